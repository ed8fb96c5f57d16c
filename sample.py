"""
Sample completions from a Qwen3 model: a local folder (config.json, model.safetensors,
tokenizer.json) or a Hugging Face hub id. Each completion is printed as soon as it is done.

    python sample.py --model Qwen/Qwen3-0.6B-Base --prompt $'Question: 2+2?\\nAnswer:' \\
        --num_samples 3

($'...' is the shell's way to put a real newline where \\n stands; --prompt_file reads a prompt as
written.)
"""
import argparse
import signal
from pathlib import Path

import torch

from cli import (ArgumentParser, check_device, nonnegative_float, positive_int, probability,
                 progress, stops_cleanly)
from model import Qwen3, Tokenizer, resolve_model_dir

parser = ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
parser.add_argument("--model", default="Qwen/Qwen3-0.6B-Base",
                    help="model folder or Hugging Face hub id")
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
    try:
        folder = resolve_model_dir(args.model)
        tokenizer = Tokenizer.from_pretrained(folder)
        model = Qwen3.from_pretrained(folder, device=args.device, dtype=dtype)
    except (FileNotFoundError, ValueError) as e:
        parser.error(f"--model: {e}")
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
        bar = progress(total=args.max_new_tokens, desc=f"sample {i + 1}", unit="tok", leave=False)

        def tick(rows):  # generate calls this every 16 tokens: move the bar, end nothing
            bar.update(16)
            return [False] * len(rows)
        ids = model.generate([prompt], args.max_new_tokens, temperature=args.temperature,
                             top_k=args.top_k,
                             top_p=args.top_p, seed=args.seed + i,
                             n_real_tokens=tokenizer.n_real_tokens,
                             stop_token_ids=tokenizer.stop_ids, stop_fn=None if bar.disable
                             else tick)[0]
        bar.close()
        stopped = bool(ids) and ids[-1] in tokenizer.stop_ids
        completions.append(tokenizer.decode(ids[:-1] if stopped else ids))
        print(f"\n{'=' * 20} sample {i + 1}/{args.num_samples}: {len(ids)} tokens"
              f"{', stopped' if stopped else ''} {'=' * 20}\n{completions[-1]}", flush=True)
    return completions


if __name__ == "__main__":
    signal.signal(signal.SIGPIPE, signal.SIG_DFL)  # `sample.py | head`: end quietly, as head wants
    stops_cleanly(main, kept="the completions printed above")()
