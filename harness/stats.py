"""Error bars: the standard error of a mean over questions, as lm-evaluation-harness computes it,
its form clustered by subject, the difference of two runs (paired question by question, or
unpaired), 95% intervals, and a permutation test's p-value; and the distances between two samples
of states that eval.py's state drift reports (MMD² with its permutation test, centroid, sliced
Wasserstein). Plain Python and numpy: no scipy.

    mean_stderr([1, 0, 1, 1, 0])          # 0.245: the sample std over items / sqrt(n), lm-eval's
    paired_difference(run, base)          # {"delta", "stderr", "low", "high", "excludes_zero", ...}

Following "Adding Error Bars to Evals" (Miller, 2024): a benchmark's questions are a sample from
the questions it could have asked, so a score has a standard error, and two models asked the same
questions are compared by the mean of their per-question differences, whose standard error is far
smaller than that of two independent scores when the models agree on most questions. Intervals are
normal (estimate ± 1.96 standard errors): the tasks here have 60 to 14,042 questions, where the
central limit theorem serves, and lm-eval and Miller use the same.
"""
import math

import numpy as np

Z95 = 1.959963984540054  # the normal distribution's 97.5% quantile: 95% of it lies within ±Z95


def mean(values) -> float:
    values = [float(v) for v in values]
    return sum(values) / len(values) if values else float("nan")


def sample_stddev(values) -> float:
    """lm-eval's sample_stddev: sqrt(sum of squared deviations / (n - 1))."""
    mu = mean(values)
    return math.sqrt(sum((v - mu) ** 2 for v in values) / (len(values) - 1))


def mean_stderr(values):
    """lm-eval's mean_stderr (lm_eval.api.metrics, 0.4), the standard error of a mean-aggregated
    metric: sample_stddev / sqrt(n). None for fewer than 2 values (lm-eval prints N/A). For n
    scores of 0 or 1 with mean p it is sqrt(p (1 - p) / (n - 1)): proportion_stderr."""
    values = [float(v) for v in values]
    if len(values) < 2:
        return None
    return sample_stddev(values) / math.sqrt(len(values))


def proportion_stderr(p: float, n: int) -> float:
    """mean_stderr of n scores of 0 or 1 whose mean is p, from p and n alone: what a published
    accuracy and its number of questions give."""
    return math.sqrt(p * (1 - p) / (n - 1))


def clustered_stderr(values, clusters):
    """The standard error of the mean when questions come in clusters (MMLU's subjects) whose
    questions are not independent draws (Miller 2024's clustered standard error): mean_stderr²
    plus, over each cluster, the products of the deviations from the mean of every two different
    questions in it, / n². With one question per cluster it is mean_stderr; never negative."""
    values = [float(v) for v in values]
    plain = mean_stderr(values)
    if plain is None:
        return None
    mu = mean(values)
    sums, squares = {}, {}  # per cluster: the sum of its deviations, the sum of their squares
    for value, cluster in zip(values, clusters):
        sums[cluster] = sums.get(cluster, 0.0) + (value - mu)
        squares[cluster] = squares.get(cluster, 0.0) + (value - mu) ** 2
    # (sum of a cluster's deviations)² - (the sum of their squares) = its cross products
    cross = sum(sums[c] ** 2 - squares[c] for c in sums) / len(values) ** 2
    return math.sqrt(plain ** 2 + cross)


def difference(delta: float, stderr, paired: bool) -> dict:
    """A difference with its standard error (None: unknown), 95% interval and whether that
    excludes 0."""
    if stderr is None:
        return {"delta": delta, "stderr": None, "low": None, "high": None,
                "excludes_zero": None, "paired": paired}
    low, high = delta - Z95 * stderr, delta + Z95 * stderr
    return {"delta": delta, "stderr": stderr, "low": low, "high": high,
            "excludes_zero": low > 0 or high < 0, "paired": paired}


def paired_difference(a, b) -> dict:
    """a - b for two runs scored on the same questions, in the same order: the mean of the
    per-question differences, and their mean_stderr (Miller 2024's paired differences)."""
    if len(a) != len(b):
        raise ValueError(f"paired scores need the same questions: {len(a)} vs {len(b)} scores")
    differences = [float(x) - float(y) for x, y in zip(a, b)]
    return difference(mean(differences), mean_stderr(differences), paired=True)


def minimum_detectable(stderr, z=Z95):
    """The minimum detectable difference of a comparison with this standard error: the smallest
    |Δ| whose 95% interval, Δ ± z·stderr, excludes 0 (the lab's minimum detectable forgetting,
    MDF = 1.96 · SE_paired). A true difference of exactly that size is detected half the time;
    80% power needs (1.96 + 0.84) · SE. None where the error is unknown."""
    return None if stderr is None else z * stderr


def unpaired_difference(mean_a: float, stderr_a, mean_b: float, stderr_b) -> dict:
    """mean_a - mean_b for two runs scored on different (independent) questions: the standard
    errors add in quadrature."""
    if stderr_a is None or stderr_b is None:
        return difference(mean_a - mean_b, None, paired=False)
    return difference(mean_a - mean_b, math.hypot(stderr_a, stderr_b), paired=False)


def average_of_differences(differences: list) -> dict:
    """The mean of k differences measured on independent question sets (Forgetting: MMLU's and
    TruthfulQA's): its standard error is sqrt(sum of their squares) / k."""
    delta = mean(d["delta"] for d in differences)
    paired = all(d["paired"] for d in differences)
    if any(d["stderr"] is None for d in differences):
        return difference(delta, None, paired)
    stderr = math.sqrt(sum(d["stderr"] ** 2 for d in differences)) / len(differences)
    return difference(delta, stderr, paired)


def permutation_p_value(observed: float, permuted) -> float:
    """The share of permutations whose statistic is at least the observed one, counting the
    observed split itself (so never 0: with P permutations the smallest p is 1 / (P + 1)). A
    permuted statistic within 1e-12 of the observed one counts as equal (the same sums, added in
    another order)."""
    permuted = [float(s) for s in permuted]
    tolerance = 1e-12 * max(1.0, abs(observed))
    at_least = sum(s >= observed - tolerance for s in permuted)
    return (1 + at_least) / (1 + len(permuted))


# Two samples of states: how far apart (eval.py's state drift) -----------------------------------

DRIFT_PERMUTATIONS = 500  # random splits in the permutation test: p-values down to 1/501


def squared_distances(x, y):
    return np.maximum((x * x).sum(1)[:, None] + (y * y).sum(1)[None, :] - 2 * x @ y.T, 0.0)


def rbf_kernel(a, b, bandwidth):
    return np.exp(-squared_distances(a, b) / (2 * bandwidth ** 2))


def mmd2(x, y, bandwidth=None, unbiased=True, groups=None):
    """MMD² of samples x (m, d) and y (n, d), RBF kernel exp(-|a-b|² / 2bw²), bandwidth by default
    the median pairwise distance of the pooled samples; returns (mmd2, bandwidth). Unbiased leaves
    out the pairs of a point with itself, or with groups=(labels_x, labels_y) all pairs sharing a
    label: one prompt's states are not independent draws, and their pairs would read as drift
    between two samples of one model. Biased keeps all."""
    if bandwidth is None:
        pooled = np.concatenate([x, y])
        distances = np.sqrt(squared_distances(pooled, pooled)[np.triu_indices(len(pooled), k=1)])
        bandwidth = float(np.median(distances)) or 1.0  # all points equal: any bandwidth gives 0
    kxx, kyy, kxy = (rbf_kernel(a, b, bandwidth) for a, b in ((x, x), (y, y), (x, y)))
    if not unbiased:
        return float(kxx.mean() + kyy.mean() - 2 * kxy.mean()), bandwidth
    gx, gy = map(np.asarray,
                 groups if groups is not None else (range(len(x)), range(len(x), len(x) + len(y))))
    term = lambda k, a, b: k[a[:, None] != b[None, :]].mean()  # noqa: E731
    return float(term(kxx, gx, gx) + term(kyy, gy, gy) - 2 * term(kxy, gx, gy)), bandwidth


def mmd2_of_splits(x, y, groups, bandwidth, swaps):
    """The unbiased grouped MMD² (as mmd2 with these groups and bandwidth) of other splits of the
    same states: in split k, the states of every label l with swaps[k, l] trade sides (x's states
    of that prompt go to y and y's to x). swaps: bool (n_splits, n_labels), over the sorted unique
    labels; a row of False is the observed split. Returns (n_splits,)."""
    labels = np.concatenate([np.asarray(groups[0]), np.asarray(groups[1])])  # (m + n,)
    pooled = np.concatenate([x, y])
    different = (labels[:, None] != labels[None, :]).astype(float)  # pairs the estimate keeps
    kept = rbf_kernel(pooled, pooled, bandwidth) * different  # (m + n, m + n)
    # on_x[i, k]: 1 where state i sits on x's side in split k
    label_index = np.searchsorted(np.unique(labels), labels)
    starts_on_x = np.arange(len(pooled)) < len(x)
    on_x = (starts_on_x[:, None] != swaps.T[label_index]).astype(float)  # (m + n, n_splits)
    on_y = 1.0 - on_x

    def term(u, v):  # per split: the mean kernel over kept pairs of a u-side and a v-side state
        return (u * (kept @ v)).sum(0) / (u * (different @ v)).sum(0)
    return term(on_x, on_x) + term(on_y, on_y) - 2 * term(on_x, on_y)


def mmd2_permutation_test(x, y, groups, bandwidth, n_permutations=DRIFT_PERMUTATIONS,
                          seed=0) -> float:
    """p-value of the unbiased grouped MMD² under "no drift": the share of random splits of the
    pooled states whose MMD² is at least the observed one. groups: (labels_x, labels_y), a state's
    label its prompt, every prompt on both sides. Without drift, a prompt's model states and its
    reference states are two samples of one distribution, so they may trade sides: each split
    swaps every prompt's two groups, or not, by a fair seeded coin. Whole groups move, so that
    each side keeps one group of each prompt and the statistic leaves out the same kind of pairs
    in every split; single states moved across prompts would put one prompt's states on a side
    twice. The bandwidth is the observed statistic's (the median of the pooled distances is the
    same for every split anyway)."""
    n_labels = len(np.unique(np.concatenate([np.asarray(groups[0]), np.asarray(groups[1])])))
    swaps = np.random.default_rng(seed).random((n_permutations, n_labels)) < 0.5
    no_swap = np.zeros((1, n_labels), dtype=bool)  # the observed split first
    statistics = mmd2_of_splits(x, y, groups, bandwidth, np.concatenate([no_swap, swaps]))
    return permutation_p_value(statistics[0], statistics[1:])


def centroid_distance(x, y) -> float:
    return float(np.linalg.norm(x.mean(0) - y.mean(0)))


def sliced_wasserstein(x, y, n_projections=128, seed=0) -> float:
    """Mean over seeded random unit directions of the exact 1-D Wasserstein-1 distance of the
    projections: the integral of |quantile_x(u) - quantile_y(u)|, step functions summed over their
    merged steps."""
    directions = np.random.default_rng(seed).standard_normal((x.shape[1], n_projections))
    px, py = (np.sort(s @ (directions / np.linalg.norm(directions, axis=0)), axis=0)
              for s in (x, y))
    edges = np.unique(np.concatenate([np.linspace(0, 1, len(x) + 1),
                                      np.linspace(0, 1, len(y) + 1)]))
    mids = (edges[1:] + edges[:-1]) / 2
    gaps = np.abs(px[(mids * len(x)).astype(int)] - py[(mids * len(y)).astype(int)])
    return float((np.diff(edges)[:, None] * gaps).sum(0).mean())


def drift_distances(x, y, groups, seed=0) -> dict:
    mmd, bandwidth = mmd2(x, y, groups=groups)
    return {"mmd2": mmd, "mmd2_biased": mmd2(x, y, bandwidth, unbiased=False)[0],
            "bandwidth": bandwidth,
            "p_value": mmd2_permutation_test(x, y, groups, bandwidth, seed=seed),
            "centroid": centroid_distance(x, y), "sliced_wasserstein": sliced_wasserstein(x, y)}
