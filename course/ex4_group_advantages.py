"""Exercise 4 (session 2): GRPO's group advantages, the baseline of eq. 6.

RL samples G answers to each question; answer i earns reward r_i (1 if right, else 0). Its
advantage is how much better it did than the other answers to the same question:

    A_i = r_i - mean_j r_j                         (the group's mean reward is the baseline)
    A_i = (r_i - mean_j r_j) / std_j r_j           with std_adv: GRPO's z-score

std is the sample standard deviation (divided by G - 1: torch's std, as TRL's GRPO computes it).
A group whose answers all earned the same reward has every A_i = 0: it teaches nothing, and the
trainer skips it (keep is False), also with std_adv, where its std is 0.

    rewards   (Q, G) float: Q questions x G answers
    std_adv   bool: divide by the group's std
    returns   (advantages (Q, G) float, keep (Q,) bool: True where the group's rewards differ)

Hint: mean(1, keepdim=True) keeps a (Q, 1) column that broadcasts against (Q, G); a std of 0
divides into NaN: clamp the std from below (1e-6) before dividing.

Grade it:        python -m pytest course/test_ex4_group_advantages.py
See it learn:    python course/run.py rl (with exercises 2 and 6)
The project's:   train_rl.group_advantages
"""
import torch  # noqa: F401  (yours to use)

SOLUTION = "train_rl.group_advantages"


def group_advantages(rewards, std_adv=False):
    raise NotImplementedError("exercise 4 (course/ex4_group_advantages.py): group_advantages is "
                              "not written yet")
