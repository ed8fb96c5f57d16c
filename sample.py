"""
Sample completions from a Qwen3 model: a local folder (config.json, model.safetensors, tokenizer.json)
or a Hugging Face hub id.

    python sample.py --model Qwen/Qwen3-0.6B-Base --prompt "Question: 2+2?\nAnswer:" --num_samples 3
"""
import argparse
from pathlib import Path

import torch

from model import Qwen3, Tokenizer, resolve_model_dir

parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
parser.add_argument("--model", default="Qwen/Qwen3-0.6B-Base", help="model folder or Hugging Face hub id")
parser.add_argument("--prompt", default="Question: What is 12 * 7?\nAnswer:", help="the prompt text")
parser.add_argument("--prompt_file", help="read the prompt from this file (its whole contents; overrides --prompt)")
parser.add_argument("--num_samples", type=int, default=3, help="how many completions of the prompt to sample")
parser.add_argument("--max_new_tokens", type=int, default=256, help="at most this many new tokens per completion")
parser.add_argument("--temperature", type=float, default=0.7, help="sampling temperature; 0 = greedy")
parser.add_argument("--top_k", type=int, default=None, help="keep only the k most likely tokens (default: all)")
parser.add_argument("--top_p", type=float, default=0.9, help="nucleus sampling: keep the smallest set of tokens "
                    "whose probability reaches top_p (1.0 = off)")
parser.add_argument("--seed", type=int, default=1337, help="random seed: the same seed gives the same samples")
parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu",
                    help="cuda, cpu, cuda:1, ... (default: cuda if available, else cpu)")
parser.add_argument("--dtype", choices=["bf16", "fp16", "fp32"], default=None,
                    help="weights dtype (default: bf16 on cuda, fp32 on cpu)")

DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}


def main(argv=None) -> list:
    """Print and return the completions (text, without the prompt and without a final stop token)."""
    args = parser.parse_args(argv)
    if not 0 < args.top_p <= 1 or (args.top_k is not None and args.top_k < 1):
        parser.error("--top_p must be in (0, 1] and --top_k at least 1")
    dtype = DTYPES[args.dtype or ("bf16" if args.device.startswith("cuda") else "fp32")]
    if args.prompt_file is not None:
        if not Path(args.prompt_file).is_file():
            parser.error(f"--prompt_file {args.prompt_file}: no such file")
        args.prompt = Path(args.prompt_file).read_text()
    try:
        folder = resolve_model_dir(args.model)
        tokenizer = Tokenizer.from_pretrained(folder)
    except FileNotFoundError as e:
        parser.error(f"--model: {e}")
    model = Qwen3.from_pretrained(folder, device=args.device, dtype=dtype)
    prompt = tokenizer.encode(args.prompt)
    if not prompt:
        parser.error("the prompt is empty")
    torch.manual_seed(args.seed)
    out = model.generate([prompt] * args.num_samples, args.max_new_tokens, temperature=args.temperature,
                         top_k=args.top_k, top_p=args.top_p, seed=args.seed, n_real_tokens=tokenizer.n_real_tokens,
                         stop_token_ids=tokenizer.stop_ids)
    completions = []
    print(args.prompt)
    for i, ids in enumerate(out):
        stopped = bool(ids) and ids[-1] in tokenizer.stop_ids
        completions.append(tokenizer.decode(ids[:-1] if stopped else ids))
        print(f"\n{'=' * 20} sample {i + 1}/{len(out)}: {len(ids)} tokens"
              f"{', stopped' if stopped else ''} {'=' * 20}\n{completions[-1]}")
    return completions


if __name__ == "__main__":
    main()
