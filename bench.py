"""
Speed, side by side with transformers: generation, training steps, evaluation.

    python bench.py --preset tiny                          # CPU: ~2 minutes on 2 cores
    python bench.py --temperature 0.7,1 --logit_std 3,0 --batch_size 16 --skip_train --threads 1
                                                           # CPU: both spreads, both temperatures
    python bench.py --preset 0.6b --batch_size 1,16,64     # one GPU, bf16: + a training step
    python bench.py --suite gpu --tokenizer TOKENIZER_JSON --data_dir data --json gpu.json
                                                           # one GPU, all below (~9 min on an H200
                                                           # before issue 19's sections)

Generation (both suites). A random-init Qwen3 of a preset shape is saved to a temporary folder and
loaded by both implementations, which then sample the same random prompts with the same settings,
exactly --new_tokens tokens per row (no stop tokens), interleaved run by run so that both see the
same machine. Each number is the fastest of --repeats runs after a warm-up; tokens/s counts new
tokens only, prefill time included. On CPU the ratio is also given by process CPU time, which other
processes disturb less. On CUDA ours runs twice, with its CUDA-graph decode step (`ours`, the
default, model.CUDA_GRAPHS) and without (`ours_eager`), and the two must give the same tokens for
the same seed (`graph_tokens_equal_eager`). transformers runs with its defaults (dynamic cache, no
compilation) and sdpa attention, top_k disabled (its generation default is 50).

Presets: `0.6b` is the Qwen3-0.6B shape (hidden 1024, 28 layers, 16 heads, 8 KV heads, head_dim
128, intermediate 3072, vocab 151936, tied). `tiny` is a CPU-sized model with the real vocabulary
(hidden 256, 4 layers, 4 heads, 2 KV heads, head_dim 64, intermediate 768, vocab 151936, tied).
`micro` (hidden 64, 2 layers) is for the tests.

The weights are N(0, 0.02) (transformers' init), except the final norm's weight, which is set so
the logits spread with a standard deviation of --logit_std (default 3; a list measures a model
each): plain random init (0) gives near-uniform next-token distributions, unlike any trained
model, a top-p 0.9 nucleus of ~120,000 tokens; with std 3 the top token has ~25% of the mass and
the nucleus a few hundred tokens at temperature 0.7 (a few thousand at 1), closer to real
rollouts. Every --temperature is measured on each. The stop tokens'
embedding rows are zero, so a random model never stops early: every row decodes to full length.

Batch-1 decode: decode-only tokens/s = (new_tokens - 1) / (time of the full run - time of a run
with one new token). On CUDA it is compared with the memory-bandwidth bound: each decode step reads
every weight once (the tied embedding once, as the lm_head) and the KV cache written so far (at the
mean context length), so bound = bandwidth / those bytes. --peak_bw_gbs defaults to the datasheet
figure of the GPU found (H200 4800 GB/s, H100 SXM 3350, H100 PCIe 2000, A100 80GB 2039).

The training-step measurement of the `generation` suite is full fine-tuning as the trainers do it:
forward + backward + AdamW over all weights on the NLL of every token of random sequences, fp32
weights under autocast to --dtype. Its MFU counts 6 x parameters + 6 x layers x context x q-width
FLOPs per token (causal attention, forward and backward, no recomputation) against the GPU's dense
bf16 peak (--peak_tflops; H100/H200 SXM: 989).

The `gpu` suite (issue 13's prepared run) adds, with the real tokenizer and prepared data:
  - the three trainers' main(), in this process, at their own defaults (RL: 16 questions x 8
    answers x 256 tokens; OPD from a teacher (the same random model); stress SFT, LoRA r64) for
    --train_steps steps: seconds per step (metrics.jsonl's step_s, the first step left out as
    warm-up) and torch.cuda.max_memory_allocated against a 24 GB card. A random model never earns a
    reward, which would skip every group, so the RL run draws each answer's reward as a coin flip
    (a hash of its text): every step then does the full policy-gradient work. RL runs again with
    eager decoding, for the graph's gain on the whole step.
  - eval.py's protocol on --eval_limit MMLU and GSM8K questions (256 greedy tokens: a random model
    never writes "Question:") and 200 TruthfulQA, timed; 16 GSM8K questions with and without the
    CUDA graph, to compare their greedy completions.
  - runs/paper.py's pipeline time, recomputed from those measurements.
  - issue 19's questions: the decode step at long context (batch 16, 900-token prompts), eager and
    with the graph, and torch.profiler's table of the eager steps (the 90 ms an eager step took on
    the H200, unexplained); --fsdp in one process (a group of one) for RL, with its rollouts on the
    gathered weights, OPD and stress SFT, seconds per step and memory; full fine-tuning at 8, 16
    and 32 x --train_len tokens (where MFU stops growing) and which attention kernel each ran.
--sections runs some of these (each under the 10 minutes one device call allows), e.g.
    python bench.py --suite gpu ... --batch_size 1 --skip_train --sections decode_profile,fsdp
Every section's figures go into --json as soon as they exist, so a run cut short keeps them.
"""
import argparse
import contextlib
import importlib
import json
import os
import platform
import resource
import shutil
import socket
import statistics
import tempfile
import time
import traceback
import zlib
from pathlib import Path
from unittest import mock

import torch

import model as model_module
from harness.cli import (ArgumentParser, check_device, check_writable_file, list_of,
                         nonnegative_float, positive_int, probability)
from harness.training import autocast
from model import Qwen3, Qwen3Config, Tokenizer, completion_logprobs

GPU_SECTIONS = ("decode_profile", "fsdp", "trainers", "eval", "training_sizes")  # --suite gpu
parser = ArgumentParser(description=__doc__,  # one-line errors
                        formatter_class=argparse.RawDescriptionHelpFormatter)
a = parser.add_argument
a("--suite", choices=["generation", "gpu"], default="generation",
  help="generation: generation + one training step; gpu: also the trainers and eval (see above)")
a("--preset", choices=["micro", "tiny", "0.6b"], default=None,
  help="model shape (default: tiny for --suite generation, 0.6b for --suite gpu)")
a("--device", default="cuda" if torch.cuda.is_available() else "cpu", help="cuda or cpu")
a("--dtype", choices=["bf16", "fp16", "fp32"], default=None,
  help="weights dtype for generation, autocast dtype for training "
  "(default: bf16 on cuda, fp32 on cpu)")
a("--batch_size", type=list_of(positive_int), default=None,
  help="comma-separated generation batch sizes "
  "(default: 1,16 on cpu, 1,16,64 on cuda, 1,16,64,128 for --suite gpu)")
a("--prompt_len", type=int, default=None, help="prompt tokens per row (default 32 cpu, 128 cuda)")
a("--new_tokens", type=int, default=None, help="new tokens per row (default 32 cpu, 256 cuda)")
a("--temperature", type=list_of(nonnegative_float), default=(0.7,),
  help="comma-separated sampling temperatures for both (0 = greedy), e.g. 0.7,1")
a("--top_p", type=probability, default=0.9, help="top-p for both (1.0 = off)")
a("--repeats", type=int, default=None,
  help="timed runs per measurement, the fastest is reported (default 2 cpu, 3 cuda, 2 --suite gpu)")
a("--train_batch_size", type=int, default=None, help="training rows (default 2 cpu, 8 cuda)")
a("--train_len", type=int, default=None,
  help="training tokens per row (default 128 cpu, 1024 cuda)")
a("--no_cuda_graph", dest="cuda_graph", action="store_false",
  help="ours without its CUDA-graph decode step (on by default on CUDA)")
a("--skip_hf", action="store_true", help="measure ours only (automatic without transformers)")
a("--skip_train", action="store_true", help="skip the training-step measurement")
a("--peak_bw_gbs", type=float, default=None,
  help="GPU memory bandwidth in GB/s for the batch-1 bound (default: from the GPU's name)")
a("--peak_tflops", type=float, default=None,
  help="GPU dense bf16 TFLOP/s for MFU (default: from the GPU's name)")
a("--logit_std", type=list_of(nonnegative_float), default=(3.0,),
  help="comma-separated spreads of the random model's logits, one model each (sets the final "
  "norm weight; 0 = plain init, near-uniform next-token distributions), e.g. 3,0")
a("--threads", type=int, default=None, help="torch CPU threads (default: torch's choice); "
  "1 makes CPU numbers steadier on a shared machine")
a("--seed", type=int, default=0, help="seed for the weights, prompts and sampling")
a("--json", default=None, help="also write the results to this JSON file")
a("--tokenizer", help="--suite gpu: a Qwen3 tokenizer.json (the real one: 151,669 tokens)")
a("--data_dir", help="--suite gpu: prepared data (data/prepare.py's output)")
a("--train_steps", type=int, default=3,
  help="--suite gpu: steps per trainer (the first is warm-up)")
a("--eval_limit", type=int, default=500, help="--suite gpu: MMLU and GSM8K questions to evaluate")
a("--sections", type=list_of(str), default=None,
  help="--suite gpu: comma-separated sections to run, of " + ",".join(GPU_SECTIONS)
  + " (default: all); the generation table, and unless --skip_train the training step, run "
  "first in any case")
a("--small", action="store_true",
  help="--suite gpu: shrink the trainers' and eval's settings (for a CPU check of the suite)")

PRESETS = {
    "micro": dict(vocab_size=4096, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                  num_attention_heads=4, num_key_value_heads=2, head_dim=32,
                  max_position_embeddings=4096),
    "tiny": dict(vocab_size=151936, hidden_size=256, intermediate_size=768, num_hidden_layers=4,
                 num_attention_heads=4, num_key_value_heads=2, head_dim=64,
                 max_position_embeddings=4096),
    "0.6b": dict(),  # Qwen3Config's defaults are Qwen3-0.6B
}
DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}
# Datasheet figures, matched against torch.cuda.get_device_name, first match wins
PEAK_BANDWIDTH_GBS = [("H200", 4800), ("H100 PCIe", 2000), ("H100 NVL", 3900), ("H100", 3350),
                      ("A100-SXM4-80GB", 2039), ("A100 80GB PCIe", 1935), ("A100", 1555),
                      ("RTX 4090", 1008), ("RTX 3090", 936), ("L40S", 864), ("A10", 600)]
PEAK_BF16_TFLOPS = [("H200", 989), ("H100 PCIe", 756), ("H100", 989), ("A100", 312),
                    ("RTX 4090", 165), ("RTX 3090", 71), ("L40S", 362), ("A10", 125)]
CARD_24GB_GIB = 24e9 / 2**30  # the paper's RTX 3090: 24 GB


def sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def timed(fn, device, cpu_times=None):
    """Wall-clock seconds of fn() (and its result); appends the process CPU seconds to cpu_times."""
    sync(device)
    start = time.perf_counter()
    cpu_start = time.process_time()
    out = fn()
    sync(device)
    if cpu_times is not None:
        cpu_times.append(time.process_time() - cpu_start)
    return time.perf_counter() - start, out


def peak_mib(device, baseline=0):
    """Peak memory in MiB: CUDA allocations since the last reset above `baseline` bytes, or RSS."""
    if device.type == "cuda":
        return (torch.cuda.max_memory_allocated(device) - baseline) / 2**20
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**10  # KiB on Linux


def reset_peak(device):
    if device.type == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)
        return torch.cuda.memory_allocated(device)
    return 0


def hardware(device):
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    name = platform.processor() or "CPU"
    try:
        name = next(line.split(":", 1)[1].strip() for line in open("/proc/cpuinfo")
                    if line.startswith("model name"))
    except (OSError, StopIteration):
        pass
    return f"{name} ({os.cpu_count()} cores, {torch.get_num_threads()} torch threads)"


def datasheet(table, gpu_name):
    return next((value for key, value in table if key in gpu_name), None)


def random_checkpoint(config, folder, device, dtype, seed, logit_std=0.0, silent_ids=()):
    """A random-init Qwen3 (weights ~ N(0, 0.02), norms 1, as transformers initialises) saved in HF
    layout. The final norm outputs rms ~1, so the logits' std is its weight * 0.02 * sqrt(hidden).
    The embedding rows of silent_ids are zero: their logit is 0, far below the top ones."""
    torch.manual_seed(seed)
    with torch.device(device):  # initialised where it runs: seconds, not minutes, for 0.6b
        model = Qwen3(config)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if not name.endswith("norm.weight"):
                p.normal_(0.0, 0.02)
        if logit_std > 0:
            model.norm.weight.fill_(logit_std / (0.02 * config.hidden_size ** 0.5))
        for token in silent_ids:
            model.embed_tokens.weight[token] = 0.0
            model.lm_head.weight[token] = 0.0
    model.to(dtype).save_pretrained(folder)


# --------------------------------------------------------------------------------------------------
# Generation


def generators(args, folder, device, dtype):
    """{name: generate(prompts, new_tokens, temperature) -> new-token lists}: ours (with its CUDA
    graph on CUDA), ours_eager (on CUDA, when the graph is on) and transformers."""
    ours = Qwen3.from_pretrained(folder, device=device, dtype=dtype)

    def ours_with(cuda_graph):
        def generate(prompts, n, temperature):
            return ours.generate(prompts, n, seed=args.seed, cuda_graph=cuda_graph,
                                 temperature=temperature,
                                 top_p=args.top_p if temperature > 0 else None)
        return generate
    fns = {"ours": ours_with(args.cuda_graph)}
    models = {"ours": ours}
    if args.cuda_graph:
        fns["ours_eager"] = ours_with(False)
        models["ours_eager"] = ours
    if args.skip_hf:
        return fns, models
    try:
        import transformers
    except ImportError:
        print("transformers is not installed: measuring ours only")
        return fns, models
    transformers.logging.set_verbosity_error()
    transformers.logging.disable_progress_bar()
    hf = transformers.Qwen3ForCausalLM.from_pretrained(folder, dtype=dtype,
                                                       attn_implementation="sdpa")
    hf = hf.to(device).eval()

    def hf_generate(prompts, n, temperature):  # one length: no padding, an all-ones mask
        hf_sampling = dict(do_sample=False)
        if temperature > 0:
            hf_sampling = dict(do_sample=True, temperature=temperature, top_p=args.top_p, top_k=0)
        idx = torch.tensor(prompts, device=device)
        torch.manual_seed(args.seed)
        with torch.no_grad():
            out = hf.generate(input_ids=idx, attention_mask=torch.ones_like(idx),
                              max_new_tokens=n, eos_token_id=None, pad_token_id=0, **hf_sampling)
        return out[:, idx.shape[1]:].tolist()

    fns["transformers"] = hf_generate
    models["transformers"] = hf
    return fns, models


def decode_bound(args, config, model, context: float) -> float:
    """Batch-1 tokens/s if each decode step only read the weights and the KV cache at `context`."""
    weight_bytes = sum(p.numel() * p.element_size() for p in model.parameters())
    if not config.tie_word_embeddings:  # the embedding is looked up, not read whole
        weight_bytes -= config.vocab_size * config.hidden_size * model.dtype.itemsize
    kv_bytes_per_token = (2 * config.num_hidden_layers * config.num_key_value_heads
                          * config.head_dim * model.dtype.itemsize)
    return args.peak_bw_gbs * 1e9 / (weight_bytes + kv_bytes_per_token * context)


def bench_generation(args, folder, config, device, dtype, result, logit_std, save=lambda: None):
    """Every --temperature and --batch_size, on the checkpoint whose logits spread by logit_std:
    a row each in result["generation"]."""
    fns, models = generators(args, folder, device, dtype)
    for temperature in args.temperature:
        g = torch.Generator().manual_seed(args.seed)  # the same prompts at every setting
        for B in args.batch_sizes:
            prompts = torch.randint(0, config.vocab_size, (B, args.prompt_len),
                                    generator=g).tolist()
            row = {"logit_std": logit_std, "temperature": temperature, "batch_size": B}
            row.update(measure_generation(args, fns, models, config, device, prompts,
                                          temperature))
            result["generation"].append(row)
            save()
            shown = ", ".join(f"{n} {row[n]['tokens_per_s']:.1f} tok/s" for n in fns)
            if "ratio" in row:
                shown += f", ratio {row['ratio']:.2f} (by CPU time {row['cpu_time_ratio']:.2f})"
            if "graph_tokens_equal_eager" in row:
                shown += f", graph tokens equal eager: {row['graph_tokens_equal_eager']}"
            print(f"logit std {logit_std:g}, temperature {temperature:g}, batch {B}: {shown}",
                  flush=True)
    del fns, models
    if device.type == "cuda":
        torch.cuda.empty_cache()


def measure_generation(args, fns, models, config, device, prompts, temperature) -> dict:
    """Each generator's tokens/s, CPU seconds and peak memory on these prompts, the ratios, and
    at batch 1 the decode-only speed (and its bandwidth bound on CUDA)."""
    B = len(prompts)
    for fn in fns.values():  # warm-up
        fn(prompts, min(args.new_tokens, 8), temperature)
    times = {name: [] for name in fns}
    cpu_times = {name: [] for name in fns}
    mem, outputs = {}, {}
    for _ in range(args.repeats):  # interleaved, so that all see the same machine
        for name, fn in fns.items():
            base = reset_peak(device)
            seconds, out = timed(lambda: fn(prompts, args.new_tokens, temperature), device,
                                 cpu_times[name])
            assert all(len(row) == args.new_tokens for row in out), f"{name}: too few tokens"
            times[name].append(seconds)
            mem[name] = peak_mib(device, base)
            outputs.setdefault(name, out)
    row = {}
    for name in fns:
        row[name] = {"tokens_per_s": B * args.new_tokens / min(times[name]),
                     "seconds": times[name], "cpu_seconds": cpu_times[name],
                     "peak_mib": mem[name]}
    if "ours_eager" in fns:  # the same seed: the same tokens with and without the graph?
        same_rows = [a == b for a, b in zip(outputs["ours"], outputs["ours_eager"])]
        row["graph_tokens_equal_eager"] = all(same_rows)
        row["graph_rows_equal_eager"] = sum(same_rows) / len(same_rows)
        row["graph_speedup"] = row["ours"]["tokens_per_s"] / row["ours_eager"]["tokens_per_s"]
    if "transformers" in fns:
        row["ratio"] = row["ours"]["tokens_per_s"] / row["transformers"]["tokens_per_s"]
        # the same ratio by process CPU time: steadier than wall time on a shared CPU
        row["cpu_time_ratio"] = min(cpu_times["transformers"]) / min(cpu_times["ours"])
    if B == 1 and args.new_tokens > 1:  # decode only: subtract a prefill + one-token run
        for name, fn in fns.items():
            prefill = min(timed(lambda: fn(prompts, 1, temperature), device)[0]
                          for _ in range(args.repeats))
            decode = (args.new_tokens - 1) / max(min(times[name]) - prefill, 1e-9)
            row[name]["decode_tokens_per_s"] = decode
            if device.type == "cuda" and args.peak_bw_gbs:
                context = args.prompt_len + args.new_tokens / 2
                bound = decode_bound(args, config, models[name], context)
                row[name].update(bandwidth_bound_tokens_per_s=bound,
                                 fraction_of_bound=decode / bound)
    return row


# --------------------------------------------------------------------------------------------------
# Training: one full fine-tuning step on random tokens


def flops_per_token(config, context: float, trained_fraction: float = 1.0) -> float:
    """Forward + backward FLOPs per token: 2N forward, 2N for the activations' gradients and
    2N x trained_fraction for the weights' (LoRA trains almost none), plus causal attention."""
    h, i, L = config.hidden_size, config.intermediate_size, config.num_hidden_layers
    q_width = config.num_attention_heads * config.head_dim
    kv_width = config.num_key_value_heads * config.head_dim
    per_layer = 2 * h * q_width + 2 * h * kv_width + 3 * h * i  # q, o; k, v; gate, up, down
    n_params = L * per_layer + config.vocab_size * h  # and the lm_head; the embedding is a lookup
    attention = 2 * config.num_hidden_layers * context * q_width  # QK^T and AV, causal: half of 4
    return (4 + 2 * trained_fraction) * n_params + 3 * attention


def bench_training(args, folder, device, dtype, batch_size=None):
    """Full fine-tuning steps on batch_size (default --train_batch_size) x --train_len random
    tokens: tokens/s, peak memory, MFU; which attention kernels the step ran (the profiler's names
    of the scaled-dot-product ones: flash, efficient or math)."""
    batch_size = batch_size or args.train_batch_size
    model = Qwen3.from_pretrained(folder, device=device, dtype=torch.float32).train()
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-5, fused=device.type == "cuda")
    g = torch.Generator().manual_seed(args.seed)
    shape = (batch_size, args.train_len + 1)
    seqs = torch.randint(0, model.config.vocab_size, shape, generator=g).tolist()

    def step():
        with autocast(device, dtype):
            logprobs, mask = completion_logprobs(model, seqs, [1] * len(seqs))
            loss = -(logprobs * mask).sum() / mask.sum()
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    reset_peak(device)
    with torch.profiler.profile() as profile:
        step()  # warm-up (and AdamW's state allocation), profiled for the attention kernels
    times = [timed(step, device)[0] for _ in range(args.repeats)]
    tokens = batch_size * args.train_len
    training = {"batch_size": batch_size, "seq_len": args.train_len, "seconds": times,
                "tokens_per_s": tokens / min(times), "peak_mib": peak_mib(device),
                "attention_ops": attention_ops(profile)}
    if args.peak_tflops:
        flops = flops_per_token(model.config, args.train_len / 2) * training["tokens_per_s"]
        training["mfu"] = flops / (args.peak_tflops * 1e12)
    print(f"training, {batch_size} x {args.train_len}: {training['tokens_per_s']:.1f} tok/s"
          + (f", MFU {100 * training['mfu']:.1f}%" if "mfu" in training else "")
          + f", attention: {', '.join(training['attention_ops'])}", flush=True)
    del model, optimizer
    return training


def attention_ops(profile) -> list:
    """The scaled-dot-product-attention operations a profiled run called (their names say which
    kernel: _scaled_dot_product_flash_attention, ..._efficient_attention, ..._math, ...)."""
    names = {event.key for event in profile.key_averages()}
    return sorted(name for name in names if "scaled_dot_product" in name and "backward" not in name)


# --------------------------------------------------------------------------------------------------
# The gpu suite: the trainers and eval.py as they run


# name: (module, flags beyond the shared ones); everything else is the trainer's default
TRAINER_RUNS = {
    "rl": ("train_rl", []),
    "rl_eager_decode": ("train_rl", []),
    "opd": ("train_distill", ["--teacher", "{teacher}"]),  # the same weights, another folder
    "sft_stress": ("train_sft", ["--preset", "stress"]),
}
SMALL_TRAINER_FLAGS = {  # --small: seconds on a CPU
    "train_rl": ["--batch_size", "1", "--grad_accum", "2", "--group_size", "2",
                 "--max_new_tokens", "8"],
    "train_distill": ["--batch_size", "1", "--grad_accum", "2", "--max_new_tokens", "8",
                      "--states_per_rollout", "2", "--continuation_tokens", "4"],
    "train_sft": ["--batch_size", "2", "--grad_accum", "1"],
}


def coin_flip_reward(completion_text: str, gold: str) -> float:
    return float(zlib.crc32(completion_text.encode()) % 2)


def bench_trainer(name, args, folder, device, extra_flags=()):
    """One trainer's main() for --train_steps steps: seconds per step and peak memory."""
    module_name, flags = TRAINER_RUNS[name]
    flags = [*flags, *extra_flags]
    module = importlib.import_module(module_name)
    with tempfile.TemporaryDirectory() as out_dir:
        argv = ["--model", folder, "--data_dir", args.data_dir, "--out_dir", out_dir,
                "--device", str(device), "--steps", str(args.train_steps), "--warmup", "1",
                "--eval_every", "0", "--save_every", "0"]
        argv += [flag.format(teacher=twin(folder)) for flag in flags]
        argv += SMALL_TRAINER_FLAGS[module_name] if args.small else []
        reset_peak(device)
        began = time.perf_counter()
        graphs = name != "rl_eager_decode"
        with contextlib.ExitStack() as stack:
            stack.enter_context(mock.patch.object(model_module, "CUDA_GRAPHS", graphs))
            if module_name == "train_rl":
                stack.enter_context(mock.patch.object(module, "gsm8k_reward", coin_flip_reward))
            module.main(argv)
        wall = time.perf_counter() - began
        lines = [json.loads(line) for line in open(Path(out_dir) / "metrics.jsonl")]
    steps = [line for line in lines if "step_s" in line]
    timed_steps = steps[1:] or steps  # the first step is the warm-up
    run = {"argv": argv, "steps": len(steps), "wall_s": wall,
           "step_s": [line["step_s"] for line in steps],
           "seconds_per_step": statistics.median(line["step_s"] for line in timed_steps),
           "last_step": steps[-1]}
    if device.type == "cuda":
        run["peak_gib"] = torch.cuda.max_memory_allocated(device) / 2**30
        run["fits_24gb"] = run["peak_gib"] < CARD_24GB_GIB
    print(f"{name}: {run['seconds_per_step']:.2f} s/step"
          + (f", peak {run['peak_gib']:.1f} GiB" if "peak_gib" in run else ""), flush=True)
    return run


def twin(folder) -> str:
    """Another folder holding folder's model (its files linked): a teacher that is not --model."""
    other = Path(f"{folder}_twin")
    if not other.is_dir():
        other.mkdir()
        for file in Path(folder).iterdir():
            (other / file.name).symlink_to(file.resolve())
    return str(other)


def bench_eval(args, folder, device, dtype):
    """eval.py's protocol on --eval_limit MMLU and GSM8K questions and 200 TruthfulQA, timed."""
    from eval import evaluate
    model = Qwen3.from_pretrained(folder, device=device, dtype=dtype)
    tokenizer = Tokenizer.from_pretrained(folder)
    small = dict(gsm8k_shots=1, mmlu_shots=1, max_new_tokens=8) if args.small else {}
    runs = {"mmlu": ("mmlu",), "gsm8k": ("gsm8k",),
            "truthfulqa": ("truthfulqa_mc1", "truthfulqa_mc2")}
    timings = {}
    for name, tasks in runs.items():
        limit = min(200, args.eval_limit) if name == "truthfulqa" else args.eval_limit
        seconds, _ = timed(lambda: evaluate(model, tokenizer, tasks, limit=limit,
                                            data_dir=args.data_dir, **small), device)
        timings[name] = {"limit": limit, "seconds": seconds}
        print(f"eval {name} {limit}: {seconds:.1f} s", flush=True)
    # 16 GSM8K questions (one batch) with and without the CUDA graph: the same completions?
    completions = {}
    limit = min(16, args.eval_limit)
    for graphs in (True, False):
        with mock.patch.object(model_module, "CUDA_GRAPHS", graphs):
            seconds, scored = timed(lambda: evaluate(model, tokenizer, ("gsm8k",), limit=limit,
                                                     data_dir=args.data_dir, **small), device)
        samples = scored["tasks"]["gsm8k"]["samples"]
        completions[graphs] = [s["pred"]["completion"] for s in samples]
        timings[f"gsm8k_{limit}_{'graph' if graphs else 'eager'}_s"] = seconds
    timings["gsm8k_graph_equals_eager"] = completions[True] == completions[False]
    del model
    return timings


def bench_decode_profile(args, folder, device, dtype):
    """The decode step at long context, issue 19's 90 ms: batch 16 with 5-shot-GSM8K-length
    prompts (900 tokens), ms per step with the graph (on CUDA) and eager, and torch.profiler's
    table of the eager steps (the 25 operations that took the most time)."""
    model = Qwen3.from_pretrained(folder, device=device, dtype=dtype)
    context, new_tokens = (64, 4) if args.small else (900, 32)
    g = torch.Generator().manual_seed(args.seed)
    prompts = torch.randint(0, model.config.vocab_size, (16, context), generator=g).tolist()

    def sample(n, graph):
        return model.generate(prompts, n, temperature=0.7, top_p=args.top_p, seed=args.seed,
                              cuda_graph=graph)

    profiled = {"batch_size": 16, "context": context, "new_tokens": new_tokens}
    for name, graph in (("graph", True), ("eager", False)):
        if graph and device.type != "cuda":
            continue
        sample(new_tokens, graph)  # warm-up (and the graph's capture)
        full_s, _ = timed(lambda: sample(new_tokens, graph), device)
        prefill_s, _ = timed(lambda: sample(1, graph), device)
        profiled[f"{name}_ms_per_step"] = 1000 * (full_s - prefill_s) / (new_tokens - 1)
    with torch.profiler.profile() as profile:
        sample(new_tokens, False)
        sync(device)
    by = "device_time_total" if device.type == "cuda" else "cpu_time_total"
    profiled["eager_profile"] = profile.key_averages().table(sort_by=by, row_limit=25)
    print(f"decode at context {context}, batch 16: "
          + ", ".join(f"{name} {profiled[f'{name}_ms_per_step']:.1f} ms/step"
                      for name in ("graph", "eager") if f"{name}_ms_per_step" in profiled)
          + "\n" + profiled["eager_profile"], flush=True)
    del model
    return profiled


def bench_fsdp(args, folder, device):
    """--fsdp in one process (torchrun's variables set here: a group of one): RL, with its
    rollouts on the gathered weights (harness/parallel.py's gathered), OPD and stress SFT's LoRA,
    each for --train_steps steps: seconds per step and peak memory."""
    group_of_one = {"RANK": "0", "LOCAL_RANK": "0", "WORLD_SIZE": "1",
                    "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(free_port())}
    runs = {}
    with mock.patch.dict(os.environ, group_of_one):  # restored as they were after
        try:
            for name in ("rl", "opd", "sft_stress"):
                recorded(runs, name, bench_trainer, name, args, folder, device, ["--fsdp"])
        finally:
            if torch.distributed.is_initialized():  # a failed run leaves its group behind
                torch.distributed.destroy_process_group()
    return runs


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def bench_training_sizes(args, folder, device, dtype):
    """Full fine-tuning at larger batches (x --train_len tokens): where MFU stops growing."""
    sizes = (2, 4) if args.small else (8, 16, 32)
    return {str(size): bench_training(args, folder, device, dtype, batch_size=size)
            for size in sizes}


def pipeline_estimate(result) -> dict:
    """runs/paper.py's wall time from the measured steps and evals: the trainers' default step
    counts, their periodic evals (--eval_limit 200 GSM8K questions + 32 KL rollouts), and six
    final evals (500 GSM8K, 500 MMLU, 200 TruthfulQA, drift: 2 x 100 rollouts of 128 tokens)."""
    trainers, evals = result["trainers"], result["eval"]
    gsm8k_per_question = evals["gsm8k"]["seconds"] / evals["gsm8k"]["limit"]
    periodic = 200 * gsm8k_per_question + 32 * gsm8k_per_question
    final = (500 * gsm8k_per_question + evals["mmlu"]["seconds"] * 500 / evals["mmlu"]["limit"]
             + evals["truthfulqa"]["seconds"] * 200 / evals["truthfulqa"]["limit"]
             + 200 * gsm8k_per_question / 2)
    runs = {  # name: (measured run, steps, periodic evals incl. step 0 and the end)
        "sft_mild": ("sft_stress", 234, 4),  # the same LoRA step: only the lr and epochs differ
        "sft_stress": ("sft_stress", 1170, 13),
        "opd_mild": ("opd", 200, 5),
        "opd_stress": ("opd", 200, 5),
        "rl": ("rl", 200, 5),
    }
    hours = {name: (trainers[run]["seconds_per_step"] * steps + n_evals * periodic) / 3600
             for name, (run, steps, n_evals) in runs.items()}
    hours["six_final_evals"] = 6 * final / 3600
    hours["total"] = sum(hours.values())
    return hours


def recorded(result, key, fn, *fn_args):
    """result[key] = fn(*fn_args), or the error it raised: one failing section (out of memory,
    say) must not cost the figures of the others."""
    try:
        result[key] = fn(*fn_args)
    except Exception as error:  # noqa: BLE001 -- recorded, printed, and the suite goes on
        traceback.print_exc()
        result[key] = {"error": f"{type(error).__name__}: {error}"}
        if torch.cuda.is_available():
            torch.cuda.empty_cache()
    return result[key]


def gpu_suite(args, folder, device, dtype, result, save):
    """The --sections asked for, each saved as soon as it is measured; issue 19's questions
    first: the eager step at long context, --fsdp on a GPU."""
    sections = {"decode_profile": lambda: bench_decode_profile(args, folder, device, dtype),
                "fsdp": lambda: bench_fsdp(args, folder, device),
                "trainers": lambda: bench_trainers(args, folder, device, result, save),
                "eval": lambda: bench_eval(args, folder, device, dtype),
                "training_sizes": lambda: bench_training_sizes(args, folder, device, dtype)}
    for name in args.sections or GPU_SECTIONS:
        recorded(result, name, sections[name])
        save()
    if "trainers" in result and "eval" in result:
        recorded(result, "pipeline_hours", pipeline_estimate, result)
        save()


def bench_trainers(args, folder, device, result, save):
    """The trainers at their defaults (TRAINER_RUNS): seconds per step, peak memory (each saved
    in result["trainers"] as it is measured), the CUDA graph's gain on RL's step, stress SFT's
    MFU."""
    trainers = result["trainers"] = {}
    for name in TRAINER_RUNS:
        recorded(trainers, name, bench_trainer, name, args, folder, device)
        save()
    if all("error" not in trainers[name] for name in ("rl", "rl_eager_decode")):
        eager_s = trainers["rl_eager_decode"]["seconds_per_step"]
        trainers["rl_graph_speedup"] = eager_s / trainers["rl"]["seconds_per_step"]
    sft = trainers["sft_stress"]
    if args.peak_tflops and "error" not in sft:  # LoRA: the base weights get no gradient
        tokens_per_s = sft["last_step"]["tokens_per_s"]
        config = Qwen3Config.from_dict(json.loads((Path(folder) / "config.json").read_text()))
        sft["mfu"] = flops_per_token(config, 128, 0.0) * tokens_per_s / (args.peak_tflops * 1e12)
    return trainers


# --------------------------------------------------------------------------------------------------


def markdown(args, result):
    names = [n for n in ("ours", "ours_eager", "transformers") if n in result["generation"][0]]
    cuda = result["device"].startswith("cuda")
    mem = [f"{n} peak MiB above weights" for n in names] if cuda else ["process peak RSS MiB"]
    ratios = []
    if "transformers" in names:
        ratios = ["ours / transformers"] + ([] if cuda else ["same, by CPU time"])
    graph = ["graph = eager tokens"] if "ours_eager" in names else []
    header = (f"`python bench.py --suite {args.suite} --preset {args.preset}` on "
              f"{result['hardware']}, torch {result['versions']['torch']}")
    if "transformers" in result["versions"]:
        header += f", transformers {result['versions']['transformers']}"
    header += (f"; {args.dtype_name}, prompt {args.prompt_len} + {args.new_tokens} new tokens, "
               f"top_p {args.top_p}")
    columns = ["logit std", "temperature", "batch"]
    columns += [f"{n} tok/s" for n in names] + ratios + graph + mem
    lines = [header, "", "| " + " | ".join(columns) + " |", "|---" * len(columns) + "|"]
    for row in result["generation"]:
        cells = [f"{row['logit_std']:g}", f"{row['temperature']:g}", f"{row['batch_size']}"]
        cells += [f"{row[n]['tokens_per_s']:.0f}" for n in names]
        if ratios:
            cells += [f"**{row['ratio']:.2f}x**", f"{row['cpu_time_ratio']:.2f}x"][:len(ratios)]
        if graph:
            cells.append("yes" if row["graph_tokens_equal_eager"] else
                         f"no ({100 * row['graph_rows_equal_eager']:.0f}% of rows)")
        if cuda:
            cells += [f"{row[n]['peak_mib']:.0f}" for n in names]
        else:
            cells.append(f"{row['ours']['peak_mib']:.0f}")
        lines.append("| " + " | ".join(cells) + " |")
    lines.append("")
    for row in result["generation"]:
        for n in names:
            if "decode_tokens_per_s" not in row[n]:
                continue
            line = (f"- batch-1 decode (logit std {row['logit_std']:g}, temperature "
                    f"{row['temperature']:g}), {n}: {row[n]['decode_tokens_per_s']:.0f} tok/s")
            if "fraction_of_bound" in row[n]:
                line += (f" = {100 * row[n]['fraction_of_bound']:.0f}% of the memory-bandwidth"
                         f" bound ({row[n]['bandwidth_bound_tokens_per_s']:.0f} tok/s at "
                         f"{args.peak_bw_gbs:g} GB/s)")
            lines.append(line)
    if "training" in result:
        t = result["training"]
        mfu = f", MFU {100 * t['mfu']:.1f}%" if "mfu" in t else ""
        lines.append(f"- training step (forward + backward + AdamW, {t['batch_size']} x "
                     f"{t['seq_len']} tokens): {t['tokens_per_s']:.0f} tok/s, peak "
                     f"{t['peak_mib']:.0f} MiB{mfu}")
    for name, run in result.get("trainers", {}).items():
        if isinstance(run, dict) and "error" in run:
            lines.append(f"- {name} step: failed, {run['error']}")
        elif isinstance(run, dict):
            memory = f", peak {run['peak_gib']:.1f} GiB" if "peak_gib" in run else ""
            mfu = f", MFU {100 * run['mfu']:.1f}%" if "mfu" in run else ""
            lines.append(f"- {name} step: {run['seconds_per_step']:.2f} s{memory}{mfu}")
    for name, timing in result.get("eval", {}).items():
        if isinstance(timing, dict):
            lines.append(f"- eval {name} {timing['limit']}: {timing['seconds']:.1f} s")
        elif name in ("error", "gsm8k_graph_equals_eager"):
            lines.append(f"- eval {name}: {timing}")
    sections = {}  # issue 19's, those that ran
    for name in ("decode_profile", "fsdp", "training_sizes"):
        if "error" in result.get(name, {}):  # the whole section failed
            lines.append(f"- {name}: failed, {result[name]['error']}")
        else:
            sections[name] = result.get(name, {})
    profiled = sections.get("decode_profile", {})
    if "eager_ms_per_step" in profiled:
        graph = (f", {profiled['graph_ms_per_step']:.1f} with the graph"
                 if "graph_ms_per_step" in profiled else "")
        lines.append(f"- decode step at batch {profiled['batch_size']}, context "
                     f"{profiled['context']}: eager {profiled['eager_ms_per_step']:.1f} ms{graph}"
                     " (profile: decode_profile.eager_profile in the JSON)")
    for name, run in sections.get("fsdp", {}).items():
        shown = run.get("error") or f"{run['seconds_per_step']:.2f} s"
        memory = f", peak {run['peak_gib']:.1f} GiB" if "peak_gib" in run else ""
        lines.append(f"- --fsdp, one process, {name} step: {shown}{memory}")
    for size, t in sections.get("training_sizes", {}).items():
        mfu = f", MFU {100 * t['mfu']:.1f}%" if "mfu" in t else ""
        lines.append(f"- training at {size} x {t['seq_len']} tokens: {t['tokens_per_s']:.0f} "
                     f"tok/s{mfu}, attention {', '.join(t['attention_ops'])}")
    if "total" in result.get("pipeline_hours", {}):
        hours = result["pipeline_hours"]["total"]
        lines.append(f"- runs/paper.py, estimated from these: {hours:.1f} h")
    return "\n".join(lines)


def resolve_defaults(args, device):
    """Fill the defaults that depend on the suite and the device."""
    on_cuda = device.type == "cuda"
    gpu_suite_run = args.suite == "gpu"
    args.preset = args.preset or ("0.6b" if gpu_suite_run else "tiny")
    args.dtype_name = args.dtype or ("bf16" if on_cuda else "fp32")
    args.cuda_graph = args.cuda_graph and on_cuda
    default_batches = (1, 16, 64, 128) if gpu_suite_run else ((1, 16, 64) if on_cuda else (1, 16))
    args.batch_sizes = list(args.batch_size or default_batches)
    args.prompt_len = args.prompt_len or (128 if on_cuda else 32)
    args.new_tokens = args.new_tokens or (256 if on_cuda else 32)
    args.repeats = args.repeats or (2 if gpu_suite_run else 3 if on_cuda else 2)
    args.train_batch_size = args.train_batch_size or (8 if on_cuda else 2)
    args.train_len = args.train_len or (1024 if on_cuda else 128)
    gpu_name = hardware(device)
    if on_cuda:
        args.peak_bw_gbs = args.peak_bw_gbs or datasheet(PEAK_BANDWIDTH_GBS, gpu_name)
        args.peak_tflops = args.peak_tflops or datasheet(PEAK_BF16_TFLOPS, gpu_name)


def check_args(args):
    """Every flag before the bench starts: one line naming a bad one."""
    check_device(args.device)
    counts = ("prompt_len", "new_tokens", "repeats", "train_batch_size", "train_len", "threads",
              "train_steps", "eval_limit")
    for flag in counts:
        if getattr(args, flag) is not None and getattr(args, flag) < 1:
            parser.error(f"--{flag}: must be >= 1, got {getattr(args, flag)}")
    for flag in ("peak_bw_gbs", "peak_tflops"):
        if getattr(args, flag) is not None and not getattr(args, flag) > 0:
            parser.error(f"--{flag}: must be > 0, got {getattr(args, flag)}")
    if args.json:
        check_writable_file(args.json, "--json")
    unknown = set(args.sections or ()) - set(GPU_SECTIONS)
    if unknown:
        parser.error(f"--sections: unknown {', '.join(sorted(unknown))}; choose from "
                     f"{', '.join(GPU_SECTIONS)}")
    if args.suite == "gpu":
        if not (args.tokenizer and Path(args.tokenizer).is_file()):
            parser.error(f"--tokenizer: {args.tokenizer}: no such file (--suite gpu needs one)")
        if not (args.data_dir and (Path(args.data_dir) / "gsm8k" / "train.jsonl").is_file()):
            parser.error(f"--data_dir: {args.data_dir}: no prepared data (data/prepare.py --out)")


def main(argv=None) -> dict:
    args = parser.parse_args(argv)
    check_args(args)
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    resolve_defaults(args, device)
    dtype = DTYPES[args.dtype_name]
    config = Qwen3Config(**PRESETS[args.preset])
    silent_ids = []
    if args.suite == "gpu":  # the real vocabulary, and stop tokens a random model never samples
        config.vocab_size = 151936
        tokenizer = Tokenizer(args.tokenizer)
        silent_ids = tokenizer.stop_ids
    versions = {"torch": torch.__version__}
    if not args.skip_hf:
        try:
            import transformers
            versions["transformers"] = transformers.__version__
        except ImportError:
            pass
    result = {"suite": args.suite, "preset": args.preset, "config": config.to_dict(dtype),
              "device": str(device), "hardware": hardware(device), "versions": versions,
              "dtype": args.dtype_name, "prompt_len": args.prompt_len,
              "new_tokens": args.new_tokens, "temperature": args.temperature,
              "logit_std": args.logit_std, "top_p": args.top_p, "peak_bw_gbs": args.peak_bw_gbs,
              "peak_tflops": args.peak_tflops, "generation": []}

    def save():
        if args.json:
            Path(args.json).write_text(json.dumps(result, indent=2))

    with tempfile.TemporaryDirectory() as root:
        # A model per --logit_std; the training step and the gpu suite use the first
        for i, logit_std in enumerate(args.logit_std):
            folder = str(Path(root) / f"logit_std_{i}")
            random_checkpoint(config, folder, device, dtype, args.seed, logit_std, silent_ids)
            if args.suite == "gpu":
                shutil.copy(args.tokenizer, Path(folder) / "tokenizer.json")
            bench_generation(args, folder, config, device, dtype, result, logit_std, save)
        folder = str(Path(root) / "logit_std_0")
        if not args.skip_train:
            result["training"] = bench_training(args, folder, device, dtype)
            save()
        if args.suite == "gpu":
            gpu_suite(args, folder, device, dtype, result, save)
    result["markdown"] = markdown(args, result)
    print("\n" + result["markdown"])
    save()
    return result


if __name__ == "__main__":
    main()
