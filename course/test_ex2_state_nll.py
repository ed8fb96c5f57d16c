"""Grader of exercise 2, state_nll: the mean NLL of the state tokens, token by token against a
plain loop on random batches (padding that may not count included), a figure and not a loss (a
float, no gradient), a mean over tokens, and the edge cases: an empty mask, a single token."""
import torch

from grading import close, generator

EXERCISE = "ex2_state_nll"


def loop_state_nll(logprobs, mask) -> float:
    """The mean NLL over the real tokens, one at a time; 0 without any."""
    values = [-float(v) for v, real in zip(logprobs.detach().flatten(), mask.flatten()) if real]
    return sum(values) / len(values) if values else 0.0


def figure(state_nll, logprobs, mask, what) -> float:
    value = state_nll(logprobs, mask)
    assert isinstance(value, float), (f"{what}: state_nll returns a Python float (a figure to log: "
                                      f".item()), got {type(value).__name__}")
    return value


def check_random_batches_against_a_loop(state_nll):
    """Random log-probs, rows of different lengths; the padding holds log-probs that may not
    count."""
    for seed, lengths in enumerate([[5, 2, 7], [1, 9], [4, 4, 4, 3]]):
        logprobs = -torch.rand(len(lengths), max(lengths), generator=generator(seed)) * 5
        mask = torch.tensor([[t < n for t in range(max(lengths))] for n in lengths])
        close(figure(state_nll, logprobs, mask, "state_nll"), loop_state_nll(logprobs, mask),
              f"state_nll of rows of {lengths} tokens")


def check_a_figure_not_a_loss(state_nll):
    """Log-probs that carry a gradient (a trainer's): a float comes back, and nothing is
    backpropagated through it."""
    logprobs = (-torch.rand(2, 3, generator=generator(7))).requires_grad_()
    mask = torch.tensor([[True, True, False], [True, True, True]])
    close(figure(state_nll, logprobs, mask, "state_nll of log-probs with a gradient"),
          loop_state_nll(logprobs, mask), "state_nll of log-probs with a gradient")


def check_a_mean_over_tokens_not_sequences(state_nll):
    """A one-token state (NLL 2) and a nine-token state (NLL 0.5 each): each token weighs
    1/10."""
    logprobs = torch.tensor([[-2.0] + [-7.0] * 8, [-0.5] * 9])
    mask = torch.tensor([[True] + [False] * 8, [True] * 9])
    close(figure(state_nll, logprobs, mask, "state_nll"), (2.0 + 9 * 0.5) / 10,
          "state_nll of a 1-token and a 9-token state (a mean over their 10 tokens, 0.65; a mean "
          "over the two states would be 1.25)")


def check_an_empty_mask_and_a_single_token(state_nll):
    """No state token (a step whose groups were all skipped): 0.0, not NaN. One token: its
    NLL."""
    empty = figure(state_nll, -torch.rand(2, 3), torch.zeros(2, 3, dtype=torch.bool), "state_nll")
    assert empty == 0.0, f"state_nll of an empty mask: got {empty}, expected 0.0"
    close(figure(state_nll, torch.tensor([[-1.25]]), torch.tensor([[True]]), "state_nll"), 1.25,
          "state_nll of one token with log-prob -1.25")


CHECKS = [check_random_batches_against_a_loop, check_a_figure_not_a_loss,
          check_a_mean_over_tokens_not_sequences, check_an_empty_mask_and_a_single_token]


def test_state_nll(check, graded):
    check(graded)


# Plausible wrong implementations; each fails a check above (tests/test_course.py) -------------

def mutant_a_mean_over_sequences(logprobs, mask):
    """Each row's mean NLL, then the mean over rows."""
    per_row = -(logprobs.detach() * mask).sum(1) / mask.sum(1).clamp(min=1)
    return per_row.mean().item()


def mutant_the_padding_counted(logprobs, mask):
    """Divides by every column, the padding's too."""
    return -(logprobs.detach() * mask).sum().item() / mask.numel()


def mutant_nan_on_an_empty_mask(logprobs, mask):
    """Right on every real token, but 0 / 0 when there is none."""
    return (-(logprobs.detach() * mask).sum() / mask.sum()).item()


MUTANTS = [mutant_a_mean_over_sequences, mutant_the_padding_counted, mutant_nan_on_an_empty_mask]
