"""
Qwen3 in one file, and only the model: the config and architecture (Qwen3Config, Qwen3), Hugging
Face weights and tokenizer in and out (from_pretrained, save_pretrained, Tokenizer), LoRA
(add_lora), generation over a KV cache with a CUDA-graph decode and a fused sampler (generate,
sample_next), and completion_logprobs for training and scoring. It matches transformers'
Qwen3ForCausalLM (modeling_qwen3.py is the ground truth) for every dense Qwen3 size, 0.6B to 32B.
It stands alone (copy it anywhere): it imports torch, safetensors, tokenizers and huggingface_hub,
nothing of this project.

    model = Qwen3.from_pretrained("Qwen/Qwen3-0.6B-Base", device="cuda", dtype=torch.bfloat16)
    tok = Tokenizer.from_pretrained("Qwen/Qwen3-0.6B-Base")
    out = model.generate([tok.encode("Question: 2+2?\nAnswer:")], max_new_tokens=32, temperature=0)
    print(tok.decode(out[0]))
"""
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

# Config -------------------------------------------------------------------------------------------


@dataclass
class Qwen3Config:
    """The config.json fields that define the computation (defaults: Qwen3-0.6B)."""
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
        checks = (("model_type", d.get("model_type", "qwen3") != "qwen3"),
                  ("rope_scaling", rope_type != "default"),
                  ("use_sliding_window", d.get("use_sliding_window")),
                  ("attention_bias", d.get("attention_bias")),
                  ("hidden_act", d.get("hidden_act", "silu") != "silu"))
        unsupported = [k for k, bad in checks if bad]
        if unsupported:
            raise ValueError(f"{source}: not a dense Qwen3 as this file implements it: "
                             + ", ".join(f"{k}={d[k]!r}" for k in unsupported))
        required = ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers",
                    "num_attention_heads")
        missing = [k for k in required if k not in d]
        if missing:
            raise ValueError(f"{source}: missing required key(s) {', '.join(missing)}")
        d = {"num_key_value_heads": d["num_attention_heads"],
             "head_dim": d["hidden_size"] // d["num_attention_heads"],
             "rope_theta": (d.get("rope_parameters") or {}).get("rope_theta"),  # transformers 5
             **d}
        lists = [k for k in ("bos_token_id", "eos_token_id") if isinstance(d.get(k), list)]
        d.update({k: d[k][0] for k in lists})  # several eos: the first
        config = cls(**{f.name: d[f.name] for f in fields(cls) if d.get(f.name) is not None})
        if config.num_attention_heads % config.num_key_value_heads:
            raise ValueError(f"{source}: num_attention_heads is no multiple of num_key_value_heads")
        return config

    def to_dict(self, dtype: torch.dtype = torch.float32) -> dict:
        """A config.json that transformers, vLLM and lm-eval load as Qwen3ForCausalLM."""
        return {"architectures": ["Qwen3ForCausalLM"], "model_type": "qwen3", "hidden_act": "silu",
                "attention_bias": False, "attention_dropout": 0.0, "rope_scaling": None,
                "use_sliding_window": False, "sliding_window": None, **asdict(self),
                "torch_dtype": str(dtype).removeprefix("torch.")}


# The model ----------------------------------------------------------------------------------------


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim))
        self.eps = eps

    def forward(self, x):
        # Normalise in fp32, scale in the input dtype: exactly transformers' order of rounding.
        x32 = x.float() * torch.rsqrt(x.float().pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * x32.to(x.dtype)


def rope_cos_sin(positions, head_dim: int, theta: float, dtype):
    """cos/sin tables (B, 1, T, head_dim) for integer positions (B, T), computed in fp32."""
    even = torch.arange(0, head_dim, 2, device=positions.device, dtype=torch.float32)
    inv_freq = 1.0 / (theta ** (even / head_dim))
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
        self.n_head = config.num_attention_heads
        self.n_kv_head = config.num_key_value_heads
        self.head_dim = config.head_dim
        self.q_proj = nn.Linear(config.hidden_size, self.n_head * self.head_dim, bias=False)
        self.k_proj = nn.Linear(config.hidden_size, self.n_kv_head * self.head_dim, bias=False)
        self.v_proj = nn.Linear(config.hidden_size, self.n_kv_head * self.head_dim, bias=False)
        self.o_proj = nn.Linear(self.n_head * self.head_dim, config.hidden_size, bias=False)
        self.q_norm = RMSNorm(self.head_dim, config.rms_norm_eps)  # Qwen3's q/k norms, pre-RoPE
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
    attention, never in memory). Rows are left-padded to one prompt length, so all rows write the
    same slot at each step; `mask` hides the padding and the slots not yet written."""

    def __init__(self, config: Qwen3Config, batch_size: int, max_len: int, device, dtype):
        shape = (config.num_hidden_layers, batch_size, config.num_key_value_heads, max_len,
                 config.head_dim)
        self.k = torch.zeros(shape, device=device, dtype=dtype)
        self.v = torch.zeros(shape, device=device, dtype=dtype)
        self.slots = None  # (T,) the cache slots the current tokens are written to
        self.length = 0    # how many slots attention reads (all of them in a CUDA graph)
        self.mask = None   # (B, 1, T, length) bool, True where a query may attend a key

    def update(self, layer: int, k, v):
        self.k[layer].index_copy_(2, self.slots, k.to(self.k.dtype))
        self.v[layer].index_copy_(2, self.slots, v.to(self.v.dtype))
        return self.k[layer, :, :, :self.length], self.v[layer, :, :, :self.length]


CUDA_GRAPHS = True  # generate() on CUDA replays its decode step as a CUDA graph: faster


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
        self.cuda_graphs = True  # may generate() capture its decode step? (not under FSDP)

    device = property(lambda self: self.embed_tokens.weight.device)
    dtype = property(lambda self: self.embed_tokens.weight.dtype)

    def forward(self, idx, positions=None, cache=None, return_hidden=False):
        """idx (B, T) token ids -> logits (B, T, vocab), or the final-norm hidden states (B, T,
        hidden). positions (B, T) default to 0..T-1; `cache` is only used by generate()."""
        if positions is None:
            positions = torch.arange(idx.shape[1], device=idx.device).expand(idx.shape[0], -1)
        x = self.embed_tokens(idx)
        cos, sin = rope_cos_sin(positions, self.config.head_dim, self.config.rope_theta, x.dtype)
        for block in self.layers:
            x = block(x, cos, sin, cache)
        x = self.norm(x)
        return x if return_hidden else self.lm_head(x)

    # Hugging Face weights in and out --------------------------------------------------------------

    @classmethod
    def from_pretrained(cls, name_or_path, device="cpu", dtype=torch.float32) -> "Qwen3":
        """A dense Qwen3 from a folder or hub id (safetensors only); names any bad weight."""
        folder = resolve_model_dir(name_or_path)
        config_file = folder / "config.json"
        config = Qwen3Config.from_dict(read_json(config_file), str(config_file))
        with torch.device("meta"):  # no memory until the weights arrive, and then only in `dtype`
            model = cls(config).to(dtype)
        model = model.to_empty(device=device)
        if config.tie_word_embeddings:  # to_empty untied them; the file may hold lm_head too
            model.lm_head.weight = model.embed_tokens.weight
        tensors = read_safetensors(folder)
        expected = model.hf_state_dict()
        missing = sorted(expected.keys() - tensors.keys())
        optional = {"lm_head.weight"} if config.tie_word_embeddings else set()
        unexpected = sorted(tensors.keys() - expected.keys() - optional)
        if missing or unexpected:
            raise ValueError(f"{folder}: missing weight(s) {missing[:5]}"
                             f"{' ...' * (len(missing) > 5)} unexpected weight(s) "
                             f"{unexpected[:5]}{' ...' * (len(unexpected) > 5)}")
        with torch.no_grad():
            for name, param in expected.items():
                if tensors[name].shape != param.shape:
                    raise ValueError(f"{folder}: weight {name} has shape "
                                     f"{tuple(tensors[name].shape)}, expected "
                                     f"{tuple(param.shape)} from config.json")
                param.copy_(tensors[name])
        return model.eval()

    def hf_state_dict(self, merged: bool = False) -> dict:
        """Weights under their Hugging Face names (model.layers.0.self_attn.q_proj.weight, ...): the
        live parameters, or with merged=True LoRA folded in (what save_pretrained writes)."""
        weights = {}
        for name, module in self.named_modules():
            if isinstance(module, LoRALinear):
                weights[name] = module.weight if merged else module.base.weight
            elif (isinstance(module, (nn.Linear, nn.Embedding, RMSNorm))
                  and not name.endswith(".base")):
                weights[name] = module.weight
        if self.config.tie_word_embeddings:
            del weights["lm_head"]
        return {(k if k == "lm_head" else "model." + k) + ".weight": v for k, v in weights.items()}

    def save_pretrained(self, out_dir, tokenizer=None):
        """Write config.json + model.safetensors (+ tokenizer.json) in the Hugging Face layout, LoRA
        merged, atomically: a crash mid-save leaves any previous model in out_dir intact."""
        Path(out_dir).mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryDirectory(dir=out_dir, prefix=".tmp-") as tmp:  # stale: cleared
            merged = self.hf_state_dict(merged=True)
            tensors = {k: v.detach().cpu().contiguous() for k, v in merged.items()}
            save_file(tensors, Path(tmp, "model.safetensors"), metadata={"format": "pt"})
            config = json.dumps(self.config.to_dict(self.dtype), indent=2)
            Path(tmp, "config.json").write_text(config)
            if tokenizer is not None:
                shutil.copy(tokenizer.path, Path(tmp, "tokenizer.json"))
            for name in os.listdir(tmp):
                make_readable(Path(tmp, name))
                os.replace(Path(tmp, name), Path(out_dir, name))

    # Generation -----------------------------------------------------------------------------------

    @torch.no_grad()
    def generate(self, prompts, max_new_tokens: int, temperature: float = 1.0, top_k=None,
                 top_p=None, stop_token_ids=None, seed=None, return_logprobs: bool = False,
                 n_real_tokens=None, cuda_graph=None, stop_fn=None, uniforms=None):
        """The new tokens of each prompt (lists of token ids, any lengths); a row that samples a
        stop token keeps it as its last and ends. temperature=0 is greedy. return_logprobs adds
        each token's log-probability under the distribution it was drawn from (after temperature,
        top-k, top-p). n_real_tokens: never sample the embedding's padding rows past the
        tokenizer's tokens. Finished rows ride along until all are done, so the batch never
        reshapes and the host waits only every 16 steps, when stop_fn(rows' tokens so far) may
        end rows too (on a stop string, say). cuda_graph: see _decoder; None: CUDA_GRAPHS.
        uniforms (B, max_new_tokens): the numbers each row's draws invert (default: from seed)."""
        if not prompts or min(map(len, prompts)) == 0 or max_new_tokens < 1:
            raise ValueError("generate: needs prompts of one token or more, max_new_tokens >= 1")
        device = self.device
        B, prompt_len = len(prompts), max(map(len, prompts))
        max_len = prompt_len + max_new_tokens
        graphable = CUDA_GRAPHS and device.type == "cuda" and self.cuda_graphs
        cuda_graph = graphable if cuda_graph is None else cuda_graph
        if max_len > self.config.max_position_embeddings:
            raise ValueError(f"generate: {max_len} tokens exceed max_position_embeddings "
                             f"{self.config.max_position_embeddings}")

        # Left-pad the prompts to one length, so that every row writes the same cache slot at
        # each step: idx (B, prompt_len); pad (B,) counts each row's padding.
        pad = torch.tensor([prompt_len - len(p) for p in prompts], device=device)
        idx = torch.tensor([[0] * (prompt_len - len(p)) + list(p) for p in prompts], device=device)
        # The KV cache holds keys and values in the compute dtype (autocast's, if it is on).
        autocast_on = torch.is_autocast_enabled(device.type)
        dtype = torch.get_autocast_dtype(device.type) if autocast_on else self.dtype
        cache = KVCache(self.config, B, max_len, device, dtype)
        slot = torch.arange(max_len, device=device)
        key_is_real = slot[None, :] >= pad[:, None]  # (B, max_len): False on each row's padding
        # One uniform per row and step, drawn on the CPU (any device): a row's own numbers
        if uniforms is None:
            stream = torch.Generator().manual_seed(seed) if seed is not None else None
            uniforms = torch.rand(B, max_new_tokens, generator=stream)
        uniforms = uniforms.to(device)
        stop_ids = set(stop_token_ids or [])
        stop = torch.tensor(sorted(stop_ids), device=device, dtype=torch.long)  # (n_stop,)
        # The one-token decode step; built before the prefill, as its warm-up writes slot 0
        decode = self._decoder(cache, key_is_real, pad, cuda_graph)

        # Prefill: the whole padded prompt in one pass, into cache slots 0..prompt_len-1. mask
        # (B, 1, prompt_len, prompt_len): causal, padding keys hidden; padding queries attend to
        # themselves only (finite outputs: no NaN can leak into the cache). positions
        # (B, prompt_len) count from each row's first real token: padding never shifts RoPE.
        causal = slot[:prompt_len, None] >= slot[None, :prompt_len]
        own_slot = torch.eye(prompt_len, dtype=torch.bool, device=device)
        cache.slots, cache.length = slot[:prompt_len], prompt_len
        cache.mask = ((causal & key_is_real[:, None, :prompt_len]) | own_slot)[:, None]
        positions = (slot[None, :prompt_len] - pad[:, None]).clamp(min=0)
        hidden = self(idx, positions, cache, return_hidden=True)  # (B, prompt_len, hidden)
        logits = self.lm_head(hidden[:, -1])  # (B, vocab): only the last position is projected

        # Decode: sample token t from the logits (B, vocab), then run it through the model to
        # get the logits of token t+1. tokens and logprobs (B, max_new_tokens) are filled in
        # place; done (B,) marks rows that sampled a stop token (or that stop_fn ended).
        tokens = torch.zeros(B, max_new_tokens, dtype=torch.long, device=device)
        logprobs = torch.zeros(B, max_new_tokens, device=device)
        done = torch.zeros(B, dtype=torch.bool, device=device)
        for t in range(max_new_tokens):
            tokens[:, t], logprobs[:, t] = sample_next(logits, temperature, top_k, top_p,
                                                       n_real_tokens, uniforms[:, t:t + 1])
            done |= torch.isin(tokens[:, t], stop)
            # Every 16 steps the host looks (one sync): stop strings, and whether all rows ended
            if t % 16 == 15 and stop_fn is not None:
                done |= torch.tensor(stop_fn(tokens[:, :t + 1].tolist()), device=device)
            if t == max_new_tokens - 1 or (t % 16 == 15 and bool(done.all())):
                break
            logits = decode(tokens[:, t:t + 1], prompt_len + t)

        # Back to lists: each row up to and including its first stop token
        tokens = tokens[:, :t + 1].tolist()
        logprobs = logprobs[:, :t + 1].tolist()
        for i, row in enumerate(tokens):
            end = next((j + 1 for j, tok in enumerate(row) if tok in stop_ids), len(row))
            tokens[i], logprobs[i] = row[:end], logprobs[i][:end]
        return (tokens, logprobs) if return_logprobs else tokens

    def _decoder(self, cache: KVCache, key_is_real, pad, cuda_graph: bool):
        """step(token (B, 1), slot s) -> next logits (B, vocab), from fixed input buffers. Eager,
        attention reads the slots written so far; a CUDA graph reads the whole cache under the
        mask, so every shape and address is fixed: captured once, replayed, no per-kernel launch
        cost. Off CUDA, cuda_graph=True runs that step uncaptured (so the tests check it)."""
        slot = torch.arange(cache.k.shape[3], device=pad.device)
        # The step's inputs, fixed buffers that step() overwrites: token and position (B, 1),
        # the slot written (1,), and the mask (B, 1, 1, max_len) of the keys it may read
        token_in, position_in = pad[:, None].clone(), pad[:, None].clone()
        slot_in = slot[:1].clone()
        mask_in = key_is_real[:, None, None].clone()
        graph = None

        def run(length):
            cache.slots = slot_in
            cache.length = length
            cache.mask = mask_in[..., :length]
            return self(token_in, position_in, cache)[:, -1]
        if cuda_graph and pad.device.type == "cuda":
            side = torch.cuda.Stream()
            side.wait_stream(torch.cuda.current_stream())
            with torch.cuda.stream(side):
                run(len(slot))  # warm-up outside the graph: lazy initialisation, allocations
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


# The fused sampler: top-k and top-p, exact, without sorting the vocabulary ---------------------
#
# top-k and top-p keep the first tokens of a stable sort by probability (the most likely first;
# equal probabilities in id order), and the draw inverts the kept CDF, in that order, at one
# uniform number per row. Sorting 151,936 logits per row used to dominate a CPU decode step; here
# the token at a given cumulative mass of that order is found by a radix search over the
# probabilities' bits (SortedOrder), a few passes over the vocabulary whatever the logits look
# like, with no host sync off the CPU (a CUDA graph can hold it). The search compares sums of
# probabilities with top_p in integer units (masses), exact in any order, so a sum within rounding
# of top_p keeps the same tokens on every path and device. The sort-based definition lives in the
# tests (tests/test_model.py, sorted_reference), which check these draws against it bit for bit.

MASS_UNIT = 2.0 ** 52  # p * 2^52 is exact in fp32 and floors exactly to int64; a row sums < 2^53


def masses(probs):
    """fp32 probabilities -> int64 masses floor(p * 2^52), exactly. top-k and top-p count in these
    units: integer sums are exact in any order, so any search keeps the same tokens, to the bit."""
    return (probs * MASS_UNIT).long()


def sample_next(logits, temperature: float, top_k=None, top_p=None, n_real_tokens=None,
                u=None):
    """One sampling step for a batch of next-token logits (B, vocab) -> (tokens (B,), logprobs
    (B,)). Drops rows past the tokenizer (n_real_tokens), applies temperature, keeps the top_k
    most likely tokens, then the fewest most likely tokens whose probability reaches top_p (of
    what top-k kept; the token crossing p is kept; equal probabilities in id order), and draws by
    inverting the kept CDF at one uniform number per row (u (B, 1), else torch's; no host sync);
    log-probs are under that distribution."""
    logits = logits[:, :n_real_tokens].float()  # a prefix of the vocabulary: ids are unchanged
    if temperature == 0:
        tokens = logits.argmax(-1)
        return tokens, logits.log_softmax(-1).gather(-1, tokens[:, None]).squeeze(-1)
    probs = (logits / temperature).softmax(-1)  # (B, vocab)
    u = torch.rand(len(probs), 1, device=probs.device) if u is None else u
    top_p = 1.0 if top_p is None else min(top_p, 1.0)
    if top_k is None and top_p >= 1:  # plain sampling: the CDF in vocabulary order
        cdf = probs.cumsum(-1)
        pick = torch.searchsorted(cdf, u * cdf[:, -1:], right=True).clamp(max=cdf.shape[-1] - 1)
        return pick.squeeze(-1), (probs.gather(-1, pick) / cdf[:, -1:]).log().squeeze(-1)
    tokens, logprobs = nucleus_draw(probs, top_k, top_p, u)
    return tokens.squeeze(-1), logprobs.squeeze(-1)


TOP_P_CANDIDATES = 1024  # on CPU, top-p first looks for the nucleus among this many top tokens


class SortedOrder:
    """The stable sort of probs (B, n) by probability (largest first, ties by position), without
    sorting. fp32 probabilities (never negative) viewed as int32 order as the floats do, so a
    token ranks by its bits, < 2^30. crossing() finds where the cumulative mass along that order
    first exceeds a target, a digit of the bits at a time from the top (a radix search): a
    histogram of the mass over the tokens' digits finds the digit, and the next histogram looks
    only inside it. Then the position among equal probabilities."""

    def __init__(self, probs, mass):
        self.bits = probs.view(torch.int32)  # (B, n)
        self.mass = mass
        # Digits of `width` bits (15 for Qwen's vocabulary: two digits, at shifts 15 and 0); fewer
        # for small n, as a histogram holds 2^width + 2 bins per row
        self.width = min(max(probs.shape[-1].bit_length() - 1, 4), 15)
        self.shifts = [*range(30 - self.width, 0, -self.width), 0]
        self.first = self.binned(torch.zeros_like(mass[:, :1]), self.shifts[0])  # for every search
        self.total = self.first[1][:, -1:]  # (B, 1): all of a row's mass

    def binned(self, base, shift):
        """The mass of the tokens per digit at `shift`, for those whose higher bits equal base's
        (B, 1): hist (B, 2^width + 2), from the largest digit down, after a first bin with the
        mass of all more likely tokens and before a last one with the less likely; and its
        running sum cum (B, 2^width + 2)."""
        bins = 2 ** self.width + 2
        # window (B, n): (bits - base) >> shift, plus 1, clipped: the bin of each token's mass
        window = (self.bits - (base - (1 << shift)).int()) >> shift
        window = window.clamp_(0, bins - 1)
        rows = torch.arange(len(window), dtype=torch.int32, device=window.device)[:, None]
        flat = window.add_(rows * bins).view(-1)  # each row's bins after the previous row's
        hist = torch.zeros(len(window) * bins, dtype=self.mass.dtype, device=window.device)
        hist = hist.index_add_(0, flat, self.mass.view(-1)).view(len(window), bins).flip(-1)
        return hist, hist.cumsum(-1)

    def crossing(self, target):
        """The first token in the order whose cumulative mass exceeds target (B, 1), for target
        below the total: its bits (B, 1) int64, j (B, 1): how many tokens of the same probability
        come before it, and the cumulative mass through it (B, 1)."""
        base = torch.zeros_like(target)  # (B, 1): the crossing's bits, one digit at a time
        for shift in self.shifts:
            hist, cum = self.first if shift == self.shifts[0] else self.binned(base, shift)
            i = torch.searchsorted(cum, target, right=True)  # the first bin past target
            base = base + ((2 ** self.width - i) << shift)  # bin i holds digit 2^width - i
        before = cum.gather(1, i) - hist.gather(1, i)  # the mass of all more likely tokens
        # Tokens of equal probability have equal masses (the mass of these bits' probability):
        # the cumulative mass passes target at the (j+1)-th of them
        tie_mass = masses(base.int().view(torch.float32))
        j = (target - before) // tie_mass
        return base, j, before + (j + 1) * tie_mass

    def position(self, bits, j):
        """The position (B, 1) of the (j+1)-th token whose probability has these bits (B, 1)."""
        count = (self.bits == bits.int()).cumsum(-1, dtype=torch.int32)  # (B, n): so far
        return torch.searchsorted(count, j.int(), right=True)


def draw(order: SortedOrder, threshold, u):
    """Keep the first tokens of the order through the one at which the cumulative mass reaches
    threshold (B, 1) (top-p's nucleus; at most all of them) and invert their CDF, in that order,
    at the uniform numbers u (B, 1) -> (the drawn positions (B, 1), their log-probs (B, 1) under
    the kept distribution)."""
    threshold = torch.minimum(threshold, order.total)  # the masses sum to a hair off 2^52
    _, _, kept = order.crossing(threshold - 1)  # integers: "exceeds threshold - 1" is ">= it"
    bits, j, _ = order.crossing((u.double() * kept.double()).long())  # floor: in [0, kept)
    pick = order.position(bits, j)
    return pick, (order.mass.gather(1, pick).double() / kept.double()).log().float()


def nucleus_draw(probs, top_k, top_p: float, u):
    """top-k, top-p and the draw: tokens and log-probs (B, 1) from probs (B, V), without sorting
    the vocabulary. top-k keeps the top_k most likely tokens, top-p then the fewest most likely
    whose mass reaches top_p (of top-k's mass, with top-k), and the kept CDF is inverted at u."""
    # top-p in masses: the nucleus ends at the token whose cumulative mass reaches top_p * 2^52,
    # top_p of the whole probability (the first token at least; at most the row's mass, draw())
    threshold = torch.full_like(u, max(math.ceil(top_p * MASS_UNIT), 1), dtype=torch.long)
    # On CPU a topk is cheaper than a search: first the C most likely tokens (unless even C
    # tokens as likely as the most likely one fall short of top_p), in id order (B, C). If the
    # ones more likely than the least of them reach the threshold, every token up to the
    # crossing is among them, and searching them is searching all.
    c = min(TOP_P_CANDIDATES, probs.shape[-1])
    if (top_k is None and probs.device.type == "cpu"
            and bool((probs.amax(-1) * c >= top_p).all())):  # host syncs, on CPU only
        ids = probs.topk(c, sorted=False).indices.sort(-1).values
        top = probs.gather(1, ids)
        top_mass = masses(top)
        sure = torch.where(top > top.amin(-1, keepdim=True), top_mass, 0).sum(-1, keepdim=True)
        if bool((sure >= threshold).all()):
            pick, logprobs = draw(SortedOrder(top, top_mass), threshold, u)
            return ids.gather(1, pick), logprobs
    mass = masses(probs)  # (B, vocab)
    if top_k is not None:
        # top-k keeps the tokens more likely than the k-th most likely one and, of those as
        # likely as it, the lowest ids up to k tokens: their mass (B, 1); top-p takes its share
        k = min(top_k, probs.shape[-1])
        kth = probs.topk(k).values[:, -1:]  # the k-th largest probability (B, 1)
        above = probs > kth
        kept_by_k = (torch.where(above, mass, 0).sum(-1, keepdim=True)
                     + (k - above.sum(-1, keepdim=True)) * masses(kth))
        threshold = (kept_by_k.double() * top_p).ceil().long()
    return draw(SortedOrder(probs, mass), threshold.clamp(min=1), u)


# Log-probabilities of given tokens, for the trainers and eval -------------------------------------

LOGPROB_CHUNK = 1024  # rows of (chunk, vocab) fp32 logits at a time: 0.6 GB for Qwen's vocab


def completion_logprobs(model, seqs: list, starts: list, temperature: float = 1.0,
                        n_real_tokens=None, return_hidden: bool = False):
    """fp32 log-probs (B, L) of each completion seqs[b][starts[b]:] given all before it, and the
    mask (B, L) of its tokens (L: the longest completion); only those positions are projected onto
    the vocabulary. n_real_tokens normalises over the tokens the sampler draws (else lowering one
    would move mass onto rows never sampled). return_hidden adds the N masked positions' states."""
    # Right-pad the sequences into idx (B, width); start (B, 1) and n_new (B, 1) per row.
    device = model.device
    width = max(map(len, seqs))
    idx = torch.tensor([s + [0] * (width - len(s)) for s in seqs], device=device)
    start = torch.tensor(starts, device=device)[:, None]
    n_new = torch.tensor([len(s) for s in seqs], device=device)[:, None] - start
    # Completion token j of row b is predicted at position where[b, j] = start - 1 + j;
    # mask (B, L) is False past a row's completion (its `where` is clamped to stay in range).
    j = torch.arange(int(n_new.max()), device=device)
    mask = j < n_new
    where = (start - 1 + j).clamp(max=width - 2)
    # One forward pass without the last token (it predicts nothing): hidden (B, width-1, hidden).
    # Gather the predicting positions' states, keeping the real ones only: rows (N, hidden).
    hidden = model(idx[:, :-1], return_hidden=True)
    rows = hidden.gather(1, where[..., None].expand(-1, -1, hidden.shape[-1]))[mask]
    head = model.lm_head.weight[:n_real_tokens]  # (vocab or n_real_tokens, hidden)

    def logprobs_of(rows, targets):  # (n, hidden), (n,) -> log softmax(logits)[target], (n,)
        logits = (rows @ head.t()).float() / temperature
        return logits.gather(-1, targets[:, None]).squeeze(-1) - logits.logsumexp(-1)
    # The (N, vocab) logits exist only LOGPROB_CHUNK rows at a time; targets (N,) are the
    # completion tokens. Then scatter the N log-probs back into the (B, L) layout of the mask.
    targets = idx.gather(1, where + 1)[mask]
    logprobs = in_row_chunks(logprobs_of, rows, targets)
    logprobs = torch.zeros(mask.shape, device=device).masked_scatter(mask, logprobs)
    return (logprobs, mask, rows) if return_hidden else (logprobs, mask)


def in_row_chunks(fn, *rows):
    """fn over LOGPROB_CHUNK rows at a time, concatenated; under grad, recomputed in backward."""
    offsets = range(0, len(rows[0]), LOGPROB_CHUNK)
    chunks = [tuple(r[i:i + LOGPROB_CHUNK] for r in rows) for i in offsets]
    recompute = torch.is_grad_enabled()
    run = (lambda *c: checkpoint(fn, *c, use_reentrant=False)) if recompute else fn
    return torch.cat([run(*chunk) for chunk in chunks])


def target_nll(logprobs, mask, first_target, n_tokens):
    """Eq. 5's and eq. 7's loss, one cross-entropy on different states: the summed NLL of the
    target tokens over n_tokens (the step's targets: a mean over tokens). logprobs, mask (B, L) as
    completion_logprobs gives them; first_target (B,): each row's first target column, the columns
    before it its state (SFT: 0; OPD: the student's own prefix). Returns (loss, targets (B, L))."""
    first = torch.as_tensor(first_target, device=mask.device).view(-1, 1)  # (B, 1) or (1, 1)
    targets = mask & (torch.arange(mask.shape[1], device=mask.device) >= first)
    return -(logprobs * targets).sum() / n_tokens, targets


# LoRA ---------------------------------------------------------------------------------------------


class LoRALinear(nn.Module):
    """y = W x + (alpha / rank) * B A x, with W frozen. B starts at zero, so training starts from
    the unchanged model. The adapters are fp32 (they are the master weights under autocast)."""

    def __init__(self, base: nn.Linear, rank: int, alpha: float):
        super().__init__()
        self.base = base
        self.scale = alpha / rank
        self.lora_a = nn.Parameter(torch.empty(rank, base.in_features, device=base.weight.device))
        self.lora_b = nn.Parameter(torch.zeros(base.out_features, rank, device=base.weight.device))
        nn.init.kaiming_uniform_(self.lora_a, a=math.sqrt(5))  # PEFT's initialisation

    @property
    def weight(self):  # the merged weight, for saving and for code that reads .weight
        update = self.scale * self.lora_b @ self.lora_a
        return self.base.weight + update.to(self.base.weight.dtype)

    def forward(self, x):
        update = x.to(self.lora_a.dtype) @ self.lora_a.t() @ self.lora_b.t() * self.scale
        return self.base(x) + update.to(x.dtype)


LORA_TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


def add_lora(model: Qwen3, rank: int, alpha: float) -> list:
    """Wrap every attention and MLP projection in LoRA, freeze the rest; return what trains."""
    model.requires_grad_(False)
    for parent in list(model.modules()):
        for name, child in list(parent.named_children()):
            if name in LORA_TARGETS and isinstance(child, nn.Linear):
                setattr(parent, name, LoRALinear(child, rank, alpha))
    return [p for p in model.parameters() if p.requires_grad]


# Files: hub downloads, safetensors, the tokenizer -------------------------------------------------
# A missing or damaged file raises FileNotFoundError or ValueError, one line that names it: the
# entry points print it after the flag that named the model (--model, --teacher).


def read_json(path) -> dict:
    try:
        return json.loads(Path(path).read_text(encoding="utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise ValueError(f"{path}: not a valid JSON file ({e})") from None


def load_safetensors(path) -> dict:
    """load_file, with a file that is truncated or no safetensors at all named in one line."""
    try:
        return load_file(path)
    except Exception as e:  # safetensors' own error type, OSError, ...
        raise ValueError(f"{path}: not a readable safetensors file, truncated or damaged? "
                         f"({e})") from None


def read_safetensors(folder: Path) -> dict:
    """All tensors of a model folder: model.safetensors or its index's shards; never pickles."""
    index = folder / "model.safetensors.index.json"
    if index.exists():
        shards = sorted(set(read_json(index)["weight_map"].values()))
    elif (folder / "model.safetensors").exists():
        shards = ["model.safetensors"]
    else:
        raise FileNotFoundError(f"{folder}: no model.safetensors or model.safetensors.index.json "
                                "(only safetensors weights are loaded, never .bin/.pt pickles)")
    missing = [shard for shard in shards if not (folder / shard).exists()]
    if missing:
        raise FileNotFoundError(f"{folder / missing[0]}: shard named in the index is missing")
    return {name: t for shard in shards for name, t in load_safetensors(folder / shard).items()}


def make_readable(path: Path):
    """rw-r--r-- (folders rwxr-xr-x) under the umask, as any saved file: safetensors writes its
    own files rw-------."""
    umask = os.umask(0)
    os.umask(umask)
    path.chmod((0o777 if path.is_dir() else 0o666) & ~umask)


HUB_ID = re.compile(r"[A-Za-z0-9][\w.-]*/[A-Za-z0-9][\w.-]*")  # owner/name: Qwen/Qwen3-0.6B-Base


def resolve_model_dir(name_or_path) -> Path:
    """A local folder as is; else a hub repo id, downloaded (config, safetensors, tokenizer)."""
    path = Path(name_or_path)
    name = str(name_or_path)
    if path.is_dir() and not (path / "config.json").exists():
        raise FileNotFoundError(f"{path}: no config.json in this model folder")
    if path.is_dir():
        return path
    if path.exists() or not HUB_ID.fullmatch(name):  # a file, or a path no hub repo can be named
        raise FileNotFoundError(f"{name}: no such model folder (nor a hub id like "
                                "Qwen/Qwen3-0.6B-Base)")
    from huggingface_hub import snapshot_download
    try:
        patterns = ["config.json", "*.safetensors", "*.index.json", "tokenizer.json"]
        return Path(snapshot_download(name, allow_patterns=patterns))
    except Exception as e:  # offline, unknown repo, ...: one clear line, not a stack of HTTP errors
        unknown = type(e).__name__.startswith(("Repository", "Revision"))
        why = f"{'has no such repo' if unknown else 'could not be reached'} ({type(e).__name__})"
        raise FileNotFoundError(f"{name}: no such model folder here, and the Hugging Face hub "
                                f"{why}; pass a local model folder instead") from None


class Tokenizer:
    """A tokenizer.json (Qwen's byte-level BPE) through `tokenizers`; no BOS, as Qwen's."""

    def __init__(self, path):
        self.path = str(path)
        try:
            self.tok = tokenizers.Tokenizer.from_file(str(path))
        except Exception as e:  # the tokenizers library's own error: name the file, in one line
            raise ValueError(f"{path}: not a readable tokenizer.json "
                             f"({str(e).splitlines()[0]})") from None
        vocab = self.tok.get_vocab(with_added_tokens=True)
        self.eos_id = self.pad_id = vocab.get("<|endoftext|>", 0)  # Qwen pads with end-of-text
        self.stop_ids = [vocab[t] for t in ("<|endoftext|>", "<|im_end|>") if t in vocab]
        self.n_real_tokens = self.tok.get_vocab_size(with_added_tokens=True)

    @classmethod
    def from_pretrained(cls, name_or_path) -> "Tokenizer":
        """A tokenizer.json file, or the one in a model folder or hub repo."""
        path = Path(name_or_path)
        if not path.is_file():
            path = resolve_model_dir(name_or_path) / "tokenizer.json"
            if not path.exists():
                raise FileNotFoundError(f"{path}: no tokenizer.json in this model folder")
        return cls(path)

    def encode(self, text: str) -> list:
        return self.tok.encode(text, add_special_tokens=False).ids

    def encode_batch(self, texts) -> list:
        return [e.ids for e in self.tok.encode_batch(list(texts), add_special_tokens=False)]

    def decode(self, ids) -> str:
        return self.tok.decode(list(ids), skip_special_tokens=False)
