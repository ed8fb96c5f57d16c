"""
The teacher of on-policy distillation (train_distill.py): loaded frozen, sharing the student's
vocabulary, and measured. The paper's condition for a student to surpass a degraded teacher (P3)
is that the teacher fails in *which states it visits* while its *local guidance on the student's
states* stays good. These figures put that guidance into numbers, at every training step, on the
very states the signal is applied to:

    signal_answered  (--signal continuation) the share of states whose text, the student's prefix
                     followed by the teacher's continuation, reaches a final answer ('#### N')
    signal_correct   the share of those answers that are right, scored as the RL reward scores an
                     answer (eval's flexible extraction, compared numerically)
    signal_nll       the student's NLL (temperature 1) of the teacher's tokens: of its continuation
                     tokens, or for the KL signals of its greedy token at each state. How far the
                     signal is from what the learner would write itself
    teacher_nll      (--signal continuation) the teacher's own NLL of its continuation tokens: how
                     sure it is of them (its entropy, estimated from its samples)
"""
import torch

from cli import fail
from eval import GSM8K_STRICT, gsm8k_reward
from model import Qwen3, Tokenizer, in_row_chunks


def load_teacher(args, student, student_tokenizer, device, dtype):
    """The frozen teacher, in the compute dtype. Distillation compares the two models token by
    token, so they must share one vocabulary: anything else is an error, not a silent mismatch."""
    try:
        teacher_tokenizer = Tokenizer.from_pretrained(args.teacher)
        teacher = Qwen3.from_pretrained(args.teacher, device=device, dtype=dtype)
    except (FileNotFoundError, ValueError) as e:  # bad input: one line naming the flag
        fail(f"--teacher: {e}")
    teacher.requires_grad_(False)
    teacher_vocab = teacher_tokenizer.tok.get_vocab(True)  # with the added tokens
    if teacher_vocab != student_tokenizer.tok.get_vocab(True):
        fail(f"--teacher {args.teacher}: its tokenizer differs from the student's "
             f"({args.model}); distillation compares the models token by token, so they must "
             "share one tokenizer")
    if teacher.config.vocab_size != student.config.vocab_size:
        fail(f"--teacher {args.teacher}: vocab_size {teacher.config.vocab_size} differs from "
             f"the student's {student.config.vocab_size}")
    return teacher


def continuation_quality(tokenizer, states, continuations, golds) -> dict:
    """signal_answered and signal_correct of a step's continuations. states: (prompt ids, prefix
    ids) pairs; continuations: the teacher's ids after each; golds: each state's gold answer."""
    texts = [tokenizer.decode(prefix + continuation)
             for (_, prefix), continuation in zip(states, continuations)]
    answered = [GSM8K_STRICT.search(text) is not None for text in texts]
    correct = [gsm8k_reward(text, gold) == 1.0
               for text, gold, done in zip(texts, golds, answered) if done]
    return dict(signal_answered=sum(answered) / max(1, len(texts)),
                signal_correct=sum(correct) / max(1, len(correct)))


def greedy_token_nll_sum(student, student_rows, teacher, teacher_rows, n_real_tokens=None):
    """Σ over rows of the student's NLL (temperature 1) of the token the teacher finds most likely
    there: student_rows and teacher_rows (n, hidden) are the two models' states at the same n
    positions (model.py's in_row_chunks: never a full (n, vocab) tensor per model in memory)."""
    student_head = student.lm_head.weight[:n_real_tokens]
    teacher_head = teacher.lm_head.weight[:n_real_tokens]

    def nll_of(student_rows, teacher_rows):  # (n, hidden) each -> (n,)
        greedy = (teacher_rows @ teacher_head.t()).argmax(-1)  # the teacher's token (n,)
        logprobs = (student_rows @ student_head.t()).float().log_softmax(-1)
        return -logprobs.gather(-1, greedy[:, None]).squeeze(-1)
    with torch.no_grad():
        return in_row_chunks(nll_of, student_rows, teacher_rows).sum().item()
