"""
State drift, the paper's MMD figure: how far a trained model's own states moved from the base
model's. eval.py --drift_reference BASE reports it (results.json's "drift", --report's column).

A state is the prompt plus a generated prefix. Both models sample one rollout per prompt (same
prompts, batches and seeds: a model against itself reads 0), each cut at 1/4, 1/2, 3/4 and all of
its generated tokens (rounded up; a stop token stays in): fractions, not fixed positions, so every
rollout gives the same number of states. The states are featurised twice, lexically (the paper's
hashed n-grams) and by the base model's hidden states, and the two sets compared by an RBF-kernel
MMD², centroid distance and sliced Wasserstein distance. A permutation test asks whether the MMD²
is larger than two samples of one model would show (its p-value).
"""
import math
import zlib

import numpy as np
import torch

from sampler import rollout
from stats import permutation_p_value

DRIFT_CUTS = (0.25, 0.5, 0.75, 1.0)
FEATURE_DIM = 4096  # hashed lexical feature buckets
DRIFT_PERMUTATIONS = 500  # random splits in the permutation test: p-values down to 1/501


def prefix_lengths(n_generated: int, cuts=DRIFT_CUTS) -> list:
    return [max(1, math.ceil(f * n_generated)) for f in cuts]


def lexical_features(texts, dim=FEATURE_DIM):
    """The paper's featurisation: counts of word unigrams, word bigrams and character 3-grams of the
    lowercased text, hashed into `dim` buckets by crc32 (stable across runs and machines, unlike
    hash()), then L2-normalised so that long and short prefixes are comparable."""
    feats = np.zeros((len(texts), dim))
    for row, text in enumerate(texts):
        text = text.lower()
        words = text.split()
        grams = ([f"w:{w}" for w in words] + [f"b:{a} {b}" for a, b in zip(words, words[1:])]
                 + [f"c:{text[i:i + 3]}" for i in range(len(text) - 2)])
        for g in grams:
            feats[row, zlib.crc32(g.encode()) % dim] += 1.0
    return feats / np.maximum(np.linalg.norm(feats, axis=1, keepdims=True), 1e-12)


@torch.no_grad()
def hidden_features(model, prompts: list, rollouts: list, cuts=DRIFT_CUTS, batch_size: int = 16):
    """Final-norm hidden states of `model`, mean-pooled over each state's generated tokens (the
    prompt is shared). The model is causal: one right-padded pass over prompt + rollout gives every
    prefix's states."""
    feats = []
    for first in range(0, len(prompts), batch_size):
        last = first + batch_size
        batch = list(zip(prompts[first:last], rollouts[first:last]))
        width = max(len(p) + len(r) for p, r in batch)
        idx = torch.tensor([p + r + [0] * (width - len(p) - len(r)) for p, r in batch],
                           device=model.device)
        hidden = model(idx, return_hidden=True).float()
        for row, (prompt, generated) in enumerate(batch):
            # (len(generated), hidden): running sums over the generated tokens' states
            sums = hidden[row, len(prompt):len(prompt) + len(generated)].cumsum(0)
            cut_lengths = prefix_lengths(len(generated), cuts)
            feats += [(sums[k - 1] / k).cpu().numpy() for k in cut_lengths]
    return np.stack(feats).astype(np.float64)


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


@torch.no_grad()
def state_drift(model, reference, tokenizer, prompts: list, max_new_tokens=128, temperature=1.0,
                seed=0, batch_size=16, cuts=DRIFT_CUTS) -> dict:
    """Distances between the states of `model` and `reference` (the base) on the text `prompts`,
    featurised twice: lexically, and by the reference's hidden states (one feature map for both
    sets; the paper names its lexical-only features a limitation). tokenizer: encode_batch, decode,
    stop_ids, n_real_tokens."""
    encoded = tokenizer.encode_batch(prompts)
    states = {}
    lengths = {}
    for name, sampler in (("model", model), ("reference", reference)):
        rollouts = rollout(model=sampler, tokenizer=tokenizer, prompts=encoded,
                           max_new_tokens=max_new_tokens, temperature=temperature, seed=seed,
                           batch_size=batch_size, desc=f"drift: {name}")
        texts = [tokenizer.decode(r[:k]) for r in rollouts for k in prefix_lengths(len(r), cuts)]
        states[name] = (lexical_features(texts),
                        hidden_features(reference, encoded, rollouts, cuts, batch_size))
        lengths[name] = sum(map(len, rollouts)) / len(rollouts)
    groups = (np.repeat(np.arange(len(prompts)), len(cuts)),) * 2  # a state's label: its prompt
    return {"n_prompts": len(prompts), "n_states": len(prompts) * len(cuts), "cuts": list(cuts),
            "max_new_tokens": max_new_tokens, "temperature": temperature, "seed": seed,
            "n_permutations": DRIFT_PERMUTATIONS, "mean_new_tokens": lengths,
            **{kind: drift_distances(states["model"][i], states["reference"][i], groups, seed)
               for i, kind in enumerate(("lexical", "hidden"))}}
