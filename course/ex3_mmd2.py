"""Exercise 3 (session 1): MMD², how far a trained model's states drifted from the base's.

eval.py --drift_reference BASE samples states from both models, turns each into a feature vector
(hashed n-grams, or the base's hidden states) and compares the two sets x and y with the maximum
mean discrepancy, an RBF kernel k(a, b) = exp(-|a - b|² / (2 bw²)):

    MMD²(x, y) = mean k(x_i, x_j) + mean k(y_i, y_j) - 2 mean k(x_i, y_j)

    biased (unbiased=False): each mean over all pairs, a point with itself included
    unbiased (the default): each mean leaves out the pairs of a point with itself; with
        groups=(labels_x, labels_y) it leaves out every pair that shares a label (one prompt's
        states are not independent draws: their pairs would read as drift), in all three means
    bandwidth: given, or by default the median distance |a - b| over the pairs of distinct
        points of x and y pooled; 1.0 when that median is 0 (all points equal: any bandwidth
        gives 0)

    x (m, d), y (n, d): numpy float arrays; groups: None, or two integer arrays (m,) and (n,)
    returns (mmd2, bandwidth): two Python floats

Hint: the squared distances of all pairs at once: (a * a).sum(1)[:, None] + (b * b).sum(1)[None,
:] - 2 a @ b.T (clip it at 0); np.triu_indices(len(p), k=1) picks each pair of p once; a boolean
matrix labels_a[:, None] != labels_b[None, :] picks the pairs an unbiased mean keeps (without
groups, give every point a label of its own: x's 0..m-1, y's m..m+n-1).

Grade it:        python -m pytest course/test_ex3_mmd2.py
See it learn:    python course/run.py forgetting (its MMD² columns)
The project's:   harness/stats.py's mmd2
"""
import numpy as np  # noqa: F401  (yours to use)

SOLUTION = "harness.stats.mmd2"


def mmd2(x, y, bandwidth=None, unbiased=True, groups=None):
    raise NotImplementedError("exercise 3 (course/ex3_mmd2.py): mmd2 is not written yet")
