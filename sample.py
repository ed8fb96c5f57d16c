"""
Sampling, as every script samples: rollout() runs model.generate over a whole list of prompts,
with stop strings and a progress bar (the trainers' states, eval's answers, the state lens). And
from the command line, completions of one prompt by a Qwen3 model: a local folder (config.json,
model.safetensors, tokenizer.json) or a Hugging Face hub id, each printed as soon as it is done.

    python sample.py --model Qwen/Qwen3-0.6B-Base --prompt $'Question: 2+2?\\nAnswer:' \\
        --num_samples 3

($'...' is the shell's way to put a real newline where \\n stands; --prompt_file reads a prompt as
written.)
"""
import argparse
import signal
from pathlib import Path

import torch

from harness.cli import (ArgumentParser, check_device, load_model, nonnegative_float,
                         positive_int, probability, progress, stops_cleanly)

# Rollouts: generate() for whole lists of prompts -------------------------------------------------


@torch.no_grad()
def rollout(model, tokenizer, prompts: list, max_new_tokens: int, temperature: float = 0.0,
            seed: int = 0, stop_strings=(), batch_size: int = 128, desc: str = "sampling",
            rows=None, top_k=None, top_p=None) -> list:
    """One completion (token ids) per prompt: the sampler every script shares. Prompts go through
    model.generate batch_size at a time, longest first (less padding). Prompt i draws with row
    rows[i] (default i) of seed's uniform numbers (its index among every GPU's prompts, say), so
    a sample depends neither on its batch nor on how many GPUs share the work. A completion ends
    with a stop token, with the token that completes one of stop_strings (text such as
    "Question:"; checked every 16 steps), or at max_new_tokens. A progress bar (`desc`) counts
    rows x tokens on a terminal. top_k, top_p: model.sample_next's. Autocast is the caller's."""
    if not prompts:
        return []
    rows = list(range(len(prompts))) if rows is None else list(rows)
    stream = torch.Generator().manual_seed(seed)
    uniforms = torch.rand(max(rows) + 1, max_new_tokens, generator=stream)[rows]  # (n, steps)
    order = sorted(range(len(prompts)), key=lambda i: -len(prompts[i]))
    completions = [None] * len(prompts)
    bar = progress(total=len(prompts) * max_new_tokens, desc=desc, unit="tok", unit_scale=True,
                   leave=False)  # rows x steps, at most: the ETA is an upper bound

    def has_stop(tokens):  # does their text hold a stop string?
        return any(stop in tokenizer.decode(tokens) for stop in stop_strings)

    def every_16_steps(rows):  # generate's stop_fn: move the bar, end the rows with a stop string
        bar.update(16 * len(rows))
        return list(map(has_stop, rows))
    for first in range(0, len(order), batch_size):
        batch = order[first:first + batch_size]
        new_tokens = model.generate([prompts[i] for i in batch], max_new_tokens,
                                    temperature=temperature, top_k=top_k, top_p=top_p,
                                    stop_token_ids=tokenizer.stop_ids,
                                    uniforms=uniforms[batch], n_real_tokens=tokenizer.n_real_tokens,
                                    stop_fn=every_16_steps if stop_strings or not bar.disable
                                    else None)
        bar.update((first + len(batch)) * max_new_tokens - bar.n)  # early stops: their budget
        for i, tokens in zip(batch, new_tokens):
            if has_stop(tokens):  # binary search for the shortest prefix that holds one
                lo, hi = 1, len(tokens)
                while lo < hi:
                    mid = (lo + hi) // 2
                    lo, hi = (lo, mid) if has_stop(tokens[:mid]) else (mid + 1, hi)
                tokens = tokens[:hi]
            completions[i] = tokens
    bar.close()
    return completions


# The command -------------------------------------------------------------------------------------

parser = ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
parser.add_argument("--model", default="Qwen/Qwen3-0.6B-Base",
                    help="model folder or Hugging Face hub id, or a LoRA adapter folder (PEFT's)")
parser.add_argument("--base_model",
                    help="an adapter's base model (default: the one its config names)")
parser.add_argument("--prompt", default="Question: What is 12 * 7?\nAnswer:",
                    help="the prompt text")
parser.add_argument("--prompt_file",
                    help="read the prompt from this file (its whole contents; overrides --prompt)")
parser.add_argument("--num_samples", type=positive_int, default=3,
                    help="how many completions of the prompt")
parser.add_argument("--max_new_tokens", type=positive_int, default=256,
                    help="at most this many new tokens each")
parser.add_argument("--temperature", type=nonnegative_float, default=0.7,
                    help="sampling temperature; 0 = greedy")
parser.add_argument("--top_k", type=positive_int, default=None,
                    help="keep only the k most likely tokens (default: all)")
parser.add_argument("--top_p", type=probability, default=0.9,
                    help="nucleus sampling: keep the smallest set of tokens "
                         "whose probability reaches top_p, in (0, 1] (1.0 = off)")
parser.add_argument("--seed", type=int, default=1337,
                    help="random seed: the same seed gives the same samples")
parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu",
                    help="cuda, cpu, cuda:1, ... (default: cuda if available, else cpu)")
parser.add_argument("--dtype", choices=["bf16", "fp16", "fp32"], default=None,
                    help="weights dtype (default: bf16 on cuda, fp32 on cpu)")

DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}


def main(argv=None) -> list:
    """Print and return the completions (text, without the prompt and without a final stop
    token)."""
    args = parser.parse_args(argv)
    check_device(args.device)
    dtype = DTYPES[args.dtype or ("bf16" if args.device.startswith("cuda") else "fp32")]
    source = "--prompt"  # the flag an empty prompt is blamed on
    if args.prompt_file is not None:
        source = f"--prompt_file {args.prompt_file}"
        if Path(args.prompt_file).is_dir():
            parser.error(f"{source}: is a folder, expected a file")
        if not Path(args.prompt_file).exists():
            parser.error(f"{source}: no such file")
        try:  # a named pipe (--prompt_file <(command)) is read to its end
            args.prompt = Path(args.prompt_file).read_text(encoding="utf-8")
        except (UnicodeDecodeError, OSError) as e:
            parser.error(f"{source}: cannot read it as UTF-8 text ({e})")
    try:  # bytes the shell passed that are not UTF-8 reach Python as lone surrogates
        args.prompt.encode("utf-8")
    except UnicodeEncodeError:
        parser.error("--prompt: not valid UTF-8 text")
    if not args.prompt:
        parser.error(f"{source}: the prompt is empty")
    model, tokenizer = load_model(args.model, "--model", device=args.device, dtype=dtype,
                                  base=args.base_model)
    prompt = tokenizer.encode(args.prompt)
    if not prompt:
        parser.error(f"{source}: the prompt is empty")
    if len(prompt) + args.max_new_tokens > model.config.max_position_embeddings:
        parser.error(f"--max_new_tokens {args.max_new_tokens}: with the prompt's {len(prompt)} "
                     f"tokens, more than "
                     f"the model's {model.config.max_position_embeddings} positions")
    print(args.prompt, flush=True)
    completions = []
    for i in range(args.num_samples):  # one at a time, so that each is shown as soon as it is done
        ids = rollout(model=model, tokenizer=tokenizer, prompts=[prompt],
                      max_new_tokens=args.max_new_tokens, temperature=args.temperature,
                      top_k=args.top_k, top_p=args.top_p, seed=args.seed + i,
                      desc=f"sample {i + 1}")[0]
        stopped = bool(ids) and ids[-1] in tokenizer.stop_ids
        completions.append(tokenizer.decode(ids[:-1] if stopped else ids))
        print(f"\n{'=' * 20} sample {i + 1}/{args.num_samples}: {len(ids)} tokens"
              f"{', stopped' if stopped else ''} {'=' * 20}\n{completions[-1]}", flush=True)
    return completions


if __name__ == "__main__":
    signal.signal(signal.SIGPIPE, signal.SIG_DFL)  # `sample.py | head`: end quietly, as head wants
    stops_cleanly(main, kept="the completions printed above")()
