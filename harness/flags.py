"""
The command line every trainer shares: its flags (training_args), each checked as it is parsed,
then together (check_training_args), before any work; a bad one ends in one line naming it. A
trainer adds its own flags and overrides these defaults.
"""
import argparse
import os

import torch

from eval import DATA_DIR, TASKS
from harness.cli import (ArgumentParser, check_device, check_other_model, fail, nonnegative_float,
                         nonnegative_int, positive_float, positive_int, subset_of)
from harness.tracking import add_tracking_flags


def training_args(description: str, **defaults) -> argparse.ArgumentParser:
    """The flags every trainer shares; a trainer adds its own and overrides these defaults. Each is
    checked as it is parsed, and then all of them together (check_training_args); a bad one is
    one line."""
    p = TrainingParser(description=description,
                       formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    a = p.add_argument
    a("--model", default="Qwen/Qwen3-0.6B-Base",
      help="model to start from: Hugging Face hub id or local folder")
    a("--out_dir", default="out",
      help="final model (Hugging Face layout), checkpoints/ and metrics.jsonl")
    a("--data_dir", default=str(DATA_DIR),
      help="prepared data (eval.py's)")
    a("--steps", type=positive_int, default=200,
      help="training steps: one batch and one optimizer update each")
    a("--batch_size", type=positive_int, default=8,
      help="examples (questions) per micro-batch, per GPU")
    a("--grad_accum", type=positive_int, default=4,
      help="micro-batches per step: batch_size x grad_accum per GPU")
    a("--lr", type=positive_float, default=1e-5, help="peak learning rate (AdamW)")
    a("--warmup", type=nonnegative_int,
      help="steps of linear warmup, at most --steps (default: 10 or --steps)")
    a("--weight_decay", type=nonnegative_float, default=0.0, help="AdamW weight decay")
    a("--max_new_tokens", type=positive_int, default=256,
      help="longest sampled answer (the learner's states, the periodic eval's KL)")
    a("--gen_batch_size", type=positive_int, default=128,
      help="sequences sampled at once (memory: the KV cache)")
    a("--grad_clip", type=nonnegative_float, default=1.0,
      help="clip the gradient norm to this (0: no clipping)")
    a("--lora_rank", type=nonnegative_int, default=0,
      help="LoRA rank on every projection; 0 = full fine-tuning")
    a("--lora_alpha", type=positive_float,
      help="LoRA alpha (updates scaled by alpha/rank); default 2 x rank")
    a("--device", default="cuda" if torch.cuda.is_available() else "cpu", help="cuda or cpu")
    a("--dtype", choices=("bf16", "fp32"),
      help="autocast dtype; weights, AdamW stay fp32 (default: bf16 on GPU)")
    a("--seed", type=int, default=1337,
      help="seeds the data order, the sampling and LoRA's initialisation")
    a("--eval_every", type=nonnegative_int, default=50,
      help="held-out accuracy on --eval_tasks every N steps (0: never)")
    a("--eval_tasks", type=subset_of(TASKS), default="gsm8k",
      help=f"comma-separated eval.py tasks of the periodic eval ({','.join(TASKS)})")
    a("--eval_limit", type=positive_int, default=200,
      help="test questions per task per periodic eval (a fixed subset)")
    a("--eval_shots", type=nonnegative_int, default=5,
      help="GSM8K and MMLU few-shot examples in the periodic eval")
    a("--eval_batch_size", type=positive_int, default=16,
      help="sequences per forward pass in the periodic eval (memory; eval.py's --batch_size)")
    a("--save_every", type=nonnegative_int, default=50,
      help="checkpoint (for --resume) every N steps (0: never)")
    a("--resume", action="store_true", help="continue from the latest checkpoint in --out_dir")
    a("--overwrite", action="store_true", help="start afresh in an --out_dir that holds an "
      "earlier run, replacing it (without this, or --resume, such an --out_dir is refused)")
    a("--skip_space_check", action="store_true", help="start even where the disk of --out_dir "
      "has less room than the run's checkpoints and final model need")
    a("--fsdp", action="store_true", help="under torchrun: shard weights, gradients and AdamW "
      "state over the GPUs (FSDP2) instead of copying them to each (DDP)")
    add_tracking_flags(p)  # --wandb, --tensorboard: tracking.py
    p.set_defaults(**defaults)
    return p


class TrainingParser(ArgumentParser):
    """A trainer's parser: parse_args checks the flags together too (check_training_args)."""

    def parse_args(self, args=None, namespace=None):
        parsed = super().parse_args(args, namespace)
        check_training_args(self, parsed)
        return parsed


DEFAULT_WARMUP = 10  # a trainer's steps of linear warmup unless --warmup says otherwise


def check_training_args(parser, args):
    """What no single flag's type can say: flags that contradict each other, and the device."""
    check_device(args.device)
    if args.resume and args.overwrite:
        parser.error("--resume and --overwrite: choose one (continue the run in --out_dir, "
                     "or replace it)")
    if args.fsdp and "WORLD_SIZE" not in os.environ:
        parser.error("--fsdp: shards over torchrun's processes; run under torchrun "
                     "(torchrun --nproc_per_node=N SCRIPT --fsdp ...)")
    if args.steps is not None:  # else (SFT's --epochs) once the data is read: resolve_warmup
        resolve_warmup(args, f"--steps {args.steps}")
    if getattr(args, "teacher", None) is not None:  # train_distill.py's: not the student itself
        check_other_model("--teacher", args.teacher, "--model (the student)", args.model)


def resolve_warmup(args, length: str):
    """An explicit --warmup must fit in the run; the default, 10 steps, shrinks to a shorter run."""
    if args.warmup is not None and args.warmup > args.steps:
        fail(f"--warmup {args.warmup}: longer than the run ({length})")
    args.warmup = min(DEFAULT_WARMUP, args.steps) if args.warmup is None else args.warmup
