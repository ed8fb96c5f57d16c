"""Exercise 1 (sessions 1 and 3): eq. 5's and eq. 7's loss, one cross-entropy on different states.

SFT fits the gold answer y after the prompt x; on-policy distillation with continuations fits the
teacher's tokens c after a state s, a prefix of the student's own answer:

    L(θ) = - (1/T) Σ_t log π_θ(y_t | x, y_<t)        SFT, the prompt x is the state      (eq. 5)
    L(θ) = - (1/T) Σ_k log π_θ(c_k | s, c_<k)        OPD, the student's prefix s is      (eq. 7)

One function does both. Each row of log-probs holds the tokens of a sequence: its first columns
are the state (the model is given them, they are not fitted), then come the targets, then the
padding after a short row. Only the targets carry loss. T counts the targets of the whole step:
the loss is a mean over tokens, not a mean of per-sequence means, and the losses of a step's
micro-batches, each divided by the same T, add up to the step's loss.

    logprobs      (B, L) float: log π_θ of each token given the tokens before it
    mask          (B, L) bool: True on real tokens, False on the padding at the end of a row
    first_target  (B,) int: the column of each row's first target (its state: the columns
                  before); also a list, or one int for every row (train_sft.py passes 0: its
                  columns start at the answer, the prompt is not in them)
    n_tokens      T, a number: the step's targets (more than this batch's when the step has
                  several micro-batches)
    returns       (loss, targets): the loss, a 0-dim tensor with a gradient; targets, (B, L) bool,
                  True on the columns that carry loss

Hint: a column index torch.arange(L) compared with first_target as a column (B, 1) broadcasts to
(B, L); torch.as_tensor(first_target).view(-1, 1) makes that column of a tensor, a list or an int.

Grade it:        python -m pytest course/test_ex1_target_nll.py
See it learn:    python course/run.py sft (eq. 5); in session 3, python course/run.py opd (eq. 7)
The project's:   model.target_nll, which train_sft.fit_states and train_distill.apply_teacher call
"""
import torch  # noqa: F401  (yours to use)

SOLUTION = "model.target_nll"


def target_nll(logprobs, mask, first_target, n_tokens):
    raise NotImplementedError("exercise 1 (course/ex1_target_nll.py): target_nll is not written "
                              "yet")
