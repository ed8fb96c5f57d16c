"""Grader of exercise 3, mmd2: the biased and unbiased estimates against the textbook double loop
(one pair at a time), the median heuristic's bandwidth (ties among the distances included), the
pairs left out by groups, and the edge cases: equal samples, all points equal. A measurement in
numpy: values only, no gradient."""
import math
import statistics

import numpy as np

from grading import close, parts

EXERCISE = "ex3_mmd2"


def rbf(a, b, bandwidth) -> float:
    return math.exp(-sum((u - v) ** 2 for u, v in zip(a, b)) / (2 * bandwidth ** 2))


def median_distance(x, y) -> float:
    pooled = [*x, *y]
    return statistics.median(math.dist(pooled[i], pooled[j])
                             for i in range(len(pooled)) for j in range(i + 1, len(pooled)))


def mmd2_loops(x, y, bandwidth, unbiased, groups=None) -> float:
    """Each mean one pair at a time; unbiased leaves out the pairs that share a label (without
    groups: a point's pair with itself)."""
    gx, gy = groups if groups is not None else (range(len(x)), range(len(x), len(x) + len(y)))

    def mean_kernel(a, b, ga, gb):
        values = [rbf(a[i], b[j], bandwidth) for i in range(len(a)) for j in range(len(b))
                  if not unbiased or ga[i] != gb[j]]
        return sum(values) / len(values)
    return (mean_kernel(x, x, list(gx), list(gx)) + mean_kernel(y, y, list(gy), list(gy))
            - 2 * mean_kernel(x, y, list(gx), list(gy)))


def samples(seed, m=7, n=5, shift=0.5):
    rng = np.random.default_rng(seed)
    return rng.normal(size=(m, 3)), rng.normal(shift, 1.0, size=(n, 3))


def estimate(mmd2, *args, **kwargs):
    value, bandwidth = parts(mmd2(*args, **kwargs), 2, "mmd2 returns (mmd2, bandwidth)")
    for part, name in ((value, "mmd2"), (bandwidth, "the bandwidth")):
        assert isinstance(part, float), f"mmd2 returns {name} as a Python float, got {type(part)}"
    return value, bandwidth


def check_biased_with_a_given_bandwidth(mmd2):
    """unbiased=False: every pair, a point's with itself included; the bandwidth comes back."""
    x, y = samples(0)
    value, bandwidth = estimate(mmd2, x, y, bandwidth=0.7, unbiased=False)
    close(bandwidth, 0.7, "the bandwidth given")
    close(value, mmd2_loops(x, y, 0.7, unbiased=False), "the biased MMD² at bandwidth 0.7",
          rtol=1e-9, atol=1e-12)


def check_unbiased_leaves_out_a_point_with_itself(mmd2):
    x, y = samples(1)
    value, _ = estimate(mmd2, x, y, bandwidth=1.3)
    close(value, mmd2_loops(x, y, 1.3, unbiased=True), "the unbiased MMD² at bandwidth 1.3",
          rtol=1e-9, atol=1e-12)


def check_the_median_heuristic(mmd2):
    """Without a bandwidth: the median distance over the pairs of distinct points of x and y
    pooled; y holds copies of x's points, so some distances tie at 0."""
    x, y = samples(2)
    y = np.concatenate([y, x[:2]])
    for unbiased in (True, False):
        value, bandwidth = estimate(mmd2, x, y, unbiased=unbiased)
        close(bandwidth, median_distance(x, y), "the median pairwise distance", rtol=1e-9)
        close(value, mmd2_loops(x, y, median_distance(x, y), unbiased),
              f"the {'un' if unbiased else ''}biased MMD² at the median distance", rtol=1e-9,
              atol=1e-12)


def check_groups_leave_out_the_pairs_of_one_label(mmd2):
    """groups: 3 prompts x 2 states on each side; the unbiased estimate leaves out every pair that
    shares a prompt (in all three means)."""
    x, y = samples(3, m=6, n=6)
    groups = (np.repeat(np.arange(3), 2), np.repeat(np.arange(3), 2))
    value, _ = estimate(mmd2, x, y, bandwidth=1.1, groups=groups)
    close(value, mmd2_loops(x, y, 1.1, unbiased=True, groups=groups),
          "the unbiased MMD² with groups", rtol=1e-9, atol=1e-12)


def check_equal_samples_and_equal_points(mmd2):
    """x against a copy of itself: the biased MMD² is 0. All points equal: every distance is 0, so
    the bandwidth is 1.0 (any gives MMD² 0), and both estimates are 0. And MMD² is symmetric."""
    x, y = samples(4)
    value, _ = estimate(mmd2, x, x.copy(), unbiased=False)
    close(value, 0.0, "the biased MMD² of a sample against a copy of itself", atol=1e-12)
    same_points = np.ones((4, 3))
    for unbiased in (True, False):
        value, bandwidth = estimate(mmd2, same_points, same_points.copy(), unbiased=unbiased)
        close(bandwidth, 1.0, "the bandwidth when every point is the same")
        close(value, 0.0, "MMD² when every point is the same", atol=1e-12)
    close(estimate(mmd2, y, x)[0], estimate(mmd2, x, y)[0], "MMD²(y, x) against MMD²(x, y)",
          rtol=1e-9, atol=1e-12)


CHECKS = [check_biased_with_a_given_bandwidth, check_unbiased_leaves_out_a_point_with_itself,
          check_the_median_heuristic, check_groups_leave_out_the_pairs_of_one_label,
          check_equal_samples_and_equal_points]


def test_mmd2(check, graded):
    check(graded)


# Plausible wrong implementations; each fails a check above (tests/test_course.py) -------------

def squared_distances(a, b):
    return np.maximum((a * a).sum(1)[:, None] + (b * b).sum(1)[None, :] - 2 * a @ b.T, 0.0)


def median_of_pooled(x, y):
    pooled = np.concatenate([x, y])
    pairs = np.triu_indices(len(pooled), k=1)
    return float(np.median(np.sqrt(squared_distances(pooled, pooled)[pairs]))) or 1.0


def mmd2_with(x, y, bandwidth, unbiased, groups, kernel_scale=2.0):
    """An MMD² with a switch for each mistake below."""
    bandwidth = median_of_pooled(x, y) if bandwidth is None else bandwidth
    kernels = [np.exp(-squared_distances(a, b) / (kernel_scale * bandwidth ** 2))
               for a, b in ((x, x), (y, y), (x, y))]
    labels = groups if groups is not None else (np.arange(len(x)), len(x) + np.arange(len(y)))
    gx, gy = map(np.asarray, labels)
    means = [k[a[:, None] != b[None, :]].mean() if unbiased else k.mean()
             for k, (a, b) in zip(kernels, ((gx, gx), (gy, gy), (gx, gy)))]
    return float(means[0] + means[1] - 2 * means[2]), float(bandwidth)


def mutant_always_biased(x, y, bandwidth=None, unbiased=True, groups=None):
    """Keeps a point's pair with itself even when asked for the unbiased estimate."""
    return mmd2_with(x, y, bandwidth, False, groups)


def mutant_groups_ignored(x, y, bandwidth=None, unbiased=True, groups=None):
    """Leaves out only a point's pair with itself, also where states share a prompt."""
    return mmd2_with(x, y, bandwidth, unbiased, None)


def mutant_a_kernel_without_the_2(x, y, bandwidth=None, unbiased=True, groups=None):
    """exp(-|a - b|² / bw²): another bandwidth than the one returned."""
    return mmd2_with(x, y, bandwidth, unbiased, groups, kernel_scale=1.0)


def mutant_the_mean_distance_as_bandwidth(x, y, bandwidth=None, unbiased=True, groups=None):
    """The mean pairwise distance where the median belongs."""
    if bandwidth is None:
        pooled = np.concatenate([x, y])
        pairs = np.triu_indices(len(pooled), k=1)
        bandwidth = float(np.sqrt(squared_distances(pooled, pooled)[pairs]).mean()) or 1.0
    return mmd2_with(x, y, bandwidth, unbiased, groups)


MUTANTS = [mutant_always_biased, mutant_groups_ignored, mutant_a_kernel_without_the_2,
           mutant_the_mean_distance_as_bandwidth]
