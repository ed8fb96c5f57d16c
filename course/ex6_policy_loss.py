"""Exercise 6 (session 2): eq. 6, the policy gradient, as a loss over tokens.

    ∇J(θ) = (1/T) Σ_i Σ_t A_i ∇ log π_θ(y_i,t | x, y_i,<t)                              (eq. 6)

T counts the answer tokens of the whole step: a mean over tokens, as DAPO and nanochat average,
not a mean of per-answer means. The loss whose gradient is -∇J: per token,

    ρ = exp(log π_θ - log π_old)                         the ratio to the policy that sampled
    loss_t = -min(ρ A, clip(ρ, 1 - ε, 1 + ε) A) + β k3   PPO's clip; k3: exercise 5 (β: kl_coef)
    loss = Σ over real tokens of loss_t / T

On a batch's first pass log π_old = log π_θ (detached): ρ = 1 and the gradient is exactly eq. 6's.
When a batch is reused (--ppo_epochs > 1), the clip stops a token's pull once its ratio has moved
past 1 ± ε in the direction its advantage pushes; the min keeps the pull where it has not.

    logprobs      (B, L) float: log π_θ of each answer token (with a gradient)
    old_logprobs  (B, L) float: log π_old of the same tokens (no gradient)
    advantages    (B,) float: one per answer (exercise 4's, flattened)
    mask          (B, L) bool: True on the answer tokens, False on padding
    n_tokens      T, a number: the step's answer tokens
    clip_eps      ε
    ref_logprobs  (B, L) float or None: the reference model's log-probs, for the KL penalty
    kl_coef       β
    returns       (loss, kl): the loss (0-dim, with a gradient) and the mean k3 over the T tokens
                  (0-dim, without a gradient: a figure to log; 0 when ref_logprobs is None)

Hint: advantages[:, None] is a column (B, 1) that broadcasts over the tokens; torch.min of the two
terms, elementwise; ratio.clamp(1 - clip_eps, 1 + clip_eps).

Grade it:        python -m pytest course/test_ex6_policy_loss.py
See it learn:    python course/run.py rl (with exercises 2 and 4); rl_kl adds the penalty
The project's:   train_rl.policy_loss
"""
import torch  # noqa: F401  (yours to use)

from ex5_k3_kl import k3_kl  # noqa: F401  (exercise 5: yours)

SOLUTION = "train_rl.policy_loss"


def policy_loss(logprobs, old_logprobs, advantages, mask, n_tokens, clip_eps, ref_logprobs=None,
                kl_coef=0.0):
    raise NotImplementedError("exercise 6 (course/ex6_policy_loss.py): policy_loss is not written "
                              "yet")
