"""
Supervised fine-tuning on GSM8K: off-policy state fitting (the paper's eq. 5).

    state source:  the dataset: the question and a prefix of its gold solution
    signal source: the gold next token

    L(θ) = - E_{(x, y) ~ D} (1/|y|) Σ_t log π_θ(y_t | x, y_<t)                                 (eq. 5)

x is the plain prompt "Question: {q}\nAnswer:" (eval's GSM8K prompt, no chat template) and y the gold
solution after a space, its "#### N" line included, then EOS. Only y's tokens carry loss, averaged over
all the answer tokens of a step. Each step builds its states (collect_states) and fits the next tokens
at them (fit_states).

--states self keeps the objective and changes the states: the learner samples --samples_per_question
answers to each question, the correct ones are kept, and fit_states trains on those (rejection-sampling
fine-tuning, a.k.a. RFT / STaR). Same loss, states from the learner: the paper's point, runnable.

Presets (the paper's Table 2, Qwen3-0.6B-Base):
    --preset stress  5 epochs, lr 5e-4, LoRA rank 64 / alpha 128: the paper's stress SFT, which forgets.
    --preset mild    1 epoch, lr 1e-4, the same LoRA: a fifth of the epochs at a fifth of the lr, so the
                     model learns the solution format and "#### N" line (that is most of the GSM8K gain for
                     a base model) while its weights move too little to forget much. Only these two
                     numbers separate the presets, so the comparison is about how hard the model is pushed.
Both use 32 sequences a step (8 x 4 micro-batches): 234 steps an epoch.

    python train_sft.py --preset mild --out_dir out/sft_mild
    python train_sft.py --preset stress --out_dir out/sft_stress
    python train_sft.py --states self --out_dir out/rft
    torchrun --standalone --nproc_per_node=2 train_sft.py --preset mild    # DDP: same script
"""
import argparse
import math

from eval import (GSM8K_STOP_STRINGS, MetricsLog, batch_at, eval_and_checkpoint, gsm8k_prompt, gsm8k_reward,
                  load_gsm8k, rollout, tokens_per_rank)
from cli import nonnegative_float, positive_float, positive_int
from model import autocast, completion_logprobs, finish, optimizer_step, rank_and_world, setup, training_args
from train_common import check_training_args, load_checkpoint, prepare_out_dir, resolve_warmup

PRESETS = {
    "mild": dict(epochs=1, lr=1e-4, lora_rank=64, lora_alpha=128),
    "stress": dict(epochs=5, lr=5e-4, lora_rank=64, lora_alpha=128),
}


def get_args(argv=None):
    parser = training_args(__doc__.strip().split("\n")[0], steps=None, eval_every=100, save_every=100)
    parser.add_argument("--preset", default="mild", choices=PRESETS,
                        help="defaults for --epochs, --lr, --lora_rank, --lora_alpha (flags given explicitly win)")
    parser.add_argument("--epochs", type=positive_float, help="passes over GSM8K train; sets --steps unless --steps is given")
    parser.add_argument("--states", default="dataset", choices=("dataset", "self"),
                        help="dataset: gold solutions (SFT); self: the learner's own correct samples (RFT)")
    parser.add_argument("--samples_per_question", type=positive_int, default=4,
                        help="--states self: answers sampled per question")
    parser.add_argument("--max_new_tokens", type=positive_int, default=256, help="--states self: longest sampled answer")
    parser.add_argument("--temperature", type=nonnegative_float, default=1.0, help="--states self: sampling temperature")
    # The preset sets the defaults, so that --help shows them and any explicit flag still overrides them
    preset = argparse.ArgumentParser(add_help=False)
    preset.add_argument("--preset", default="mild")
    parser.set_defaults(**PRESETS.get(preset.parse_known_args(argv)[0].preset, {}))
    args = parser.parse_args(argv)
    check_training_args(parser, args)
    if args.states == "self" and args.samples_per_question > 1 and args.temperature == 0:
        parser.error("--temperature 0 with --samples_per_question above 1: greedy samples of one question are "
                     "all the same; sample at a temperature above 0")
    return args


def collect_states(model, tokenizer, questions, step, args, dtype):
    """The states this step fits, as token sequences (prompt + answer) and where each answer starts."""
    prompts = [tokenizer.encode(gsm8k_prompt(q["question"])) for q in questions]
    if args.states == "dataset":  # the gold solution after "Answer:", then EOS: the model learns to stop
        answers = [tokenizer.encode(" " + q["answer"]) + [tokenizer.eos_id] for q in questions]
    else:  # the learner's own answers, kept where they are right
        prompts = [p for p in prompts for _ in range(args.samples_per_question)]
        golds = [q["gold"] for q in questions for _ in range(args.samples_per_question)]
        with autocast(model.device, dtype):
            samples = rollout(model, tokenizer, prompts, args.max_new_tokens, args.temperature,
                              args.seed * 1_000_003 + step, GSM8K_STOP_STRINGS)
        correct = [gsm8k_reward(tokenizer.decode(s), gold) == 1.0 for s, gold in zip(samples, golds)]
        prompts, answers = [p for p, c in zip(prompts, correct) if c], [s for s, c in zip(samples, correct) if c]
    return [p + a for p, a in zip(prompts, answers)], [len(p) for p in prompts]


def fit_states(model, seqs, starts, args, dtype, vocab_limit=None):
    """Backpropagate eq. 5 on these states, --batch_size sequences at a time: the NLL of the answer tokens,
    averaged over all of the step's answer tokens (so --grad_accum only trades memory for time).
    Returns this GPU's mean NLL: the loss, and also the state NLL, since the answers are the states here."""
    n_tokens = sum(len(s) - st for s, st in zip(seqs, starts))
    norm, nll_sum = tokens_per_rank(n_tokens), 0.0  # the loss is a mean over the step's tokens on all GPUs
    for i in range(0, len(seqs), args.batch_size):
        with autocast(model.device, dtype):
            logprobs, mask = completion_logprobs(model, seqs[i:i + args.batch_size], starts[i:i + args.batch_size],
                                                 vocab_limit=vocab_limit)
            nll = -(logprobs * mask).sum()
        (nll / norm).backward()
        nll_sum += nll.item()
    return nll_sum / max(n_tokens, 1)


def main(argv=None):
    args = get_args(argv)
    prepare_out_dir(args)  # before anything loads: an earlier run there is refused, the folder is writable
    model, tokenizer, optimizer, device, dtype = setup(args)
    train = load_gsm8k("train", args.data_dir)
    questions_per_step = args.batch_size * args.grad_accum
    if args.steps is None:
        args.steps = math.ceil(args.epochs * len(train) / (questions_per_step * rank_and_world()[1]))
        resolve_warmup(args, f"{args.steps} steps for --epochs {args.epochs}")
    start = load_checkpoint(args.out_dir, model, optimizer) if args.resume else 0
    metrics = MetricsLog(args.out_dir, args.steps, start)
    print(f"{args.states} states, {args.steps} steps of {questions_per_step} questions per GPU, "
          f"{sum(p.numel() for p in model.parameters() if p.requires_grad):,} trainable parameters")
    if start == 0:
        eval_and_checkpoint(0, model, tokenizer, optimizer, metrics, args, dtype)
    for step in range(start, args.steps):
        questions = batch_at(train, step, questions_per_step, args.seed)
        seqs, starts = collect_states(model, tokenizer, questions, step, args, dtype)
        loss = fit_states(model, seqs, starts, args, dtype, tokenizer.n_real_tokens)
        lr, grad_norm = optimizer_step(optimizer, step, args, loss)
        figures = dict(loss=loss, state_nll=loss, lr=lr, grad_norm=grad_norm,
                       answer_len=sum(len(s) - st for s, st in zip(seqs, starts)) / max(1, len(seqs)))
        if args.states == "self":
            figures["kept_fraction"] = len(seqs) / (len(questions) * args.samples_per_question)
        metrics.log(step + 1, **figures, tokens=sum(map(len, seqs)))
        eval_and_checkpoint(step + 1, model, tokenizer, optimizer, metrics, args, dtype)
    finish(model, tokenizer, args.out_dir)


if __name__ == "__main__":
    main()
