"""
On-policy distillation (OPD) on GSM8K questions: the paper's eq. 7.

    state source:  the student: prefixes of its own sampled answers (--states teacher: of the teacher's,
                   which is off-policy, offline distillation)
    signal source: the teacher

Each step samples answers (collect_states) and applies the teacher's signal at the states they pass
through (apply_teacher). Three signals, run on the same states so that they can be compared:

  --signal continuation (default; the paper's working variant): cut each answer at --states_per_rollout
      random prefix states s, let the teacher write --continuation_tokens tokens c from each, fit them:
          L(θ) = - E_s E_{c ~ π_T(·|s)} (1/T) Σ_k log π_θ(c_k | s, c_<k)                          (eq. 7)
  --signal token_kl: the per-token reverse KL on the student's sampled tokens, as a policy gradient
      (Thinking Machines' on-policy distillation):
          A_t = -(log π_θ(y_t | s_t) - log π_T(y_t | s_t)),     L = -(1/T) Σ_t sg(A_t) log π_θ(y_t | s_t)
  --signal full_kl: the exact KL over the whole vocabulary at every state (GKD-style):
          L = (1/T) Σ_t KL(π_θ(·|s_t) || π_T(·|s_t)),   or KL(π_T || π_θ) with --kl_direction forward
T counts the tokens that carry the signal in the step. The paper reports that the one-step next-token
KL signals collapsed where continuations worked.

    python train_distill.py --teacher out/sft_stress --out_dir out/opd     # student: --model (the base)
    python train_distill.py --teacher out/sft_stress --states teacher --out_dir out/offline_distill
"""
import random

import torch

from eval import (GSM8K_STOP_STRINGS, MetricsLog, batch_at, eval_and_checkpoint, gsm8k_prompt, load_gsm8k, rollout,
                  state_nll, tokens_per_rank)
from cli import positive_float, positive_int
from model import (Qwen3, Tokenizer, autocast, completion_logprobs, finish, in_row_chunks, optimizer_step, setup,
                   training_args)
from train_common import check_training_args, load_checkpoint, prepare_out_dir


def get_args(argv=None):
    parser = training_args(__doc__.strip().split("\n")[0], steps=200, batch_size=2, grad_accum=8, lr=1e-5,
                           eval_every=50, save_every=50)
    a = parser.add_argument
    a("--teacher", required=True, help="teacher model folder or hub id; it must share the student's tokenizer")
    a("--signal", default="continuation", choices=("continuation", "token_kl", "full_kl"), help="see above")
    a("--states", default="student", choices=("student", "teacher"),
      help="whose sampled answers give the states: student (on-policy) or teacher (off-policy)")
    a("--kl_direction", default="reverse", choices=("reverse", "forward"),
      help="--signal full_kl: reverse KL(student || teacher) or forward KL(teacher || student)")
    a("--max_new_tokens", type=positive_int, default=256, help="longest sampled answer")
    a("--states_per_rollout", type=positive_int, default=4, help="--signal continuation: prefix states cut from each answer")
    a("--continuation_tokens", type=positive_int, default=32, help="--signal continuation: tokens the teacher writes per state")
    a("--temperature", type=positive_float, default=1.0, help="sampling temperature, also of the distributions compared")
    a("--gen_batch_size", type=positive_int, default=128, help="sequences sampled at once (memory: the KV cache)")
    args = parser.parse_args(argv)
    check_training_args(parser, args)
    if args.signal == "token_kl" and args.states == "teacher":  # a policy gradient needs the student's samples
        parser.error("--signal token_kl needs --states student; use full_kl or continuation on teacher states")
    return args


def load_teacher(args, student, student_tokenizer, device, dtype):
    """The frozen teacher, in the compute dtype. Distillation compares the two models token by token, so
    they must share one vocabulary: anything else is an error, not a silent mismatch."""
    try:
        teacher_tokenizer = Tokenizer.from_pretrained(args.teacher)
        teacher = Qwen3.from_pretrained(args.teacher, device=device, dtype=dtype).requires_grad_(False)
    except (FileNotFoundError, ValueError) as e:  # bad input: one line naming the flag, no traceback
        raise SystemExit(f"--teacher: {e}")
    if teacher_tokenizer.tok.get_vocab(True) != student_tokenizer.tok.get_vocab(True):  # with added tokens
        raise SystemExit(f"--teacher {args.teacher}: its tokenizer differs from the student's ({args.model}); "
                         "distillation compares the models token by token, so they must share one tokenizer")
    if teacher.config.vocab_size != student.config.vocab_size:
        raise SystemExit(f"--teacher {args.teacher}: vocab_size {teacher.config.vocab_size} differs from the "
                         f"student's {student.config.vocab_size}")
    return teacher


def collect_states(student, teacher, tokenizer, questions, step, args, dtype):
    """Sample answers (from the student, or with --states teacher from the teacher) and turn them into
    training sequences: token ids, where the answer starts, where the signal starts."""
    seed = 2 * (args.seed * 1_000_003 + step)
    prompts = [tokenizer.encode(gsm8k_prompt(q["question"])) for q in questions]
    with autocast(student.device, dtype):
        answers = rollout(student if args.states == "student" else teacher, tokenizer, prompts, args.max_new_tokens,
                          args.temperature, seed, GSM8K_STOP_STRINGS, args.gen_batch_size)
    answer_len = sum(map(len, answers)) / len(answers)
    if args.signal != "continuation":  # the KL signals act at every state of the answer
        return dict(seqs=[p + a for p, a in zip(prompts, answers)], starts=[len(p) for p in prompts],
                    signal_starts=[len(p) for p in prompts], answer_len=answer_len)
    rng, states = random.Random(seed), []
    for prompt, answer in zip(prompts, answers):  # a state: the prompt and the first `cut` answer tokens
        cuts = sorted(rng.sample(range(len(answer)), min(args.states_per_rollout, len(answer))))
        states += [(prompt, answer[:cut]) for cut in cuts]
    with autocast(student.device, dtype):
        continuations = rollout(teacher, tokenizer, [p + s for p, s in states], args.continuation_tokens,
                                args.temperature, seed + 1, GSM8K_STOP_STRINGS, args.gen_batch_size)
    return dict(seqs=[p + s + c for (p, s), c in zip(states, continuations)], starts=[len(p) for p, _ in states],
                signal_starts=[len(p) + len(s) for p, s in states], answer_len=answer_len)


def token_kl_loss(logprobs, teacher_logprobs, mask, n_tokens):
    """Reverse KL on sampled tokens as a policy gradient: advantage -(log π_θ - log π_T), held constant.
    Its gradient, -sg(A) ∇log π_θ, is in expectation the gradient of the per-token KL(π_θ || π_T) at the
    sampled states (held fixed: no reward-to-go). It needs the student's own samples (--states student)."""
    advantage = -(logprobs.detach() - teacher_logprobs)
    return -(advantage * logprobs * mask).sum() / n_tokens


def full_kl_sum(student, student_rows, teacher, teacher_rows, forward, temperature, vocab_limit=None):
    """Σ over rows of the exact KL between the two next-token distributions (model.py's in_row_chunks:
    never a full (rows, vocab) tensor per model in memory)."""
    student_head, teacher_head = student.lm_head.weight[:vocab_limit], teacher.lm_head.weight[:vocab_limit]

    def kl_of(student_rows, teacher_rows):
        s = ((student_rows @ student_head.t()).float() / temperature).log_softmax(-1)
        t = ((teacher_rows @ teacher_head.t()).float() / temperature).log_softmax(-1)
        p, q = (t, s) if forward else (s, t)
        return (p.exp() * (p - q)).sum(-1)
    return in_row_chunks(kl_of, student_rows, teacher_rows).sum()


def apply_teacher(student, teacher, optimizer, batch, step, args, dtype, vocab_limit=None):
    """Backpropagate the teacher's signal on this step's sequences, micro-batch by micro-batch, then update.
    Distributions are over the first vocab_limit tokens, those the sampler draws from."""
    seqs, starts, signal_starts = batch["seqs"], batch["starts"], batch["signal_starts"]
    n_signal = tokens_per_rank(sum(len(s) - st for s, st in zip(seqs, signal_starts)))  # over all GPUs
    micro = args.batch_size * (args.states_per_rollout if args.signal == "continuation" else 1)
    loss_sum = kl_sum = nll_sum = n_state = 0.0
    for i in range(0, len(seqs), micro):
        mb_seqs, mb_starts = seqs[i:i + micro], starts[i:i + micro]
        with autocast(student.device, dtype):
            logprobs, mask, rows = completion_logprobs(student, mb_seqs, mb_starts, args.temperature, vocab_limit,
                                                       return_hidden=True)
            # columns of the answer part: state tokens first, then the tokens that carry the signal
            offset = torch.tensor([s - st for s, st in zip(signal_starts[i:i + micro], mb_starts)], device=mask.device)
            is_signal = torch.arange(mask.shape[1], device=mask.device) >= offset[:, None]
            signal, state = mask & is_signal, (mask & ~is_signal if args.signal == "continuation" else mask)
            if args.signal == "continuation":  # the teacher's tokens are the targets: plain cross-entropy
                loss, kl = -(logprobs * signal).sum() / n_signal, torch.zeros(())
            else:
                with torch.no_grad():
                    teacher_logprobs, _, teacher_rows = completion_logprobs(
                        teacher, mb_seqs, mb_starts, args.temperature, vocab_limit, return_hidden=True)
                if args.signal == "token_kl":
                    loss = token_kl_loss(logprobs, teacher_logprobs, signal, n_signal)
                    kl = ((logprobs.detach() - teacher_logprobs) * signal).sum() / n_signal  # sampled estimate
                else:
                    loss = full_kl_sum(student, rows, teacher, teacher_rows, args.kl_direction == "forward",
                                       args.temperature, vocab_limit) / n_signal
                    kl = loss.detach()
        loss.backward()
        loss_sum += loss.item()
        kl_sum += kl.item()
        nll_sum, n_state = nll_sum + state_nll(logprobs, state) * state.sum().item(), n_state + state.sum().item()
    lr, grad_norm = optimizer_step(optimizer, step, args, loss_sum)
    figures = dict(loss=loss_sum, lr=lr, grad_norm=grad_norm, state_nll=nll_sum / max(1, n_state),
                   answer_len=batch["answer_len"])
    return figures if args.signal == "continuation" else {**figures, "kl": kl_sum}


def main(argv=None):
    args = get_args(argv)
    prepare_out_dir(args)  # before anything loads: an earlier run there is refused, the folder is writable
    student, tokenizer, optimizer, device, dtype = setup(args)
    teacher = load_teacher(args, student, tokenizer, device, dtype)
    train = load_gsm8k("train", args.data_dir)
    questions_per_step = args.batch_size * args.grad_accum
    start = load_checkpoint(args.out_dir, student, optimizer) if args.resume else 0
    metrics = MetricsLog(args.out_dir, args.steps, start)
    print(f"{args.signal} signal on {args.states} states: {args.steps} steps of {questions_per_step} questions per GPU")
    if start == 0:
        eval_and_checkpoint(0, student, tokenizer, optimizer, metrics, args, dtype)
    for step in range(start, args.steps):
        questions = batch_at(train, step, questions_per_step, args.seed)
        batch = collect_states(student, teacher, tokenizer, questions, step, args, dtype)
        figures = apply_teacher(student, teacher, optimizer, batch, step, args, dtype, tokenizer.n_real_tokens)
        metrics.log(step + 1, **figures, tokens=sum(map(len, batch["seqs"])))
        eval_and_checkpoint(step + 1, student, tokenizer, optimizer, metrics, args, dtype)
    finish(student, tokenizer, args.out_dir)


if __name__ == "__main__":
    main()
