"""
The training harness: what train_sft.py, train_rl.py and train_distill.py share, so that each of
them holds only its method (where its states come from, and the signal it applies to them). A
trainer takes all of its machinery from here, but for the sums over GPUs in its loss (parallel.py).

    training_args, setup   the shared flags; torchrun, device, dtype, seed, model (LoRA), AdamW
    batch_at, step_seed    the questions and the sampling seed of any step, without replaying
    optimizer_step         the non-finite stop, clipping, lr_at's schedule, AdamW
    MetricsLog             metrics.jsonl, a progress line and bar; periodic_eval: --eval_tasks,
                           kl_to_start
    finish                 the final model
"""
import datetime
import functools
import json
import math
import os
import random
import sys
import time
from pathlib import Path

import torch

from eval import evaluate, gsm8k_prompt, kl_to_start, load_gsm8k
from harness.adapter import write_adapter
from harness.cli import fail, finite_or_null, load_model, progress
from harness.checkpoint import check_room, final_model_size, load_checkpoint, prepare_out_dir
from harness.faults import check_run_fits, how_to_continue, start_metrics
from harness.parallel import all_finite, gathered, rank_and_world, unwrap, wrap
from harness.resources import append_whole, new_step, room_for
from harness.tracking import Tracker
from harness.watch import Watch
from model import add_lora
# What the trainers take from the rest of harness/ through this module, their one door to it:
# the --out_dir guard, checkpoints and --resume, flag checks, the one-line stops of a trainer
from harness.checkpoint import save_when_due  # noqa: F401
from harness.cli import nonnegative_float, positive_float, positive_int  # noqa: F401
from harness.flags import resolve_warmup, training_args  # noqa: F401
from harness.faults import training_run  # noqa: F401

# Flags and set-up ---------------------------------------------------------------------------------


def setup(args):
    """A run's start: the --out_dir guard first (checkpoint.prepare_out_dir: an earlier run there
    is refused before anything loads), then torchrun's process group if any, the seed, model and
    tokenizer, LoRA, the learner wrapped for DDP or FSDP (parallel.wrap), AdamW, and with --resume
    the checkpoint's weights and AdamW state, to continue after its step bit for bit. Trained
    weights are fp32 (AdamW's master weights, under autocast); a LoRA's frozen base is in the
    compute dtype (half the memory; fp32 under FSDP, which casts every weight it gathers).
    Returns model, tokenizer, optimizer, device, dtype, and the first step to take."""
    prepare_out_dir(args)
    device = torch.device(args.device)
    if rank_and_world()[1] > 1:
        if device.type == "cuda":
            device = torch.device("cuda", int(os.environ["LOCAL_RANK"]))
            torch.cuda.set_device(device)
        backend = "nccl" if device.type == "cuda" else "gloo"
        # rank 0 alone evaluates and saves while the others wait: allow it an hour
        torch.distributed.init_process_group(backend, timeout=datetime.timedelta(hours=1))
    dtype_name = args.dtype or ("bf16" if device.type == "cuda" else "fp32")
    dtype = torch.bfloat16 if dtype_name == "bf16" else torch.float32
    torch.manual_seed(args.seed)  # LoRA's initialisation; every sampling call passes its own seed
    weights_dtype = dtype if args.lora_rank and not args.fsdp else torch.float32
    model, tokenizer = load_model(args.model, "--model", device=device, dtype=weights_dtype)
    check_run_fits(args, model.config, tokenizer)  # --max_new_tokens, --eval_shots: faults.py
    if args.lora_rank:  # the adapters are created in fp32
        add_lora(model, args.lora_rank, args.lora_alpha or 2 * args.lora_rank)
    check_room(args, model, tokenizer)  # for the checkpoints and the final model: checkpoint.py
    model = wrap(model, fsdp=args.fsdp, device=device, dtype=dtype)
    trained = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(trained, lr=args.lr, weight_decay=args.weight_decay)
    first_step = load_checkpoint(args.out_dir, model, optimizer) if args.resume else 0
    return model, tokenizer, optimizer, device, dtype, first_step


def autocast(device, dtype):
    """Compute in dtype (bf16 on a GPU) over fp32 weights; a no-op for fp32."""
    return torch.autocast(device.type, dtype=dtype, enabled=dtype != torch.float32)


def starting_model(args, device, dtype):
    """The model a run started from, frozen, loaded once per run, held as the learner computes
    with its weights (fp32 master weights, a LoRA's base in the compute dtype, FSDP's gathered
    weights in the compute dtype; whole on each GPU): under the same autocast it computes exactly
    what the learner did at step 0, so kl_to_start reads 0 there and a KL penalty starts at 0."""
    held_in_compute_dtype = args.lora_rank or args.fsdp
    return load_frozen(args.model, device, dtype if held_in_compute_dtype else torch.float32)


@functools.lru_cache(maxsize=1)
def load_frozen(name_or_path, device, dtype):
    return frozen_model(name_or_path, "--model", device=device, dtype=dtype)


def frozen_model(name, flag: str, device, dtype, like=None):
    """A model that is not trained (the starting model, a teacher): cli.load_model's, one line
    naming the flag for anything wrong with it, requires_grad off."""
    return load_model(name, flag, device=device, dtype=dtype, like=like)[0].requires_grad_(False)


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
    orders = {}  # epoch -> its shuffled order of the items
    batch = []
    for k in range((step * world + rank) * n, (step * world + rank + 1) * n):
        epoch, i = divmod(k, len(items))
        if epoch not in orders:
            shuffle = random.Random(step_seed(seed, epoch))
            orders[epoch] = shuffle.sample(range(len(items)), len(items))
        batch.append(items[orders[epoch][i]])
    return batch


# The update ---------------------------------------------------------------------------------------


def lr_at(step: int, args) -> float:
    """Linear warmup to args.lr, then cosine decay towards 0 at args.steps."""
    if step < args.warmup:
        return args.lr * (step + 1) / args.warmup
    progress = (step - args.warmup) / max(1, args.steps - args.warmup)
    return args.lr * 0.5 * (1 + math.cos(math.pi * progress))


def optimizer_step(optimizer, step: int, args, loss: float):
    """Stop on a non-finite loss or gradient before anything changes (so the last checkpoint is
    the last good one), clip, set this step's lr, update. The gradients are already averaged over
    GPUs (DDP or FSDP, in the last micro-batch's backward). Returns (lr, gradient norm)."""
    params = [p for group in optimizer.param_groups for p in group["params"]]
    grad_norm = torch.nn.utils.clip_grad_norm_(params, args.grad_clip or float("inf"))
    if hasattr(grad_norm, "full_tensor"):  # FSDP: a norm over every GPU's shards
        grad_norm = grad_norm.full_tensor()
    if not (all_finite(loss) and torch.isfinite(grad_norm)):
        fail(f"step {step + 1}: loss {loss}, gradient norm {grad_norm.item()}: not finite, "
             f"stopping; {how_to_continue(args.out_dir)}, perhaps with a lower --lr")
    for group in optimizer.param_groups:
        group["lr"] = lr_at(step, args)
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    return lr_at(step, args), grad_norm.item()


# Metrics and the periodic eval --------------------------------------------------------------------


class MetricsLog:
    """metrics.jsonl, one JSON line per step (and one per eval), a progress line per step and a
    progress bar with rate and ETA (rank 0). "step" is the number of steps done: the eval at step N
    scores the model a checkpoint at N holds. A figure that is NaN or infinite is written null, its
    name listed in not_finite. A run that trains on nothing says so (watch.py's warnings, each a
    line after its step's, and in its record under "warnings")."""

    def __init__(self, out_dir, steps: int, first_step: int = 0, args=None):
        self.path = Path(out_dir) / "metrics.jsonl"
        self.steps = steps
        self.on = rank_and_world()[0] == 0
        self.tracker = Tracker(args if self.on else None, first_step)  # args: --wandb, ...
        self.watch = Watch(steps)
        if self.on:  # after --resume: the lines up to the checkpoint's step (a last line torn
            start_metrics(self.path, first_step)  # by a crash dropped); afresh: none. faults.py
            self.watch.replay(self.path)  # the watch goes on where those steps left it
        self.bar = progress(total=steps, initial=first_step, desc="training", unit="step",
                            disable=not self.on or None)
        self.t_last = time.time()
        self.step_times = []

    def log(self, step: int, **figures):
        """A training step's figures (with tokens=, which becomes tokens/s and counts for the ETA)
        or an eval's."""
        now = time.time()
        if "tokens" in figures:
            self.step_times.append(now - self.t_last)
            figures["tokens_per_s"] = figures.pop("tokens") / self.step_times[-1]
            figures["step_s"] = self.step_times[-1]
            self.bar.update(1)
            new_step()  # the peak memory that an out-of-memory line gives is the next step's
        self.t_last = now  # so an eval's time never counts as a step's
        if not self.on:
            return
        warnings = self.watch.check(step, figures) if "step_s" in figures else []
        clean, n_not_finite = finite_or_null(figures)
        if n_not_finite:
            clean["not_finite"] = [k for k in figures
                                   if clean[k] is None and figures[k] is not None]
        if warnings:
            clean["warnings"] = warnings
        # the line whole, or (a full disk) none of it: resources.py
        append_whole(self.path, json.dumps({"step": step, **clean}, allow_nan=False) + "\n")
        self.tracker.send(step, clean)  # the same record to W&B, TensorBoard: tracking.py
        recent = self.step_times[-20:]
        eta = (self.steps - step) * sum(recent) / max(1, len(recent))
        shown = " | ".join(f"{k} {v:.4g}" if isinstance(v, float) else f"{k} {v}"
                           for k, v in figures.items())
        hours, minutes = eta // 3600, eta % 3600 // 60
        self.bar.write(f"step {step}/{self.steps} | {shown} | eta {hours:.0f}h{minutes:02.0f}m")
        for warning in warnings:  # one line each
            self.bar.write(f"warning: step {step}: {warning}")
        sys.stdout.flush()


KL_PROMPTS = 32  # fixed GSM8K test prompts the learner answers to measure its KL to the start


def periodic_eval(steps_done: int, model, tokenizer, metrics, args, dtype):
    """After `steps_done` steps, every --eval_every steps and at the end (rank 0): each of
    --eval_tasks (eval.py's protocol on a fixed subset of --eval_limit test questions) and the KL
    to the starting model on the learner's own answers to KL_PROMPTS GSM8K test questions."""
    at_the_end = steps_done == args.steps
    if not args.eval_every or (steps_done % args.eval_every != 0 and not at_the_end):
        return
    with gathered(model):  # FSDP: every GPU gathers the weights, then rank 0 evaluates alone
        if rank_and_world()[0] == 0:
            evaluate_and_log(steps_done, unwrap(model), tokenizer, metrics, args, dtype)
    if rank_and_world()[1] > 1:
        torch.distributed.barrier()


def evaluate_and_log(steps_done: int, model, tokenizer, metrics, args, dtype):
    questions = load_gsm8k("test", args.data_dir)[:KL_PROMPTS]
    prompts = tokenizer.encode_batch([gsm8k_prompt(q["question"]) for q in questions])
    with autocast(model.device, dtype):
        scores = evaluate(model, tokenizer, args.eval_tasks, limit=args.eval_limit, data_dir=
                          args.data_dir, gsm8k_shots=args.eval_shots, mmlu_shots=args.eval_shots,
                          batch_size=args.eval_batch_size)
        kl = kl_to_start(model=model, start_model=starting_model(args, model.device, dtype),
                         tokenizer=tokenizer, prompts=prompts, batch_size=args.eval_batch_size,
                         max_new_tokens=args.max_new_tokens, seed=args.seed)
    # as task_metric: gsm8k_flexible, gsm8k_strict, mmlu_acc, truthfulqa_mc1_acc, truthfulqa_mc2
    named = {task if task.endswith(name) else f"{task}_{name.split('_')[-1]}": value
             for task, result in scores["tasks"].items()
             for name, value in result["metrics"].items() if isinstance(value, float)}
    metrics.log(steps_done, kl_to_start=kl, **named)


# The final model ----------------------------------------------------------------------------------


def finish(model, tokenizer, out_dir, base_model: str):
    """Write the final model to out_dir (Hugging Face layout, LoRA merged) and, with LoRA, its
    adapter of base_model (the run's --model) in PEFT's format to out_dir/adapter; leave the
    group. A full disk is one line (the temporary folders gone) with the command that continues
    from the last checkpoint (faults.what_ran_out)."""
    with gathered(model):  # FSDP: whole weights on every GPU (in the compute dtype), for rank 0
        if rank_and_world()[0] == 0:
            final = unwrap(model)
            with room_for(out_dir, "the final model", final_model_size(final, tokenizer)):
                final.save_pretrained(out_dir, tokenizer=tokenizer)
                adapter = write_adapter(final, out_dir, base=base_model)  # adapter.py
            print(f"saved the final model to {out_dir}"
                  + (f", its LoRA adapter (PEFT's format) to {adapter}" if adapter else ""))
    if torch.distributed.is_initialized():
        torch.distributed.barrier()  # no process leaves before rank 0 has saved
        torch.distributed.destroy_process_group()
