"""
Checkpoints, and what a run finds in its --out_dir: one run at a time there (faults.hold_out_dir),
an earlier run is never overwritten by accident (--resume continues it, --overwrite replaces it),
the folder is known to be writable before the first step, and a checkpoint is verified before the
one before it goes and checked again when --resume loads it.

    prepare_out_dir   before any work: lock the folder, refuse or clear an earlier run, prove the
                      folder writable
    check_room        before the first step: room on its disk for the checkpoints and the final
                      model (a full disk at a save: resources.NoRoom, one line)
    save_when_due     the end of a step: a checkpoint every --save_every steps, and at SIGTERM's
                      stop
    save_checkpoint   trained weights, AdamW state and RNG in safetensors, renamed in whole
    load_checkpoint   --resume: the newest readable checkpoint of this run, bit-identical

Under --fsdp each GPU holds a shard of the weights and AdamW state, and writes it: the checkpoint
is torch.distributed.checkpoint's, in its Hugging Face safetensors format (one file per GPU, the
layout in their headers), and --resume loads it on the same number of GPUs. Either kind is flushed
to disk and read back before it counts, and meta.json names how it was written (one process, DDP
or FSDP, and how many processes), so that a run of another kind is told, not left guessing.
"""
import json
import math
import os
import shutil
import sys
from pathlib import Path

import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from safetensors import safe_open
from safetensors.torch import save_file
from torch.distributed.checkpoint.state_dict import (StateDictOptions, get_state_dict,
                                                     set_state_dict)
from torch.distributed.fsdp import FSDPModule

from harness.cli import Stop, check_writable_dir, fail
from harness.faults import hold_out_dir, same_flags, stop_requested
from harness.parallel import rank_and_world, unwrap
from harness.resources import NoRoom, room_for, size
from model import load_safetensors, make_readable, read_json

KEEP_CHECKPOINTS = 2  # the newest and the one before it, in case the newest turns out unreadable
HEADER_BYTES = 128  # about what safetensors' header takes for one tensor (its name, shape, offsets)
NO_ROOM = "no room"  # what rank 0 tells the other GPUs when a sharded checkpoint did not fit


def prepare_out_dir(args):
    """Before any work: hold the folder's lock for this run (rank 0), then refuse an --out_dir
    holding an earlier run (a finished model, checkpoints, or the metrics of a run stopped before
    its first checkpoint) unless --resume continues it or --overwrite replaces it. A run stopped
    before its first checkpoint starts over by --resume or by the same command. Prove the folder
    writable; clear what an interrupted save left."""
    out = Path(args.out_dir)
    if out.exists() and not out.is_dir():
        fail(f"--out_dir {out}: is a file, not a folder")
    first = rank_and_world()[0] == 0
    hold_out_dir(args)  # a second run into this folder stops here
    checkpoints = sorted((out / "checkpoints").glob("step_*"))
    finished = (out / "model.safetensors").exists() or (out / "config.json").exists()
    stopped_early = (out / "metrics.jsonl").exists() and not (checkpoints or finished)
    if args.resume and not checkpoints:
        if finished:
            fail(f"--resume: {out} holds a finished model and no checkpoint to continue from; "
                 "pass --overwrite to replace it")
        args.resume = False  # nothing to continue from: start over
        if first:
            print(f"--resume: no checkpoint in {out / 'checkpoints'}: the run starts over")
    elif (finished or checkpoints) and not (args.resume or args.overwrite):
        fail(f"--out_dir {out}: holds {'a finished model' if finished else 'checkpoints'} of an "
             "earlier run; pass --resume to continue it, --overwrite to replace it, or another "
             "--out_dir")
    elif stopped_early and not args.overwrite:
        if not same_flags(args):
            fail(f"--out_dir {out}: holds metrics.jsonl of an earlier run, stopped before its "
                 "first checkpoint, with other flags; pass --resume or --overwrite to start over "
                 "(replacing it), or another --out_dir")
        if first:
            print(f"{out}: the same command, stopped before its first checkpoint: it starts over")
    check_writable_dir(out / "checkpoints", "--out_dir")
    if first:  # what an interrupted save (model, checkpoint, metrics) left: removed
        for stale in [*out.glob(".tmp-*"), *(out / "checkpoints").glob(".tmp-*")]:
            if stale.is_dir():
                shutil.rmtree(stale, ignore_errors=True)
            else:
                stale.unlink(missing_ok=True)
        if args.overwrite:  # the old run's checkpoints would pass for this one's; its final model
            for old in checkpoints:  # stays until this run's replaces it
                shutil.rmtree(old)


def check_room(args, model, tokenizer):
    """Before the first step (rank 0; --skip_space_check skips it): the disk of --out_dir has room
    for what this run adds there, its checkpoints (the newest KEEP_CHECKPOINTS stay, and a new
    one is written whole before the oldest goes: one more at once, fewer those --resume finds)
    and the final model; else one line saying what each takes, what is free, and what to lower.
    model: the learner as setup holds it (LoRA added, not wrapped for DDP or FSDP)."""
    if args.skip_space_check or rank_and_world()[0] != 0:
        return
    out = Path(args.out_dir)
    trained = [p for p in model.parameters() if p.requires_grad]
    # a trained weight, AdamW's two moments of it (its dtype, fp32) and AdamW's step; the RNG
    checkpoint = sum(size_on_disk([p] * 3) + size_on_disk([torch.zeros(())]) for p in trained)
    checkpoint += size_on_disk([torch.get_rng_state()])
    final = final_model_size(model, tokenizer)
    there = sorted((out / "checkpoints").glob("step_*")) if args.resume else []
    done = int(there[-1].name.removeprefix("step_")) if there else 0
    saves = 0  # the checkpoints this run writes (as many as can be while --epochs sets --steps)
    if args.save_every:
        saves = (args.steps or math.inf) // args.save_every - done // args.save_every
    at_once = max(0, min(len(there) + saves, KEEP_CHECKPOINTS + 1) - len(there))
    beside_final = max(0, min(len(there) + saves, KEEP_CHECKPOINTS) - len(there))
    needed = max(at_once * checkpoint, beside_final * checkpoint + final)
    free = shutil.disk_usage(out).free
    if needed <= free:
        return
    lower = ["free space there", "choose another --out_dir"]
    if saves:
        lower.append("save no checkpoints (--save_every 0: no --resume then)")
    if not args.lora_rank and saves:
        lower.append("train LoRA adapters (--lora_rank 64: small checkpoints)")
    writes = [f"the final model, {size(final)}"]
    if at_once:
        writes.insert(0, f"{at_once} checkpoint{'s' * (at_once > 1)} at once (the newest "
                      f"{KEEP_CHECKPOINTS} stay, and the next is written whole before the oldest "
                      f"goes), {size(checkpoint)} each: the trained weights and AdamW's state, 12 "
                      "bytes a trained weight")
    fail(f"--out_dir {out}: its disk has {size(free)} free, and this run writes up to "
         f"{size(needed)} there ({'; '.join(writes)}); {', '.join(lower)}, or pass "
         "--skip_space_check")


def final_model_size(model, tokenizer) -> int:
    """What the final model takes on disk, about: its weights (LoRA merged: the base's shapes
    and dtype), its tokenizer.json, and with LoRA its adapter (adapter.py's: the LoRA weights)."""
    adapter = [p for name, p in model.named_parameters() if "lora_" in name]
    return (size_on_disk(model.hf_state_dict().values()) + size_on_disk(adapter)
            + Path(tokenizer.path).stat().st_size)


def due(steps_done: int, every: int) -> bool:
    """Is this a step to act on, for a flag such as --save_every N (0: never)?"""
    return every > 0 and steps_done > 0 and steps_done % every == 0


def save_when_due(args, model, optimizer, steps_done: int):
    """The end of a step: a checkpoint every --save_every steps. When SIGTERM asked the run to
    stop (faults.stop_requested: any of its processes), a checkpoint now if this step has none,
    then the stop, which says what was kept (cli.stops_cleanly)."""
    saved = due(steps_done, args.save_every)
    if saved:
        save_checkpoint(args.out_dir, model, optimizer, steps_done)
    if stop_requested():
        if not saved:
            save_checkpoint(args.out_dir, model, optimizer, steps_done)
        raise Stop("SIGTERM")


def save_checkpoint(out_dir, model, optimizer, step: int):
    """out_dir/checkpoints/step_N (N steps done, rank 0): trained weights, AdamW state and the
    torch RNG in safetensors (nothing pickled). Written to a temporary folder, flushed to disk and
    read back, then renamed into place; only then does the oldest go: the newest two are whole."""
    if isinstance(model, FSDPModule):
        return save_sharded(out_dir, model, optimizer, step)
    kind = run_kind(model)
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
    tmp = root / f".tmp-step_{step:07d}"
    # A full disk: the half-written folder goes, and one line names the folder and the bytes
    with room_for(root, f"the checkpoint of step {step}", needed=size_on_disk(tensors.values()),
                  partial=[tmp]):
        tmp.mkdir(exist_ok=True)
        save_file(tensors, tmp / "state.safetensors")
        (tmp / "meta.json").write_text(json.dumps({"step": step, **kind}))
        problem = seal(tmp, root / f"step_{step:07d}", tensors.keys())
    if problem:
        fail(problem)


def size_on_disk(tensors) -> int:
    """What a safetensors file of these tensors takes, about: their bytes (a DTensor's whole
    size) and a line of the file's JSON header each."""
    return sum(t.numel() * t.element_size() + HEADER_BYTES for t in tensors)


def seal(tmp: Path, final: Path, keys):
    """Make the checkpoint written in tmp the newest: flush its files to disk, read them back,
    rename tmp to final (rank 0). Only then does the oldest go. Returns what is wrong instead,
    if its files do not read back whole (and nothing is renamed or removed)."""
    for path in [*tmp.iterdir(), tmp]:
        fsync(path)  # on disk before the rename makes it the newest
        make_readable(path)
    problem = read_back_problem(tmp, keys)
    if problem:
        return (f"{tmp}: the checkpoint just written does not read back whole ({problem}); is "
                "the disk full?")
    shutil.rmtree(final, ignore_errors=True)
    os.replace(tmp, final)
    fsync(final.parent)  # the rename itself
    for old in sorted(final.parent.glob("step_*"))[:-KEEP_CHECKPOINTS]:
        shutil.rmtree(old)
    return None


def fsync(path: Path):
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def read_back_problem(folder: Path, keys=None):
    """What is wrong with a checkpoint folder's files (None: nothing): meta.json, then the
    safetensors files it names (state.safetensors, or one shard per FSDP process), and with keys
    that they hold exactly those tensors. safetensors checks that a file's header covers the file
    exactly, so a truncated file shows here without reading the tensors."""
    if not (folder / "meta.json").exists():
        return "no meta.json: an incomplete save"
    try:
        meta = json.loads((folder / "meta.json").read_text())
        meta["step"]  # (a KeyError without it)
        kind = kind_of(meta)
        files = [folder / "state.safetensors"]
        if kind["kind"] == "fsdp":  # a shard per process
            files = sorted(folder.glob("*.safetensors"))
            if len(files) != kind["processes"]:
                raise ValueError(f"{len(files)} shard files for {kind['processes']} processes")
        found = set()
        for file in files:
            with safe_open(file, "pt") as f:
                found |= set(f.keys())
    except Exception as e:  # JSON, a missing file, safetensors' own error
        return f"unreadable ({type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''})"
    if keys is not None and found != set(keys):
        return "its tensors are not the ones written"
    return None


def run_kind(model) -> dict:
    """How this run holds the model, as meta.json records it: {"kind": "plain" (one process),
    "ddp" or "fsdp", "processes": how many}. A run resumes only a checkpoint of its own kind: the
    files differ under FSDP, and the number of processes sets each step's questions."""
    world = rank_and_world()[1]
    kind = "fsdp" if isinstance(model, FSDPModule) else "ddp" if world > 1 else "plain"
    return {"kind": kind, "processes": world}


def kind_of(meta: dict) -> dict:
    """A checkpoint's kind from its meta.json; one from before kinds were recorded is FSDP's if it
    has a world_size, else one process's or DDP's (processes None: either)."""
    if "kind" in meta:
        return {"kind": meta["kind"], "processes": meta["processes"]}
    if "world_size" in meta:
        return {"kind": "fsdp", "processes": meta["world_size"]}
    return {"kind": "plain", "processes": None}


def described(kind: dict) -> str:
    n = kind["processes"]
    if n is None:
        return "one process or DDP (a checkpoint from before kinds were recorded)"
    return {"plain": "one process (no torchrun)", "ddp": f"{n} DDP processes (torchrun)",
            "fsdp": f"{n} FSDP processes (torchrun --fsdp)"}[kind["kind"]]


def check_kind(folder: Path, saved: dict, model):
    """A checkpoint (saved: its kind_of) written by another kind of run (one process, DDP, FSDP,
    another number of processes) is refused with both kinds named, before anything loads."""
    this_run = run_kind(model)
    if saved["processes"] is None and this_run["kind"] != "fsdp":
        return  # from before kinds were recorded: unsharded, loadable by either
    if saved != this_run:
        fail(f"--resume {folder}: written by {described(saved)}, and this run has "
             f"{described(this_run)}; resume it as it was written")


def load_checkpoint(out_dir, model, optimizer) -> int:
    """Restore the newest readable checkpoint in out_dir/checkpoints (a damaged newest one is
    reported and the one before it used); returns how many steps it had done. A checkpoint of
    another run (another model shape, LoRA against full fine-tuning) or of another kind of run
    (one process, DDP, FSDP) is refused with what differs."""
    found = sorted((Path(out_dir) / "checkpoints").glob("step_*"), reverse=True)
    if not found:
        fail(f"--resume: no checkpoint in {out_dir}/checkpoints")
    problems = []
    sharded = isinstance(model, FSDPModule)
    for folder in found:
        try:
            problem = read_back_problem(folder)
            if problem:
                raise ValueError(f"{folder}: {problem}")
            meta = read_json(folder / "meta.json")
            check_kind(folder, kind_of(meta), model)  # another kind's: refused, not passed over
            tensors = None if sharded else load_safetensors(folder / "state.safetensors")
        except ValueError as e:
            problems.append(str(e))
            continue
        for problem in problems:  # a damaged newer one: say so, and use this one
            print(f"warning: {problem}; resuming from the checkpoint before it", file=sys.stderr)
        if sharded:
            load_sharded(folder, model, optimizer)
        else:
            restore(folder, tensors, unwrap(model), optimizer)
        print(f"resumed from {folder}")
        return meta["step"]
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
    """Every GPU writes its shards into one temporary folder; then rank 0 flushes, reads back and
    renames it in (seal), as for an unsharded checkpoint, and tells every GPU how that went."""
    root = Path(out_dir) / "checkpoints"
    tmp = [str(root / f".tmp-step_{step:07d}")]
    dist.broadcast_object_list(tmp)  # one folder for all, rank 0's name
    tmp = Path(tmp[0])
    flat = sharded_state(model, optimizer)[0]
    writer = dcp.HuggingFaceStorageWriter(str(tmp), save_distributed=True)
    what = f"the checkpoint of step {step}"
    needed = size_on_disk(flat.values())
    with room_for(root, what, needed=needed, partial=[tmp]):  # dcp.save fails on every GPU
        dcp.save(flat, storage_writer=writer)
    dist.barrier()  # every shard is written
    problem = [None]
    if rank_and_world()[0] == 0:
        try:
            with room_for(root, what, needed=needed, partial=[tmp]):
                (tmp / "meta.json").write_text(json.dumps({"step": step, **run_kind(model)}))
                problem = [seal(tmp, root / f"step_{step:07d}", flat.keys())]  # every GPU's
        except NoRoom:
            problem = [NO_ROOM]
    dist.broadcast_object_list(problem)  # all stop together if it failed
    if problem[0] == NO_ROOM:
        raise NoRoom(root, what, needed)
    if problem[0]:
        fail(problem[0])


def load_sharded(folder: Path, model, optimizer):
    """--resume under --fsdp: a sharded checkpoint, on the same number of GPUs (check_kind)."""
    optimizer.zero_grad(set_to_none=True)
    # The tensors to load into (AdamW's as after one step), filled in place by dcp.load
    flat, weights, adam = sharded_state(model, optimizer)
    dcp.load(flat, storage_reader=dcp.HuggingFaceStorageReader(str(folder)))
    set_state_dict(model, optimizer, model_state_dict=weights, optim_state_dict=adam,
                   options=StateDictOptions(strict=False))  # a tied head is the embedding
