"""Grader of exercise 6, policy_loss: eq. 6's gradient on a batch's first pass, PPO's clipped
ratio on a reused batch against a loop over tokens (value and gradient), where the clip stops a
token's pull and where the min keeps it, the k3 penalty and the KL it reports, a mean over the
step's tokens, and the edge cases: an empty mask, zero advantages, a single token."""
import torch

from grading import close, generator, gradient, parts

EXERCISE = "ex6_policy_loss"
EPS = 0.2


def batch(seed, lengths=(5, 2, 4)):
    """log π (B, L) as a leaf with a gradient, log π_old a little apart, advantages (B,), the mask
    of real tokens, a reference's log-probs."""
    width = max(lengths)
    logprobs = (-2 * torch.rand(len(lengths), width, generator=generator(seed))).requires_grad_()
    old = logprobs.detach() + 0.4 * torch.randn(len(lengths), width, generator=generator(seed + 1))
    advantages = torch.randn(len(lengths), generator=generator(seed + 2))
    mask = torch.tensor([[t < n for t in range(width)] for n in lengths])
    ref = logprobs.detach() + torch.randn(len(lengths), width, generator=generator(seed + 3))
    return logprobs, old, advantages, mask, ref


def loop_loss(logprobs, old, advantages, mask, n_tokens, ref=None, kl_coef=0.0):
    """(loss, mean k3), one token at a time: -min(ρA, clip(ρ)A) + β k3 over the real tokens / T."""
    terms, kls = [], []
    for b, t in mask.nonzero().tolist():
        ratio = torch.exp(logprobs[b, t] - old[b, t])
        a = advantages[b]
        term = -torch.minimum(ratio * a, ratio.clamp(1 - EPS, 1 + EPS) * a)
        if ref is not None:
            r = ref[b, t] - logprobs[b, t]
            k3 = torch.exp(r) - r - 1
            term = term + kl_coef * k3
            kls.append(k3.item())
        terms.append(term)
    return torch.stack(terms).sum() / n_tokens, sum(kls) / n_tokens


def losses(policy_loss, *args, **kwargs):
    return parts(policy_loss(*args, **kwargs), 2, "policy_loss returns (loss, kl)")


def check_the_first_pass_is_eq6(policy_loss):
    """old = log π (detached): ρ = 1, the loss is -Σ A / T over the tokens and its gradient -A/T
    at each real token (eq. 6), 0 on the padding."""
    logprobs, _, advantages, mask, _ = batch(0)
    loss, _ = losses(policy_loss, logprobs, logprobs.detach(), advantages, mask, 13, EPS)
    per_token = advantages[:, None] * mask
    close(loss, -per_token.sum() / 13, "the loss on a batch's first pass (-Σ A / T)")
    close(gradient(loss, logprobs, "the loss"), -per_token / 13,
          "its gradient: -A/T at each answer token, 0 on the padding (eq. 6)")


def check_a_reused_batch_is_clipped_as_ppo(policy_loss):
    """A batch reused after the policy moved: value and gradient token by token."""
    for seed in (1, 2):
        logprobs, old, advantages, mask, _ = batch(seed)
        loss, _ = losses(policy_loss, logprobs, old, advantages, mask, 11, EPS)
        expected, _ = loop_loss(logprobs, old, advantages, mask, 11)
        close(loss, expected, "the loss on a reused batch")
        close(gradient(loss, logprobs, "the loss"), gradient(expected, logprobs, "the loop"),
              "its gradient on a reused batch")


def check_the_clip_stops_the_pull_and_the_min_keeps_it(policy_loss):
    """Four tokens whose ratio moved: A > 0 past 1 + ε and A < 0 past 1 - ε stop pulling (0);
    A > 0 below 1 - ε and A < 0 above 1 + ε still pull (-ρA/T), the min keeping them."""
    ratios = torch.tensor([1.5, 0.5, 0.5, 1.5])
    advantages = torch.tensor([1.0, 1.0, -1.0, -1.0])
    logprobs = torch.zeros(4, 1, requires_grad=True)
    old = -ratios.log()[:, None]
    loss, _ = losses(policy_loss, logprobs, old, advantages, torch.ones(4, 1, dtype=torch.bool), 4,
                     EPS)
    expected = torch.tensor([0.0, -0.5 / 4, 0.0, 1.5 / 4])[:, None]
    close(gradient(loss, logprobs, "the loss"), expected,
          "the gradient of tokens with (ratio, A) = (1.5, 1), (0.5, 1), (0.5, -1), (1.5, -1)")


def check_the_kl_penalty(policy_loss):
    """With a reference: the loss adds kl_coef x the mean k3, and kl is that mean (a figure:
    without a gradient); kl_coef 0 leaves the loss alone but still reports kl; without a
    reference kl is 0."""
    logprobs, old, advantages, mask, ref = batch(3)
    for kl_coef in (0.0, 0.3):
        loss, kl = losses(policy_loss, logprobs, old, advantages, mask, 11, EPS, ref, kl_coef)
        expected, expected_kl = loop_loss(logprobs, old, advantages, mask, 11, ref, kl_coef)
        close(loss, expected, f"the loss with kl_coef {kl_coef}")
        close(gradient(loss, logprobs, "the loss"), gradient(expected, logprobs, "the loop"),
              f"its gradient with kl_coef {kl_coef}")
        close(kl, expected_kl, "kl: the mean k3 over the answer tokens")
        assert not getattr(kl, "requires_grad", False), "kl is a figure: return it detached"
    _, kl = losses(policy_loss, logprobs, old, advantages, mask, 11, EPS)
    close(kl, 0.0, "kl without a reference model")


def check_a_mean_over_the_steps_tokens(policy_loss):
    """A one-token answer and a nine-token answer, both A = 1, T = 10: each token's gradient is
    -1/10 (a mean over answers would give the short one -1/2)."""
    logprobs = torch.zeros(2, 9, requires_grad=True)
    mask = torch.tensor([[True] + [False] * 8, [True] * 9])
    loss, _ = losses(policy_loss, logprobs, logprobs.detach(), torch.ones(2), mask, 10, EPS)
    close(gradient(loss, logprobs, "the loss"), -mask.float() / 10,
          "the gradient of a 1-token and a 9-token answer (-1/T at each token)")


def check_an_empty_mask_zero_advantages_and_one_token(policy_loss):
    """No answer token: loss and kl 0, not NaN. Zero advantages (a group of equal rewards): no
    gradient. One token with A = 2 on its first pass: loss -2."""
    logprobs, old, _, mask, ref = batch(4)
    empty = torch.zeros_like(mask)
    loss, kl = losses(policy_loss, logprobs, old, torch.ones(3), empty, 1, EPS, ref, 0.1)
    close(loss, 0.0, "the loss of an empty mask")
    close(kl, 0.0, "the kl of an empty mask")
    loss, _ = losses(policy_loss, logprobs, old, torch.zeros(3), mask, 11, EPS)
    close(gradient(loss, logprobs, "the loss"), torch.zeros_like(logprobs),
          "the gradient with zero advantages")
    one = torch.tensor([[-0.7]], requires_grad=True)
    loss, _ = losses(policy_loss, one, one.detach(), torch.tensor([2.0]),
                     torch.tensor([[True]]), 1, EPS)
    close(loss, -2.0, "the loss of one token with A = 2 on its first pass")


CHECKS = [check_the_first_pass_is_eq6, check_a_reused_batch_is_clipped_as_ppo,
          check_the_clip_stops_the_pull_and_the_min_keeps_it, check_the_kl_penalty,
          check_a_mean_over_the_steps_tokens, check_an_empty_mask_zero_advantages_and_one_token]


def test_policy_loss(check, graded):
    check(graded)


# Plausible wrong implementations; each fails a check above (tests/test_course.py) -------------

def loss_with(logprobs, old_logprobs, advantages, mask, n_tokens, clip_eps, ref_logprobs, kl_coef,
              ratio_of=None, objective=None, per_answer=False):
    """policy_loss with a switch for each mistake below."""
    ratio = torch.exp(logprobs - old_logprobs) if ratio_of is None else ratio_of(logprobs)
    adv = advantages[:, None]
    clipped = ratio.clamp(1 - clip_eps, 1 + clip_eps)
    per_token = -(torch.min(ratio * adv, clipped * adv) if objective is None
                  else objective(ratio, clipped, adv))
    kl = torch.zeros_like(logprobs)
    if ref_logprobs is not None:
        r = ref_logprobs - logprobs
        kl = torch.exp(r) - r - 1
    terms = (per_token + kl_coef * kl) * mask
    if per_answer:
        loss = (terms.sum(1) / mask.sum(1).clamp(min=1)).mean()
    else:
        loss = terms.sum() / n_tokens
    return loss, (kl.detach() * mask).sum() / n_tokens


def mutant_a_mean_over_answers(logprobs, old_logprobs, advantages, mask, n_tokens, clip_eps,
                               ref_logprobs=None, kl_coef=0.0):
    """Each answer's mean over its tokens, then the mean over answers."""
    return loss_with(logprobs, old_logprobs, advantages, mask, n_tokens, clip_eps, ref_logprobs,
                     kl_coef, per_answer=True)


def mutant_no_clip(logprobs, old_logprobs, advantages, mask, n_tokens, clip_eps,
                   ref_logprobs=None, kl_coef=0.0):
    """ρA alone: a reused batch keeps pulling however far its ratio moved."""
    return loss_with(logprobs, old_logprobs, advantages, mask, n_tokens, clip_eps, ref_logprobs,
                     kl_coef, objective=lambda ratio, clipped, adv: ratio * adv)


def mutant_the_clip_without_the_min(logprobs, old_logprobs, advantages, mask, n_tokens, clip_eps,
                                    ref_logprobs=None, kl_coef=0.0):
    """clip(ρ)A alone: a token that moved against its advantage stops being pulled back."""
    return loss_with(logprobs, old_logprobs, advantages, mask, n_tokens, clip_eps, ref_logprobs,
                     kl_coef, objective=lambda ratio, clipped, adv: clipped * adv)


def mutant_the_old_policy_ignored(logprobs, old_logprobs, advantages, mask, n_tokens, clip_eps,
                                  ref_logprobs=None, kl_coef=0.0):
    """ρ = exp(log π - sg(log π)) = 1 always: plain REINFORCE, right on a first pass only."""
    return loss_with(logprobs, old_logprobs, advantages, mask, n_tokens, clip_eps, ref_logprobs,
                     kl_coef, ratio_of=lambda lp: torch.exp(lp - lp.detach()))


MUTANTS = [mutant_a_mean_over_answers, mutant_no_clip, mutant_the_clip_without_the_min,
           mutant_the_old_policy_ignored]
