"""
The trainers' guards for a user's work: the flags checked together before anything loads, an
--out_dir that is never overwritten by accident and is known to be writable before the first step,
and checkpoints that are verified before the previous one goes and checked again on --resume.
(The flags one at a time are checked as they are parsed: model.training_args and cli.py.)
"""
import json
import os
import shutil
import sys
import tempfile
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import save_file

from cli import check_device, check_writable_dir, fail
from model import load_safetensors, make_readable, rank_and_world

DEFAULT_WARMUP = 10  # steps of linear warmup unless --warmup says otherwise
KEEP_CHECKPOINTS = 2  # the newest and the one before it, in case the newest turns out unreadable


def check_training_args(parser, args):
    """What no single flag's type can say: flags that contradict each other, and the device."""
    check_device(args.device)
    if args.resume and args.overwrite:
        parser.error("--resume and --overwrite: choose one (continue the run in --out_dir, "
                     "or replace it)")
    if args.steps is not None:  # else (SFT's --epochs) once the data is read: resolve_warmup
        resolve_warmup(args, f"--steps {args.steps}")


def resolve_warmup(args, length: str):
    """An explicit --warmup must fit in the run; the default, 10 steps, shrinks to a shorter run."""
    if args.warmup is not None and args.warmup > args.steps:
        fail(f"--warmup {args.warmup}: longer than the run ({length})")
    args.warmup = min(DEFAULT_WARMUP, args.steps) if args.warmup is None else args.warmup


def prepare_out_dir(args):
    """Before any work: refuse an --out_dir holding an earlier run (a finished model, checkpoints,
    or the metrics of a run stopped before its first checkpoint) unless --resume continues it or
    --overwrite replaces it; prove the folder writable; clear what an interrupted save left."""
    out, rank = Path(args.out_dir), rank_and_world()[0]
    if out.exists() and not out.is_dir():
        fail(f"--out_dir {out}: is a file, not a folder")
    checkpoints = sorted((out / "checkpoints").glob("step_*"))
    finished = (out / "model.safetensors").exists() or (out / "config.json").exists()
    held = ("a finished model" if finished else "checkpoints" if checkpoints
            else "metrics.jsonl" if (out / "metrics.jsonl").exists() else None)
    if args.resume and not checkpoints:
        fail(f"--resume: no checkpoint in {out / 'checkpoints'} to continue from")
    if held and not (args.resume or args.overwrite):
        fail(f"--out_dir {out}: holds {held} of an earlier run; pass --resume to continue it, "
                     "--overwrite to replace it, or another --out_dir")
    check_writable_dir(out / "checkpoints", "--out_dir")
    if rank == 0:  # temporary folders of an interrupted save (model or checkpoint): removed
        for stale in [*out.glob(".tmp-*"), *(out / "checkpoints").glob(".tmp-*")]:
            shutil.rmtree(stale, ignore_errors=True)
        if args.overwrite:  # the old run's checkpoints would pass for this one's; its final model
            for old in checkpoints:  # stays until this run's replaces it
                shutil.rmtree(old)


# Checkpoints -------------------------------------------------------------------------------


class DamagedCheckpoint(Exception):
    """A checkpoint folder that cannot be read whole: --resume falls back to the one before it."""


def save_checkpoint(out_dir, model, optimizer, step: int):
    """out_dir/checkpoints/step_N (N steps done, rank 0): trained weights, AdamW state and the torch
    RNG in safetensors (nothing pickled). Written to a temporary folder, flushed to disk and read
    back, then renamed into place; only then does the oldest go: the newest two are always whole."""
    if rank_and_world()[0] != 0:
        return
    root, names = Path(out_dir) / "checkpoints", {p: name for name, p in model.named_parameters()}
    root.mkdir(parents=True, exist_ok=True)
    tensors = {"rng.torch": torch.get_rng_state()}
    for i, p in enumerate(p for group in optimizer.param_groups for p in group["params"]):
        tensors[f"param.{names[p]}"] = p.detach().cpu().contiguous()
        adam = optimizer.state.get(p, {})
        tensors.update({f"adam.{i}.{k}": v.detach().cpu().contiguous() for k, v in adam.items()})
    tmp, final = Path(tempfile.mkdtemp(dir=root, prefix=".tmp-")), root / f"step_{step:07d}"
    save_file(tensors, tmp / "state.safetensors")
    (tmp / "meta.json").write_text(json.dumps({"step": step}))
    for path in (tmp / "state.safetensors", tmp / "meta.json", tmp):
        fsync(path)  # on disk before the rename makes it the newest
        make_readable(path)
    if problem := read_back_problem(tmp, tensors.keys()):
        fail(f"{tmp}: the checkpoint just written does not read back whole ({problem}); "
             "is the disk full?")
    shutil.rmtree(final, ignore_errors=True)
    os.replace(tmp, final)
    for old in sorted(root.glob("step_*"))[:-KEEP_CHECKPOINTS]:
        shutil.rmtree(old)


def fsync(path: Path):
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def read_back_problem(folder: Path, keys=None):
    """What is wrong with a checkpoint folder's files (None: nothing). safetensors checks that its
    header covers the file exactly, so a truncated file shows here without reading the tensors."""
    if not (folder / "meta.json").exists():
        return "no meta.json: an incomplete save"
    try:
        json.loads((folder / "meta.json").read_text())["step"]
        with safe_open(folder / "state.safetensors", "pt") as f:
            found = set(f.keys())
    except Exception as e:  # JSON, a missing file, safetensors' own error
        return f"unreadable ({type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''})"
    if keys is not None and found != set(keys):
        return "its tensors are not the ones written"
    return None


def load_checkpoint(out_dir, model, optimizer) -> int:
    """Restore the newest readable checkpoint in out_dir/checkpoints (a damaged newest one is
    reported and the one before it used); returns how many steps it had done. A checkpoint of
    another run (another model shape, LoRA against full fine-tuning) is refused with what differs."""
    found = sorted((Path(out_dir) / "checkpoints").glob("step_*"), reverse=True)
    problems = []
    if not found:
        fail(f"--resume: no checkpoint in {out_dir}/checkpoints")
    for folder in found:
        try:
            if problem := read_back_problem(folder):
                raise ValueError(f"{folder}: {problem}")
            tensors = load_safetensors(folder / "state.safetensors")
        except ValueError as e:
            problems.append(str(e))
            continue
        for problem in problems:  # a damaged newer one: say so, and use this one
            print(f"warning: {problem}; resuming from the checkpoint before it", file=sys.stderr)
        restore(folder, tensors, model, optimizer)
        print(f"resumed from {folder}")
        return json.loads((folder / "meta.json").read_text())["step"]
    fail(f"--resume: no readable checkpoint in {out_dir}/checkpoints: {'; '.join(problems)}")


def restore(folder, tensors, model, optimizer):
    """Check that the checkpoint holds exactly this run's trained weights, shape by shape, then load
    them, AdamW's state and the RNG. Nothing is changed unless everything matches."""
    names = {p: name for name, p in model.named_parameters()}
    params = [p for group in optimizer.param_groups for p in group["params"]]
    wanted = {f"param.{names[p]}": p for p in params}
    saved = {k for k in tensors if k.startswith("param.")}
    if saved != wanted.keys():
        lora = [any("lora_" in k for k in keys) for keys in (saved, wanted)]
        why = (f"it holds {'LoRA adapters' if lora[0] else 'all weights'} and this run trains "
               f"{'LoRA adapters' if lora[1] else 'all weights'}: resume with the run's own "
               "--lora_rank"
               if lora[0] != lora[1] else f"its trained weights differ from this model's, e.g. "
               f"{sorted(saved ^ wanted.keys())[0]} (another --model?)")
        fail(f"--resume {folder}: not a checkpoint of this run: {why}")
    for key, p in wanted.items():
        if tensors[key].shape != p.shape:
            fail(f"--resume {folder}: {key[6:]} has shape {tuple(tensors[key].shape)}, this run's "
                 f"is {tuple(p.shape)} (another --model or --lora_rank?)")
    state = {}
    with torch.no_grad():
        for i, p in enumerate(params):
            p.copy_(tensors[f"param.{names[p]}"])
            prefix = f"adam.{i}."
            state[i] = {k.removeprefix(prefix): v for k, v in tensors.items()
                        if k.startswith(prefix)}
    optimizer.load_state_dict({"state": {i: s for i, s in state.items() if s},
                               "param_groups": optimizer.state_dict()["param_groups"]})
    torch.set_rng_state(tensors["rng.torch"])
