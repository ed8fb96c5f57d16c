"""model.py against references we did not write: transformers' Qwen3ForCausalLM for the logits and
the checkpoint format, Qwen's tokenizer ids, and the definitions of the sampler's masks."""
import json
import math
import os
import shutil
import subprocess
import sys

import pytest
import torch
from safetensors.torch import load_file

from conftest import DEVICES, ROOT, TINY, tiny_config, tiny_model, write_byte_tokenizer
import model as M
from model import Qwen3, Qwen3Config, Tokenizer, add_lora, completion_logprobs, sample_next
from sample import rollout

SHAPES = {  # tied and untied heads, MHA and GQA, head_dim != hidden/heads, other rope theta
    "tied-gqa": {},
    "untied-mha": dict(tie_word_embeddings=False, num_key_value_heads=4, rope_theta=1e6),
    "gqa4-hd16": dict(num_attention_heads=8, num_key_value_heads=2, head_dim=16,
                      num_hidden_layers=3),
}


def uniform(n, seed):
    """n seeded uniform numbers (n, 1): what the sampler inverts its CDF at."""
    return torch.rand(n, 1, generator=torch.Generator().manual_seed(seed))


def hf_model(folder, device="cpu", dtype=torch.float32):
    transformers = pytest.importorskip("transformers")
    return transformers.Qwen3ForCausalLM.from_pretrained(folder, dtype=dtype).to(device).eval()


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("shape", SHAPES)
def test_logits_equal_transformers(make_checkpoint, shape, device):
    folder = make_checkpoint(seed=1, **SHAPES[shape])
    ours = Qwen3.from_pretrained(folder, device=device)
    theirs = hf_model(folder, device)
    idx = torch.randint(0, 512, (2, 37), generator=torch.Generator().manual_seed(0)).to(device)
    with torch.no_grad():
        expected = theirs(idx).logits
        assert (ours(idx) - expected).abs().max().item() < 1e-4
        # and at shifted positions, which exercises RoPE beyond 0..T-1
        positions = torch.arange(100, 137, device=device).expand(2, -1)
        expected = theirs(idx, position_ids=positions).logits
        assert (ours(idx, positions) - expected).abs().max().item() < 1e-4


@pytest.mark.parametrize("device", DEVICES)
def test_bf16_logits_equal_transformers_to_the_bit(make_checkpoint, device):
    folder = make_checkpoint(seed=2)
    theirs = hf_model(folder, device, torch.bfloat16)
    ours = Qwen3.from_pretrained(folder, device=device, dtype=torch.bfloat16)
    idx = torch.randint(0, 512, (2, 33), generator=torch.Generator().manual_seed(1)).to(device)
    with torch.no_grad():
        assert torch.equal(ours(idx), theirs(idx).logits)


def test_save_load_round_trip_is_exact(tmp_path):
    model = tiny_model(seed=3, tie_word_embeddings=False)
    model.save_pretrained(tmp_path / "m")
    loaded = Qwen3.from_pretrained(tmp_path / "m")
    assert loaded.config == model.config
    for (k, a), (_, b) in zip(model.hf_state_dict().items(), loaded.hf_state_dict().items()):
        assert torch.equal(a, b), k
    config = json.loads((tmp_path / "m" / "config.json").read_text())
    assert config["architectures"] == ["Qwen3ForCausalLM"]
    assert config["model_type"] == "qwen3"


@pytest.mark.parametrize("device", DEVICES)
def test_greedy_generation_matches_transformers(make_checkpoint, device):
    folder = make_checkpoint(seed=4)
    ours = Qwen3.from_pretrained(folder, device=device)
    theirs = hf_model(folder, device)
    prompt = [5, 17, 301, 42, 9]
    expected = theirs.generate(torch.tensor([prompt], device=device), max_new_tokens=12,
                               do_sample=False, eos_token_id=None,
                               pad_token_id=0)[0, len(prompt):].tolist()
    assert ours.generate([prompt], max_new_tokens=12, temperature=0) == [expected]


def test_kv_cached_decode_equals_full_forward():
    model = tiny_model(seed=5)
    prompt = [3, 1, 4, 1, 5, 9, 2, 6]
    tokens, logprobs = model.generate([prompt], max_new_tokens=20, temperature=1.0, seed=0,
                                      return_logprobs=True)
    with torch.no_grad():
        expected = completion_logprobs(model, [prompt + tokens[0]], [len(prompt)])[0][0]
    assert torch.allclose(torch.tensor(logprobs[0]), expected, atol=1e-5)


def test_batched_different_lengths_equal_one_by_one():
    model = tiny_model(seed=6)
    prompts = [[7], [1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11], [400, 300, 200], [9, 9, 9, 9, 9, 9]]
    batched = model.generate(prompts, max_new_tokens=15, temperature=0)
    assert batched == [model.generate([p], max_new_tokens=15, temperature=0)[0] for p in prompts]
    batched_lp = model.generate(prompts, max_new_tokens=15, seed=1, return_logprobs=True)[1]
    single = model.generate([prompts[1]], max_new_tokens=15, seed=1, return_logprobs=True)[1]
    assert len(batched_lp[1]) == 15
    assert all(math.isfinite(x) for row in batched_lp for x in row)
    assert len(single[0]) == 15


def test_stop_tokens_end_rows_and_are_kept():
    model = tiny_model(seed=7)
    free = model.generate([[1, 2, 3], [4, 5]], max_new_tokens=10, temperature=0)
    stop = free[0][3]  # a token the first row emits at its 4th step
    out = model.generate([[1, 2, 3], [4, 5]], max_new_tokens=10, temperature=0,
                         stop_token_ids=[stop])
    assert out[0] == free[0][:free[0].index(stop) + 1]
    assert out[1] == (free[1][:free[1].index(stop) + 1] if stop in free[1] else free[1])


def test_seeded_sampling_is_deterministic():
    model = tiny_model(seed=8)
    a = model.generate([[1, 2], [3]], max_new_tokens=12, seed=123, top_p=0.9)
    assert a == model.generate([[1, 2], [3]], max_new_tokens=12, seed=123, top_p=0.9)
    assert a != model.generate([[1, 2], [3]], max_new_tokens=12, seed=124, top_p=0.9)


def test_completion_logprobs_equal_log_softmax_with_gradients(monkeypatch):
    # several chunks, each recomputed in the backward pass
    monkeypatch.setattr(M, "LOGPROB_CHUNK", 4)
    model = tiny_model(seed=9)
    seqs = [list(range(1, 11)), list(range(20, 27)), list(range(40, 52))]
    starts = [3, 5, 1]
    lp, mask = completion_logprobs(model, seqs, starts, temperature=0.7)
    lp.sum().backward()
    chunked_grad = model.layers[0].mlp.up_proj.weight.grad.clone()
    model.zero_grad()
    direct, direct_sum = [], 0
    for seq, start in zip(seqs, starts):
        logits = model(torch.tensor([seq[:-1]]))[0] / 0.7
        row = logits.log_softmax(-1).gather(-1,
                                            torch.tensor(seq[1:])[:, None]).squeeze(-1)[start - 1:]
        direct.append(row)
        direct_sum = direct_sum + row.sum()
    direct_sum.backward()
    assert mask.sum(1).tolist() == [7, 2, 11]
    for b, row in enumerate(direct):
        assert torch.allclose(lp[b, :len(row)], row, atol=1e-5)
        assert not lp[b, len(row):].any()
    assert torch.allclose(chunked_grad, model.layers[0].mlp.up_proj.weight.grad, atol=1e-5)


def test_completion_logprobs_are_the_completion_tokens_only():
    """Right-padded batch of different lengths: each completion's log-probs equal a plain
    log-softmax of the full logits of that sequence alone; prompts and padding are masked out."""
    model = tiny_model(seed=5)
    seqs = [[5, 6, 7, 8, 9, 10], [11, 12, 13], [3, 4, 5, 6, 7, 8, 9, 1, 2]]
    starts = [2, 1, 7]
    logprobs, mask = completion_logprobs(model, seqs, starts, temperature=0.7)
    assert mask.tolist() == [[1, 1, 1, 1], [1, 1, 0, 0], [1, 1, 0, 0]]
    for b, (seq, start) in enumerate(zip(seqs, starts)):
        full = (model(torch.tensor([seq]))[0] / 0.7).log_softmax(-1)
        expected = full[torch.arange(start - 1, len(seq) - 1), torch.tensor(seq[start:])]
        assert torch.allclose(logprobs[b, :len(seq) - start], expected, atol=1e-5)
        assert (logprobs[b, len(seq) - start:] == 0).all()


def test_completion_logprobs_normalise_over_the_real_tokens_only():
    """n_real_tokens: normalised over the first tokens only, as the sampler draws them."""
    model = tiny_model(seed=5)
    seq = [5, 6, 7, 8, 9, 10]
    limited, _ = completion_logprobs(model, [seq], [2], n_real_tokens=300)
    full = model(torch.tensor([seq]))[0, :, :300].log_softmax(-1)
    assert torch.allclose(limited[0], full[torch.arange(1, 5), torch.tensor(seq[2:])], atol=1e-5)


def test_rollout_ends_at_the_token_that_completes_a_stop_string(tmp_path):
    write_byte_tokenizer(tmp_path / "tok.json")
    tok = Tokenizer.from_pretrained(tmp_path / "tok.json")
    text = " 5 apples.\n\nQuestion: how many"

    class Scripted:  # a stand-in model that always "samples" the same text
        device = torch.device("cpu")

        def generate(self, prompts, max_new_tokens, **kw):
            return [tok.encode(text) for _ in prompts]
    out = rollout(Scripted(), tok, [[1], [2]], 64, 1.0, 0, stop_strings=("Question:",))
    assert tok.decode(out[0]) == " 5 apples.\n\nQuestion:"
    assert out[0] == out[1]
    assert rollout(Scripted(), tok, [[1]], 64, 1.0, 0)[0] == tok.encode(text)  # no stop strings


# --- the sampler -------------------------------------------------------------------------------

def test_sampler_masks_equal_their_definitions():
    logits = torch.tensor([[2.0, 1.0, 0.5, 0.0, -1.0, 3.0]])
    probs = logits.softmax(-1)[0]
    def support(**kw):  # the tokens drawn at 300 uniform numbers
        return set(sample_next(logits.expand(300, -1), 1.0, u=uniform(300, 0), **kw)[0].tolist())
    assert support(top_k=2) == {0, 5}
    # top_p: the smallest set of most likely tokens whose mass reaches p, including the one crossing
    # p
    order = probs.argsort(descending=True).tolist()
    p = probs[order[0]].item() + 0.01  # crosses p at the second token
    assert support(top_p=p) == set(order[:2])
    assert support(top_p=probs[order[0]].item() - 0.01) == {order[0]}
    assert support(n_real_tokens=3) == {0, 1, 2}
    # the returned log-prob is under the truncated, renormalised distribution
    tok, lp = sample_next(logits, 1.0, top_k=2, u=uniform(len(logits), 0))
    assert torch.allclose(lp.exp(), probs[tok] / (probs[0] + probs[5]))
    assert sample_next(logits, 0.0)[0].item() == 5


def test_sampler_draws_follow_the_target_distribution():
    logits = torch.tensor([1.0, 0.2, -0.5, 2.0, 0.0, -2.0, 1.5, 0.7])
    n = 200_000
    tokens, _ = sample_next(logits.expand(n, -1), 0.8, u=uniform(n, 0))
    observed = torch.bincount(tokens, minlength=8).double()
    expected = (logits / 0.8).softmax(-1).double() * n
    chi2 = ((observed - expected) ** 2 / expected).sum().item()
    assert chi2 < 24.3  # the 0.999 quantile of chi-squared with 7 degrees of freedom


# --- LoRA --------------------------------------------------------------------------------------

def test_lora_saves_merged_with_the_same_logits(tmp_path):
    model = tiny_model(seed=10)
    trainable = add_lora(model, rank=4, alpha=8)
    assert len(trainable) == 2 * 7 * model.config.num_hidden_layers
    with torch.no_grad():
        for p in trainable:
            p.add_(0.05 * torch.randn_like(p))  # a trained adapter: B no longer zero
    idx = torch.randint(0, 512, (2, 9))
    with torch.no_grad():
        with_adapters = model(idx)
        model.save_pretrained(tmp_path / "merged")
        loaded = Qwen3.from_pretrained(tmp_path / "merged")
        assert (with_adapters - loaded(idx)).abs().max() < 1e-5
        assert (with_adapters - model(idx)).abs().max() == 0  # saving leaves the model as it was
    saved = load_file(tmp_path / "merged" / "model.safetensors")
    assert not any("lora" in k for k in saved)  # merged: plain Hugging Face weights


# --- files and errors --------------------------------------------------------------------------

def test_tokenizer_ids_equal_qwens(tokenizer_file):
    tok = Tokenizer.from_pretrained(tokenizer_file)
    assert tok.encode("Hello world") == [9707, 1879]
    assert tok.encode("Natalia sold clips to 48 of her friends in April") == [
        45, 4212, 685, 6088, 26111, 311, 220, 19, 23, 315, 1059, 4780, 304, 5813]
    assert tok.encode("<|endoftext|><|im_start|><|im_end|><think></think>") == [
        151643, 151644, 151645, 151667, 151668]
    assert (tok.eos_id, tok.stop_ids, tok.n_real_tokens) == (151643, [151643, 151645], 151669)
    text = ("Question: Janet’s ducks lay 16 eggs per day.\n"
            "Answer: 16 - 3 - 4 = <<16-3-4=9>>9\n#### 9")
    assert tok.decode(tok.encode(text)) == text


def test_clear_errors(tmp_path, make_checkpoint):
    with pytest.raises(FileNotFoundError, match="no such model folder"):
        Qwen3.from_pretrained(tmp_path / "nope")
    folder = make_checkpoint()
    (folder / "model.safetensors").rename(folder / "other.safetensors")
    with pytest.raises(FileNotFoundError, match="no model.safetensors"):
        Qwen3.from_pretrained(folder)
    folder = make_checkpoint(name="wide")
    config = json.loads((folder / "config.json").read_text())
    config["intermediate_size"] = 96
    (folder / "config.json").write_text(json.dumps(config))
    with pytest.raises(ValueError,
                       match=r"mlp.gate_proj.weight has shape \(128, 64\), expected \(96, 64\)"):
        Qwen3.from_pretrained(folder)
    with pytest.raises(ValueError, match="qwen3_moe"):
        Qwen3Config.from_dict({**tiny_config().to_dict(), "model_type": "qwen3_moe"})
    with pytest.raises(ValueError, match="missing required key"):
        Qwen3Config.from_dict({"model_type": "qwen3", "hidden_size": 8})


@pytest.mark.parametrize("device", DEVICES)
def test_static_decode_step_for_cuda_graphs_gives_the_same_tokens(device):
    # The CUDA-graph path replays a fixed-shape step over the whole masked cache; off CUDA the same
    # step runs uncaptured, so its tokens and log-probs can be checked here against the eager step.
    model = tiny_model(seed=11).to(device)
    prompts = [[5, 6, 7], [1, 2, 3, 4, 5, 6, 7, 8, 9], [42]]
    sampling = dict(max_new_tokens=12, seed=3, top_p=0.95, return_logprobs=True)
    eager = model.generate(prompts, **sampling, cuda_graph=False)
    static = model.generate(prompts, **sampling, cuda_graph=True)
    assert static[0] == eager[0]
    assert torch.allclose(torch.tensor(static[1]), torch.tensor(eager[1]), atol=1e-5)


def sorted_reference(logits, temperature, top_k=None, top_p=1.0, u=None):
    """The sort-based definition of top-k, top-p and the draw, which model.py's sort-free sampler
    is checked against, in model.masses' integer units: a stable sort by probability (ties: the
    lower id first); top-k's first k tokens; then those whose cumulative mass before them is below
    the threshold (top_p * 2^52 capped at the row's mass, or top_p of top-k's mass; at least 1);
    the draw inverts the kept CDF at floor(u * kept mass). -> tokens (B,), logprobs (B,), keep
    (B, V) by vocabulary id."""
    probs = (logits.float() / temperature).softmax(-1)
    order = probs.sort(dim=-1, descending=True, stable=True).indices
    mass = M.masses(probs).gather(1, order)  # (B, V) in sorted order
    keep = torch.arange(probs.shape[-1], device=probs.device) < (top_k or probs.shape[-1])
    if top_k is None:
        threshold = mass.sum(-1, keepdim=True).clamp(max=math.ceil(top_p * 2 ** 52))
    else:
        kept_by_k = torch.where(keep, mass, 0).sum(-1, keepdim=True)
        threshold = (kept_by_k.double() * top_p).ceil().long()
    keep = keep & (mass.cumsum(-1) - mass < threshold.clamp(min=1))
    kept = torch.where(keep, mass, 0)
    cdf = kept.cumsum(-1)
    pick = torch.searchsorted(cdf, (u.double() * cdf[:, -1:].double()).long(), right=True)
    logprobs = (kept.gather(1, pick).double() / cdf[:, -1:].double()).log().float()
    keep_by_id = torch.zeros_like(keep).scatter(1, order, keep)
    return order.gather(1, pick).squeeze(-1), logprobs.squeeze(-1), keep_by_id


def varied_logits(rows, vocab, seed):
    """Random logits of spreads from near-uniform (a nucleus of most of the vocabulary) to 3 (a
    trained model's), every other row rounded to whole numbers: many equal probabilities."""
    g = torch.Generator().manual_seed(seed)
    spread = torch.tensor([3.0, 0.3, 1.0, 0.05])[torch.arange(rows) % 4, None]
    logits = spread * torch.randn(rows, vocab, generator=g)
    logits[::2] = (logits[::2] * 4).round() / 4
    return logits


def searched_nucleus(probs, threshold):
    """SortedOrder's nucleus: keep (B, V), the tokens up to and including the first whose
    cumulative mass in the order reaches threshold (B, 1), and their mass (B, 1)."""
    order = M.SortedOrder(probs, M.masses(probs))
    bits, j, kept = order.crossing(threshold - 1)
    ties = order.bits == bits.int()
    return (order.bits > bits) | (ties & (ties.cumsum(-1) <= j + 1)), kept


@pytest.mark.parametrize("vocab, top_p", [(5000, 0.9), (5000, 1e-9), (5000, 1 - 1e-9),
                                          (700, 0.5), (151936, 0.9)])
def test_sort_free_nucleus_equals_the_sorted_reference(vocab, top_p):
    logits = varied_logits(4, vocab, seed=vocab)
    probs = logits.softmax(-1)
    mass = M.masses(probs)
    threshold = mass.sum(-1, keepdim=True).clamp(max=math.ceil(top_p * 2 ** 52))
    keep, kept = searched_nucleus(probs, threshold.clamp(min=1))
    reference = sorted_reference(logits, 1.0, top_p=top_p, u=torch.zeros(4, 1))[2]
    assert torch.equal(keep, reference)
    assert torch.equal(kept, torch.where(reference, mass, 0).sum(-1, keepdim=True))
    assert keep.any(-1).all() and (top_p > 0.99 or not keep.all())


def test_sort_free_nucleus_at_a_threshold_equal_to_a_cumulative_mass():
    # Masses are integers, so "reaches the threshold" has no rounding: at exactly the cumulative
    # mass through the k-th token of a stable sort the nucleus is k tokens, one more past it.
    logits = varied_logits(2, 3000, seed=5)[:, :3000]
    probs = logits.softmax(-1)
    order = probs.sort(dim=-1, descending=True, stable=True).indices
    cum = M.masses(probs).gather(1, order).cumsum(-1)
    for k in (1, 2, 17, 300, 2999):  # row 0 has ties (rounded logits)
        for extra, size in ((0, k), (1, k + 1), (-1, k)):
            keep, _ = searched_nucleus(probs, cum[:, k - 1:k] + extra)
            first = torch.zeros_like(keep).scatter(1, order[:, :size], True)
            assert torch.equal(keep, first), (k, extra)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("top_k, top_p, candidates, vocab",
                         [(None, 0.9, 1024, 5000), (None, 0.9, 2, 5000), (None, 0.2, 1024, 5000),
                          (None, 1e-9, 1024, 5000), (40, None, 1024, 5000), (40, 0.8, 1024, 5000),
                          (3000, 0.95, 1024, 5000), (None, 0.9, 1024, 151936)])
def test_sort_free_draws_equal_the_sorted_reference(monkeypatch, top_k, top_p, candidates, vocab,
                                                    device):
    # Fixed uniform numbers draw the same tokens, with the same log-probs, as the sort-based
    # definition: top-k, top-p and both; on CPU through the top candidates (1024) or the whole
    # vocabulary's search (2 candidates, or a near-uniform row), at u = 0, u = 1 - 2^-24 and
    # random u, at temperature 0.7.
    monkeypatch.setattr(M, "TOP_P_CANDIDATES", candidates)
    draws = 4 if vocab > 10000 else 24
    logits = varied_logits(4, vocab, seed=vocab + 1).repeat_interleave(draws, 0).to(device)
    u = uniform(len(logits), 2).to(device)
    u[::draws], u[1::draws] = 0.0, 1 - 2 ** -24
    tokens, logprobs = sample_next(logits, 0.7, top_k=top_k, top_p=top_p, u=u)
    ref_tokens, ref_logprobs, _ = sorted_reference(logits, 0.7, top_k, top_p or 1.0, u)
    assert torch.equal(tokens, ref_tokens)
    assert torch.equal(logprobs, ref_logprobs)


def test_candidates_cut_through_equal_probabilities(monkeypatch):
    # 9 likely tokens, then 715 of one probability (ids 0, 7, 14, ...) and the nucleus ends at
    # the third of those: 20 candidates hold 11 of them, which ones topk's choice. The search must
    # still keep the lowest ids, 0, 7 and 14 (the candidates alone hold the nucleus only when the
    # tokens more likely than the least of them reach top_p).
    monkeypatch.setattr(M, "TOP_P_CANDIDATES", 20)
    logits = torch.full((64, 5000), -5.0)
    logits[:, 4000:4010] = 3.0
    logits[:, ::7] = 1.0
    probs = logits[0].softmax(-1)
    top_p = (probs[4000:4010].sum() + 2.5 * probs[0]).item()
    u = uniform(64, 0)
    tokens, logprobs = sample_next(logits, 1.0, top_p=top_p, u=u)
    ref_tokens, ref_logprobs, keep = sorted_reference(logits, 1.0, top_p=top_p, u=u)
    assert keep[0].nonzero().flatten()[:3].tolist() == [0, 7, 14]
    assert torch.equal(tokens, ref_tokens) and torch.equal(logprobs, ref_logprobs)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_sampler_never_waits_for_the_gpu():
    # No host sync (no .item(), no shape that depends on the data): a CUDA graph can hold it
    logits = varied_logits(4, 5000, seed=3).cuda()
    u = uniform(4, 0).cuda()
    torch.cuda.set_sync_debug_mode("error")
    try:
        for top_k, top_p in ((None, 0.9), (40, None), (40, 0.9), (None, None)):
            sample_next(logits, 0.7, top_k=top_k, top_p=top_p, u=u)
    finally:
        torch.cuda.set_sync_debug_mode("default")


def test_generate_draws_the_same_tokens_through_the_candidates_or_the_search(monkeypatch):
    model = tiny_model(seed=13)
    prompts = [[5, 6, 7], [1, 2, 3, 4], [42]]
    sampling = dict(max_new_tokens=12, seed=4, top_p=0.8, return_logprobs=True)
    candidates = model.generate(prompts, **sampling)
    monkeypatch.setattr(M, "TOP_P_CANDIDATES", 1)
    assert model.generate(prompts, **sampling) == candidates


@pytest.mark.parametrize("top_p, candidates", [(0.6, 3), (0.95, 3), (0.95, 1024)])
def test_top_p_draws_follow_the_truncated_distribution(monkeypatch, top_p, candidates):
    # On CPU the nucleus is first looked for among the TOP_P_CANDIDATES most likely tokens; when
    # their mass falls short of p (0.95 here with 3 candidates) the whole vocabulary is searched.
    monkeypatch.setattr(M, "TOP_P_CANDIDATES", candidates)
    logits = torch.tensor([1.0, 0.2, -0.5, 2.0, 0.0, -2.0, 1.5, 0.7])
    probs = logits.softmax(-1)
    order = probs.argsort(descending=True)
    keep = (probs[order].cumsum(0) - probs[order]) < top_p
    target = torch.zeros(8, dtype=torch.float64)
    target[order[keep]] = probs[order[keep]].double() / probs[order[keep]].sum()
    n = 100_000
    tokens, logprobs = sample_next(logits.expand(n, -1), 1.0, top_p=top_p,
                                   u=uniform(n, 1))
    observed = torch.bincount(tokens, minlength=8).double()
    assert set(tokens.unique().tolist()) == set(order[keep].tolist())
    kept = target > 0
    chi2 = ((observed[kept] - n * target[kept]) ** 2 / (n * target[kept])).sum().item()
    assert chi2 < 24.3  # below the 0.999 quantile for up to 7 degrees of freedom
    assert torch.allclose(logprobs.exp(), target[tokens].float(), atol=1e-6)


def test_stop_fn_ends_rows_at_the_next_check_with_the_same_tokens():
    model = tiny_model(seed=12)
    prompts = [[1, 2, 3], [4, 5]]
    full = model.generate(prompts, max_new_tokens=40, temperature=0)
    seen = []

    # called every 16 steps with every row's tokens so far; ends row 0 at the first call
    def stop_fn(rows):
        seen.append([len(r) for r in rows])
        return [True, len(rows[1]) >= 32]
    stopped = model.generate(prompts, max_new_tokens=40, temperature=0, stop_fn=stop_fn)
    assert seen == [[16, 16], [32, 32]]  # the batch ran until both rows were done, then stopped
    assert stopped == [row[:32] for row in full]


STANDALONE = """
import json, sys
from pathlib import Path
import importlib.abc
import torch

class NoProjectModules(importlib.abc.MetaPathFinder):  # as if model.py were copied alone
    def find_spec(self, name, path=None, target=None):
        if name.split(".")[0] in PROJECT_MODULES:
            raise ImportError(f"{name} is a project module: model.py must not need it")

sys.meta_path.insert(0, NoProjectModules())
import model as M

folder = Path(sys.argv[1])
torch.manual_seed(0)
net = M.Qwen3(M.Qwen3Config(**TINY))
net.save_pretrained(folder)
loaded = M.Qwen3.from_pretrained(folder)
assert all(torch.equal(a, b) for a, b in zip(net.state_dict().values(),
                                             loaded.state_dict().values()))
tok = M.Tokenizer.from_pretrained(folder)
prompts = tok.encode_batch(["2 + 2 =", "Hello"])
(folder / "config.json").write_text("{ torn")
try:
    M.Qwen3.from_pretrained(folder)
    error = None
except ValueError as e:
    error = str(e)
print(json.dumps({"modules": sorted(set(sys.modules) & PROJECT_MODULES), "error": error,
                  "greedy": loaded.generate(prompts, 6, temperature=0),
                  "nucleus": loaded.generate(prompts, 6, temperature=1.0, top_k=40, top_p=0.8,
                                             seed=3)}))
"""


def test_model_py_stands_alone(tmp_path):
    """model.py copied alone into an empty folder, every other module of this project unimportable
    (a student's notebook): it builds, saves, loads, generates and names a damaged file, and its
    tokens are this project's model.py's, bit for bit."""
    alone = tmp_path / "alone"
    alone.mkdir()
    shutil.copy(ROOT / "model.py", alone / "model.py")
    folder = tmp_path / "tiny"
    folder.mkdir()
    write_byte_tokenizer(folder / "tokenizer.json")
    project = {p.stem for p in ROOT.glob("*.py")} - {"model"} | {"harness"}
    script = f"PROJECT_MODULES = {project!r}\nTINY = {TINY!r}\n" + STANDALONE
    done = subprocess.run([sys.executable, "-E", "-s", "-c", script, str(folder)], cwd=alone,
                          capture_output=True, text=True, timeout=120,
                          env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert done.returncode == 0, done.stderr
    result = json.loads(done.stdout)
    assert result["modules"] == []
    assert result["error"].startswith(f"{folder / 'config.json'}: not a valid JSON file")
    # the same weights (seed 0) in this project's model.py give the same tokens
    torch.manual_seed(0)
    net = Qwen3(tiny_config())
    tok = Tokenizer.from_pretrained(folder)
    prompts = tok.encode_batch(["2 + 2 =", "Hello"])
    assert result["greedy"] == net.generate(prompts, 6, temperature=0)
    assert result["nucleus"] == net.generate(prompts, 6, temperature=1.0, top_k=40, top_p=0.8,
                                             seed=3)
