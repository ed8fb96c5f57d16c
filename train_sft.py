"""
Supervised fine-tuning on GSM8K: off-policy state fitting (the paper's eq. 5).

    state source:  the dataset: the question and a prefix of its gold solution
    signal source: the gold next token

    L(θ) = - E_{(x, y) ~ D} (1/|y|) Σ_t log π_θ(y_t | x, y_<t)                           (eq. 5)

x is the plain prompt "Question: {q}\nAnswer:" (eval's GSM8K prompt, no chat template) and y the
gold solution after a space, its "#### N" line included, then EOS. Only y's tokens carry loss,
averaged over all the answer tokens of a step. Each step builds its states (collect_states) and
fits the next tokens at them (fit_states).

--states self keeps the objective and changes the states: the learner samples
--samples_per_question answers to each question, the correct ones are kept, and fit_states trains
on those (rejection-sampling fine-tuning, a.k.a. RFT / STaR). Same loss, states from the learner:
the paper's point, runnable.

Presets (the paper's Table 2, Qwen3-0.6B-Base):
    --preset stress  5 epochs, lr 5e-4, LoRA rank 64 / alpha 128: the paper's stress SFT, which
                     forgets.
    --preset mild    1 epoch, lr 1e-4, the same LoRA: a fifth of the epochs at a fifth of the lr,
                     so the model learns the solution format and "#### N" line (that is most of
                     the GSM8K gain for a base model) while its weights move too little to forget
                     much. Only these two numbers separate the presets, so the comparison is
                     about how hard the model is pushed.
Both use 32 sequences a step (8 x 4 micro-batches): 234 steps an epoch.

    python train_sft.py --preset mild --out_dir out/sft_mild
    python train_sft.py --preset stress --out_dir out/sft_stress
    python train_sft.py --states self --out_dir out/rft
    torchrun --standalone --nproc_per_node=2 train_sft.py --preset mild    # DDP: same script
"""
import argparse
import math

# The method's pieces: the task, the model's log-probs, the sampler (for --states self)
from eval import GSM8K_STOP_STRINGS, gsm8k_prompt, gsm8k_reward, load_gsm8k
from model import completion_logprobs, target_nll
from sample import rollout
# The machinery: sums over GPUs; flags, set-up, the update, logs, eval, checkpoints
from harness.parallel import (gathered, global_rows, micro_batches, rank_and_world,
                              tokens_per_rank)
from harness.training import (MetricsLog, autocast, batch_at, finish, nonnegative_float,
                              optimizer_step, periodic_eval, positive_float, positive_int,
                              resolve_warmup, save_when_due, setup, step_seed, training_args,
                              training_run)

PRESETS = {"mild": dict(epochs=1, lr=1e-4, lora_rank=64, lora_alpha=128),
           "stress": dict(epochs=5, lr=5e-4, lora_rank=64, lora_alpha=128),}


def get_args(argv=None):
    parser = training_args(__doc__.strip().split("\n")[0], steps=None, eval_every=100,
                           save_every=100)
    a = parser.add_argument
    a("--preset", default="mild", choices=PRESETS,
      help="defaults for --epochs, --lr, --lora_rank, --lora_alpha (explicit flags win)")
    a("--epochs", type=positive_float,
      help="passes over GSM8K train; sets --steps unless it is given")
    a("--states", default="dataset", choices=("dataset", "self"),
      help="dataset: gold solutions (SFT); self: the learner's own correct samples (RFT)")
    a("--samples_per_question", type=positive_int, default=4,
      help="--states self: answers sampled per question")
    a("--temperature", type=nonnegative_float, default=1.0,
      help="--states self: sampling temperature")
    # The preset sets the defaults, so that --help shows them and explicit flags still win
    preset = argparse.ArgumentParser(add_help=False)
    preset.add_argument("--preset", default="mild")
    parser.set_defaults(**PRESETS.get(preset.parse_known_args(argv)[0].preset, {}))
    args = parser.parse_args(argv)
    greedy = args.temperature == 0
    if args.states == "self" and args.samples_per_question > 1 and greedy:
        parser.error("--temperature 0 with --samples_per_question above 1: greedy samples of one "
                     "question are all the same; sample at a temperature above 0")
    return args


def collect_states(model, tokenizer, questions, step, args, dtype):
    """The states this step fits, as token sequences (prompt + answer) and where each answer
    starts."""
    # prompts: token ids of "Question: {q}\nAnswer:", one list per question
    prompts = [tokenizer.encode(gsm8k_prompt(q["question"])) for q in questions]
    if args.states == "dataset":  # the gold solution after "Answer:", then EOS: it learns to stop
        answers = [tokenizer.encode(" " + q["answer"]) + [tokenizer.eos_id] for q in questions]
        return [p + a for p, a in zip(prompts, answers)], [len(p) for p in prompts]
    # --states self: the learner's own answers, kept where they are right. Each prompt is repeated
    # --samples_per_question times and sampled at this step's seed
    prompts = [p for p in prompts for _ in range(args.samples_per_question)]
    golds = [q["gold"] for q in questions for _ in range(args.samples_per_question)]
    with autocast(model.device, dtype), gathered(model):  # FSDP: whole weights while sampling
        samples = rollout(model=model, tokenizer=tokenizer, prompts=prompts,
                          max_new_tokens=args.max_new_tokens, temperature=args.temperature,
                          seed=step_seed(args.seed, step), stop_strings=GSM8K_STOP_STRINGS,
                          batch_size=args.gen_batch_size, rows=global_rows(len(prompts)))
    # eval's grader decides which samples are right; only those become states
    correct = [gsm8k_reward(tokenizer.decode(s), gold) == 1.0 for s, gold in zip(samples, golds)]
    prompts = [p for p, right in zip(prompts, correct) if right]
    answers = [s for s, right in zip(samples, correct) if right]
    return [p + a for p, a in zip(prompts, answers)], [len(p) for p in prompts]


def fit_states(model, seqs, starts, args, dtype, n_real_tokens=None):
    """Backpropagate eq. 5 on these states, --batch_size sequences at a time: the NLL of the
    answer tokens (model.target_nll), averaged over all of the step's answer tokens (so
    --grad_accum only trades memory for time). The caller's optimizer_step applies the gradient.
    Returns this GPU's mean NLL: the loss, and also the state NLL, since the answers are the
    states here."""
    # The loss is a sum over answer tokens divided by the step's answer tokens on all GPUs:
    # the same number whatever the micro-batching and however many GPUs share the step.
    n_tokens = sum(len(s) - st for s, st in zip(seqs, starts))
    norm = tokens_per_rank(n_tokens)
    nll_sum = 0.0
    for i in micro_batches(model, len(seqs), args.batch_size):  # gradients sync in the last
        with autocast(model.device, dtype):
            # logprobs, mask (micro-batch, longest answer): log π_θ(y_t | x, y_<t) of each answer
            # token; the prompt and the padding after short answers are not in them
            logprobs, mask = completion_logprobs(model, seqs[i:i + args.batch_size],
                                                 starts[i:i + args.batch_size],
                                                 n_real_tokens=n_real_tokens)
            # The micro-batch's NLL over the step's answer tokens, a scalar: every column is a
            # target (first_target 0), the prompt being the state, outside the columns
            loss, _ = target_nll(logprobs, mask, first_target=0, n_tokens=norm)
        # Gradients add up over micro-batches: each adds its share of the step's mean
        loss.backward()
        nll_sum += loss.item() * norm
    return nll_sum / max(n_tokens, 1)


@training_run  # harness/faults.py: SIGINT, SIGTERM end it in one line; the lock goes
def main(argv=None):
    # Set-up: flags, the --out_dir guard, model + tokenizer + AdamW (as --resume's checkpoint left
    # them, if it is given), the training questions
    args = get_args(argv)
    model, tokenizer, optimizer, device, dtype, first_step = setup(args)
    train = load_gsm8k("train", args.data_dir)
    questions_per_step = args.batch_size * args.grad_accum
    if args.steps is None:  # --epochs: enough steps for that many passes over the train split
        questions_per_pass = questions_per_step * rank_and_world()[1]
        args.steps = math.ceil(args.epochs * len(train) / questions_per_pass)
        resolve_warmup(args, f"{args.steps} steps for --epochs {args.epochs}")
    metrics = MetricsLog(args.out_dir, args.steps, first_step, args=args)
    n_trained = sum(p.numel() for p in model.parameters() if p.requires_grad)
    print(f"{args.states} states, {args.steps} steps of {questions_per_step} questions per GPU, "
          f"{n_trained:,} trainable parameters")
    if first_step == 0:  # a fresh run is evaluated before its first step
        periodic_eval(0, model, tokenizer, metrics, args, dtype)
    for step in range(first_step, args.steps):
        # This step's questions: its slice of a seeded shuffle of the train split
        questions = batch_at(train, step=step, n=questions_per_step, seed=args.seed)
        # The states: gold solutions (or the learner's correct answers), as token sequences
        seqs, starts = collect_states(model=model, tokenizer=tokenizer, questions=questions,
                                      step=step, args=args, dtype=dtype)
        # The signal: the next token's NLL at every state, backpropagated
        loss = fit_states(model=model, seqs=seqs, starts=starts, args=args, dtype=dtype,
                          n_real_tokens=tokenizer.n_real_tokens)
        # The update: gradients averaged over GPUs, clipped, AdamW at this step's learning rate
        lr, grad_norm = optimizer_step(optimizer, step, args, loss)
        # Log the step, evaluate every --eval_every steps, checkpoint every --save_every
        answer_tokens = sum(len(s) - st for s, st in zip(seqs, starts))
        figures = dict(loss=loss, state_nll=loss, lr=lr, grad_norm=grad_norm,
                       answer_len=answer_tokens / max(1, len(seqs)))
        if args.states == "self":
            figures["kept_fraction"] = len(seqs) / (len(questions) * args.samples_per_question)
        metrics.log(step + 1, **figures, tokens=sum(map(len, seqs)))
        periodic_eval(step + 1, model, tokenizer, metrics, args, dtype)
        save_when_due(args, model, optimizer, step + 1)  # and at SIGTERM's stop
    finish(model, tokenizer, args.out_dir, base_model=args.model)


if __name__ == "__main__":
    main()
