"""Exercise 8 (session 3): the exact KL between two next-token distributions.

train_distill.py --signal full_kl (GKD-style) compares the student's and the teacher's whole
next-token distributions at every state, not only at the sampled token:

    p = softmax(logits / τ),  q = softmax(other_logits / τ)      (τ: the temperature)
    KL(p || q) = Σ_v p(v) (log p(v) - log q(v))

The trainer calls it with (student, teacher) for the reverse KL, the default, and with (teacher,
student) for --kl_direction forward: the order is the direction, KL(p || q) != KL(q || p).

    logits        (n, vocab) float: the logits of p at n states (with a gradient)
    other_logits  (n, vocab) float: the logits of q at the same states
    temperature   τ > 0
    returns       (n,): the KL at each state (summed over the vocabulary)

Hint: log_softmax(-1) gives log p stably (softmax then log loses the tiny probabilities).

Grade it:        python -m pytest course/test_ex8_next_token_kl.py
See it learn:    python course/run.py full_kl
The project's:   train_distill.next_token_kl (next_token_figures sums it over the states)
"""
import torch  # noqa: F401  (yours to use)

SOLUTION = "train_distill.next_token_kl"


def next_token_kl(logits, other_logits, temperature):
    raise NotImplementedError("exercise 8 (course/ex8_next_token_kl.py): next_token_kl is not "
                              "written yet")
