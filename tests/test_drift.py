"""drift.py, the state drift: the MMD / centroid / sliced-Wasserstein math against direct
computations, the two featurisations, and state_drift on tiny models. (eval.py's --drift_reference
and --report's drift column are tested in test_eval.py.)"""
import json
import zlib

import numpy as np
import pytest

import drift as D
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
        got, bw = D.mmd2(x, y, bandwidth=0.7, unbiased=unbiased)
        assert bw == 0.7
        assert got == pytest.approx(mmd2_loops(x, y, 0.7, unbiased), abs=1e-12)
        got, bw = D.mmd2(x, y, unbiased=unbiased)  # the median heuristic
        assert bw == pytest.approx(median, abs=1e-12)
        assert got == pytest.approx(mmd2_loops(x, y, median, unbiased), abs=1e-12)
    gx, gy = [0, 0, 1, 1, 2, 2, 3], [0, 1, 1, 2, 4]  # grouped: pairs sharing a label are left out
    got, _ = D.mmd2(x, y, 0.7, groups=(gx, gy))
    assert got == pytest.approx(mmd2_loops(x, y, 0.7, True, gx, gy), abs=1e-12)
    assert got != pytest.approx(D.mmd2(x, y, 0.7)[0], abs=1e-6)


def test_mmd2_is_zero_without_drift_and_grows_with_the_shift():
    rng = np.random.default_rng(1)
    x, y = rng.normal(size=(200, 4)), rng.normal(size=(200, 4))
    assert D.mmd2(x, x.copy(), unbiased=False)[0] == 0.0
    assert D.mmd2(x, x.copy(), groups=(np.arange(200) // 4,) * 2)[0] == 0.0
    assert abs(D.mmd2(x, y)[0]) < 0.01  # two samples of one distribution
    shifted = [D.mmd2(x, y + shift, bandwidth=2.0)[0] for shift in (0.0, 0.25, 0.5, 1.0, 2.0)]
    assert shifted == sorted(shifted)
    assert shifted[-1] > 0.3
    assert shifted[1] > 0.01


def test_centroid_and_sliced_wasserstein():
    rng = np.random.default_rng(2)
    x = rng.normal(size=(50, 6))
    assert D.centroid_distance(x, x.copy()) == 0.0
    assert D.sliced_wasserstein(x, x.copy()) == 0.0
    shift = np.zeros(6)
    shift[0] = 1.0
    assert D.centroid_distance(x, x + shift) == pytest.approx(1.0)
    assert D.sliced_wasserstein(x, x + shift) > 0.1
    # in 1-D every unit direction is +-1, and W1 is exact: equal sizes pair the sorted points
    a, b = rng.normal(size=(9, 1)), rng.normal(1.0, 2.0, size=(9, 1))
    paired = np.abs(np.sort(a[:, 0]) - np.sort(b[:, 0])).mean()
    assert D.sliced_wasserstein(a, b) == pytest.approx(paired, abs=1e-12)
    # other sizes: W1 = integral of |CDF_a - CDF_b|
    a, b = rng.normal(size=(7, 1)), rng.normal(0.5, 1.0, size=(4, 1))
    points = np.sort(np.concatenate([a[:, 0], b[:, 0]]))
    def cdf(s):
        return np.searchsorted(np.sort(s[:, 0]), points[:-1], side="right") / len(s)
    w1 = np.sum(np.abs(cdf(a) - cdf(b)) * np.diff(points))
    assert D.sliced_wasserstein(a, b) == pytest.approx(w1, abs=1e-12)


def test_lexical_features_hit_the_crc32_buckets():
    feats = D.lexical_features(["Ab cd", "", "ab cd"])
    grams = ["w:ab", "w:cd", "b:ab cd", "c:ab ", "c:b c", "c: cd"]
    expected = np.zeros(D.FEATURE_DIM)
    for g in grams:
        expected[zlib.crc32(g.encode()) % D.FEATURE_DIM] += 1.0
    assert np.array_equal(feats[0], expected / np.linalg.norm(expected))
    # lowercased; empty text: all zero
    assert np.array_equal(feats[0], feats[2])
    assert not feats[1].any()
    assert np.array_equal(D.lexical_features(["Ab cd"]), feats[:1])


def test_prefix_lengths():
    assert D.prefix_lengths(128) == [32, 64, 96, 128]
    assert D.prefix_lengths(5) == [2, 3, 4, 5]
    assert D.prefix_lengths(1) == [1, 1, 1, 1]


def test_hidden_features_pool_each_prefix_of_one_forward_pass():
    import torch
    model = tiny_model()
    prompts, rollouts = [[5, 6, 7], [8]], [[9, 10, 11, 12, 13], [14, 15]]
    # padded batch: one row is shorter
    feats = D.hidden_features(model, prompts, rollouts, batch_size=2)
    assert feats.shape == (8, model.config.hidden_size)
    assert np.array_equal(feats, D.hidden_features(model, prompts, rollouts, batch_size=2))
    with torch.no_grad():
        hidden = model(torch.tensor([[8, 14, 15]]), return_hidden=True)[0].double().numpy()
    assert np.allclose(feats[4:],
                       [hidden[1:2].mean(0), hidden[1:2].mean(0), hidden[1:3].mean(0),
                        hidden[1:3].mean(0)],
                       atol=1e-5)
    assert np.allclose(D.hidden_features(model, prompts, rollouts, batch_size=1), feats, atol=1e-5)


class Policy:
    """Only a model's generate(), its tokens optionally mapped: state_drift featurises with the
    reference alone."""
    def __init__(self, model, token_map=lambda t: t):
        self.model, self.token_map = model, token_map

    def generate(self, prompts, *args, **kwargs):
        return [[self.token_map(t) for t in row]
                for row in self.model.generate(prompts, *args, **kwargs)]


def test_state_drift_of_a_model_against_itself_and_others():
    # enough to keep noise under the bounds
    prompts = [f"Question: what is {i} + {i}?\nAnswer:" for i in range(12)]
    base, other, tok = tiny_model(seed=0), tiny_model(seed=1), ByteTokenizer()
    same = D.state_drift(Policy(base), base, tok, prompts, max_new_tokens=6, seed=3, batch_size=8)
    assert (same["n_prompts"], same["n_states"], same["seed"],
            same["cuts"]) == (12, 48, 3, [0.25, 0.5, 0.75, 1.0])
    for kind in ("lexical", "hidden"):
        assert same[kind]["mmd2_biased"] == 0.0
        assert same[kind]["mmd2"] == 0.0
        assert same[kind]["centroid"] == 0.0
        assert same[kind]["sliced_wasserstein"] == 0.0
        assert same[kind]["bandwidth"] > 0
    # another random model: other states (random text from both, so no drift common to all prompts)
    drift = D.state_drift(other, base, tok, prompts, max_new_tokens=6, temperature=0.3, seed=3,
                          batch_size=8)
    for kind in ("lexical", "hidden"):
        assert drift[kind]["mmd2_biased"] > 0.05
        assert drift[kind]["centroid"] > 0.1
        assert drift[kind]["sliced_wasserstein"] > 0
        assert abs(drift[kind]["mmd2"]) < 0.05
    # a policy collapsed onto 4 tokens: drift in every prompt's states, which the unbiased (grouped)
    # estimate sees
    collapsed = D.state_drift(Policy(base, lambda t: 256 + t % 4), base, tok, prompts,
                              max_new_tokens=6, seed=3, batch_size=8)
    for kind in ("lexical", "hidden"):
        assert collapsed[kind]["mmd2"] > 0.15
        assert collapsed[kind]["mmd2_biased"] > collapsed[kind]["mmd2"]
    assert json.loads(json.dumps(drift)) == drift  # goes into results.json as it is
