"""Grader of exercise 5, k3_kl: its mean under the policy is the exact KL(π || π_ref) (torch's
kl_divergence of two categoricals, every token of the vocabulary taken as a sample and weighed by
its probability), it is never negative and 0 where the models agree, its gradient token by token,
and as a loss on the policy's samples the gradient of KL(π_ref || π); shapes kept, one token."""
import math

import torch
from torch.distributions import Categorical, kl_divergence

from grading import close, generator, gradient

EXERCISE = "ex5_k3_kl"


def two_models(seed, states=4, vocab=7):
    """The policy's logits (states, vocab), with a gradient, and the reference's."""
    logits = (2 * torch.randn(states, vocab, generator=generator(seed))).requires_grad_()
    return logits, 2 * torch.randn(states, vocab, generator=generator(seed + 1))


def every_token(k3_kl, logits, ref_logits):
    """k3 at every token of the vocabulary as if sampled (states, vocab), and π's probabilities."""
    k3 = k3_kl(logits.log_softmax(-1), ref_logits.log_softmax(-1))
    shape = tuple(getattr(k3, "shape", ()))
    assert shape == tuple(logits.shape), f"k3's shape: got {shape}, expected one per token"
    return k3, logits.softmax(-1).detach()


def check_its_mean_under_the_policy_is_the_kl(k3_kl):
    """Σ_y π(y) k3(y) = KL(π || π_ref) at each state: the estimator is unbiased."""
    logits, ref_logits = two_models(0)
    k3, probs = every_token(k3_kl, logits, ref_logits)
    exact = kl_divergence(Categorical(logits=logits), Categorical(logits=ref_logits))
    close((probs * k3).sum(-1), exact, "the mean of k3 over the policy's tokens: KL(π || π_ref)")


def check_never_negative_and_zero_where_the_models_agree(k3_kl):
    """Far apart models (log-probs up to 20 apart): k3 >= 0 at every token; equal log-probs: 0,
    with a zero gradient."""
    logprobs = -20 * torch.rand(5, 9, generator=generator(2))
    ref = -20 * torch.rand(5, 9, generator=generator(3))
    values = torch.as_tensor(k3_kl(logprobs, ref))
    worst = values.argmin()
    assert values.flatten()[worst] >= -1e-6, (
        f"k3 is never negative; got {values.flatten()[worst].item():.4g} where log π - log π_ref "
        f"= {(logprobs - ref).flatten()[worst].item():.3g}")
    leaf = logprobs.clone().requires_grad_()
    agree = k3_kl(leaf, logprobs.clone())
    close(agree, torch.zeros(5, 9), "k3 where log π = log π_ref")
    close(gradient(agree.sum(), leaf, "k3"), torch.zeros(5, 9), "its gradient there")


def check_its_gradient_token_by_token(k3_kl):
    """d k3 / d log π = 1 - π_ref / π = 1 - exp(log π_ref - log π), at each token."""
    leaf = (-3 * torch.rand(3, 6, generator=generator(4))).requires_grad_()
    ref = -3 * torch.rand(3, 6, generator=generator(5))
    grad = gradient(torch.as_tensor(k3_kl(leaf, ref)).sum(), leaf, "k3")
    close(grad, 1 - torch.exp(ref - leaf.detach()), "d k3 / d log π")


def check_as_a_loss_its_gradient_is_the_kl_from_the_reference(k3_kl):
    """On the policy's samples (each token weighed by its probability, held fixed), k3's gradient
    with respect to the policy's logits is that of KL(π_ref || π), as in GRPO."""
    logits, ref_logits = two_models(6)
    k3, probs = every_token(k3_kl, logits, ref_logits)
    kl = kl_divergence(Categorical(logits=ref_logits), Categorical(logits=logits)).sum()
    close(gradient((probs * k3).sum(), logits, "k3"), gradient(kl, logits, "the KL"),
          "the gradient of k3 on π's samples: that of KL(π_ref || π)")


def check_one_token(k3_kl):
    value = k3_kl(torch.tensor([[-1.0]]), torch.tensor([[-2.0]]))
    close(value, torch.tensor([[math.exp(-1)]]),
          "k3 of one token with log π = -1, log π_ref = -2 (r = -1: e^-1 + 1 - 1)")


CHECKS = [check_its_mean_under_the_policy_is_the_kl,
          check_never_negative_and_zero_where_the_models_agree, check_its_gradient_token_by_token,
          check_as_a_loss_its_gradient_is_the_kl_from_the_reference, check_one_token]


def test_k3_kl(check, graded):
    check(graded)


# Plausible wrong implementations; each fails a check above (tests/test_course.py) -------------

def mutant_the_ratio_upside_down(logprobs, ref_logprobs):
    """r = log π - log π_ref: the mean is no longer the KL."""
    r = logprobs - ref_logprobs
    return torch.exp(r) - r - 1


def mutant_k1(logprobs, ref_logprobs):
    """log π - log π_ref: unbiased, but negative at many tokens."""
    return logprobs - ref_logprobs


def mutant_k2(logprobs, ref_logprobs):
    """r² / 2: never negative, but biased."""
    return (ref_logprobs - logprobs) ** 2 / 2


MUTANTS = [mutant_the_ratio_upside_down, mutant_k1, mutant_k2]
