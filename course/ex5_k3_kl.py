"""Exercise 5 (session 2): the k3 estimator of the KL to a reference model.

train_rl.py --kl_coef > 0 keeps the policy π near its starting model π_ref with a penalty on the
KL between them. The exact KL needs the whole vocabulary at every state; the sampled tokens give an
estimate, one per token. With r = log π_ref(y) - log π(y) at a token y that π sampled:

    k1 = -r                 unbiased (its mean over π's samples is KL(π || π_ref)), but often < 0
    k3 = exp(r) - r - 1     unbiased too, and never negative (exp(r) >= 1 + r): GRPO's choice

Why k3 is unbiased: the mean of exp(r) over π's samples is Σ_y π(y) π_ref(y) / π(y) = 1.
As a loss on π's samples, its gradient is that of KL(π_ref || π): the grader checks that too.

    logprobs      (B, L) float: log π of each sampled token (with a gradient)
    ref_logprobs  (B, L) float: log π_ref of the same tokens
    returns       (B, L): k3 at every token (no sum, no mask: policy_loss averages it)

Hint: one line per formula; mind the sign of r.

Grade it:        python -m pytest course/test_ex5_k3_kl.py
See it learn:    python course/run.py rl_kl (with exercises 2, 4 and 6)
The project's:   train_rl.k3_kl
"""
import torch  # noqa: F401  (yours to use)

SOLUTION = "train_rl.k3_kl"


def k3_kl(logprobs, ref_logprobs):
    raise NotImplementedError("exercise 5 (course/ex5_k3_kl.py): k3_kl is not written yet")
