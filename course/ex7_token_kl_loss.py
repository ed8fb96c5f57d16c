"""Exercise 7 (session 3): the token reverse-KL signal, distillation as a policy gradient.

train_distill.py --signal token_kl: the student samples its own answer; at each sampled token y_t
the teacher says how much more (or less) likely it finds it. That log-ratio is an advantage, as
in RL, and the loss is a policy gradient with it held constant (sg: stop-gradient):

    A_t = -(log π_θ(y_t | s_t) - log π_T(y_t | s_t))
    L = -(1/T) Σ_t sg(A_t) log π_θ(y_t | s_t)

In expectation over the student's samples its gradient is that of the reverse KL, KL(π_θ || π_T),
at each state (the grader checks it against the exact KL). Without the stop-gradient, A_t's own
gradient would be added: another direction.

    logprobs          (B, L) float: log π_θ of each sampled token (with a gradient)
    teacher_logprobs  (B, L) float: log π_T of the same tokens
    mask              (B, L) bool: True on the tokens that carry the signal
    n_tokens          T, a number: the step's signal tokens (a mean over tokens)
    returns           the loss, a 0-dim tensor with a gradient

Hint: .detach() is sg.

Grade it:        python -m pytest course/test_ex7_token_kl_loss.py
See it learn:    python course/run.py token_kl
The project's:   train_distill.token_kl_loss
"""
import torch  # noqa: F401  (yours to use)

SOLUTION = "train_distill.token_kl_loss"


def token_kl_loss(logprobs, teacher_logprobs, mask, n_tokens):
    raise NotImplementedError("exercise 7 (course/ex7_token_kl_loss.py): token_kl_loss is not "
                              "written yet")
