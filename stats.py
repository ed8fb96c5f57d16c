"""Error bars: the standard error of a mean over questions, as lm-evaluation-harness computes it,
its form clustered by subject, the difference of two runs (paired question by question, or
unpaired), 95% intervals, and a permutation test's p-value. Plain Python: no scipy.

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
