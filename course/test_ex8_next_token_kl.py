"""Grader of exercise 8, next_token_kl: the exact KL(p || q) against torch's kl_divergence of two
categoricals (value and gradient, at temperature 1 and 0.7), the direction on a hand-computed
pair, logits that differ by a constant (the same distribution), ties (uniform), peaked
distributions, a vocabulary of one token."""
import math

import torch
from torch.distributions import Categorical, kl_divergence

from grading import close, generator, gradient

EXERCISE = "ex8_next_token_kl"


def check_against_torch_kl_divergence(next_token_kl):
    """Random logits (5 states x 9 tokens): KL(softmax(a/τ) || softmax(b/τ)) at each state, and its
    gradient with respect to both sides' logits."""
    for temperature in (1.0, 0.7):
        a = (2 * torch.randn(5, 9, generator=generator(0))).requires_grad_()
        b = (2 * torch.randn(5, 9, generator=generator(1))).requires_grad_()
        kl = next_token_kl(a, b, temperature)
        exact = kl_divergence(Categorical(logits=a / temperature),
                              Categorical(logits=b / temperature))
        close(kl, exact, f"KL(p || q) at each state, temperature {temperature}")
        for side, name in ((a, "logits"), (b, "other_logits")):
            close(gradient(kl.sum(), side, "the KL"), gradient(exact.sum(), side, "torch's KL"),
                  f"its gradient with respect to {name}, temperature {temperature}")


def check_the_direction(next_token_kl):
    """p = (0.5, 0.5), q = (0.9, 0.1): KL(p || q) = 0.5 ln(0.5/0.9) + 0.5 ln(0.5/0.1) = 0.511;
    KL(q || p) = 0.368."""
    p = torch.tensor([[0.5, 0.5]]).log()
    q = torch.tensor([[0.9, 0.1]]).log()
    close(next_token_kl(p, q, 1.0), [0.5 * math.log(0.5 / 0.9) + 0.5 * math.log(0.5 / 0.1)],
          "KL(p || q) of p = (0.5, 0.5), q = (0.9, 0.1)")
    close(next_token_kl(q, p, 1.0), [0.9 * math.log(0.9 / 0.5) + 0.1 * math.log(0.1 / 0.5)],
          "KL(q || p) of the same two")


def check_one_distribution_is_zero(next_token_kl):
    """Logits that differ by a constant at each state give the same distribution: KL 0, with a
    zero gradient. So do ties (equal logits: uniform)."""
    a = torch.randn(4, 7, generator=generator(2)).requires_grad_()
    shifted = a.detach() + torch.tensor([[3.0], [-2.0], [0.5], [10.0]])
    kl = next_token_kl(a, shifted, 0.8)
    close(kl, torch.zeros(4), "the KL between logits that differ by a constant", atol=1e-5)
    close(gradient(kl.sum(), a, "the KL"), torch.zeros(4, 7), "its gradient", atol=1e-5)
    close(next_token_kl(torch.zeros(2, 5), torch.ones(2, 5), 1.0), torch.zeros(2),
          "the KL between two uniform distributions")


def check_peaked_distributions_and_one_token(next_token_kl):
    """Logits 60 apart: one token holds almost all the mass (finite, and as torch computes it);
    a vocabulary of one token: 0."""
    a = torch.tensor([[60.0, 0.0, 0.0], [0.0, 60.0, 0.0]])
    b = torch.tensor([[0.0, 60.0, 0.0], [0.0, 60.0, 1.0]])
    close(next_token_kl(a, b, 1.0), kl_divergence(Categorical(logits=a), Categorical(logits=b)),
          "the KL of peaked distributions")
    close(next_token_kl(torch.tensor([[2.0]]), torch.tensor([[-3.0]]), 1.0), [0.0],
          "the KL over a vocabulary of one token")


CHECKS = [check_against_torch_kl_divergence, check_the_direction, check_one_distribution_is_zero,
          check_peaked_distributions_and_one_token]


def test_next_token_kl(check, graded):
    check(graded)


# Plausible wrong implementations; each fails a check above (tests/test_course.py) -------------

def kl_with(logits, other_logits, temperature, swapped=False, reduce=torch.sum):
    """next_token_kl with a switch for each mistake below."""
    log_p = (logits / temperature).log_softmax(-1)
    log_q = (other_logits / temperature).log_softmax(-1)
    if swapped:
        log_p, log_q = log_q, log_p
    return reduce(log_p.exp() * (log_p - log_q), -1)


def mutant_the_direction_swapped(logits, other_logits, temperature):
    """KL(q || p)."""
    return kl_with(logits, other_logits, temperature, swapped=True)


def mutant_no_temperature(logits, other_logits, temperature):
    """The distributions at temperature 1 whatever the temperature asked."""
    return kl_with(logits, other_logits, 1.0)


def mutant_logits_as_log_probabilities(logits, other_logits, temperature):
    """p's weights right, but log p - log q taken as the difference of the logits."""
    p = (logits / temperature).softmax(-1)
    return (p * (logits - other_logits) / temperature).sum(-1)


def mutant_a_mean_over_the_vocabulary(logits, other_logits, temperature):
    """Averaged over the vocabulary, not summed."""
    return kl_with(logits, other_logits, temperature, reduce=torch.mean)


MUTANTS = [mutant_the_direction_swapped, mutant_no_temperature,
           mutant_logits_as_log_probabilities, mutant_a_mean_over_the_vocabulary]
