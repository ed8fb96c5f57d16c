"""Grader of exercise 7, token_kl_loss: in expectation over the student's samples its gradient is
that of the exact reverse KL(π_θ || π_T) (torch's kl_divergence; every token of the vocabulary
taken as the sample, weighed by its probability); its value and gradient on a random batch, the
advantage held constant, a mean over the step's tokens, an empty mask, a single token."""
import torch
from torch.distributions import Categorical, kl_divergence

from grading import close, generator, gradient

EXERCISE = "ex7_token_kl_loss"


def check_in_expectation_its_gradient_is_the_reverse_kl(token_kl_loss):
    """Three states, a vocabulary of 6: Σ_y π_θ(y) ∇ loss(y) = ∇ KL(π_θ || π_T), the loss of
    each token y taken alone (T = 1)."""
    logits = torch.randn(3, 6, generator=generator(0)).requires_grad_()
    teacher = torch.randn(3, 6, generator=generator(1)).log_softmax(-1)
    logprobs = logits.log_softmax(-1)
    probs = logprobs.exp().detach()
    expected_loss = torch.zeros(())
    for state in range(3):
        for token in range(6):
            one = token_kl_loss(logprobs[state, token].view(1, 1), teacher[state, token].view(1, 1),
                                torch.tensor([[True]]), 1)
            expected_loss = expected_loss + probs[state, token] * one
    kl = kl_divergence(Categorical(logits=logits), Categorical(logits=teacher)).sum()
    close(gradient(expected_loss, logits, "the loss"), gradient(kl, logits, "the KL"),
          "the gradient of the loss, in expectation over the student's samples: that of "
          "KL(π_θ || π_T)")


def check_a_random_batch(token_kl_loss):
    """Value -(1/T) Σ sg(A) log π_θ and gradient (log π_θ - log π_T)/T at each real token (A held
    constant: its own gradient is not added), 0 on the padding."""
    logprobs = (-3 * torch.rand(3, 5, generator=generator(2))).requires_grad_()
    teacher = -3 * torch.rand(3, 5, generator=generator(3))
    mask = torch.tensor([[t < n for t in range(5)] for n in (5, 2, 4)])
    loss = token_kl_loss(logprobs, teacher, mask, 13)
    advantage = teacher - logprobs.detach()
    close(loss, -(advantage * logprobs.detach() * mask).sum() / 13, "the loss")
    close(gradient(loss, logprobs, "the loss"), -advantage * mask / 13,
          "d loss / d log π_θ: -A/T at each token (A = log π_T - log π_θ, held constant)")


def check_a_mean_over_the_steps_tokens(token_kl_loss):
    """A one-token and a nine-token answer, every token with A = 1, T = 10: each token's gradient
    is -1/10."""
    logprobs = torch.full((2, 9), -1.0, requires_grad=True)
    mask = torch.tensor([[True] + [False] * 8, [True] * 9])
    loss = token_kl_loss(logprobs, torch.zeros(2, 9), mask, 10)
    close(gradient(loss, logprobs, "the loss"), -mask.float() / 10,
          "the gradient of a 1-token and a 9-token answer (-A/T at each token)")


def check_an_empty_mask_and_a_single_token(token_kl_loss):
    """No signal token: 0 and no gradient, not NaN. One token with log π_θ = -1 and log π_T = -2:
    A = -1, the loss -(A log π_θ) = -1."""
    logprobs = (-torch.rand(2, 3)).requires_grad_()
    loss = token_kl_loss(logprobs, -torch.rand(2, 3), torch.zeros(2, 3, dtype=torch.bool), 1)
    close(loss, 0.0, "the loss of an empty mask")
    close(gradient(loss, logprobs, "the loss"), torch.zeros(2, 3), "its gradient")
    one = token_kl_loss(torch.tensor([[-1.0]], requires_grad=True), torch.tensor([[-2.0]]),
                        torch.tensor([[True]]), 1)
    close(one, -1.0, "the loss of one token with log π_θ = -1, log π_T = -2")


CHECKS = [check_in_expectation_its_gradient_is_the_reverse_kl, check_a_random_batch,
          check_a_mean_over_the_steps_tokens, check_an_empty_mask_and_a_single_token]


def test_token_kl_loss(check, graded):
    check(graded)


# Plausible wrong implementations; each fails a check above (tests/test_course.py) -------------

def mutant_the_advantage_not_detached(logprobs, teacher_logprobs, mask, n_tokens):
    """The same value, but A's own gradient is added: (2 log π_θ - log π_T)/T per token."""
    advantage = -(logprobs - teacher_logprobs)
    return -(advantage * logprobs * mask).sum() / n_tokens


def mutant_the_direction_swapped(logprobs, teacher_logprobs, mask, n_tokens):
    """A = log π_θ - log π_T: the student is pushed away from the teacher."""
    advantage = logprobs.detach() - teacher_logprobs
    return -(advantage * logprobs * mask).sum() / n_tokens


def mutant_a_mean_over_answers(logprobs, teacher_logprobs, mask, n_tokens):
    """Each answer's mean over its tokens, then the mean over answers."""
    advantage = -(logprobs.detach() - teacher_logprobs)
    per_answer = -(advantage * logprobs * mask).sum(1) / mask.sum(1).clamp(min=1)
    return per_answer.mean()


MUTANTS = [mutant_the_advantage_not_detached, mutant_the_direction_swapped,
           mutant_a_mean_over_answers]
