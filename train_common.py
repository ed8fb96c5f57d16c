"""
The training harness: what train_sft.py, train_rl.py and train_distill.py share, so that each of
them holds only its method (where its states come from, and the signal it applies to them).

    training_args    the flags every trainer has (each trainer adds its own)
    setup            torchrun's process group, device, dtype, seed, the model (with LoRA on
                     request), its tokenizer and AdamW; starting_model: the frozen start
    batch_at         the questions of any step, without replaying the steps before it
    step_seed        the seed of one step's sampling
    tokens_per_rank  what a loss divides by, so that it is a mean over every GPU's tokens
    optimizer_step   DDP gradient averaging, the non-finite stop, clipping, lr_at's schedule, AdamW
    MetricsLog       metrics.jsonl and a progress line; periodic_eval: held-out GSM8K, kl_to_start
    save_checkpoint  load_checkpoint (--resume, bit-identical), finish (the final model)

Imports go one way: model.py <- eval.py <- train_common.py <- the trainers.
"""
import argparse
import functools
import json
import math
import os
import random
import shutil
import tempfile
import time
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from eval import evaluate, gsm8k_prompt, kl_to_start, load_gsm8k
from model import Qwen3, Tokenizer, add_lora

# Flags and set-up ---------------------------------------------------------------------------------


def training_args(description: str, **defaults) -> argparse.ArgumentParser:
    """The flags every trainer shares; a trainer adds its own and overrides these defaults."""
    p = argparse.ArgumentParser(description=description,
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    a = p.add_argument
    a("--model", default="Qwen/Qwen3-0.6B-Base",
      help="model to start from: Hugging Face hub id or local folder")
    a("--out_dir", default="out",
      help="final model (Hugging Face layout), checkpoints/ and metrics.jsonl")
    a("--data_dir", default=str(Path(__file__).resolve().parent / "data"),
      help="prepared data (eval.py's)")
    a("--steps", type=int, default=200,
      help="training steps: one batch of examples and one optimizer update each")
    a("--batch_size", type=int, default=8, help="examples (questions) per micro-batch, per GPU")
    a("--grad_accum", type=int, default=4,
      help="micro-batches per step: batch_size x grad_accum examples per GPU")
    a("--lr", type=float, default=1e-5, help="peak learning rate (AdamW)")
    a("--warmup", type=int, default=10, help="steps of linear warmup")
    a("--weight_decay", type=float, default=0.0, help="AdamW weight decay")
    a("--grad_clip", type=float, default=1.0,
      help="clip the gradient norm to this (0: no clipping)")
    a("--lora_rank", type=int, default=0,
      help="LoRA rank on every projection; 0 = full fine-tuning")
    a("--lora_alpha", type=float, default=None,
      help="LoRA alpha (updates scaled by alpha/rank); default 2 x rank")
    a("--device", default="cuda" if torch.cuda.is_available() else "cpu", help="cuda or cpu")
    a("--dtype", choices=("bf16", "fp32"),
      help="autocast dtype; weights, AdamW stay fp32 (default: bf16 on GPU)")
    a("--seed", type=int, default=1337,
      help="seeds the data order, the sampling and LoRA's initialisation")
    a("--eval_every", type=int, default=50,
      help="held-out GSM8K accuracy every N steps (0: never)")
    a("--eval_limit", type=int, default=200,
      help="GSM8K test questions per periodic eval (a fixed subset)")
    a("--save_every", type=int, default=50,
      help="checkpoint (weights + AdamW state, for --resume) every N steps")
    a("--resume", action="store_true", help="continue from the latest checkpoint in --out_dir")
    p.set_defaults(**defaults)
    return p


def rank_and_world():
    """(this process's rank, the number of processes): (0, 1) without torchrun."""
    return int(os.environ.get("RANK", 0)), int(os.environ.get("WORLD_SIZE", 1))


def setup(args):
    """Join torchrun's process group if any, seed, load model and tokenizer, add LoRA, make AdamW.
    Trained weights are fp32 (AdamW's master weights, under autocast); a LoRA's frozen base is in
    the compute dtype (half the memory). Returns model, tokenizer, optimizer, device, dtype."""
    device = torch.device(args.device)
    if rank_and_world()[1] > 1:
        if device.type == "cuda":
            device = torch.device("cuda", int(os.environ["LOCAL_RANK"]))
            torch.cuda.set_device(device)
        torch.distributed.init_process_group("nccl" if device.type == "cuda" else "gloo")
    dtype_name = args.dtype or ("bf16" if device.type == "cuda" else "fp32")
    dtype = torch.bfloat16 if dtype_name == "bf16" else torch.float32
    torch.manual_seed(args.seed)  # LoRA's initialisation; every sampling call passes its own seed
    weights_dtype = dtype if args.lora_rank else torch.float32
    try:
        model = Qwen3.from_pretrained(args.model, device=device, dtype=weights_dtype)
        tokenizer = Tokenizer.from_pretrained(args.model)
    except (FileNotFoundError, ValueError) as e:  # bad input: one line naming the flag
        raise SystemExit(f"--model: {e}")
    if args.lora_rank:  # the adapters are created in fp32
        add_lora(model, args.lora_rank, args.lora_alpha or 2 * args.lora_rank)
    trained = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(trained, lr=args.lr, weight_decay=args.weight_decay)
    return model, tokenizer, optimizer, device, dtype


def autocast(device, dtype):
    """Compute in dtype (bf16 on a GPU) over fp32 weights; a no-op for fp32."""
    return torch.autocast(device.type, dtype=dtype, enabled=dtype != torch.float32)


def starting_model(args, device, dtype):
    """The model a run started from, frozen, loaded once per run, held as the learner's weights
    are (fp32 master weights, or a LoRA's base in the compute dtype): under the same autocast it
    computes exactly what the learner did at step 0, so kl_to_start reads 0 there and a KL
    penalty starts at 0."""
    return load_frozen(args.model, device, dtype if args.lora_rank else torch.float32)


@functools.lru_cache(maxsize=1)
def load_frozen(name_or_path, device, dtype):
    return Qwen3.from_pretrained(name_or_path, device=device, dtype=dtype).requires_grad_(False)


# Data order and loss scaling ----------------------------------------------------------------------


def step_seed(seed: int, step: int) -> int:
    """The seed of one step's sampling (and of one epoch's shuffle): --seed and the step number
    combined, so that any step's samples are known without replaying the steps before it."""
    return seed * 1_000_003 + step


def batch_at(items: list, step: int, n: int, seed: int) -> list:
    """The n training items this process takes at `step`: consecutive slices of a new shuffle
    each epoch, so a step's batch is known without replaying the steps before it (which keeps
    --resume exact). Under torchrun each rank takes the next slice."""
    rank, world = rank_and_world()
    orders, batch = {}, []
    for k in range((step * world + rank) * n, (step * world + rank + 1) * n):
        epoch, i = divmod(k, len(items))
        if epoch not in orders:
            shuffle = random.Random(step_seed(seed, epoch))
            orders[epoch] = shuffle.sample(range(len(items)), len(items))
        batch.append(items[orders[epoch][i]])
    return batch


def tokens_per_rank(n_tokens: int) -> float:
    """The step's token count averaged over GPUs. Losses divide by it, so that once
    optimizer_step has averaged the gradients over GPUs the loss is a mean over all the step's
    tokens, not a mean of means."""
    world = rank_and_world()[1]
    if world == 1:
        return max(n_tokens, 1)
    on_gpu = torch.distributed.get_backend() == "nccl"
    total = torch.tensor([float(n_tokens)], device="cuda" if on_gpu else "cpu")
    torch.distributed.all_reduce(total)
    return max(total.item() / world, 1)


# The update ---------------------------------------------------------------------------------------


def lr_at(step: int, args) -> float:
    """Linear warmup to args.lr, then cosine decay towards 0 at args.steps."""
    if step < args.warmup:
        return args.lr * (step + 1) / args.warmup
    progress = (step - args.warmup) / max(1, args.steps - args.warmup)
    return args.lr * 0.5 * (1 + math.cos(math.pi * progress))


def optimizer_step(optimizer, step: int, args, loss: float):
    """Average gradients over GPUs, stop on a non-finite loss or gradient before anything changes
    (so the last checkpoint is the last good one), clip, set this step's lr, update. Returns
    (lr, gradient norm)."""
    params = [p for group in optimizer.param_groups for p in group["params"]]
    world = rank_and_world()[1]
    for p in params if world > 1 else []:  # DDP by hand: one all-reduce per step, any method
        p.grad = p.grad if p.grad is not None else torch.zeros_like(p)
        torch.distributed.all_reduce(p.grad)
        p.grad /= world
    grad_norm = torch.nn.utils.clip_grad_norm_(params, args.grad_clip or float("inf"))
    if not (math.isfinite(loss) and torch.isfinite(grad_norm)):
        raise SystemExit(f"step {step + 1}: loss {loss}, gradient norm {grad_norm.item()}: not "
                         f"finite, stopping. The last good checkpoint is in {args.out_dir}/"
                         "checkpoints (--resume, perhaps with a lower --lr)")
    for group in optimizer.param_groups:
        group["lr"] = lr_at(step, args)
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    return lr_at(step, args), grad_norm.item()


# Metrics and the periodic eval --------------------------------------------------------------------


class MetricsLog:
    """metrics.jsonl, one JSON line per step (and one per eval), and a progress line with an ETA
    (rank 0). "step" is the number of steps done: the eval at step N scores the model a checkpoint
    at N holds."""

    def __init__(self, out_dir, steps: int, first_step: int = 0):
        self.path = Path(out_dir) / "metrics.jsonl"
        self.steps = steps
        self.on = rank_and_world()[0] == 0
        if self.on:  # after --resume: the lines up to the checkpoint's step, no later ones
            self.path.parent.mkdir(parents=True, exist_ok=True)
            kept = self.path.read_text().splitlines() if self.path.exists() else []
            kept = [line + "\n" for line in kept if json.loads(line)["step"] <= first_step]
            self.path.write_text("".join(kept))
        self.t_last, self.step_times = time.time(), []

    def log(self, step: int, **figures):
        """A training step's figures (with tokens=, which becomes tokens/s and counts for the ETA)
        or an eval's."""
        now = time.time()
        if "tokens" in figures:
            self.step_times.append(now - self.t_last)
            figures["tokens_per_s"] = figures.pop("tokens") / self.step_times[-1]
            figures["step_s"] = self.step_times[-1]
        self.t_last = now  # so an eval's time never counts as a step's
        if not self.on:
            return
        with open(self.path, "a") as f:
            f.write(json.dumps({"step": step, **figures}) + "\n")
        recent = self.step_times[-20:]
        eta = (self.steps - step) * sum(recent) / max(1, len(recent))
        shown = " | ".join(f"{k} {v:.4g}" if isinstance(v, float) else f"{k} {v}"
                           for k, v in figures.items())
        hours, minutes = eta // 3600, eta % 3600 // 60
        print(f"step {step}/{self.steps} | {shown} | eta {hours:.0f}h{minutes:02.0f}m", flush=True)


KL_PROMPTS = 32  # fixed GSM8K test prompts the learner answers to measure its KL to the start


def periodic_eval(steps_done: int, model, tokenizer, metrics, args, dtype):
    """After `steps_done` steps, every --eval_every steps and at the end (rank 0): held-out GSM8K
    (eval.py's protocol on a fixed subset of --eval_limit test questions) and the KL to the
    starting model on the learner's own answers to KL_PROMPTS test questions."""
    at_the_end = steps_done == args.steps
    if not args.eval_every or (steps_done % args.eval_every != 0 and not at_the_end):
        return
    if rank_and_world()[0] == 0:
        questions = load_gsm8k("test", args.data_dir)[:KL_PROMPTS]
        prompts = tokenizer.encode_batch([gsm8k_prompt(q["question"]) for q in questions])
        with autocast(model.device, dtype):
            scores = evaluate(model, tokenizer, ("gsm8k",), limit=args.eval_limit,
                              data_dir=args.data_dir)
            kl = kl_to_start(model=model, start_model=starting_model(args, model.device, dtype),
                             tokenizer=tokenizer, prompts=prompts,
                             max_new_tokens=args.max_new_tokens, seed=args.seed)
        accuracy = scores["tasks"]["gsm8k"]["metrics"]  # exact_match_flexible, exact_match_strict
        metrics.log(steps_done, kl_to_start=kl,
                    **{f"gsm8k_{name.split('_')[-1]}": value for name, value in accuracy.items()})
    if rank_and_world()[1] > 1:
        torch.distributed.barrier()


# Checkpoints and the final model ------------------------------------------------------------------


def due(steps_done: int, every: int) -> bool:
    """Is this a step to act on, for a flag such as --save_every N (0: never)?"""
    return every > 0 and steps_done > 0 and steps_done % every == 0


def save_checkpoint(out_dir, model, optimizer, step: int):
    """out_dir/checkpoints/step_N (N steps done, rank 0): trained weights, AdamW state and the
    torch RNG in safetensors (nothing pickled), renamed into place before older ones go: a crash
    leaves a whole one."""
    if rank_and_world()[0] != 0:
        return
    root = Path(out_dir) / "checkpoints"
    names = {p: name for name, p in model.named_parameters()}
    root.mkdir(parents=True, exist_ok=True)
    tensors = {"rng.torch": torch.get_rng_state()}
    for i, p in enumerate(p for group in optimizer.param_groups for p in group["params"]):
        tensors[f"param.{names[p]}"] = p.detach().cpu().contiguous()
        for k, v in optimizer.state.get(p, {}).items():
            tensors[f"adam.{i}.{k}"] = v.detach().cpu().contiguous()
    tmp = Path(tempfile.mkdtemp(dir=root, prefix=".tmp-"))
    final = root / f"step_{step:07d}"
    save_file(tensors, tmp / "state.safetensors")
    (tmp / "meta.json").write_text(json.dumps({"step": step}))
    shutil.rmtree(final, ignore_errors=True)
    os.replace(tmp, final)
    for old in set(root.glob("step_*")) - {final}:
        shutil.rmtree(old)


def load_checkpoint(out_dir, model, optimizer) -> int:
    """Restore the latest checkpoint in out_dir/checkpoints; returns how many steps it had done."""
    found = sorted((Path(out_dir) / "checkpoints").glob("step_*"))
    if not found:
        raise SystemExit(f"--resume: no checkpoint in {out_dir}/checkpoints")
    tensors = load_file(found[-1] / "state.safetensors")
    meta = json.loads((found[-1] / "meta.json").read_text())
    names = {p: name for name, p in model.named_parameters()}
    state = {}
    with torch.no_grad():
        for i, p in enumerate(p for group in optimizer.param_groups for p in group["params"]):
            p.copy_(tensors[f"param.{names[p]}"])
            prefix = f"adam.{i}."
            state[i] = {k.split(".", 2)[2]: v for k, v in tensors.items() if k.startswith(prefix)}
    optimizer.load_state_dict({"state": {i: s for i, s in state.items() if s},
                               "param_groups": optimizer.state_dict()["param_groups"]})
    torch.set_rng_state(tensors["rng.torch"])
    print(f"resumed from {found[-1]}")
    return meta["step"]


def finish(model, tokenizer, out_dir):
    """Write the final model to out_dir (Hugging Face layout, LoRA merged) and leave torchrun's
    group."""
    if rank_and_world()[0] == 0:
        model.save_pretrained(out_dir, tokenizer=tokenizer)
        print(f"saved the final model to {out_dir}")
    if torch.distributed.is_initialized():
        torch.distributed.destroy_process_group()
