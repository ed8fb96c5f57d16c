"""
Reinforcement learning on GSM8K, GRPO-style: on-policy, the paper's eq. 6.

    state source:  the current policy: its own sampled answers
    signal source: a scalar reward: 1 if the answer is right (eval's flexible answer, numerically), else 0

    ∇J(θ) = E_{x ~ D, y_1..G ~ π_θ(·|x)} (1/T) Σ_i Σ_t A_i ∇ log π_θ(y_i,t | x, y_i,<t),
    A_i = r_i - mean_j r_j                                                                      (eq. 6)

Each step samples --group_size answers to each of its questions (collect_states), scores them, and
applies the policy gradient above to them (apply_reward). T counts the answer tokens of the step.

What it is: REINFORCE with a per-question baseline (the group's mean reward, as GRPO computes it), the
loss averaged over tokens rather than per answer (as DAPO and nanochat do), log-probs taken at the
sampling temperature. Questions whose answers all score the same carry no signal and are skipped (their
fraction is logged). What it is not: DeepSeek's full GRPO recipe. There is no KL penalty to a reference
model unless --kl_coef > 0 (then the k3 estimator), no division of the advantage by the group's std
unless --std_adv, and no importance ratio or clipping, because each batch is used for exactly one
update: with --ppo_epochs > 1 the batch is reused and PPO's clipped ratio comes in. No value network.

    python train_rl.py                                     # the main job, on one GPU
    torchrun --standalone --nproc_per_node=4 train_rl.py   # DDP: same script, 4x the questions per step
"""
import torch

from eval import (GSM8K_STOP_STRINGS, MetricsLog, batch_at, eval_and_checkpoint, gsm8k_prompt, gsm8k_reward,
                  load_gsm8k, rollout, starting_model, state_nll, tokens_per_rank)
from cli import nonnegative_float, positive_float, positive_int
from model import autocast, completion_logprobs, finish, optimizer_step, setup, training_args
from train_common import check_training_args, load_checkpoint, prepare_out_dir


def get_args(argv=None):
    parser = training_args(__doc__.strip().split("\n")[0], steps=200, batch_size=1, grad_accum=16, lr=2e-6,
                           eval_every=50, save_every=50)
    a = parser.add_argument
    a("--group_size", type=positive_int, default=8, help="answers sampled per question (at least 2)")
    a("--max_new_tokens", type=positive_int, default=256, help="longest sampled answer")
    a("--temperature", type=positive_float, default=1.0, help="sampling temperature; log-probs are taken at it too")
    a("--std_adv", action="store_true", help="divide each advantage by its group's reward std (GRPO's z-score)")
    a("--kl_coef", type=nonnegative_float, default=0.0, help="weight of a k3 KL penalty to the frozen start (0: none)")
    a("--ppo_epochs", type=positive_int, default=1, help="updates per batch of rollouts; above 1, PPO's clipped ratio")
    a("--clip_eps", type=positive_float, default=0.2, help="PPO clip range for --ppo_epochs > 1")
    a("--gen_batch_size", type=positive_int, default=128, help="sequences sampled at once (memory: the KV cache)")
    args = parser.parse_args(argv)
    check_training_args(parser, args)
    if args.group_size < 2:  # the baseline is the group's mean: a lone answer's advantage is always 0
        parser.error(f"--group_size {args.group_size}: must be at least 2 (the baseline is the group's mean "
                     "reward, so a group of one never learns)")
    return args


def collect_states(model, tokenizer, questions, step, args, dtype):
    """Sample --group_size answers per question from the current model and score them."""
    prompts = [p for p in tokenizer.encode_batch([gsm8k_prompt(q["question"]) for q in questions])
               for _ in range(args.group_size)]
    with autocast(model.device, dtype):
        answers = rollout(model, tokenizer, prompts, args.max_new_tokens, args.temperature,
                          args.seed * 1_000_003 + step, GSM8K_STOP_STRINGS, args.gen_batch_size)
    golds = [q["gold"] for q in questions for _ in range(args.group_size)]
    rewards = [gsm8k_reward(tokenizer.decode(a), gold) for a, gold in zip(answers, golds)]
    return dict(seqs=[p + a for p, a in zip(prompts, answers)], starts=[len(p) for p in prompts],
                rewards=torch.tensor(rewards).view(len(questions), args.group_size))


def group_advantages(rewards, std_adv=False):
    """rewards (questions, group) -> advantages (reward minus its group's mean, optionally over its std) and
    the mask of groups whose rewards differ: the others have all-zero advantages and are skipped."""
    advantages = rewards - rewards.mean(1, keepdim=True)
    std = rewards.std(1, keepdim=True)
    if std_adv:
        advantages = advantages / std.clamp(min=1e-6)
    return advantages, std.squeeze(1) > 0


def policy_loss(logprobs, old_logprobs, advantages, mask, n_tokens, clip_eps, ref_logprobs=None, kl_coef=0.0):
    """Eq. 6 as a loss over tokens (B, L). With old_logprobs = logprobs.detach() the ratio is 1 and its
    gradient is exactly -A ∇log π; PPO's clip only acts when a batch is reused. Optional k3 KL penalty,
    exp(r) - r - 1 with r = log π_ref - log π: its value is an unbiased, never negative estimate of
    KL(π || π_ref); as a loss on π's samples its gradient is that of KL(π_ref || π), as in GRPO."""
    ratio = torch.exp(logprobs - old_logprobs)
    adv = advantages[:, None]
    per_token = -torch.min(ratio * adv, ratio.clamp(1 - clip_eps, 1 + clip_eps) * adv)
    kl = torch.zeros_like(logprobs)
    if ref_logprobs is not None:
        r = ref_logprobs - logprobs
        kl = torch.exp(r) - r - 1
    return ((per_token + kl_coef * kl) * mask).sum() / n_tokens, (kl.detach() * mask).sum() / n_tokens


def apply_reward(model, ref_model, optimizer, batch, step, args, dtype, vocab_limit=None):
    """The policy-gradient update(s) on this step's scored rollouts, --batch_size questions (x --group_size
    answers) per micro-batch; log-probs over the first vocab_limit tokens, those the sampler draws from.
    Returns the step's figures."""
    advantages, keep = group_advantages(batch["rewards"], args.std_adv)
    kept = keep.repeat_interleave(args.group_size)  # per answer: does its group carry any signal?
    seqs = [seq for seq, k in zip(batch["seqs"], kept) if k]
    starts = [start for start, k in zip(batch["starts"], kept) if k]
    advantages = advantages.flatten()[kept]
    n_tokens = sum(len(s) - st for s, st in zip(seqs, starts))
    norm = tokens_per_rank(n_tokens)  # the loss is a mean over the step's tokens on all GPUs
    micro = args.batch_size * args.group_size
    old_logprobs, ref_logprobs = {}, {}
    for epoch in range(args.ppo_epochs):
        loss_sum = kl_sum = nll_sum = 0.0
        for i in range(0, len(seqs), micro):
            mb_seqs, mb_starts = seqs[i:i + micro], starts[i:i + micro]
            with autocast(model.device, dtype):
                logprobs, mask = completion_logprobs(model, mb_seqs, mb_starts, args.temperature, vocab_limit)
                old_logprobs.setdefault(i, logprobs.detach())  # first pass: the policy that sampled the batch
                if ref_model is not None and i not in ref_logprobs:
                    with torch.no_grad():
                        ref_logprobs[i], _ = completion_logprobs(ref_model, mb_seqs, mb_starts, args.temperature,
                                                                 vocab_limit)
                loss, kl = policy_loss(logprobs, old_logprobs[i], advantages[i:i + micro].to(logprobs.device), mask,
                                       norm, args.clip_eps, ref_logprobs.get(i), args.kl_coef)
            loss.backward()
            loss_sum, kl_sum = loss_sum + loss.item(), kl_sum + kl.item()
            nll_sum += state_nll(logprobs, mask) * mask.sum().item() / n_tokens
        lr, grad_norm = optimizer_step(optimizer, step, args, loss_sum)
    rewards = batch["rewards"]
    lengths = [len(s) - st for s, st in zip(batch["seqs"], batch["starts"])]
    figures = dict(loss=loss_sum, lr=lr, grad_norm=grad_norm, reward=rewards.mean().item(),
                   pass_rate=(rewards.max(1).values > 0).float().mean().item(),  # questions with a right answer
                   zero_var_frac=1 - keep.float().mean().item(), response_len=sum(lengths) / len(lengths))
    if seqs:  # the mean -log π of the sampled tokens: a one-sample estimate of the entropy, and the state NLL
        figures.update(entropy=nll_sum, state_nll=nll_sum, **({"kl": kl_sum} if ref_model is not None else {}))
    return figures


def main(argv=None):
    args = get_args(argv)
    prepare_out_dir(args)  # before anything loads: an earlier run there is refused, the folder is writable
    model, tokenizer, optimizer, device, dtype = setup(args)
    # the frozen starting model: one copy, shared with the periodic kl_to_start
    ref_model = starting_model(args, model.device, dtype) if args.kl_coef > 0 else None
    train = load_gsm8k("train", args.data_dir)
    questions_per_step = args.batch_size * args.grad_accum
    start = load_checkpoint(args.out_dir, model, optimizer) if args.resume else 0
    metrics = MetricsLog(args.out_dir, args.steps, start)
    print(f"{args.steps} steps of {questions_per_step} questions x {args.group_size} answers per GPU")
    if start == 0:
        eval_and_checkpoint(0, model, tokenizer, optimizer, metrics, args, dtype)
    for step in range(start, args.steps):
        questions = batch_at(train, step, questions_per_step, args.seed)
        batch = collect_states(model, tokenizer, questions, step, args, dtype)
        figures = apply_reward(model, ref_model, optimizer, batch, step, args, dtype, tokenizer.n_real_tokens)
        metrics.log(step + 1, **figures, tokens=sum(map(len, batch["seqs"])))
        eval_and_checkpoint(step + 1, model, tokenizer, optimizer, metrics, args, dtype)
    finish(model, tokenizer, args.out_dir)


if __name__ == "__main__":
    main()
