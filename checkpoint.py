"""
Checkpoints, and what a run finds in its --out_dir: an earlier run is never overwritten by accident
(--resume continues it, --overwrite replaces it), the folder is known to be writable before the
first step, and a checkpoint is verified before the one before it goes and checked again when
--resume loads it.

    prepare_out_dir   before any work: refuse or clear an earlier run, prove the folder writable
    save_checkpoint   trained weights, AdamW state and RNG in safetensors, renamed in whole
    load_checkpoint   --resume: the newest readable checkpoint of this run, bit-identical

Under --fsdp each GPU holds a shard of the weights and AdamW state, and writes it: the checkpoint
is torch.distributed.checkpoint's, in its Hugging Face safetensors format (one file per GPU, the
layout in their headers), and --resume loads it on the same number of GPUs.
"""
import json
import os
import shutil
import sys
import tempfile
from pathlib import Path

import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from safetensors import safe_open
from safetensors.torch import save_file
from torch.distributed.checkpoint.state_dict import (StateDictOptions, get_state_dict,
                                                     set_state_dict)
from torch.distributed.fsdp import FSDPModule

from cli import check_writable_dir, fail
from model import load_safetensors, make_readable
from train_common import rank_and_world, unwrap

KEEP_CHECKPOINTS = 2  # the newest and the one before it, in case the newest turns out unreadable


def prepare_out_dir(args):
    """Before any work: refuse an --out_dir holding an earlier run (a finished model, checkpoints,
    or the metrics of a run stopped before its first checkpoint) unless --resume continues it or
    --overwrite replaces it; prove the folder writable; clear what an interrupted save left."""
    out = Path(args.out_dir)
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
    if rank_and_world()[0] == 0:  # what an interrupted save (model or checkpoint) left: removed
        for stale in [*out.glob(".tmp-*"), *(out / "checkpoints").glob(".tmp-*")]:
            shutil.rmtree(stale, ignore_errors=True)
        if args.overwrite:  # the old run's checkpoints would pass for this one's; its final model
            for old in checkpoints:  # stays until this run's replaces it
                shutil.rmtree(old)


def save_checkpoint(out_dir, model, optimizer, step: int):
    """out_dir/checkpoints/step_N (N steps done, rank 0): trained weights, AdamW state and the
    torch RNG in safetensors (nothing pickled). Written to a temporary folder, flushed to disk and
    read back, then renamed into place; only then does the oldest go: the newest two are whole."""
    if isinstance(model, FSDPModule):
        return save_sharded(out_dir, model, optimizer, step)
    model = unwrap(model)  # DDP: the model's own parameter names
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
    for path in (tmp / "state.safetensors", tmp / "meta.json", tmp):
        fsync(path)  # on disk before the rename makes it the newest
        make_readable(path)
    problem = read_back_problem(tmp, tensors.keys())
    if problem:
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
    another run (another model shape, LoRA against full fine-tuning) is refused with what
    differs."""
    found = sorted((Path(out_dir) / "checkpoints").glob("step_*"), reverse=True)
    if not found:
        fail(f"--resume: no checkpoint in {out_dir}/checkpoints")
    if isinstance(model, FSDPModule):
        return load_sharded(found[0], model, optimizer)
    model = unwrap(model)
    problems = []
    for folder in found:
        try:
            problem = read_back_problem(folder)
            if problem:
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
    """Check that the checkpoint holds exactly this run's trained weights, shape by shape, then
    load them, AdamW's state and the RNG. Nothing is changed unless everything matches."""
    names = {p: name for name, p in model.named_parameters()}
    params = [p for group in optimizer.param_groups for p in group["params"]]
    wanted = {f"param.{names[p]}": p for p in params}
    saved = {k for k in tensors if k.startswith("param.")}
    if saved != wanted.keys():
        lora = ["LoRA adapters" if any("lora_" in k for k in keys) else "all weights"
                for keys in (saved, wanted)]
        why = (f"its trained weights differ from this model's, e.g. "
               f"{sorted(saved ^ wanted.keys())[0]} (another --model?)")
        if lora[0] != lora[1]:
            why = (f"it holds {lora[0]} and this run trains {lora[1]}: resume with the run's own "
                   "--lora_rank")
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


# Sharded checkpoints (--fsdp) ---------------------------------------------------------------------


def sharded_state(model, optimizer):
    """The trained weights and AdamW state: this GPU's shards (DTensors), FQN-named, as torch's
    state dicts and flat (the same tensors; a tied head is the embedding, left out of both)."""
    weights, adam = get_state_dict(model, optimizer)
    if model.config.tie_word_embeddings:
        weights.pop("lm_head.weight", None)
    flat = {f"param.{name}": tensor for name, tensor in weights.items()}
    for name, moments in adam["state"].items():
        flat.update({f"adam.{name}.{key}": value for key, value in moments.items()})
    return flat, weights, adam


def save_sharded(out_dir, model, optimizer, step: int):
    """Every GPU writes its shards into one temporary folder, then rank 0 renames it in."""
    root = Path(out_dir) / "checkpoints"
    tmp = [str(root / f".tmp-step_{step:07d}")]
    dist.broadcast_object_list(tmp)  # one folder for all, rank 0's name
    tmp = Path(tmp[0])
    writer = dcp.HuggingFaceStorageWriter(str(tmp), save_distributed=True)
    dcp.save(sharded_state(model, optimizer)[0], storage_writer=writer)
    dist.barrier()  # every shard is written
    if rank_and_world()[0] == 0:
        meta = {"step": step, "world_size": rank_and_world()[1]}
        (tmp / "meta.json").write_text(json.dumps(meta))
        final = root / f"step_{step:07d}"
        shutil.rmtree(final, ignore_errors=True)
        os.replace(tmp, final)
        for old in sorted(root.glob("step_*"))[:-KEEP_CHECKPOINTS]:
            shutil.rmtree(old)
    dist.barrier()


def load_sharded(folder: Path, model, optimizer) -> int:
    """--resume under --fsdp: the newest sharded checkpoint, on the same number of GPUs."""
    meta_file = folder / "meta.json"
    if not meta_file.exists():
        fail(f"--resume {folder}: no meta.json (an incomplete save?)")
    meta = json.loads(meta_file.read_text())
    if meta.get("world_size") != rank_and_world()[1]:
        fail(f"--resume {folder}: written by {meta.get('world_size')} --fsdp processes (or "
             f"without --fsdp), this run has {rank_and_world()[1]}")
    optimizer.zero_grad(set_to_none=True)
    # The tensors to load into (AdamW's as after one step), filled in place by dcp.load
    flat, weights, adam = sharded_state(model, optimizer)
    dcp.load(flat, storage_reader=dcp.HuggingFaceStorageReader(str(folder)))
    set_state_dict(model, optimizer, model_state_dict=weights, optim_state_dict=adam,
                   options=StateDictOptions(strict=False))  # a tied head is the embedding
    print(f"resumed from {folder}")
    return meta["step"]
