"""The state drift: the MMD / centroid / sliced-Wasserstein math (harness/stats.py) against
direct computations, the two featurisations and state_drift on tiny models (eval.py). (eval.py's
--drift_reference and --report's drift column are tested in test_eval.py.)"""
import json
import zlib

import numpy as np
import pytest
import torch

import eval as E
from harness import stats as S
from conftest import ByteTokenizer, tiny_model


def rbf(a, b, bandwidth):
    return np.exp(-np.sum((a - b) ** 2) / (2 * bandwidth ** 2))


def mmd2_loops(x, y, bandwidth, unbiased, gx=None, gy=None):
    """The textbook estimator, one pair at a time; pairs sharing a group label are skipped when
    unbiased."""
    gx = list(range(len(x))) if gx is None else gx
    gy = [len(x) + j for j in range(len(y))] if gy is None else gy
    def term(a, b, ga, gb):
        values = [rbf(a[i], b[j], bandwidth) for i in range(len(a)) for j in range(len(b))
                  if not unbiased or ga[i] != gb[j]]
        return sum(values) / len(values)
    return term(x, x, gx, gx) + term(y, y, gy, gy) - 2 * term(x, y, gx, gy)


def test_mmd2_matches_the_double_loop():
    rng = np.random.default_rng(0)
    x, y = rng.normal(size=(7, 3)), rng.normal(0.5, 1.0, size=(5, 3))
    pooled = np.concatenate([x, y])
    median = np.median([np.linalg.norm(pooled[i] - pooled[j]) for i in range(12)
                        for j in range(i + 1, 12)])
    for unbiased in (True, False):
        got, bw = S.mmd2(x, y, bandwidth=0.7, unbiased=unbiased)
        assert bw == 0.7
        assert got == pytest.approx(mmd2_loops(x, y, 0.7, unbiased), abs=1e-12)
        got, bw = S.mmd2(x, y, unbiased=unbiased)  # the median heuristic
        assert bw == pytest.approx(median, abs=1e-12)
        assert got == pytest.approx(mmd2_loops(x, y, median, unbiased), abs=1e-12)
    gx, gy = [0, 0, 1, 1, 2, 2, 3], [0, 1, 1, 2, 4]  # grouped: pairs sharing a label are left out
    got, _ = S.mmd2(x, y, 0.7, groups=(gx, gy))
    assert got == pytest.approx(mmd2_loops(x, y, 0.7, True, gx, gy), abs=1e-12)
    assert got != pytest.approx(S.mmd2(x, y, 0.7)[0], abs=1e-6)


def test_mmd2_is_zero_without_drift_and_grows_with_the_shift():
    rng = np.random.default_rng(1)
    x, y = rng.normal(size=(200, 4)), rng.normal(size=(200, 4))
    assert S.mmd2(x, x.copy(), unbiased=False)[0] == 0.0
    assert S.mmd2(x, x.copy(), groups=(np.arange(200) // 4,) * 2)[0] == 0.0
    assert abs(S.mmd2(x, y)[0]) < 0.01  # two samples of one distribution
    shifted = [S.mmd2(x, y + shift, bandwidth=2.0)[0] for shift in (0.0, 0.25, 0.5, 1.0, 2.0)]
    assert shifted == sorted(shifted)
    assert shifted[-1] > 0.3
    assert shifted[1] > 0.01


def swapped(x, y, labels, swap):
    """x and y with the states of every label in `swap` traded between them, one pair at a time."""
    x, y = x.copy(), y.copy()
    for i, label in enumerate(labels):
        if label in swap:
            x[i], y[i] = y[i].copy(), x[i].copy()
    return x, y


def test_mmd2_of_splits_is_mmd2_of_the_swapped_sets():
    rng = np.random.default_rng(3)
    labels = np.repeat(np.arange(6), 3)  # 6 prompts, 3 states each, on both sides
    x, y = rng.normal(size=(18, 4)), rng.normal(0.3, 1.0, size=(18, 4))
    swaps = np.zeros((3, 6), dtype=bool)
    swaps[1, [0, 4]] = True
    swaps[2] = [True, False, True, True, False, True]
    got = S.mmd2_of_splits(x, y, (labels, labels), 0.9, swaps)
    for k, row in enumerate(swaps):
        a, b = swapped(x, y, labels, set(np.flatnonzero(row)))
        assert got[k] == pytest.approx(mmd2_loops(a, b, 0.9, True, labels, labels), abs=1e-12)
    assert got[0] == pytest.approx(S.mmd2(x, y, 0.9, groups=(labels, labels))[0], abs=1e-12)
    # swapping every prompt swaps x and y, which MMD² does not see
    assert S.mmd2_of_splits(x, y, (labels, labels), 0.9, np.ones((1, 6), bool))[0] == \
        pytest.approx(got[0], abs=1e-12)


def test_permutation_test_is_calibrated_and_finds_a_real_difference():
    """Two samples of one distribution: p-values spread over (0, 1], seldom small; two clearly
    different state sets: p < 0.01. Seeded."""
    labels = np.repeat(np.arange(25), 4)  # 25 prompts, 4 states each
    p_values = []
    for seed in range(50):
        rng = np.random.default_rng(seed)
        prompt_means = rng.normal(size=(25, 5)).repeat(4, axis=0)  # states of a prompt are alike
        x = prompt_means + 0.5 * rng.normal(size=(100, 5))
        y = prompt_means + 0.5 * rng.normal(size=(100, 5))
        bandwidth = S.mmd2(x, y, groups=(labels, labels))[1]
        p_values.append(S.mmd2_permutation_test(x, y, (labels, labels), bandwidth, 200, seed))
    assert sum(p < 0.05 for p in p_values) <= 6  # 2.5 expected
    assert 0.35 < np.mean(p_values) < 0.65
    assert all(1 / 201 <= p <= 1 for p in p_values)
    shifted = y + np.array([0.5, 0, 0, 0, 0])  # drift in every prompt's states
    bandwidth = S.mmd2(x, shifted, groups=(labels, labels))[1]
    assert S.mmd2_permutation_test(x, shifted, (labels, labels), bandwidth, 200, 0) < 0.01
    # the same states on both sides: no split is smaller than the observed 0
    assert S.mmd2_permutation_test(x, x.copy(), (labels, labels), bandwidth, 200, 0) == 1.0


def test_centroid_and_sliced_wasserstein():
    rng = np.random.default_rng(2)
    x = rng.normal(size=(50, 6))
    assert S.centroid_distance(x, x.copy()) == 0.0
    assert S.sliced_wasserstein(x, x.copy()) == 0.0
    shift = np.zeros(6)
    shift[0] = 1.0
    assert S.centroid_distance(x, x + shift) == pytest.approx(1.0)
    assert S.sliced_wasserstein(x, x + shift) > 0.1
    # in 1-D every unit direction is +-1, and W1 is exact: equal sizes pair the sorted points
    a, b = rng.normal(size=(9, 1)), rng.normal(1.0, 2.0, size=(9, 1))
    paired = np.abs(np.sort(a[:, 0]) - np.sort(b[:, 0])).mean()
    assert S.sliced_wasserstein(a, b) == pytest.approx(paired, abs=1e-12)
    # other sizes: W1 = integral of |CDF_a - CDF_b|
    a, b = rng.normal(size=(7, 1)), rng.normal(0.5, 1.0, size=(4, 1))
    points = np.sort(np.concatenate([a[:, 0], b[:, 0]]))
    def cdf(s):
        return np.searchsorted(np.sort(s[:, 0]), points[:-1], side="right") / len(s)
    w1 = np.sum(np.abs(cdf(a) - cdf(b)) * np.diff(points))
    assert S.sliced_wasserstein(a, b) == pytest.approx(w1, abs=1e-12)


def test_lexical_features_hit_the_crc32_buckets():
    feats = E.lexical_features(["Ab cd", "", "ab cd"])
    grams = ["w:ab", "w:cd", "b:ab cd", "c:ab ", "c:b c", "c: cd"]
    expected = np.zeros(E.FEATURE_DIM)
    for g in grams:
        expected[zlib.crc32(g.encode()) % E.FEATURE_DIM] += 1.0
    assert np.array_equal(feats[0], expected / np.linalg.norm(expected))
    # lowercased; empty text: all zero
    assert np.array_equal(feats[0], feats[2])
    assert not feats[1].any()
    assert np.array_equal(E.lexical_features(["Ab cd"]), feats[:1])


def test_prefix_lengths():
    assert E.prefix_lengths(128) == [32, 64, 96, 128]
    assert E.prefix_lengths(5) == [2, 3, 4, 5]
    assert E.prefix_lengths(1) == [1, 1, 1, 1]


def test_hidden_features_pool_each_prefix_of_one_forward_pass():
    model = tiny_model()
    prompts, rollouts = [[5, 6, 7], [8]], [[9, 10, 11, 12, 13], [14, 15]]
    # padded batch: one row is shorter
    feats = E.hidden_features(model, prompts, rollouts, batch_size=2)
    assert feats.shape == (8, model.config.hidden_size)
    assert np.array_equal(feats, E.hidden_features(model, prompts, rollouts, batch_size=2))
    with torch.no_grad():
        hidden = model(torch.tensor([[8, 14, 15]]), return_hidden=True)[0].double().numpy()
    assert np.allclose(feats[4:],
                       [hidden[1:2].mean(0), hidden[1:2].mean(0), hidden[1:3].mean(0),
                        hidden[1:3].mean(0)],
                       atol=1e-5)
    assert np.allclose(E.hidden_features(model, prompts, rollouts, batch_size=1), feats, atol=1e-5)


class Policy:
    """Only a model's generate(), its tokens optionally mapped, or sampled with its own random
    numbers (another seed): state_drift featurises with the reference alone."""
    def __init__(self, model, token_map=lambda t: t, seed=None):
        self.model, self.token_map = model, token_map
        self.stream = None if seed is None else torch.Generator().manual_seed(seed)

    def generate(self, prompts, *args, uniforms=None, **kwargs):
        if self.stream is not None:
            uniforms = torch.rand(uniforms.shape, generator=self.stream)
        return [[self.token_map(t) for t in row]
                for row in self.model.generate(prompts, *args, uniforms=uniforms, **kwargs)]


def test_state_drift_of_a_model_against_itself_and_others():
    # enough to keep noise under the bounds
    prompts = [f"Question: what is {i} + {i}?\nAnswer:" for i in range(12)]
    base, other, tok = tiny_model(seed=0), tiny_model(seed=1), ByteTokenizer()
    same = E.state_drift(Policy(base), base, tok, prompts, max_new_tokens=6, seed=3, batch_size=8)
    assert (same["n_prompts"], same["n_states"], same["seed"],
            same["cuts"]) == (12, 48, 3, [0.25, 0.5, 0.75, 1.0])
    for kind in ("lexical", "hidden"):
        assert same[kind]["mmd2_biased"] == 0.0
        assert same[kind]["mmd2"] == 0.0
        assert same[kind]["centroid"] == 0.0
        assert same[kind]["sliced_wasserstein"] == 0.0
        assert same[kind]["bandwidth"] > 0
        assert same[kind]["p_value"] == 1.0
    # another random model: other states (random text from both, so no drift common to all prompts)
    drift = E.state_drift(other, base, tok, prompts, max_new_tokens=6, temperature=0.3, seed=3,
                          batch_size=8)
    for kind in ("lexical", "hidden"):
        assert drift[kind]["mmd2_biased"] > 0.05
        assert drift[kind]["centroid"] > 0.1
        assert drift[kind]["sliced_wasserstein"] > 0
        assert abs(drift[kind]["mmd2"]) < 0.05
    # a policy collapsed onto 4 tokens: drift in every prompt's states, which the unbiased (grouped)
    # estimate sees
    collapsed = E.state_drift(Policy(base, lambda t: 256 + t % 4), base, tok, prompts,
                              max_new_tokens=6, seed=3, batch_size=8)
    for kind in ("lexical", "hidden"):
        assert collapsed[kind]["mmd2"] > 0.15
        assert collapsed[kind]["mmd2_biased"] > collapsed[kind]["mmd2"]
        assert collapsed[kind]["p_value"] < 0.01  # 1 / 501 at least: no split reaches it
    # the same model, sampled with other random numbers: no drift to find
    reseeded = E.state_drift(Policy(base, seed=7), base, tok, prompts, max_new_tokens=6, seed=3,
                             batch_size=8)
    for kind in ("lexical", "hidden"):
        assert reseeded[kind]["mmd2_biased"] > 0  # other samples
        assert reseeded[kind]["p_value"] > 0.05
    assert json.loads(json.dumps(drift)) == drift  # goes into results.json as it is
