"""
Qwen3 in one file: the architecture, Hugging Face weights in and out, LoRA, a KV cache and a fused
sampler for batched generation. It matches transformers' Qwen3ForCausalLM (modeling_qwen3.py is the
ground truth) for every dense Qwen3 size, 0.6B to 32B.

    model = Qwen3.from_pretrained("Qwen/Qwen3-0.6B-Base", device="cuda", dtype=torch.bfloat16)
    tok = Tokenizer.from_pretrained("Qwen/Qwen3-0.6B-Base")
    out = model.generate([tok.encode("Question: 2+2?\nAnswer:")], max_new_tokens=32, temperature=0)
    print(tok.decode(out[0]))
"""
import argparse
import json
import math
import os
import re
import shutil
import tempfile
from dataclasses import asdict, dataclass, fields
from pathlib import Path

import tokenizers
import torch
import torch.nn as nn
import torch.nn.functional as F
from safetensors.torch import load_file, save_file
from torch.utils.checkpoint import checkpoint

from cli import (ArgumentParser, nonnegative_float, nonnegative_int, positive_float,
                 positive_int)

# Config -------------------------------------------------------------------------------------------


@dataclass
class Qwen3Config:
    """The fields of a Hugging Face Qwen3 config.json that define the computation (defaults: 0.6B)."""
    vocab_size: int = 151936
    hidden_size: int = 1024
    intermediate_size: int = 3072
    num_hidden_layers: int = 28
    num_attention_heads: int = 16
    num_key_value_heads: int = 8
    head_dim: int = 128
    rope_theta: float = 1000000.0
    rms_norm_eps: float = 1e-6
    tie_word_embeddings: bool = True
    max_position_embeddings: int = 40960
    bos_token_id: int = 151643
    eos_token_id: int = 151643

    @classmethod
    def from_dict(cls, d: dict, source: str = "config") -> "Qwen3Config":
        # Refuse what this file does not implement rather than silently computing something else.
        rope = d.get("rope_scaling") or {}
        rope_type = rope.get("rope_type", rope.get("type", "default"))
        unsupported = [k for k, bad in (("model_type", d.get("model_type", "qwen3") != "qwen3"),
                                         ("rope_scaling", rope_type != "default"),
                                         ("use_sliding_window", d.get("use_sliding_window")),
                                         ("attention_bias", d.get("attention_bias")),
                                         ("hidden_act", d.get("hidden_act", "silu") != "silu")) if bad]
        if unsupported:
            raise ValueError(f"{source}: not a dense Qwen3 as this file implements it: "
                             + ", ".join(f"{k}={d[k]!r}" for k in unsupported))
        missing = [k for k in ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers",
                               "num_attention_heads") if k not in d]
        if missing:
            raise ValueError(f"{source}: missing required key(s) {', '.join(missing)}")
        d = {"num_key_value_heads": d["num_attention_heads"], "head_dim": d["hidden_size"] // d["num_attention_heads"],
             "rope_theta": (d.get("rope_parameters") or {}).get("rope_theta"), **d}  # transformers 5 nests the theta
        d.update({k: d[k][0] for k in ("bos_token_id", "eos_token_id") if isinstance(d.get(k), list)})  # several eos
        config = cls(**{f.name: d[f.name] for f in fields(cls) if d.get(f.name) is not None})
        if config.num_attention_heads % config.num_key_value_heads:
            raise ValueError(f"{source}: num_attention_heads must be a multiple of num_key_value_heads")
        return config

    def to_dict(self, dtype: torch.dtype = torch.float32) -> dict:
        """A config.json that transformers, vLLM and lm-eval load as Qwen3ForCausalLM."""
        return {"architectures": ["Qwen3ForCausalLM"], "model_type": "qwen3", "hidden_act": "silu",
                "attention_bias": False, "attention_dropout": 0.0, "rope_scaling": None, "use_sliding_window": False,
                "sliding_window": None, **asdict(self), "torch_dtype": str(dtype).removeprefix("torch.")}


# The model ----------------------------------------------------------------------------------------


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.weight, self.eps = nn.Parameter(torch.ones(dim)), eps

    def forward(self, x):
        # Normalise in fp32, scale in the input dtype: exactly transformers' order of rounding.
        x32 = x.float() * torch.rsqrt(x.float().pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * x32.to(x.dtype)


def rope_cos_sin(positions, head_dim: int, theta: float, dtype):
    """cos/sin tables (B, 1, T, head_dim) for integer positions (B, T), computed in fp32."""
    inv_freq = 1.0 / (theta ** (torch.arange(0, head_dim, 2, device=positions.device, dtype=torch.float32) / head_dim))
    freqs = positions[..., None].float() * inv_freq
    angles = torch.cat((freqs, freqs), dim=-1)[:, None]
    return angles.cos().to(dtype), angles.sin().to(dtype)


def apply_rope(x, cos, sin):
    x1, x2 = x.chunk(2, dim=-1)
    return x * cos + torch.cat((-x2, x1), dim=-1) * sin  # rotate-half, as in transformers


class Attention(nn.Module):
    def __init__(self, config: Qwen3Config, layer_idx: int):
        super().__init__()
        self.layer_idx = layer_idx
        self.n_head, self.n_kv_head, self.head_dim = (config.num_attention_heads, config.num_key_value_heads,
                                                      config.head_dim)
        self.q_proj = nn.Linear(config.hidden_size, self.n_head * self.head_dim, bias=False)
        self.k_proj = nn.Linear(config.hidden_size, self.n_kv_head * self.head_dim, bias=False)
        self.v_proj = nn.Linear(config.hidden_size, self.n_kv_head * self.head_dim, bias=False)
        self.o_proj = nn.Linear(self.n_head * self.head_dim, config.hidden_size, bias=False)
        self.q_norm = RMSNorm(self.head_dim, config.rms_norm_eps)  # Qwen3's per-head q/k norm, before RoPE
        self.k_norm = RMSNorm(self.head_dim, config.rms_norm_eps)

    def forward(self, x, cos, sin, cache=None):
        B, T, _ = x.shape
        q = self.q_norm(self.q_proj(x).view(B, T, self.n_head, self.head_dim)).transpose(1, 2)
        k = self.k_norm(self.k_proj(x).view(B, T, self.n_kv_head, self.head_dim)).transpose(1, 2)
        v = self.v_proj(x).view(B, T, self.n_kv_head, self.head_dim).transpose(1, 2)
        q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
        if cache is None:  # a whole causal sequence (training, scoring)
            y = F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=True)
        else:  # generation: attend over the cache, masked for left padding and the future
            k, v = cache.update(self.layer_idx, k, v)
            y = F.scaled_dot_product_attention(q, k, v, attn_mask=cache.mask, enable_gqa=True)
        return self.o_proj(y.transpose(1, 2).reshape(B, T, -1))


class MLP(nn.Module):
    def __init__(self, config: Qwen3Config):
        super().__init__()
        self.gate_proj = nn.Linear(config.hidden_size, config.intermediate_size, bias=False)
        self.up_proj = nn.Linear(config.hidden_size, config.intermediate_size, bias=False)
        self.down_proj = nn.Linear(config.intermediate_size, config.hidden_size, bias=False)

    def forward(self, x):
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))  # SwiGLU


class Block(nn.Module):
    def __init__(self, config: Qwen3Config, layer_idx: int):
        super().__init__()
        self.input_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.self_attn = Attention(config, layer_idx)
        self.post_attention_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.mlp = MLP(config)

    def forward(self, x, cos, sin, cache=None):
        x = x + self.self_attn(self.input_layernorm(x), cos, sin, cache)
        return x + self.mlp(self.post_attention_layernorm(x))


class KVCache:
    """Pre-allocated keys and values of every layer, for the KV heads only (GQA repeats them inside
    attention, never in memory). Rows are left-padded to one prompt length, so all rows write the same
    slot at each step; `mask` hides the padding and the slots not yet written."""

    def __init__(self, config: Qwen3Config, batch_size: int, max_len: int, device, dtype):
        shape = (config.num_hidden_layers, batch_size, config.num_key_value_heads, max_len, config.head_dim)
        self.k, self.v = torch.zeros(shape, device=device, dtype=dtype), torch.zeros(shape, device=device, dtype=dtype)
        self.slots = None  # (T,) the cache slots the current tokens are written to
        self.length = 0    # how many slots attention reads (all of them when the step is a CUDA graph)
        self.mask = None   # (B, 1, T, length) bool, True where a query may attend a key

    def update(self, layer: int, k, v):
        self.k[layer].index_copy_(2, self.slots, k.to(self.k.dtype))
        self.v[layer].index_copy_(2, self.slots, v.to(self.v.dtype))
        return self.k[layer, :, :, :self.length], self.v[layer, :, :, :self.length]


CUDA_GRAPHS = True  # generate() on CUDA replays its decode step as a CUDA graph: the same tokens, faster


class Qwen3(nn.Module):
    def __init__(self, config: Qwen3Config):
        super().__init__()
        self.config = config
        self.embed_tokens = nn.Embedding(config.vocab_size, config.hidden_size)
        self.layers = nn.ModuleList(Block(config, i) for i in range(config.num_hidden_layers))
        self.norm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.lm_head = nn.Linear(config.hidden_size, config.vocab_size, bias=False)
        if config.tie_word_embeddings:
            self.lm_head.weight = self.embed_tokens.weight

    device = property(lambda self: self.embed_tokens.weight.device)
    dtype = property(lambda self: self.embed_tokens.weight.dtype)

    def forward(self, idx, positions=None, cache=None, return_hidden=False):
        """idx (B, T) token ids -> logits (B, T, vocab), or the final-norm hidden states (B, T, hidden).
        positions (B, T) default to 0..T-1; `cache` is only used by generate()."""
        if positions is None:
            positions = torch.arange(idx.shape[1], device=idx.device).expand(idx.shape[0], -1)
        x = self.embed_tokens(idx)
        cos, sin = rope_cos_sin(positions, self.config.head_dim, self.config.rope_theta, x.dtype)
        for block in self.layers:
            x = block(x, cos, sin, cache)
        x = self.norm(x)
        return x if return_hidden else self.lm_head(x)

    # Generation -----------------------------------------------------------------------------------

    @torch.no_grad()
    def generate(self, prompts, max_new_tokens: int, temperature: float = 1.0, top_k=None, top_p=None,
                 stop_token_ids=None, seed=None, return_logprobs: bool = False, vocab_limit=None,
                 cuda_graph=None, stop_fn=None):
        """Sample continuations for a batch of prompts (lists of token ids, any lengths). Returns the new
        tokens of each prompt; a row that samples a stop token keeps it as its last token and ends there.
        temperature=0 is greedy. return_logprobs adds each new token's log-probability under the
        distribution it was drawn from (after temperature, top-k, top-p; greedy: the plain softmax).
        vocab_limit masks embedding rows past the tokenizer's real tokens. Finished rows ride along until
        all are done, so the batch never reshapes and the host waits only once every 16 steps, when
        stop_fn(rows' tokens so far) may also end rows (e.g. on a stop string; the caller trims them).
        cuda_graph replays the decode step as a CUDA graph (see _decoder); None: CUDA_GRAPHS on CUDA."""
        if not prompts or min(map(len, prompts)) == 0 or max_new_tokens < 1:
            raise ValueError("generate: needs prompts of at least one token and max_new_tokens >= 1")
        device, B, prompt_len = self.device, len(prompts), max(map(len, prompts))
        cuda_graph = CUDA_GRAPHS and device.type == "cuda" if cuda_graph is None else cuda_graph
        max_len = prompt_len + max_new_tokens
        if max_len > self.config.max_position_embeddings:
            raise ValueError(f"generate: {max_len} tokens exceed max_position_embeddings "
                             f"{self.config.max_position_embeddings}")
        pad = torch.tensor([prompt_len - len(p) for p in prompts], device=device)
        idx = torch.tensor([[0] * (prompt_len - len(p)) + list(p) for p in prompts], device=device)
        dtype = torch.get_autocast_dtype(device.type) if torch.is_autocast_enabled(device.type) else self.dtype
        cache = KVCache(self.config, B, max_len, device, dtype)
        slot = torch.arange(max_len, device=device)
        key_is_real = slot[None, :] >= pad[:, None]  # (B, max_len): False on each row's left padding
        generator = torch.Generator(device=device).manual_seed(seed) if seed is not None else None
        stop = torch.tensor(sorted(stop_ids := set(stop_token_ids or [])), device=device, dtype=torch.long)
        decode = self._decoder(cache, key_is_real, pad, cuda_graph)  # before prefill: its warm-up writes slot 0

        # Prefill: the whole padded prompt at once. Padding queries attend to themselves only, which
        # keeps their (unused) outputs finite so no NaN can leak into the cache.
        causal = slot[:prompt_len, None] >= slot[None, :prompt_len]
        own_slot = torch.eye(prompt_len, dtype=torch.bool, device=device)
        cache.slots, cache.length = slot[:prompt_len], prompt_len
        cache.mask = ((causal & key_is_real[:, None, :prompt_len]) | own_slot)[:, None]
        positions = (slot[None, :prompt_len] - pad[:, None]).clamp(min=0)
        logits = self.lm_head(self(idx, positions, cache, return_hidden=True)[:, -1])  # last position only

        tokens = torch.zeros(B, max_new_tokens, dtype=torch.long, device=device)
        logprobs = torch.zeros(B, max_new_tokens, device=device)
        done = torch.zeros(B, dtype=torch.bool, device=device)
        for t in range(max_new_tokens):
            tokens[:, t], logprobs[:, t] = sample_next(logits, temperature, top_k, top_p, vocab_limit, generator)
            done |= torch.isin(tokens[:, t], stop)
            if t % 16 == 15 and stop_fn is not None:
                done |= torch.tensor(stop_fn(tokens[:, :t + 1].tolist()), device=device)
            if t == max_new_tokens - 1 or (t % 16 == 15 and bool(done.all())):
                break
            logits = decode(tokens[:, t:t + 1], prompt_len + t)
        tokens, logprobs = tokens[:, :t + 1].tolist(), logprobs[:, :t + 1].tolist()
        for i, row in enumerate(tokens):
            end = next((j + 1 for j, tok in enumerate(row) if tok in stop_ids), len(row))
            tokens[i], logprobs[i] = row[:end], logprobs[i][:end]
        return (tokens, logprobs) if return_logprobs else tokens

    def _decoder(self, cache: KVCache, key_is_real, pad, cuda_graph: bool):
        """The one-token decode step, step(token (B, 1), slot s) -> next logits (B, vocab), reading its inputs
        from fixed buffers. Eager, attention reads the slots written so far. For a CUDA graph it reads the
        whole cache under the mask, so every shape and address is fixed: captured once, replayed, with no
        per-kernel launch cost. Off CUDA, cuda_graph=True runs that step uncaptured (so the tests check it)."""
        slot = torch.arange(cache.k.shape[3], device=pad.device)
        token_in, position_in, slot_in = pad[:, None].clone(), pad[:, None].clone(), slot[:1].clone()
        mask_in, graph = key_is_real[:, None, None].clone(), None

        def run(length):
            cache.slots, cache.length, cache.mask = slot_in, length, mask_in[..., :length]
            return self(token_in, position_in, cache)[:, -1]
        if cuda_graph and pad.device.type == "cuda":
            side = torch.cuda.Stream()
            side.wait_stream(torch.cuda.current_stream())
            with torch.cuda.stream(side):
                run(len(slot))  # warm-up outside the graph: lazy initialisation and allocations happen here
            torch.cuda.current_stream().wait_stream(side)
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph):
                logits_out = run(len(slot))

        def step(token, s):
            token_in.copy_(token)
            position_in.copy_((s - pad)[:, None])
            slot_in.fill_(s)
            mask_in.copy_((key_is_real & (slot <= s))[:, None, None])
            if graph is None:
                return run(len(slot) if cuda_graph else s + 1)
            graph.replay()
            return logits_out
        return step

    # Hugging Face weights in and out --------------------------------------------------------------

    @classmethod
    def from_pretrained(cls, name_or_path, device="cpu", dtype=torch.float32) -> "Qwen3":
        """A dense Qwen3 from a folder or hub repo id (safetensors only); names any bad or missing weight."""
        folder = resolve_model_dir(name_or_path)
        config = Qwen3Config.from_dict(read_json(folder / "config.json"), str(folder / "config.json"))
        with torch.device("meta"):  # no memory until the weights arrive, and then only in `dtype`
            model = cls(config).to(dtype)
        model = model.to_empty(device=device)
        if config.tie_word_embeddings:  # to_empty unties shared parameters; the checkpoint may hold lm_head
            model.lm_head.weight = model.embed_tokens.weight
        tensors, expected = read_safetensors(folder), model.hf_state_dict()
        missing = sorted(expected.keys() - tensors.keys())
        optional = {"lm_head.weight"} if config.tie_word_embeddings else set()
        unexpected = sorted(tensors.keys() - expected.keys() - optional)
        if missing or unexpected:
            raise ValueError(f"{folder}: missing weight(s) {missing[:5]}{' ...' * (len(missing) > 5)} "
                             f"unexpected weight(s) {unexpected[:5]}{' ...' * (len(unexpected) > 5)}")
        with torch.no_grad():
            for name, param in expected.items():
                if tensors[name].shape != param.shape:
                    raise ValueError(f"{folder}: weight {name} has shape {tuple(tensors[name].shape)}, "
                                     f"expected {tuple(param.shape)} from config.json")
                param.copy_(tensors[name])
        return model.eval()

    def hf_state_dict(self, merged: bool = False) -> dict:
        """Weights under their Hugging Face names (model.layers.0.self_attn.q_proj.weight, ...): the
        live parameters, or with merged=True, LoRA adapters folded in (what save_pretrained writes)."""
        weights = {}
        for name, module in self.named_modules():
            if isinstance(module, LoRALinear):
                weights[name] = module.weight if merged else module.base.weight
            elif isinstance(module, (nn.Linear, nn.Embedding, RMSNorm)) and not name.endswith(".base"):
                weights[name] = module.weight
        if self.config.tie_word_embeddings:
            del weights["lm_head"]
        return {(k if k == "lm_head" else "model." + k) + ".weight": v for k, v in weights.items()}

    def save_pretrained(self, out_dir, tokenizer=None):
        """Write config.json + model.safetensors (+ tokenizer.json) in the Hugging Face layout, LoRA
        merged, atomically: a crash mid-save leaves any previous model in out_dir intact."""
        Path(out_dir).mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryDirectory(dir=out_dir, prefix=".tmp-") as tmp:  # a trainer cleans up stale ones
            tensors = {k: v.detach().cpu().contiguous() for k, v in self.hf_state_dict(merged=True).items()}
            save_file(tensors, Path(tmp, "model.safetensors"), metadata={"format": "pt"})
            Path(tmp, "config.json").write_text(json.dumps(self.config.to_dict(self.dtype), indent=2))
            if tokenizer is not None:
                shutil.copy(tokenizer.path, Path(tmp, "tokenizer.json"))
            for name in os.listdir(tmp):
                make_readable(Path(tmp, name))
                os.replace(Path(tmp, name), Path(out_dir, name))


def make_readable(path: Path):
    """rw-r--r-- (folders rwxr-xr-x) under the umask, as any saved file: safetensors writes its own rw-------."""
    os.umask(umask := os.umask(0))
    path.chmod((0o777 if path.is_dir() else 0o666) & ~umask)


# Log-probabilities of given tokens, for the trainers and eval -------------------------------------

LOGPROB_CHUNK = 1024  # rows of (chunk, vocab) fp32 logits at a time: 0.6 GB for Qwen's vocab


def completion_logprobs(model, seqs: list, starts: list, temperature: float = 1.0, vocab_limit=None,
                        return_hidden: bool = False):
    """fp32 log-probs (B, L) of each completion seqs[b][starts[b]:] given all before it, and the mask
    (B, L) of its real tokens. Only completion positions are projected onto the vocabulary. vocab_limit
    normalises over the tokenizer's real tokens, those the sampler draws (else lowering a sampled token
    would move mass onto rows never sampled). return_hidden adds the (N, hidden) masked-position states."""
    device, width = model.device, max(map(len, seqs))
    idx = torch.tensor([s + [0] * (width - len(s)) for s in seqs], device=device)
    start = torch.tensor(starts, device=device)[:, None]
    n_new = torch.tensor([len(s) for s in seqs], device=device)[:, None] - start
    j = torch.arange(int(n_new.max()), device=device)
    mask, where = j < n_new, (start - 1 + j).clamp(max=width - 2)  # position `where` predicts token j
    hidden = model(idx[:, :-1], return_hidden=True)
    rows = hidden.gather(1, where[..., None].expand(-1, -1, hidden.shape[-1]))[mask]
    head = model.lm_head.weight[:vocab_limit]

    def logprobs_of(rows, targets):
        logits = (rows @ head.t()).float() / temperature
        return logits.gather(-1, targets[:, None]).squeeze(-1) - logits.logsumexp(-1)
    logprobs = in_row_chunks(logprobs_of, rows, idx.gather(1, where + 1)[mask])
    logprobs = torch.zeros(mask.shape, device=device).masked_scatter(mask, logprobs)
    return (logprobs, mask, rows) if return_hidden else (logprobs, mask)


def in_row_chunks(fn, *rows):
    """fn over LOGPROB_CHUNK rows at a time, concatenated; under grad each chunk is recomputed in backward."""
    chunks = [tuple(r[i:i + LOGPROB_CHUNK] for r in rows) for i in range(0, len(rows[0]), LOGPROB_CHUNK)]
    run = (lambda *chunk: checkpoint(fn, *chunk, use_reentrant=False)) if torch.is_grad_enabled() else fn
    return torch.cat([run(*chunk) for chunk in chunks])


# The fused sampler --------------------------------------------------------------------------------


TOP_P_CANDIDATES = 1024  # on CPU, top-p first looks for the nucleus among this many most likely tokens


def sample_next(logits, temperature: float, top_k=None, top_p=None, vocab_limit=None, generator=None):
    """One sampling step for a batch of next-token logits (B, vocab) -> (tokens (B,), logprobs (B,)).
    Drops rows past the tokenizer (vocab_limit), applies temperature, keeps the top_k tokens, then the fewest
    most likely tokens whose probability reaches top_p (the one crossing p is kept), and draws by inverting
    the kept CDF at one uniform number per row (no host sync); log-probs are under that distribution."""
    logits = logits[:, :vocab_limit].float()  # a prefix of the vocabulary, so token ids are unchanged
    if temperature == 0:
        tokens = logits.argmax(-1)
        return tokens, logits.log_softmax(-1).gather(-1, tokens[:, None]).squeeze(-1)
    logits, ids = logits / temperature, None  # ids: the vocabulary ids of the candidates, when sorted
    if top_k is not None:
        values, ids = torch.topk(logits, min(top_k, logits.shape[-1]))
        probs = values.softmax(-1)
    elif top_p is not None and top_p < 1.0:
        if logits.device.type == "cpu":  # sorting the whole vocabulary dominates a CPU step: try the top first
            values, ids = torch.topk(logits, min(TOP_P_CANDIDATES, logits.shape[-1]))
            probs = (values - logits.logsumexp(-1, keepdim=True)).exp()  # their true probabilities
        if ids is None or not bool((probs.sum(-1) >= top_p).all()):  # the nucleus reaches past them
            values, ids = logits.sort(-1, descending=True)
            probs = values.softmax(-1)
    else:
        probs = logits.softmax(-1)
    if top_p is not None and top_p < 1.0:
        probs = probs.masked_fill(probs.cumsum(-1) - probs >= top_p, 0.0)  # mass of more likely tokens >= p
    cdf = probs.cumsum(-1)
    u = torch.rand(len(cdf), 1, device=cdf.device, generator=generator) * cdf[:, -1:]
    pick = torch.searchsorted(cdf, u, right=True).clamp(max=cdf.shape[-1] - 1)  # never a zero-probability token
    logprobs = (probs.gather(-1, pick) / cdf[:, -1:]).log().squeeze(-1)
    return (pick if ids is None else ids.gather(-1, pick)).squeeze(-1), logprobs


# LoRA ---------------------------------------------------------------------------------------------


class LoRALinear(nn.Module):
    """y = W x + (alpha / rank) * B A x, with W frozen. B starts at zero, so training starts from the
    unchanged model. The adapters are fp32 (they are the master weights under autocast)."""

    def __init__(self, base: nn.Linear, rank: int, alpha: float):
        super().__init__()
        self.base, self.scale = base, alpha / rank
        self.lora_a = nn.Parameter(torch.empty(rank, base.in_features, device=base.weight.device))
        self.lora_b = nn.Parameter(torch.zeros(base.out_features, rank, device=base.weight.device))
        nn.init.kaiming_uniform_(self.lora_a, a=math.sqrt(5))  # PEFT's initialisation

    @property
    def weight(self):  # the merged weight, for saving and for code that reads .weight
        return self.base.weight + (self.scale * self.lora_b @ self.lora_a).to(self.base.weight.dtype)

    def forward(self, x):
        return self.base(x) + (x.to(self.lora_a.dtype) @ self.lora_a.t() @ self.lora_b.t() * self.scale).to(x.dtype)


LORA_TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


def add_lora(model: Qwen3, rank: int, alpha: float) -> list:
    """Wrap each attention and MLP projection in a LoRA adapter, freeze the rest; return what trains."""
    model.requires_grad_(False)
    for parent in list(model.modules()):
        for name, child in list(parent.named_children()):
            if name in LORA_TARGETS and isinstance(child, nn.Linear):
                setattr(parent, name, LoRALinear(child, rank, alpha))
    return [p for p in model.parameters() if p.requires_grad]


# Files: hub downloads, safetensors, the tokenizer -------------------------------------------------


HUB_ID = re.compile(r"[A-Za-z0-9][\w.-]*/[A-Za-z0-9][\w.-]*")  # owner/name, e.g. Qwen/Qwen3-0.6B-Base


def resolve_model_dir(name_or_path) -> Path:
    """A local folder as is; otherwise a hub repo id, downloaded (config, safetensors, tokenizer)."""
    path, name = Path(name_or_path), str(name_or_path)
    if path.is_dir() and not (path / "config.json").exists():
        raise FileNotFoundError(f"{path}: no config.json in this model folder")
    if path.is_dir():
        return path
    if path.exists() or not HUB_ID.fullmatch(name):  # a file, or a path no hub repo can be named
        raise FileNotFoundError(f"{name}: no such model folder (nor a hub id like Qwen/Qwen3-0.6B-Base)")
    from huggingface_hub import snapshot_download
    try:
        patterns = ["config.json", "*.safetensors", "*.index.json", "tokenizer.json"]
        return Path(snapshot_download(name, allow_patterns=patterns))
    except Exception as e:  # offline, unknown repo, ...: one clear line, not a stack of HTTP errors
        why = "has no such repo" if type(e).__name__.startswith(("Repository", "Revision")) else "could not be reached"
        raise FileNotFoundError(f"{name}: no such model folder here, and the Hugging Face hub {why} "
                                f"({type(e).__name__}); pass a local model folder instead") from None


def read_json(path: Path) -> dict:
    try:
        return json.loads(Path(path).read_text(encoding="utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise ValueError(f"{path}: not a valid JSON file ({e})") from None


def read_safetensors(folder: Path) -> dict:
    """All tensors of a model folder: model.safetensors, or the shards its index names. Never pickle."""
    index = folder / "model.safetensors.index.json"
    if index.exists():
        shards = sorted(set(read_json(index)["weight_map"].values()))
    elif (folder / "model.safetensors").exists():
        shards = ["model.safetensors"]
    else:
        raise FileNotFoundError(f"{folder}: no model.safetensors or model.safetensors.index.json "
                                "(only safetensors weights are loaded, never .bin/.pt pickles)")
    if missing := [shard for shard in shards if not (folder / shard).exists()]:
        raise FileNotFoundError(f"{folder / missing[0]}: shard named in the index is missing")
    return {name: t for shard in shards for name, t in load_safetensors(folder / shard).items()}


def load_safetensors(path: Path) -> dict:
    """load_file, with a file that is truncated or no safetensors at all named in one line."""
    try:
        return load_file(path)
    except Exception as e:  # safetensors' own error type, OSError, ...
        raise ValueError(f"{path}: not a readable safetensors file, truncated or damaged? ({e})") from None


class Tokenizer:
    """A tokenizer.json (Qwen's byte-level BPE) through the `tokenizers` library; no BOS, as Qwen's."""

    def __init__(self, path):
        try:
            self.path, self.tok = str(path), tokenizers.Tokenizer.from_file(str(path))
        except Exception as e:  # the tokenizers library's own error: name the file, in one line
            raise ValueError(f"{path}: not a readable tokenizer.json ({str(e).splitlines()[0]})") from None
        vocab = self.tok.get_vocab(with_added_tokens=True)
        self.eos_id = self.pad_id = vocab.get("<|endoftext|>", 0)  # Qwen pads with its end-of-text token
        self.stop_ids = [vocab[t] for t in ("<|endoftext|>", "<|im_end|>") if t in vocab]
        self.n_real_tokens = self.tok.get_vocab_size(with_added_tokens=True)

    @classmethod
    def from_pretrained(cls, name_or_path) -> "Tokenizer":
        """A tokenizer.json file, or the one in a model folder or hub repo."""
        path = Path(name_or_path)
        if not path.is_file() and not (path := resolve_model_dir(name_or_path) / "tokenizer.json").exists():
            raise FileNotFoundError(f"{path}: no tokenizer.json in this model folder")
        return cls(path)

    def encode(self, text: str) -> list:
        return self.tok.encode(text, add_special_tokens=False).ids

    def encode_batch(self, texts) -> list:
        return [e.ids for e in self.tok.encode_batch(list(texts), add_special_tokens=False)]

    def decode(self, ids) -> str:
        return self.tok.decode(list(ids), skip_special_tokens=False)


# Training utilities shared by the trainers (metrics and the periodic eval are eval.py's) --------


def training_args(description: str, **defaults) -> argparse.ArgumentParser:
    """The flags every trainer shares; a trainer adds its own and overrides these defaults. Each is checked
    as it is parsed (train_common.check_training_args checks them together) and a bad one is one line."""
    p = ArgumentParser(description=description, formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    a = p.add_argument
    a("--model", default="Qwen/Qwen3-0.6B-Base", help="model to start from: Hugging Face hub id or local folder")
    a("--out_dir", default="out", help="final model (Hugging Face layout), checkpoints/ and metrics.jsonl")
    a("--data_dir", default=str(Path(__file__).resolve().parent / "data"), help="prepared data (eval.py's)")
    a("--steps", type=positive_int, default=200, help="training steps: one batch and one optimizer update each")
    a("--batch_size", type=positive_int, default=8, help="examples (questions) per micro-batch, per GPU")
    a("--grad_accum", type=positive_int, default=4, help="micro-batches per step: batch_size x grad_accum per GPU")
    a("--lr", type=positive_float, default=1e-5, help="peak learning rate (AdamW)")
    a("--warmup", type=nonnegative_int, help="steps of linear warmup, at most --steps (default: 10 or --steps)")
    a("--weight_decay", type=nonnegative_float, default=0.0, help="AdamW weight decay")
    a("--grad_clip", type=nonnegative_float, default=1.0, help="clip the gradient norm to this (0: no clipping)")
    a("--lora_rank", type=nonnegative_int, default=0, help="LoRA rank on every projection; 0 = full fine-tuning")
    a("--lora_alpha", type=positive_float, help="LoRA alpha (updates scaled by alpha/rank); default 2 x rank")
    a("--device", default="cuda" if torch.cuda.is_available() else "cpu", help="cuda or cpu")
    a("--dtype", choices=("bf16", "fp32"), help="autocast dtype; weights, AdamW stay fp32 (default: bf16 on GPU)")
    a("--seed", type=int, default=1337, help="seeds the data order, the sampling and LoRA's initialisation")
    a("--eval_every", type=nonnegative_int, default=50, help="held-out GSM8K accuracy every N steps (0: never)")
    a("--eval_limit", type=positive_int, default=200, help="GSM8K test questions per periodic eval (fixed subset)")
    a("--eval_shots", type=nonnegative_int, default=5, help="GSM8K few-shot examples in the periodic eval")
    a("--save_every", type=nonnegative_int, default=50, help="checkpoint (for --resume) every N steps (0: never)")
    a("--resume", action="store_true", help="continue from the latest checkpoint in --out_dir")
    a("--overwrite", action="store_true", help="start afresh in an --out_dir that holds an earlier run, "
      "replacing it (without this, or --resume, such an --out_dir is refused)")
    p.set_defaults(**defaults)
    return p


def rank_and_world():
    return int(os.environ.get("RANK", 0)), int(os.environ.get("WORLD_SIZE", 1))  # (0, 1) without torchrun


def setup(args):
    """Join torchrun's process group if any, seed, load model and tokenizer, add LoRA. Trained weights are fp32
    (AdamW's master weights, under autocast); a LoRA's frozen base is in the compute dtype (half the memory)."""
    device = torch.device(args.device)
    if rank_and_world()[1] > 1:
        if device.type == "cuda":
            device = torch.device("cuda", int(os.environ["LOCAL_RANK"]))
            torch.cuda.set_device(device)
        torch.distributed.init_process_group("nccl" if device.type == "cuda" else "gloo")
    dtype = torch.bfloat16 if (args.dtype or ("bf16" if device.type == "cuda" else "fp32")) == "bf16" else torch.float32
    torch.manual_seed(args.seed)  # LoRA's initialisation; every sampling call passes its own seed
    try:
        tokenizer = Tokenizer.from_pretrained(args.model)  # first: it is quick to find broken
        model = Qwen3.from_pretrained(args.model, device=device, dtype=dtype if args.lora_rank else torch.float32)
    except (FileNotFoundError, ValueError) as e:  # bad input: one line naming the flag, no traceback
        raise SystemExit(f"--model: {e}")
    if args.lora_rank:  # the adapters are created in fp32
        add_lora(model, args.lora_rank, args.lora_alpha or 2 * args.lora_rank)
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=args.lr,
                                  weight_decay=args.weight_decay)
    return model, tokenizer, optimizer, device, dtype


def autocast(device, dtype):
    return torch.autocast(device.type, dtype=dtype, enabled=dtype != torch.float32)


def lr_at(step: int, args) -> float:
    """Linear warmup to args.lr, then cosine decay towards 0 at args.steps."""
    if step < args.warmup:
        return args.lr * (step + 1) / args.warmup
    return args.lr * 0.5 * (1 + math.cos(math.pi * (step - args.warmup) / max(1, args.steps - args.warmup)))


def optimizer_step(optimizer, step: int, args, loss: float):
    """Average gradients over GPUs, stop on a non-finite loss or gradient before anything changes (so the
    last checkpoint is the last good one), clip, set this step's lr, update. Returns (lr, gradient norm)."""
    params = [p for group in optimizer.param_groups for p in group["params"]]
    world = rank_and_world()[1]
    for p in params if world > 1 else []:  # DDP by hand: one all-reduce per step, whatever method we called
        p.grad = p.grad if p.grad is not None else torch.zeros_like(p)
        torch.distributed.all_reduce(p.grad)
        p.grad /= world
    grad_norm = torch.nn.utils.clip_grad_norm_(params, args.grad_clip or float("inf"))
    if not (math.isfinite(loss) and torch.isfinite(grad_norm)):
        saved = sorted(Path(args.out_dir, "checkpoints").glob("step_*"))
        kept = f"the last good checkpoint is {saved[-1]} (--resume" if saved else "no checkpoint was saved yet (rerun"
        raise SystemExit(f"step {step + 1}: loss {loss}, gradient norm {grad_norm.item()}: not finite, stopping; "
                         f"{kept}, perhaps with a lower --lr)")
    for group in optimizer.param_groups:
        group["lr"] = lr_at(step, args)
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    return lr_at(step, args), grad_norm.item()


def finish(model, tokenizer, out_dir):
    """Write the final model to out_dir (Hugging Face layout, LoRA merged) and leave torchrun's group."""
    if rank_and_world()[0] == 0:
        model.save_pretrained(out_dir, tokenizer=tokenizer)
        print(f"saved the final model to {out_dir}")
    if torch.distributed.is_initialized():
        torch.distributed.destroy_process_group()
