"""
Reinforcement learning on GSM8K, GRPO-style: on-policy, the paper's eq. 6.

    state source:  the current policy: its own sampled answers
    signal source: a scalar reward: 1 if the answer is right (eval's flexible answer,
                   numerically), else 0

    ∇J(θ) = E_{x ~ D, y_1..G ~ π_θ(·|x)} (1/T) Σ_i Σ_t A_i ∇ log π_θ(y_i,t | x, y_i,<t),
    A_i = r_i - mean_j r_j                                                              (eq. 6)

Each step samples --group_size answers to each of its questions (collect_states), scores them,
and applies the policy gradient above to them (apply_reward). T counts the answer tokens of the
step.

What it is: REINFORCE with a per-question baseline (the group's mean reward, as GRPO computes
it), the loss averaged over tokens rather than per answer (as DAPO and nanochat do), log-probs
taken at the sampling temperature. Questions whose answers all score the same carry no signal and
are skipped (their fraction is logged). What it is not: DeepSeek's full GRPO recipe. There is no
KL penalty to a reference model unless --kl_coef > 0 (then the k3 estimator), no division of the
advantage by the group's std unless --std_adv, and no importance ratio or clipping, because each
batch is used for exactly one update: with --ppo_epochs > 1 the batch is reused and PPO's clipped
ratio comes in. No value network.

    python train_rl.py                                     # the main job, on one GPU
    torchrun --standalone --nproc_per_node=4 train_rl.py   # DDP: 4x the questions per step
"""
import torch

# The method's pieces: the task and the state lens, the model's log-probs, the sampler
from eval import GSM8K_STOP_STRINGS, gsm8k_prompt, gsm8k_reward, load_gsm8k, state_nll
from model import completion_logprobs
from sample import rollout
# The machinery: sums over GPUs; flags, set-up, the update, logs, eval, checkpoints
from harness.parallel import gathered, global_rows, micro_batches, tokens_per_rank
from harness.training import (MetricsLog, autocast, batch_at, finish, nonnegative_float,
                              optimizer_step, periodic_eval, positive_float, positive_int,
                              save_when_due, setup, starting_model, step_seed, training_args,
                              training_run)


def get_args(argv=None):
    parser = training_args(__doc__.strip().split("\n")[0], steps=200, batch_size=1,
                           grad_accum=16, lr=2e-6, eval_every=50, save_every=50)
    a = parser.add_argument
    a("--group_size", type=positive_int, default=8,
      help="answers sampled per question (at least 2; --batch_size counts questions)")
    a("--temperature", type=positive_float, default=1.0,
      help="sampling temperature; log-probs are taken at it too")
    a("--std_adv", action="store_true",
      help="divide each advantage by its group's reward std (GRPO's z-score)")
    a("--kl_coef", type=nonnegative_float, default=0.0,
      help="weight of a k3 KL penalty to the frozen starting model (0: none)")
    a("--ppo_epochs", type=positive_int, default=1,
      help="updates per batch of rollouts; above 1, PPO's clipped ratio")
    a("--clip_eps", type=positive_float, default=0.2, help="PPO clip range for --ppo_epochs > 1")
    args = parser.parse_args(argv)
    if args.group_size < 2:  # the baseline is the group's mean: a lone answer's advantage is 0
        parser.error(f"--group_size {args.group_size}: must be at least 2 (the baseline is the "
                     "group's mean reward, so a group of one never learns)")
    return args


def collect_states(model, tokenizer, questions, step, args, dtype):
    """Sample --group_size answers per question from the current model and score them."""
    # prompts: token ids of "Question: {q}\nAnswer:", each repeated --group_size times
    prompts = tokenizer.encode_batch([gsm8k_prompt(q["question"]) for q in questions])
    prompts = [p for p in prompts for _ in range(args.group_size)]  # each one group_size times
    with autocast(model.device, dtype), gathered(model):  # FSDP: whole weights while sampling
        answers = rollout(model=model, tokenizer=tokenizer, prompts=prompts,
                          max_new_tokens=args.max_new_tokens, temperature=args.temperature,
                          seed=step_seed(args.seed, step), stop_strings=GSM8K_STOP_STRINGS,
                          batch_size=args.gen_batch_size, rows=global_rows(len(prompts)))
    # The reward: 1.0 for a right final answer (eval's flexible extraction), else 0.0
    golds = [q["gold"] for q in questions for _ in range(args.group_size)]
    rewards = [gsm8k_reward(tokenizer.decode(a), gold) for a, gold in zip(answers, golds)]
    return dict(seqs=[p + a for p, a in zip(prompts, answers)], starts=[len(p) for p in prompts],
                rewards=torch.tensor(rewards).view(len(questions), args.group_size))


def group_advantages(rewards, std_adv=False):
    """rewards (questions, group) -> advantages (reward minus its group's mean, optionally over
    its std) and the mask of groups whose rewards differ: the others have all-zero advantages and
    are skipped."""
    advantages = rewards - rewards.mean(1, keepdim=True)
    std = rewards.std(1, keepdim=True)
    if std_adv:
        advantages = advantages / std.clamp(min=1e-6)
    return advantages, std.squeeze(1) > 0


def k3_kl(logprobs, ref_logprobs):
    """The k3 estimate of KL(π || π_ref) at each sampled token (B, L): exp(r) - r - 1 with r =
    log π_ref - log π. Its mean over π's samples is the KL (unbiased) and it is never negative; as
    a loss on π's samples its gradient is that of KL(π_ref || π), as in GRPO."""
    r = ref_logprobs - logprobs
    return torch.exp(r) - r - 1


def policy_loss(logprobs, old_logprobs, advantages, mask, n_tokens, clip_eps, ref_logprobs=None,
                kl_coef=0.0):
    """Eq. 6 as a loss over tokens (B, L). With old_logprobs = logprobs.detach() the ratio is 1
    and its gradient is exactly -A ∇log π; PPO's clip only acts when a batch is reused. Optional
    KL penalty to ref_logprobs' model, k3_kl weighted by kl_coef. Returns (loss, the KL
    estimate), each a mean over n_tokens."""
    ratio = torch.exp(logprobs - old_logprobs)
    adv = advantages[:, None]
    per_token = -torch.min(ratio * adv, ratio.clamp(1 - clip_eps, 1 + clip_eps) * adv)
    kl = torch.zeros_like(logprobs) if ref_logprobs is None else k3_kl(logprobs, ref_logprobs)
    loss = ((per_token + kl_coef * kl) * mask).sum() / n_tokens
    return loss, (kl.detach() * mask).sum() / n_tokens


def apply_reward(model, ref_model, batch, args, dtype, n_real_tokens=None):
    """Backpropagate the policy gradient (eq. 6) on this step's scored rollouts, --batch_size
    questions (x --group_size answers) per micro-batch; the caller's optimizer_step applies it.
    Log-probs are over the first n_real_tokens tokens, those the sampler draws from. The first
    pass over a batch keeps its log-probs in it (the policy that sampled it, and the reference
    model's): a second pass (--ppo_epochs) computes its PPO ratio against them. Returns the
    step's figures, the loss first."""
    # Advantages (questions, group) -> one per answer; drop the answers of groups whose rewards
    # are all equal (their advantages are 0): seqs, starts and advantages (n_kept,) line up.
    advantages, keep = group_advantages(batch["rewards"], args.std_adv)
    kept = keep.repeat_interleave(args.group_size)
    seqs = [seq for seq, k in zip(batch["seqs"], kept) if k]
    starts = [start for start, k in zip(batch["starts"], kept) if k]
    advantages = advantages.flatten()[kept]
    # The loss divides by the answer tokens of the step on all GPUs: a mean over tokens
    n_tokens = sum(len(s) - st for s, st in zip(seqs, starts))
    norm = tokens_per_rank(n_tokens)
    micro = args.batch_size * args.group_size
    old_logprobs = batch.setdefault("old_logprobs", {})  # micro-batch index -> (micro, L)
    ref_logprobs = batch.setdefault("ref_logprobs", {})
    loss_sum = kl_sum = nll_sum = 0.0
    for i in micro_batches(model, len(seqs), micro):  # gradients sync over GPUs in the last
        mb_seqs, mb_starts = seqs[i:i + micro], starts[i:i + micro]
        with autocast(model.device, dtype):
            # log π_θ of each sampled answer token at the sampling temperature: (micro, L),
            # mask (micro, L) marks the answer tokens (not the padding after short answers)
            logprobs, mask = completion_logprobs(model, mb_seqs, mb_starts,
                                                 temperature=args.temperature,
                                                 n_real_tokens=n_real_tokens)
            # On the first pass the current policy is the one that sampled the batch
            old_logprobs.setdefault(i, logprobs.detach())
            if ref_model is not None and i not in ref_logprobs:  # for the k3 KL penalty
                with torch.no_grad():
                    ref_logprobs[i], _ = completion_logprobs(ref_model, mb_seqs, mb_starts,
                                                             temperature=args.temperature,
                                                             n_real_tokens=n_real_tokens)
            # The per-token loss -A log π (with PPO's clip on a reused batch, and the KL term),
            # summed over the micro-batch's tokens and divided by the step's: a scalar
            loss, kl = policy_loss(logprobs=logprobs, old_logprobs=old_logprobs[i],
                                   advantages=advantages[i:i + micro].to(logprobs.device),
                                   mask=mask, n_tokens=norm, clip_eps=args.clip_eps,
                                   ref_logprobs=ref_logprobs.get(i), kl_coef=args.kl_coef)
        loss.backward()  # gradients add up over micro-batches
        loss_sum += loss.item()
        kl_sum += kl.item()
        nll_sum += state_nll(logprobs, mask) * mask.sum().item() / n_tokens
    # The figures: rewards of all answers, including the skipped groups'
    rewards = batch["rewards"]
    lengths = [len(s) - st for s, st in zip(batch["seqs"], batch["starts"])]
    figures = dict(loss=loss_sum, reward=rewards.mean().item(),
                   pass_rate=(rewards.max(1).values > 0).float().mean().item(),  # any right
                   zero_var_frac=1 - keep.float().mean().item(),
                   response_len=sum(lengths) / len(lengths),  # and the share cut off at the limit:
                   truncated_frac=sum(n >= args.max_new_tokens for n in lengths) / len(lengths))
    if seqs:  # the mean -log π of the sampled tokens: a one-sample entropy estimate, and the
        figures.update(entropy=nll_sum, state_nll=nll_sum)  # state NLL of the learner's states
    if seqs and ref_model is not None:
        figures["kl"] = kl_sum
    return figures


@training_run  # harness/faults.py: SIGINT, SIGTERM end it in one line; the lock goes
def main(argv=None):
    # Set-up: flags, the --out_dir guard, model + tokenizer + AdamW (as --resume's checkpoint left
    # them, if it is given), the training questions
    args = get_args(argv)
    model, tokenizer, optimizer, device, dtype, first_step = setup(args)
    # the frozen starting model: one copy, shared with the periodic kl_to_start
    ref_model = starting_model(args, model.device, dtype) if args.kl_coef > 0 else None
    train = load_gsm8k("train", args.data_dir)
    questions_per_step = args.batch_size * args.grad_accum
    metrics = MetricsLog(args.out_dir, args.steps, first_step, args=args)
    print(f"{args.steps} steps of {questions_per_step} questions x {args.group_size} answers "
          "per GPU")
    if first_step == 0:  # a fresh run is evaluated before its first step
        periodic_eval(0, model, tokenizer, metrics, args, dtype)
    for step in range(first_step, args.steps):
        # This step's questions: its slice of a seeded shuffle of the train split
        questions = batch_at(train, step=step, n=questions_per_step, seed=args.seed)
        # The states: the learner's own answers, sampled now, with their rewards
        batch = collect_states(model=model, tokenizer=tokenizer, questions=questions, step=step,
                               args=args, dtype=dtype)
        # The signal: the reward, as a policy gradient; above one --ppo_epochs, the same batch
        # is reused for more updates, each one pass of apply_reward and one optimizer step
        for _ in range(args.ppo_epochs):
            figures = apply_reward(model=model, ref_model=ref_model, batch=batch, args=args,
                                   dtype=dtype, n_real_tokens=tokenizer.n_real_tokens)
            # The update: gradients averaged over GPUs, clipped, AdamW at this step's rate
            lr, grad_norm = optimizer_step(optimizer, step, args, figures["loss"])
        # Log the step, evaluate every --eval_every steps, checkpoint every --save_every
        metrics.log(step + 1, **figures, lr=lr, grad_norm=grad_norm,
                    tokens=sum(map(len, batch["seqs"])))
        periodic_eval(step + 1, model, tokenizer, metrics, args, dtype)
        save_when_due(args, model, optimizer, step + 1)  # and at SIGTERM's stop
    finish(model, tokenizer, args.out_dir, base_model=args.model)


if __name__ == "__main__":
    main()
