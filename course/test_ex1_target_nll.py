"""Grader of exercise 1, target_nll: eq. 5's and eq. 7's loss against torch's cross_entropy on
random sequences (its value and its gradient), the gradient each column gets, a mean over the
step's tokens across micro-batches, and the edge cases: states of no token and of the whole row,
first_target as a list or one int, an empty mask, a single token."""
import torch
import torch.nn.functional as F

from grading import close, generator, gradient, parts, same

EXERCISE = "ex1_target_nll"
VOCAB = 11


def sequences(lengths, first_targets, seed=0):
    """Random logits (B, L, VOCAB) with a gradient, tokens (B, L), their log-probs (B, L) (the
    padding's too: nothing there may count), the mask of real tokens and the targets, each cell
    written out: real, and at or after its row's first target."""
    width = max(lengths)
    logits = torch.randn(len(lengths), width, VOCAB, generator=generator(seed)).requires_grad_()
    tokens = torch.randint(VOCAB, (len(lengths), width), generator=generator(seed + 1))
    logprobs = logits.log_softmax(-1).gather(-1, tokens[..., None]).squeeze(-1)
    mask = torch.tensor([[t < n for t in range(width)] for n in lengths])
    targets = torch.tensor([[first <= t < n for t in range(width)]
                            for n, first in zip(lengths, first_targets)])
    return logits, tokens, logprobs, mask, targets


def against_cross_entropy(target_nll, lengths, first_targets, n_tokens, first_as=torch.tensor):
    """The loss, the targets and the loss's gradient against torch's cross_entropy of the targets,
    summed, over n_tokens."""
    logits, tokens, logprobs, mask, targets = sequences(lengths, first_targets)
    loss, got = parts(target_nll(logprobs, mask, first_as(first_targets), n_tokens), 2,
                      "target_nll returns (loss, targets)")
    same(got, targets, "targets (True from first_target to the last real token)")
    expected = F.cross_entropy(logits[targets], tokens[targets], reduction="sum") / n_tokens
    close(loss, expected, "the loss (the targets' summed NLL / n_tokens)")
    close(gradient(loss, logits, "the loss"), gradient(expected, logits, "cross_entropy"),
          "the loss's gradient with respect to the logits")


def check_sft_batch_against_cross_entropy(target_nll):
    """Eq. 5: rows of prompt, answer, padding; the targets are the answers, T their count."""
    lengths, prompts = [9, 5, 7, 12], [3, 2, 6, 4]
    against_cross_entropy(target_nll, lengths, prompts,
                          n_tokens=sum(n - p for n, p in zip(lengths, prompts)))


def check_continuation_states_of_every_length(target_nll):
    """Eq. 7: a state of no token (first_target 0), states that fill their row (no target), a
    one-token continuation; T counts more targets than this micro-batch holds (the step's)."""
    lengths, states = [7, 5, 6, 3, 8], [0, 5, 5, 2, 3]
    against_cross_entropy(target_nll, lengths, states,
                          n_tokens=sum(n - s for n, s in zip(lengths, states)) + 7)


def check_first_target_as_a_list_or_one_int(target_nll):
    """train_distill.py passes first_target as a list, train_sft.py as the int 0 (every column is
    a target): the same as a tensor."""
    against_cross_entropy(target_nll, [6, 4, 5], [2, 1, 3], n_tokens=9, first_as=list)
    against_cross_entropy(target_nll, [6, 4, 5], [0, 0, 0], n_tokens=15, first_as=lambda f: 0)


def check_the_state_and_the_padding_get_no_gradient(target_nll):
    """d loss / d logprobs is -1/T at each target and exactly 0 at the state and the padding."""
    _, _, logprobs, mask, targets = sequences([6, 4, 8], [2, 3, 5])
    leaf = logprobs.detach().requires_grad_()
    loss, _ = parts(target_nll(leaf, mask, torch.tensor([2, 3, 5]), 10), 2, "target_nll returns")
    close(gradient(loss, leaf, "the loss"), -targets.float() / 10,
          "d loss / d logprobs (-1/T at each target; 0 on the state and the padding)")


def check_a_mean_over_tokens_not_sequences(target_nll):
    """A one-token answer (NLL 2) and a nine-token answer (NLL 0.5 each) after one prompt token:
    each of the 10 tokens weighs 1/10."""
    logprobs = torch.tensor([[-9.0, -2.0] + [0.0] * 8, [-9.0] + [-0.5] * 9])
    mask = torch.tensor([[True] * 2 + [False] * 8, [True] * 10])
    loss, _ = parts(target_nll(logprobs, mask, torch.tensor([1, 1]), 10), 2, "target_nll returns")
    close(loss, (2.0 + 9 * 0.5) / 10, "the loss of a 1-token and a 9-token answer (a mean over "
          "their 10 tokens, 0.65; a mean over the two answers would be 1.25)")


def check_micro_batches_add_up_to_the_step(target_nll):
    """The step split in two micro-batches, each divided by the step's T: their losses and
    gradients add up to the whole batch's."""
    lengths, firsts = [8, 3, 6, 5], [2, 1, 4, 0]
    logits, _, logprobs, mask, targets = sequences(lengths, firsts)
    n_tokens = int(targets.sum())
    first = torch.tensor(firsts)
    whole, _ = parts(target_nll(logprobs, mask, first, n_tokens), 2, "target_nll returns")
    top, _ = parts(target_nll(logprobs[:2], mask[:2], first[:2], n_tokens), 2, "target_nll")
    width = max(lengths[2:])  # the second micro-batch is padded to its own longest row
    bottom, _ = parts(target_nll(logprobs[2:, :width], mask[2:, :width], first[2:], n_tokens), 2,
                      "target_nll returns")
    close(top + bottom, whole, "two micro-batches' losses, each over the step's T, summed")
    close(gradient(top + bottom, logits, "the micro-batches' losses"),
          gradient(whole, logits, "the loss"), "their gradient")


def check_an_empty_mask_and_a_single_token(target_nll):
    """A micro-batch without a real token: loss 0 and a zero gradient, not NaN (T, the step's,
    is at least 1). One token: the loss is its NLL."""
    leaf = torch.randn(3, 4).requires_grad_()
    loss, targets = parts(target_nll(leaf, torch.zeros(3, 4, dtype=torch.bool),
                                     torch.tensor([1, 0, 2]), 5), 2, "target_nll returns")
    close(loss, 0.0, "the loss of an empty mask")
    close(gradient(loss, leaf, "the loss"), torch.zeros(3, 4), "its gradient")
    same(targets, torch.zeros(3, 4, dtype=torch.bool), "its targets")
    one = torch.tensor([[-1.25]], requires_grad=True)
    loss, _ = parts(target_nll(one, torch.tensor([[True]]), torch.tensor([0]), 1), 2,
                    "target_nll returns")
    close(loss, 1.25, "the loss of one token with log-prob -1.25")


CHECKS = [check_sft_batch_against_cross_entropy, check_continuation_states_of_every_length,
          check_first_target_as_a_list_or_one_int, check_the_state_and_the_padding_get_no_gradient,
          check_a_mean_over_tokens_not_sequences, check_micro_batches_add_up_to_the_step,
          check_an_empty_mask_and_a_single_token]


def test_target_nll(check, graded):
    check(graded)


# Plausible wrong implementations; each fails a check above (tests/test_course.py) -------------

def targets_of(mask, first_target, after=False):
    first = torch.as_tensor(first_target).view(-1, 1)
    columns = torch.arange(mask.shape[1])
    return mask & (columns > first if after else columns >= first)


def mutant_a_mean_over_sequences(logprobs, mask, first_target, n_tokens):
    """Each sequence's mean NLL, then the mean over sequences: a short answer weighs as much as
    a long one."""
    targets = targets_of(mask, first_target)
    per_row = -(logprobs * targets).sum(1) / targets.sum(1).clamp(min=1)
    return per_row.mean(), targets


def mutant_the_prompt_left_in(logprobs, mask, first_target, n_tokens):
    """Every real token fitted, the state's too."""
    return -(logprobs * mask).sum() / n_tokens, mask


def mutant_a_mean_over_this_micro_batch(logprobs, mask, first_target, n_tokens):
    """Divides by this micro-batch's targets, not the step's T."""
    targets = targets_of(mask, first_target)
    return -(logprobs * targets).sum() / targets.sum(), targets


def mutant_the_first_target_left_out(logprobs, mask, first_target, n_tokens):
    """> where >= belongs: the token at first_target is not fitted."""
    targets = targets_of(mask, first_target, after=True)
    return -(logprobs * targets).sum() / n_tokens, targets


MUTANTS = [mutant_a_mean_over_sequences, mutant_the_prompt_left_in,
           mutant_a_mean_over_this_micro_batch, mutant_the_first_target_left_out]
