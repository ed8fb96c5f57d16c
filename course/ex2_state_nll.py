"""Exercise 2 (session 1): the state lens, state_nll.

Every trainer logs how familiar its training states are to the learner: the mean negative
log-likelihood, under the current model, of the state tokens a step trains on. SFT's states are
the dataset's (for SFT it equals the loss), RL's and OPD's the learner's own samples. A high
state NLL means the model is trained on states it would not visit itself.

    state_nll = - (1/N) Σ over the N real tokens of log π_θ(s_t | s_<t)

    logprobs  (B, L) float: log π_θ of each state token (it may carry a gradient: the lens does
              not pass one on)
    mask      (B, L) bool: True on the state tokens, False elsewhere (padding)
    returns   a Python float: a figure to log, not a loss; 0.0 when the mask is empty (a step
              without states logs 0, not NaN)

Hint: .item() turns a 0-dim tensor into a float; count the tokens, and guard the count.

Grade it:        python -m pytest course/test_ex2_state_nll.py
See it learn:    python course/run.py rl (its state_nll column) or python course/run.py opd
The project's:   eval.state_nll
"""
import torch  # noqa: F401  (yours to use)

SOLUTION = "eval.state_nll"


def state_nll(logprobs, mask):
    raise NotImplementedError("exercise 2 (course/ex2_state_nll.py): state_nll is not written yet")
