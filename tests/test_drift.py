"""eval.py's state drift: the MMD / centroid / sliced-Wasserstein math against direct computations, the two
featurisations, state_drift on tiny models, and the drift through the CLI into results.json and --report."""
import json
import zlib

import numpy as np
import pytest
import torch

import eval as ev
from conftest import tiny_model


def rbf(a, b, bandwidth):
    return np.exp(-np.sum((a - b) ** 2) / (2 * bandwidth ** 2))


def mmd2_loops(x, y, bandwidth, unbiased, gx=None, gy=None):
    """The textbook estimator, one pair at a time; pairs sharing a group label are skipped when unbiased."""
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
    median = np.median([np.linalg.norm(pooled[i] - pooled[j]) for i in range(12) for j in range(i + 1, 12)])
    for unbiased in (True, False):
        got, bw = ev.mmd2(x, y, bandwidth=0.7, unbiased=unbiased)
        assert bw == 0.7 and got == pytest.approx(mmd2_loops(x, y, 0.7, unbiased), abs=1e-12)
        got, bw = ev.mmd2(x, y, unbiased=unbiased)  # the median heuristic
        assert bw == pytest.approx(median, abs=1e-12)
        assert got == pytest.approx(mmd2_loops(x, y, median, unbiased), abs=1e-12)
    gx, gy = [0, 0, 1, 1, 2, 2, 3], [0, 1, 1, 2, 4]  # grouped: pairs sharing a label are left out
    got, _ = ev.mmd2(x, y, 0.7, groups=(gx, gy))
    assert got == pytest.approx(mmd2_loops(x, y, 0.7, True, gx, gy), abs=1e-12)
    assert got != pytest.approx(ev.mmd2(x, y, 0.7)[0], abs=1e-6)


def test_mmd2_is_zero_without_drift_and_grows_with_the_shift():
    rng = np.random.default_rng(1)
    x, y = rng.normal(size=(200, 4)), rng.normal(size=(200, 4))
    assert ev.mmd2(x, x.copy(), unbiased=False)[0] == 0.0
    assert ev.mmd2(x, x.copy(), groups=(np.arange(200) // 4,) * 2)[0] == 0.0
    assert abs(ev.mmd2(x, y)[0]) < 0.01  # two samples of one distribution
    shifted = [ev.mmd2(x, y + shift, bandwidth=2.0)[0] for shift in (0.0, 0.25, 0.5, 1.0, 2.0)]
    assert shifted == sorted(shifted) and shifted[-1] > 0.3 and shifted[1] > 0.01


def test_centroid_and_sliced_wasserstein():
    rng = np.random.default_rng(2)
    x = rng.normal(size=(50, 6))
    assert ev.centroid_distance(x, x.copy()) == 0.0 and ev.sliced_wasserstein(x, x.copy()) == 0.0
    shift = np.zeros(6)
    shift[0] = 1.0
    assert ev.centroid_distance(x, x + shift) == pytest.approx(1.0)
    assert ev.sliced_wasserstein(x, x + shift) > 0.1
    # in 1-D every unit direction is +-1, and W1 is exact: equal sizes pair the sorted points
    a, b = rng.normal(size=(9, 1)), rng.normal(1.0, 2.0, size=(9, 1))
    assert ev.sliced_wasserstein(a, b) == pytest.approx(np.abs(np.sort(a[:, 0]) - np.sort(b[:, 0])).mean(), abs=1e-12)
    # other sizes: W1 = integral of |CDF_a - CDF_b|
    a, b = rng.normal(size=(7, 1)), rng.normal(0.5, 1.0, size=(4, 1))
    points = np.sort(np.concatenate([a[:, 0], b[:, 0]]))
    cdf = lambda s: np.searchsorted(np.sort(s[:, 0]), points[:-1], side="right") / len(s)  # noqa: E731
    assert ev.sliced_wasserstein(a, b) == pytest.approx(np.sum(np.abs(cdf(a) - cdf(b)) * np.diff(points)), abs=1e-12)


def test_lexical_features_hit_the_crc32_buckets():
    feats = ev.lexical_features(["Ab cd", "", "ab cd"])
    grams = ["w:ab", "w:cd", "b:ab cd", "c:ab ", "c:b c", "c: cd"]
    expected = np.zeros(ev.FEATURE_DIM)
    for g in grams:
        expected[zlib.crc32(g.encode()) % ev.FEATURE_DIM] += 1.0
    assert np.array_equal(feats[0], expected / np.linalg.norm(expected))
    assert np.array_equal(feats[0], feats[2]) and not feats[1].any()  # lowercased; empty text: all zero
    assert np.array_equal(ev.lexical_features(["Ab cd"]), feats[:1])


def test_prefix_lengths():
    assert ev.prefix_lengths(128) == [32, 64, 96, 128]
    assert ev.prefix_lengths(5) == [2, 3, 4, 5] and ev.prefix_lengths(1) == [1, 1, 1, 1]


def test_hidden_features_pool_each_prefix_of_one_forward_pass():
    import torch
    model = tiny_model()
    prompts, rollouts = [[5, 6, 7], [8]], [[9, 10, 11, 12, 13], [14, 15]]
    feats = ev.hidden_features(model, prompts, rollouts, batch_size=2)  # padded batch: one row is shorter
    assert feats.shape == (8, model.config.hidden_size)
    assert np.array_equal(feats, ev.hidden_features(model, prompts, rollouts, batch_size=2))
    with torch.no_grad():
        hidden = model(torch.tensor([[8, 14, 15]]), return_hidden=True)[0].double().numpy()
    assert np.allclose(feats[4:], [hidden[1:2].mean(0), hidden[1:2].mean(0), hidden[1:3].mean(0), hidden[1:3].mean(0)],
                       atol=1e-5)
    assert np.allclose(ev.hidden_features(model, prompts, rollouts, batch_size=1), feats, atol=1e-5)


class ByteTokenizer:
    """Enough of a tokenizer for state_drift on a vocabulary-512 model: a token per byte; ids print as words."""
    stop_ids, n_real_tokens = [2], 300

    def encode_batch(self, texts):
        return [list(t.encode()) for t in texts]

    def decode(self, ids):
        return " ".join(f"t{i}" for i in ids)


class Policy:
    """Only a model's generate(), its tokens optionally mapped: state_drift featurises with the reference alone."""
    def __init__(self, model, token_map=lambda t: t):
        self.model, self.token_map = model, token_map

    def generate(self, prompts, *args, **kwargs):
        return [[self.token_map(t) for t in row] for row in self.model.generate(prompts, *args, **kwargs)]


def test_state_drift_of_a_model_against_itself_and_others():
    prompts = [f"Question: what is {i} + {i}?\nAnswer:" for i in range(12)]  # enough to keep noise under the bounds
    base, other, tok = tiny_model(seed=0), tiny_model(seed=1), ByteTokenizer()
    same = ev.state_drift(Policy(base), base, tok, prompts, max_new_tokens=6, seed=3, batch_size=8)
    assert (same["n_prompts"], same["n_states"], same["seed"], same["cuts"]) == (12, 48, 3, [0.25, 0.5, 0.75, 1.0])
    for kind in ("lexical", "hidden"):
        assert same[kind]["mmd2_biased"] == 0.0 and same[kind]["mmd2"] == 0.0 and same[kind]["centroid"] == 0.0
        assert same[kind]["sliced_wasserstein"] == 0.0 and same[kind]["bandwidth"] > 0
    # another random model: other states (random text from both, so no drift common to all prompts)
    drift = ev.state_drift(other, base, tok, prompts, max_new_tokens=6, temperature=0.3, seed=3, batch_size=8)
    for kind in ("lexical", "hidden"):
        assert drift[kind]["mmd2_biased"] > 0.05 and drift[kind]["centroid"] > 0.1
        assert drift[kind]["sliced_wasserstein"] > 0 and abs(drift[kind]["mmd2"]) < 0.05
    # a policy collapsed onto 4 tokens: drift in every prompt's states, which the unbiased (grouped) estimate sees
    collapsed = ev.state_drift(Policy(base, lambda t: 256 + t % 4), base, tok, prompts, max_new_tokens=6, seed=3,
                               batch_size=8)
    for kind in ("lexical", "hidden"):
        assert collapsed[kind]["mmd2"] > 0.15 and collapsed[kind]["mmd2_biased"] > collapsed[kind]["mmd2"]
    assert json.loads(json.dumps(drift)) == drift  # goes into results.json as it is


def write_word_tokenizer(folder, n_words=300):
    """A word-level tokenizer.json small enough for a vocabulary-512 checkpoint (the real one is 151k tokens,
    which makes every tiny model 10M parameters), with Qwen's two stop tokens."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    words = ["<|endoftext|>", "<|im_end|>", "[UNK]", "Question", "Answer", ":"] + [f"w{i}" for i in range(n_words - 6)]
    tokenizer = Tokenizer(models.WordLevel({w: i for i, w in enumerate(words)}, unk_token="[UNK]"))
    tokenizer.pre_tokenizer = pre_tokenizers.Whitespace()
    tokenizer.save(str(folder / "tokenizer.json"))
    return folder


def test_drift_through_the_cli(make_checkpoint, tmp_path, capsys):
    data = tmp_path / "data" / "gsm8k"
    data.mkdir(parents=True)
    rows = [{"question": f"Tom has {i} apples and buys {i + 1} more. How many?", "answer": f"#### {2 * i + 1}"}
            for i in range(5)]
    (data / "test.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    base = write_word_tokenizer(make_checkpoint(seed=0, name="base"))
    trained = write_word_tokenizer(make_checkpoint(seed=1, name="trained"))
    out = tmp_path / "trained.json"
    common = ["--tasks", "none", "--drift_prompts", "3", "--drift_max_new_tokens", "6", "--drift_seed", "1",
              "--drift_temperature", "0.5", "--device", "cpu", "--data_dir", str(tmp_path / "data")]
    ev.main(["--model", str(trained), "--drift_reference", str(base), "--out", str(out)] + common)
    results = json.loads(out.read_text())
    drift = results["drift"]
    assert results["tasks"] == {} and drift["reference"] == str(base)
    assert (drift["n_prompts"], drift["n_states"], drift["max_new_tokens"], drift["temperature"], drift["seed"]) == \
        (3, 12, 6, 0.5, 1)
    for kind in ("lexical", "hidden"):
        assert set(drift[kind]) == {"mmd2", "mmd2_biased", "bandwidth", "centroid", "sliced_wasserstein"}
        assert drift[kind]["mmd2_biased"] > 0 and drift[kind]["centroid"] > 0
    assert f"drift: MMD² lexical {drift['lexical']['mmd2']:.4f}" in capsys.readouterr().err

    write_word_tokenizer(trained, n_words=301)
    before = out.read_text()
    with pytest.raises(SystemExit, match="--drift_reference .*its tokenizer differs"):  # found before scoring
        ev.main(["--model", str(trained), "--drift_reference", str(base), "--out", str(out)] + common)
    assert out.read_text() == before


def fake_results(path, drift=None):
    results = {"model": "m", "settings": {}, "tasks": {"mmlu": {"metrics": {"acc": 0.5}, "samples": [{"index": 0}]}}}
    if drift is not None:
        results["drift"] = {"reference": "Qwen/Qwen3-0.6B-Base", "n_prompts": 100, "max_new_tokens": 128,
                            "temperature": 1.0, "seed": 0, "lexical": {"mmd2": drift}}
    path.write_text(json.dumps(results))
    return str(path)


def test_report_has_the_drift_column(tmp_path, capsys):
    base, rl = fake_results(tmp_path / "base.json"), fake_results(tmp_path / "rl.json", drift=0.012345)
    ev.main(["--report", base, rl])
    lines = capsys.readouterr().out.splitlines()
    assert lines[0].endswith("| Retention ↑ | Drift (MMD²) |") and lines[1].count("|") == 10
    assert lines[2] == "| base | – | – | 50.0 | – | – | – | – | – |"
    assert lines[3] == "| rl | – | – | 50.0 | – | – | – | – | 0.0123 |"
    assert lines[-1] == ("Drift: lexical state MMD² against Qwen/Qwen3-0.6B-Base (100 GSM8K prompts, 128 new tokens, "
                         "temperature 1.0, seed 0).")


def test_kl_to_start_is_zero_for_the_start_and_positive_for_another_model():
    base, other, tok = tiny_model(seed=0), tiny_model(seed=1), ByteTokenizer()
    prompts = [[5, 6, 7], [8, 9], [10, 11, 12, 13]] * 4
    assert ev.kl_to_start(base, base, tok, prompts, max_new_tokens=12, batch_size=5) == 0.0
    # a Monte Carlo estimate of a true KL: with 12 x 12 sampled tokens it is clearly positive
    assert ev.kl_to_start(other, base, tok, prompts, max_new_tokens=12, batch_size=5) > 0.1


def test_the_starting_model_computes_what_the_learner_did_under_autocast(make_checkpoint):
    # Full fine-tuning trains fp32 master weights under bf16 autocast; a bf16 copy of the start would compute
    # slightly differently (fp32 embeddings and norms stay fp32 under autocast), so the start is held in fp32.
    from argparse import Namespace
    folder = make_checkpoint(seed=4)
    learner = ev.Qwen3.from_pretrained(folder)  # the fp32 master weights
    prompts, tok = [[5, 6, 7], [8, 9]] * 3, ByteTokenizer()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        start = ev.starting_model(Namespace(model=str(folder), lora_rank=0), learner.device, torch.bfloat16)
        assert start.dtype == torch.float32
        assert ev.kl_to_start(learner, start, tok, prompts, max_new_tokens=8) == 0.0
        bf16_copy = ev.Qwen3.from_pretrained(folder, dtype=torch.bfloat16)
        assert ev.kl_to_start(learner, bf16_copy, tok, prompts, max_new_tokens=8) != 0.0
