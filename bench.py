"""
Throughput of our generate() side by side with transformers' generate(), and of a training step.

A random-init Qwen3 of a preset shape is saved to a temporary folder and loaded by both
implementations, which then sample the same random prompts with the same settings, exactly
--new_tokens tokens per row (no stop tokens), interleaved run by run so that both see the same
machine. Each number is the fastest of --repeats runs after a warm-up (the least disturbed by other
processes); tokens/s counts new tokens only, prefill time included. On CPU the ratio is also given
by process CPU time, which other processes on the machine disturb less (--threads 1: even less).
Ours runs its CUDA-graph decode step on CUDA (--no_cuda_graph: eager); transformers runs with its
defaults (dynamic cache) and sdpa attention, top_k disabled (its generation default is 50).

    python bench.py --preset tiny                         # CPU: ~2 minutes on 2 cores
    python bench.py --preset 0.6b --batch_size 1,16,64    # one GPU, bf16

Presets: `0.6b` is the Qwen3-0.6B shape (hidden 1024, 28 layers, 16 heads, 8 KV heads, head_dim 128,
intermediate 3072, vocab 151936, tied). `tiny` is a CPU-sized model with the real vocabulary
(hidden 256, 4 layers, 4 heads, 2 KV heads, head_dim 64, intermediate 768, vocab 151936, tied):
with Qwen's vocabulary the lm_head and the top-p sort over 151936 logits weigh as they do in real
rollouts. `micro` (hidden 64, 2 layers, vocab 4096) is for the tests.

The weights are N(0, 0.02) (transformers' init), except the final norm's weight, which is set so the
logits spread with a standard deviation of --logit_std (default 3) over the vocabulary. Plain random
init gives near-uniform next-token distributions (logit std 0.3 for `tiny`: at temperature 0.7 and
top_p 0.9 the nucleus holds ~120k of the 151936 tokens), unlike any trained model; with std 3 the
top token has ~25% of the mass and the nucleus a few hundred tokens, closer to real rollouts. This
only matters to samplers whose cost depends on the distribution; --logit_std 0 keeps the plain init.

The training step is what the trainers do for full fine-tuning: forward + backward + AdamW over all
weights on the NLL of every token of random sequences (completion_logprobs with start 1), fp32
weights under autocast to --dtype (plain fp32 when --dtype is fp32). Peak memory:
on CUDA torch.cuda.max_memory_allocated, for generation above the weights already loaded; on CPU the
process's peak resident set (ru_maxrss), which only ever grows, read at the end of each phase.

Batch-1 decode: decode-only tokens/s = (new_tokens - 1) / (time of the full run - time of a run
with one new token). On CUDA it is compared with the memory-bandwidth bound: every decode step reads all the
weights once (the tied embedding counts once, as the lm_head), so bound = peak bandwidth / weight
bytes. The KV-cache reads are left out of the bound, which makes the fraction conservative.
--peak_bw_gbs defaults to the H100 SXM's 3350 GB/s (H100 PCIe: 2000, H200: 4800, A100 80GB: 2039).
"""
import argparse
import json
import os
import platform
import resource
import tempfile
import time

import torch

from cli import ArgumentParser, check_device, check_writable_file
from model import Qwen3, Qwen3Config, autocast, completion_logprobs

parser = ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)  # one-line errors
parser.add_argument("--preset", choices=["micro", "tiny", "0.6b"], default="tiny", help="model shape (see above)")
parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu", help="cuda or cpu")
parser.add_argument("--dtype", choices=["bf16", "fp16", "fp32"], default=None,
                    help="weights dtype for generation, autocast dtype for training (default: bf16 on cuda, "
                    "fp32 on cpu)")
parser.add_argument("--batch_size", default=None, help="comma-separated generation batch sizes "
                    "(default: 1,16 on cpu, 1,16,64 on cuda)")
parser.add_argument("--prompt_len", type=int, default=None, help="prompt tokens per row (default 32 cpu, 128 cuda)")
parser.add_argument("--new_tokens", type=int, default=None, help="new tokens per row (default 32 cpu, 256 cuda)")
parser.add_argument("--temperature", type=float, default=0.7, help="sampling temperature for both (0 = greedy)")
parser.add_argument("--top_p", type=float, default=0.9, help="top-p for both (1.0 = off)")
parser.add_argument("--repeats", type=int, default=None, help="timed runs per measurement, the fastest is reported "
                    "(default 2 cpu, 3 cuda)")
parser.add_argument("--train_batch_size", type=int, default=None, help="training rows (default 2 cpu, 8 cuda)")
parser.add_argument("--train_len", type=int, default=None, help="training tokens per row (default 128 cpu, 1024 cuda)")
parser.add_argument("--no_cuda_graph", dest="cuda_graph", action="store_false",
                    help="ours without its CUDA-graph decode step (on by default on CUDA)")
parser.add_argument("--skip_hf", action="store_true", help="measure ours only (automatic without transformers)")
parser.add_argument("--skip_train", action="store_true", help="skip the training-step measurement")
parser.add_argument("--peak_bw_gbs", type=float, default=3350.0, help="GPU peak memory bandwidth, GB/s, for the "
                    "batch-1 decode bound (default: H100 SXM)")
parser.add_argument("--logit_std", type=float, default=3.0, help="spread of the random model's logits "
                    "(sets the final norm weight; 0 = plain init, near-uniform next-token distributions)")
parser.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's choice); "
                    "1 makes CPU numbers steadier on a shared machine")
parser.add_argument("--seed", type=int, default=0, help="seed for the weights, prompts and sampling")
parser.add_argument("--json", default=None, help="also write the results to this JSON file")

PRESETS = {
    "micro": dict(vocab_size=4096, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                  num_key_value_heads=2, head_dim=32, max_position_embeddings=4096),
    "tiny": dict(vocab_size=151936, hidden_size=256, intermediate_size=768, num_hidden_layers=4, num_attention_heads=4,
                 num_key_value_heads=2, head_dim=64, max_position_embeddings=4096),
    "0.6b": dict(),  # Qwen3Config's defaults are Qwen3-0.6B
}
DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}


def sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def timed(fn, device, cpu_times=None):
    """Wall-clock seconds of fn() (and its result); appends the process CPU seconds to cpu_times."""
    sync(device)
    start, cpu_start = time.perf_counter(), time.process_time()
    out = fn()
    sync(device)
    if cpu_times is not None:
        cpu_times.append(time.process_time() - cpu_start)
    return time.perf_counter() - start, out


def peak_mib(device, baseline=0):
    """Peak memory in MiB: CUDA allocations since the last reset above `baseline` bytes, or process RSS."""
    if device.type == "cuda":
        return (torch.cuda.max_memory_allocated(device) - baseline) / 2**20
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**10  # KiB on Linux


def reset_peak(device):
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
        return torch.cuda.memory_allocated(device)
    return 0


def hardware(device):
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    name = platform.processor() or "CPU"
    try:
        name = next(line.split(":", 1)[1].strip() for line in open("/proc/cpuinfo") if line.startswith("model name"))
    except (OSError, StopIteration):
        pass
    return f"{name} ({os.cpu_count()} cores, {torch.get_num_threads()} torch threads)"


def random_checkpoint(config, folder, device, dtype, seed, logit_std=0.0):
    """A random-init Qwen3 (weights ~ N(0, 0.02), norms 1, as transformers initialises) saved in HF layout.
    The final norm outputs rms ~1, so the logits' std is its weight * 0.02 * sqrt(hidden_size)."""
    torch.manual_seed(seed)
    with torch.device(device):  # initialised where it runs: seconds, not minutes, for 0.6b
        model = Qwen3(config)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if not name.endswith("norm.weight"):
                p.normal_(0.0, 0.02)
        if logit_std > 0:
            model.norm.weight.fill_(logit_std / (0.02 * config.hidden_size ** 0.5))
    model.to(dtype).save_pretrained(folder)


def generators(args, folder, device, dtype):
    """{name: generate(prompts, new_tokens) -> list of new-token lists} for ours and transformers."""
    ours = Qwen3.from_pretrained(folder, device=device, dtype=dtype)
    sampling = dict(temperature=args.temperature, top_p=args.top_p if args.temperature > 0 else None)

    def ours_generate(prompts, n):
        return ours.generate(prompts, n, seed=args.seed, cuda_graph=args.cuda_graph, **sampling)

    fns, models = {"ours": ours_generate}, {"ours": ours}
    if not args.skip_hf:
        try:
            import transformers
        except ImportError:
            print("transformers is not installed: measuring ours only")
            return fns, models
        transformers.logging.set_verbosity_error()
        transformers.logging.disable_progress_bar()
        hf = transformers.Qwen3ForCausalLM.from_pretrained(folder, dtype=dtype, attn_implementation="sdpa")
        hf = hf.to(device).eval()
        hf_sampling = (dict(do_sample=True, temperature=args.temperature, top_p=args.top_p, top_k=0)
                       if args.temperature > 0 else dict(do_sample=False))

        def hf_generate(prompts, n):  # all prompts have the same length: no padding, an all-ones mask
            idx = torch.tensor(prompts, device=device)
            torch.manual_seed(args.seed)
            with torch.no_grad():
                out = hf.generate(input_ids=idx, attention_mask=torch.ones_like(idx), max_new_tokens=n,
                                  eos_token_id=None, pad_token_id=0, **hf_sampling)
            return out[:, idx.shape[1]:].tolist()

        fns["transformers"], models["transformers"] = hf_generate, hf
    return fns, models


def bench_generation(args, folder, config, device, dtype, result):
    fns, models = generators(args, folder, device, dtype)
    g = torch.Generator().manual_seed(args.seed)
    for B in args.batch_sizes:
        prompts = torch.randint(0, config.vocab_size, (B, args.prompt_len), generator=g).tolist()
        for fn in fns.values():  # warm-up
            fn(prompts, min(args.new_tokens, 8))
        times, cpu_times, mem = {name: [] for name in fns}, {name: [] for name in fns}, {}
        for _ in range(args.repeats):  # interleaved, so that both see the same machine
            for name, fn in fns.items():
                base = reset_peak(device)
                seconds, out = timed(lambda: fn(prompts, args.new_tokens), device, cpu_times[name])
                assert all(len(row) == args.new_tokens for row in out), f"{name}: wrong number of new tokens"
                times[name].append(seconds)
                mem[name] = peak_mib(device, base)
        row = {"batch_size": B}
        for name in fns:
            row[name] = {"tokens_per_s": B * args.new_tokens / min(times[name]), "seconds": times[name],
                         "cpu_seconds": cpu_times[name], "peak_mib": mem[name]}
        if "transformers" in fns:
            row["ratio"] = row["ours"]["tokens_per_s"] / row["transformers"]["tokens_per_s"]
            # the same ratio by process CPU time: steadier than wall time when other processes share the CPU
            row["cpu_time_ratio"] = min(cpu_times["transformers"]) / min(cpu_times["ours"])
        if B == 1 and args.new_tokens > 1:  # decode only: subtract a prefill + one-token run
            for name, fn in fns.items():
                prefill = min(timed(lambda: fn(prompts, 1), device)[0] for _ in range(args.repeats))
                decode = (args.new_tokens - 1) / max(min(times[name]) - prefill, 1e-9)
                row[name]["decode_tokens_per_s"] = decode
                if device.type == "cuda":
                    model = models[name]
                    weight_bytes = sum(p.numel() * p.element_size() for p in model.parameters())
                    if not config.tie_word_embeddings:  # the embedding is looked up, not read whole
                        weight_bytes -= config.vocab_size * config.hidden_size * model.dtype.itemsize
                    bound = args.peak_bw_gbs * 1e9 / weight_bytes
                    row[name].update(bandwidth_bound_tokens_per_s=bound, fraction_of_bound=decode / bound)
        result["generation"].append(row)
        print(f"batch {B}: " + ", ".join(f"{n} {row[n]['tokens_per_s']:.1f} tok/s" for n in fns)
              + (f", ratio {row['ratio']:.2f} (by CPU time {row['cpu_time_ratio']:.2f})" if "ratio" in row else ""),
              flush=True)
    del fns, models
    if device.type == "cuda":
        torch.cuda.empty_cache()


def bench_training(args, folder, device, dtype, result):
    model = Qwen3.from_pretrained(folder, device=device, dtype=torch.float32).train()
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-5, fused=device.type == "cuda")
    g = torch.Generator().manual_seed(args.seed)
    seqs = torch.randint(0, model.config.vocab_size, (args.train_batch_size, args.train_len + 1), generator=g).tolist()

    def step():
        with autocast(device, dtype):
            logprobs, mask = completion_logprobs(model, seqs, [1] * len(seqs))
            loss = -(logprobs * mask).sum() / mask.sum()
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    reset_peak(device)
    step()  # warm-up (and AdamW's state allocation)
    times = [timed(step, device)[0] for _ in range(args.repeats)]
    tokens = args.train_batch_size * args.train_len
    result["training"] = {"batch_size": args.train_batch_size, "seq_len": args.train_len, "seconds": times,
                          "tokens_per_s": tokens / min(times), "peak_mib": peak_mib(device)}
    print(f"training: {result['training']['tokens_per_s']:.1f} tok/s", flush=True)


def markdown(args, result):
    names = ["ours"] + (["transformers"] if "transformers" in result["versions"] else [])
    both, cuda = len(names) > 1, result["device"].startswith("cuda")
    mem = [f"{n} peak MiB above weights" for n in names] if cuda else ["process peak RSS MiB"]
    ratios = ["ours / transformers"] + ([] if cuda else ["same, by CPU time"]) if both else []
    lines = [f"`python bench.py --preset {args.preset}` on {result['hardware']}, torch {result['versions']['torch']}"
             + (f", transformers {result['versions']['transformers']}" if both else "")
             + f"; {args.dtype_name}, prompt {args.prompt_len} + {args.new_tokens} new tokens, "
             f"temperature {args.temperature}, top_p {args.top_p}", "",
             "| batch | " + " | ".join([f"{n} tok/s" for n in names] + ratios + mem) + " |",
             "|---" * (1 + len(names) + len(ratios) + len(mem)) + "|"]
    for row in result["generation"]:
        cells = [f"{row[n]['tokens_per_s']:.0f}" for n in names]
        cells += [f"**{row['ratio']:.2f}x**", f"{row['cpu_time_ratio']:.2f}x"][:len(ratios)] if both else []
        cells += [f"{row[n]['peak_mib']:.0f}" for n in names] if cuda else [f"{row['ours']['peak_mib']:.0f}"]
        lines.append(f"| {row['batch_size']} | " + " | ".join(cells) + " |")
    lines.append("")
    for row in result["generation"]:
        for n in names:
            if "decode_tokens_per_s" in row[n]:
                lines.append(f"- batch-1 decode, {n}: {row[n]['decode_tokens_per_s']:.0f} tok/s"
                             + (f" = {100 * row[n]['fraction_of_bound']:.0f}% of the memory-bandwidth bound "
                                f"({row[n]['bandwidth_bound_tokens_per_s']:.0f} tok/s at {args.peak_bw_gbs:g} GB/s)"
                                if "fraction_of_bound" in row[n] else ""))
    if "training" in result:
        t = result["training"]
        lines.append(f"- training step (forward + backward + AdamW, {t['batch_size']} x {t['seq_len']} tokens): "
                     f"{t['tokens_per_s']:.0f} tok/s, peak {t['peak_mib']:.0f} MiB")
    return "\n".join(lines)


def check_args(args):
    """Every flag before the bench starts: one line naming a bad one."""
    check_device(args.device)
    for flag in ("prompt_len", "new_tokens", "repeats", "train_batch_size", "train_len", "threads"):
        if getattr(args, flag) is not None and getattr(args, flag) < 1:
            parser.error(f"--{flag}: must be >= 1, got {getattr(args, flag)}")
    sizes = (args.batch_size or "1").split(",")
    if not all(size.isdigit() and int(size) > 0 for size in sizes):
        parser.error(f"--batch_size {args.batch_size!r}: expected comma-separated positive integers, e.g. 1,16")
    if not (args.temperature >= 0 and 0 < args.top_p <= 1 and args.peak_bw_gbs > 0 and args.logit_std >= 0):
        parser.error("--temperature must be >= 0, --top_p in (0, 1], --peak_bw_gbs > 0 and --logit_std >= 0")
    if args.json:
        check_writable_file(args.json, "--json")


def main(argv=None) -> dict:
    args = parser.parse_args(argv)
    check_args(args)
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    on_cuda = device.type == "cuda"
    args.dtype_name = args.dtype or ("bf16" if on_cuda else "fp32")
    dtype = DTYPES[args.dtype_name]
    args.cuda_graph = args.cuda_graph and on_cuda
    args.batch_sizes = [int(b) for b in (args.batch_size or ("1,16,64" if on_cuda else "1,16")).split(",")]
    args.prompt_len = args.prompt_len or (128 if on_cuda else 32)
    args.new_tokens = args.new_tokens or (256 if on_cuda else 32)
    args.repeats = args.repeats or (3 if on_cuda else 2)
    args.train_batch_size = args.train_batch_size or (8 if on_cuda else 2)
    args.train_len = args.train_len or (1024 if on_cuda else 128)
    config = Qwen3Config(**PRESETS[args.preset])
    versions = {"torch": torch.__version__}
    if not args.skip_hf:
        try:
            import transformers
            versions["transformers"] = transformers.__version__
        except ImportError:
            pass
    result = {"preset": args.preset, "config": config.to_dict(dtype), "device": str(device),
              "hardware": hardware(device), "versions": versions, "dtype": args.dtype_name,
              "prompt_len": args.prompt_len, "new_tokens": args.new_tokens, "temperature": args.temperature,
              "top_p": args.top_p, "generation": []}
    with tempfile.TemporaryDirectory() as folder:
        random_checkpoint(config, folder, device, dtype, args.seed, args.logit_std)
        bench_generation(args, folder, config, device, dtype, result)
        if not args.skip_train:
            bench_training(args, folder, device, dtype, result)
    result["markdown"] = markdown(args, result)
    print("\n" + result["markdown"])
    if args.json:
        with open(args.json, "w") as f:
            json.dump(result, f, indent=2)
    return result


if __name__ == "__main__":
    main()
