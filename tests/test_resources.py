"""Running out of disk and of memory (harness/resources.py), as a user does: at every writer a full
disk ends in one line naming the folder, the bytes the write needed and those free, and how to go
on; nothing is left written half and nothing written before is touched; a trainer's line names the
last checkpoint and the --resume that continues from it, which continues to exactly the weights of
a run that never stopped. Out of memory ends in one line naming the flags of the phase that ran
out, each with its value and a value to try. The trainers check the disk before the first step.

The full disk is patched in at each writer (an OSError or safetensors' error after half the
bytes), the out-of-memory errors at the allocation points (torch.OutOfMemoryError, as CUDA raises
it; the CPU allocator's own error once, for real); then a real full disk, on a small tmpfs where
this machine lets the test mount one (root), else skipped.
"""
import errno
import json
import os
import re
import shlex
import shutil
import subprocess
import sys
import types
from pathlib import Path

import pytest
import torch
from safetensors import SafetensorError
from safetensors.torch import load_file

import eval as ev
import model as M
import train_rl
import train_sft
from conftest import ROOT, args_for, load_script, tiny_model, train_lines, write_byte_tokenizer
from harness import checkpoint, faults, resources, training
from harness.resources import NoRoom
from test_bad_input import write_tiny_data

pytestmark = pytest.mark.usefixtures("one_thread")

FULL = OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
SIZE = r"[\d.]+ (?:bytes|KiB|MiB|GiB)"  # resources.size's


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    """A few rows of each dataset, and a tiny model with the byte-level tokenizer."""
    folder = tmp_path_factory.mktemp("resources")
    write_tiny_data(folder / "data")
    tiny_model(seed=0).save_pretrained(folder / "model")
    write_byte_tokenizer(folder / "model" / "tokenizer.json")
    return folder


def sft_argv(world, out_dir, *extra):
    return ["--model", world / "model", "--data_dir", world / "data", "--out_dir", out_dir,
            "--device", "cpu", "--steps", "4", "--batch_size", "2", "--grad_accum", "1",
            "--lora_rank", "0", "--lr", "3e-3", "--warmup", "1", "--eval_every", "0",
            "--save_every", "2", *extra]


def stopped_with(main, argv) -> str:
    """main(argv) ends in one line, as SystemExit; returns the line."""
    with pytest.raises(SystemExit) as stop:
        main([str(a) for a in argv] if isinstance(argv, list) else argv)
    line = str(stop.value.code)
    assert "\n" not in line and "Traceback" not in line, line
    return line


def continue_with(line: str, main):
    """Run the command the line ends with ("... continue with: python SCRIPT ARGS"), in process."""
    python, script, *argv = shlex.split(line.split(": ")[-1])
    assert python == "python" and Path(script).name == f"{main.__module__}.py"
    main(argv)
    return argv


def same_weights(run, reference):
    a, b = (load_file(Path(out) / "model.safetensors") for out in (run, reference))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert [r["loss"] for r in train_lines(run)] == [r["loss"] for r in train_lines(reference)]


def leftovers(folder) -> list:
    """What a write left half: temporary files and folders anywhere under folder."""
    return sorted(str(p) for p in Path(folder).rglob(".tmp*"))


@pytest.fixture(scope="module")
def straight(world):
    """4 steps of SFT that never stopped: what every stopped and continued run must reach."""
    out = world / "straight"
    train_sft.main([str(a) for a in sft_argv(world, out)])
    return out


# The pieces: a full disk recognised, a file written whole or not at all ------------------------


def test_a_full_disk_is_recognised_in_every_form_a_writer_raises_it():
    assert resources.disk_full(FULL)
    assert resources.disk_full(OSError(errno.EDQUOT, "Disk quota exceeded"))  # a quota
    rust = SafetensorError("Error while serializing: I/O error: No space left on device "
                           "(os error 28)")  # safetensors' own, no errno
    assert resources.disk_full(rust)
    try:
        try:
            raise FULL
        except OSError as e:
            raise RuntimeError("a writer's own error") from e
    except RuntimeError as wrapped:  # raised from one
        assert resources.disk_full(wrapped)
    assert not resources.disk_full(OSError(errno.EACCES, "Permission denied"))
    assert not resources.disk_full(ValueError("no space in this text"))


def half_then_full(original):
    """A write function that writes half its bytes, then finds the disk full."""
    def write(self, data):
        original(self, data[:len(data) // 2])
        raise FULL
    return write


def test_write_whole_leaves_the_earlier_file_and_no_temporary_file(tmp_path, monkeypatch):
    path = tmp_path / "r.json"
    path.write_text("earlier")
    monkeypatch.setattr(Path, "write_bytes", half_then_full(Path.write_bytes))
    with pytest.raises(NoRoom) as full:
        resources.write_whole(path, "x" * 5000, what="the results file")
    assert re.fullmatch(rf"\S+: error: {re.escape(str(tmp_path))}: no room left on its disk for "
                        rf"the results file \(it needed 4\.9 KiB, {SIZE} free\); free space "
                        "there and run it again", str(full.value.code))
    assert full.value.needed == 5000
    assert full.value.free == shutil.disk_usage(tmp_path).free
    assert path.read_text() == "earlier" and sorted(p.name for p in tmp_path.iterdir()) == [
        "r.json"]


def test_append_whole_cuts_a_half_written_line_back(tmp_path, monkeypatch):
    path = tmp_path / "metrics.jsonl"
    path.write_text('{"step": 1}\n')

    class HalfThenFull:  # os, but a write puts half its bytes down, then finds the disk full
        def __getattr__(self, name):
            return getattr(os, name)

        def write(self, fd, data):
            os.write(fd, data[:len(data) // 2])
            raise FULL
    monkeypatch.setattr(resources, "os", HalfThenFull())
    with pytest.raises(NoRoom, match="no room left on its disk for a line of metrics.jsonl"):
        resources.append_whole(path, '{"step": 2, "loss": 0.5}\n')
    assert path.read_text() == '{"step": 1}\n'


def test_bytes_read_as_a_person_reads_them():
    assert [resources.size(n) for n in (18, 2048, 5 * 2**20 + 2**19, 7 * 2**30)] == [
        "18 bytes", "2.0 KiB", "5.5 MiB", "7.0 GiB"]


# A trainer's writers: the checkpoint, the final model, metrics.jsonl, args.json, tracking --------


def test_a_checkpoint_that_finds_the_disk_full_is_one_line_and_resume_continues_exactly(
        world, straight, monkeypatch):
    """The step-4 checkpoint finds the disk full: one line naming the folder, the bytes and the
    step-2 checkpoint; that one is whole, the half-written one is gone; --resume continues to the
    weights of the run that never stopped."""
    out = world / "checkpoint_full"
    save_file, calls = checkpoint.save_file, []

    def full_at_step_4(tensors, path):
        calls.append(path)
        if len(calls) == 2:  # half a file, then safetensors' error for a full disk
            Path(path).write_bytes(b"\0" * 1000)
            raise SafetensorError("Error while serializing: I/O error: No space left on device "
                                  "(os error 28)")
        return save_file(tensors, path)
    monkeypatch.setattr(checkpoint, "save_file", full_at_step_4)
    line = stopped_with(train_sft.main, sft_argv(world, out))
    folder = re.escape(str(out / "checkpoints"))
    assert re.fullmatch(rf"train_sft\.py: error: {folder}: no room left on its disk for the "
                        rf"checkpoint of step 4 \(it needed ({SIZE}), {SIZE} free\); free space "
                        rf"there \(or move .*\), then: kept {folder}/step_0000002 \(2 steps "
                        r"done\); continue with: python \S+train_sft\.py .* --resume", line), line
    written = sum(f.stat().st_size for f in (out / "checkpoints" / "step_0000002").iterdir())
    assert f"it needed {resources.size(written)}" in line  # the estimate: the size it takes
    assert [p.name for p in (out / "checkpoints").iterdir()] == ["step_0000002"]
    assert leftovers(out) == [] and not (out / "model.safetensors").exists()
    monkeypatch.setattr(checkpoint, "save_file", save_file)
    continue_with(line, train_sft.main)
    same_weights(out, straight)


def test_the_final_model_on_a_full_disk_costs_nothing_after_a_checkpoint_at_its_step(
        world, straight, monkeypatch):
    out = world / "final_full"
    save_file = M.save_file

    def full(tensors, path, metadata=None):
        Path(path).write_bytes(b"\0" * 1000)
        raise SafetensorError("Error while serializing: I/O error: No space left on device "
                              "(os error 28)")
    monkeypatch.setattr(M, "save_file", full)
    line = stopped_with(train_sft.main, sft_argv(world, out))
    assert re.search(rf"^train_sft\.py: error: {re.escape(str(out))}: no room left on its disk "
                     rf"for the final model \(it needed {SIZE}, {SIZE} free\); .* kept "
                     r"\S+step_0000004 \(4 steps done\); continue with: .* --resume$", line), line
    assert leftovers(out) == [] and not (out / "model.safetensors").exists()
    assert not (out / "config.json").exists()  # nothing of the final model: no half of it
    monkeypatch.setattr(M, "save_file", save_file)
    continue_with(line, train_sft.main)  # the last step had its checkpoint: it only saves
    same_weights(out, straight)


def test_metrics_and_flags_on_a_full_disk_are_one_line_and_no_half_line(world, monkeypatch):
    out = world / "metrics_full"
    append_whole, calls = resources.append_whole, []

    def full_at_line_3(path, text, what=None):
        calls.append(text)
        if len(calls) == 3:
            raise NoRoom(Path(path).parent, f"a line of {Path(path).name}", len(text.encode()))
        return append_whole(path, text, what)
    monkeypatch.setattr(training, "append_whole", full_at_line_3)
    line = stopped_with(train_sft.main, sft_argv(world, out))
    assert re.search(r"no room left on its disk for a line of metrics\.jsonl .*kept "
                     r"\S+step_0000002 \(2 steps done\); continue with: .* --resume$", line)
    assert [r["step"] for r in train_lines(out)] == [1, 2]
    # args.json, written whole as the run starts: a full disk there is one line, before a step
    monkeypatch.undo()
    write_bytes = Path.write_bytes
    monkeypatch.setattr(Path, "write_bytes", lambda self, data: (
        half_then_full(write_bytes) if self.name == ".tmp-args.json" else write_bytes)(self, data))
    line = stopped_with(train_sft.main, sft_argv(world, world / "flags_full"))
    assert re.search(r"flags_full: no room left on its disk for args\.json \(it needed .*\); "
                     r".*no checkpoint in \S+ yet", line), line
    assert leftovers(world / "flags_full") == []


def test_tracking_on_a_full_disk_is_one_line_naming_its_folder(world, monkeypatch):
    from test_tracking import FakeSummaryWriter

    class FullWriter(FakeSummaryWriter):
        def add_scalar(self, tag, value, global_step):
            if global_step == 3:
                raise FULL
    module = types.ModuleType("torch.utils.tensorboard")
    module.SummaryWriter = FullWriter
    monkeypatch.setitem(sys.modules, "torch.utils.tensorboard", module)
    out = world / "tracking_full"
    line = stopped_with(train_sft.main, sft_argv(world, out, "--tensorboard"))
    assert re.search(rf"{re.escape(str(out / 'tensorboard'))}: no room left on its disk for the "
                     r"record of step 3 .*kept \S+step_0000002 \(2 steps done\)", line), line


# Before the first step: room for the checkpoints and the final model -----------------------------


def test_the_free_space_check_stops_a_run_that_cannot_fit_before_its_first_step(world,
                                                                                monkeypatch):
    out = world / "no_room"

    monkeypatch.setattr(shutil, "disk_usage", lambda path: disk_with(free=10**5))
    line = stopped_with(train_sft.main, sft_argv(world, out))
    assert re.fullmatch(rf"\S+: error: --out_dir {re.escape(str(out))}: its disk has 97\.7 KiB "
                        rf"free, and this run writes up to ({SIZE}) there \(2 checkpoints at "
                        rf"once .*, ({SIZE}) each: the trained weights and AdamW's state, 12 "
                        rf"bytes a trained weight; the final model, ({SIZE})\); free space "
                        r"there, choose another --out_dir, save no checkpoints .*, train LoRA "
                        r"adapters .*, or pass --skip_space_check", line), line
    assert not out.exists()  # refused before any work: nothing written
    train_sft.main([str(a) for a in sft_argv(world, out, "--skip_space_check")])
    assert (out / "model.safetensors").exists()


def disk_with(free: int):
    """What shutil.disk_usage answers for a disk with `free` bytes free."""
    return types.SimpleNamespace(total=10**12, used=10**12 - free, free=free)


def needs(world, tmp_path, monkeypatch, **flags) -> bool:
    """Does check_room pass for a tiny model's run with these flags and `free` bytes free?"""
    free = flags.pop("free")
    monkeypatch.setattr(shutil, "disk_usage", lambda path: disk_with(free=free))
    args = args_for(out_dir=str(tmp_path), device="cpu", **flags)
    model, tokenizer = M.Qwen3.from_pretrained(world / "model"), M.Tokenizer.from_pretrained(
        world / "model")
    if args.lora_rank:
        M.add_lora(model, args.lora_rank, 2 * args.lora_rank)
    try:
        checkpoint.check_room(args, model, tokenizer)
        return True
    except SystemExit:
        return False


def test_the_space_check_asks_for_what_the_run_then_writes(world, straight, tmp_path,
                                                          monkeypatch):
    """Its estimate, against what a run wrote: 3 checkpoints at once (the newest 2 kept, and
    the next one written whole before the oldest goes), or 2 and the final model."""
    state = straight / "checkpoints" / "step_0000004"
    checkpoint_bytes = sum(f.stat().st_size for f in state.iterdir())
    final = sum((straight / name).stat().st_size
                for name in ("model.safetensors", "tokenizer.json", "config.json"))
    written = max(3 * checkpoint_bytes, 2 * checkpoint_bytes + final)
    flags = dict(steps=6, save_every=2, lora_rank=0)
    assert not needs(world, tmp_path, monkeypatch, free=int(written * 0.98), **flags)
    assert needs(world, tmp_path, monkeypatch, free=int(written * 1.02), **flags)
    # no checkpoints (--save_every 0): the final model alone
    flags = dict(steps=6, save_every=0, lora_rank=0)
    assert not needs(world, tmp_path, monkeypatch, free=int(final * 0.98), **flags)
    assert needs(world, tmp_path, monkeypatch, free=int(final * 1.02), **flags)
    # LoRA: the adapters and their AdamW state only
    assert needs(world, tmp_path, monkeypatch, free=int(final * 1.5), steps=6, save_every=2,
                 lora_rank=2)


# Out of memory: the phase, its flags with their values and values to try -----------------------


def oom(*args, **kwargs):
    raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")


def at_call(n, function):
    """function, except that its nth call runs out of memory."""
    calls = []

    def wrapped(*args, **kwargs):
        calls.append(1)
        return oom() if len(calls) == n else function(*args, **kwargs)
    return wrapped


def rl_argv(world, out_dir):
    return ["--model", world / "model", "--data_dir", world / "data", "--out_dir", out_dir,
            "--device", "cpu", "--steps", "4", "--batch_size", "2", "--grad_accum", "1",
            "--group_size", "2", "--max_new_tokens", "8", "--gen_batch_size", "8", "--lr",
            "1e-3", "--warmup", "1", "--eval_every", "0", "--save_every", "2"]


def test_out_of_memory_in_the_rollouts_names_gen_batch_size_and_the_command_continues(
        world, monkeypatch):
    out = world / "rl_oom"
    monkeypatch.setattr(train_rl, "rollout", at_call(3, train_rl.rollout))
    line = stopped_with(train_rl.main, rl_argv(world, out))
    assert re.fullmatch(r"train_rl\.py: error: out of memory in sampling: it samples "
                        r"--gen_batch_size 8 sequences at once: try --gen_batch_size 4; kept "
                        rf"{re.escape(str(out))}/checkpoints/step_0000002 \(2 steps done\); "
                        r"continue with: python \S+train_rl\.py .* --gen_batch_size 4 --resume",
                        line), line
    assert [r["step"] for r in train_lines(out)] == [1, 2]  # nothing written half
    monkeypatch.undo()
    argv = continue_with(line, train_rl.main)
    assert argv.count("--gen_batch_size") == 1  # the flag given once, its new value
    assert [r["step"] for r in train_lines(out)] == [1, 2, 3, 4]
    assert json.loads((out / "args.json").read_text())["gen_batch_size"] == 4


def test_out_of_memory_in_the_update_keeps_the_steps_size(world, monkeypatch):
    out = world / "sft_oom"
    monkeypatch.setattr(train_sft, "completion_logprobs", oom)
    line = stopped_with(train_sft.main, sft_argv(world, out))
    assert re.fullmatch(r"train_sft\.py: error: out of memory in the update: its micro-batches "
                        r"hold --batch_size 2 questions, --grad_accum 1 a step: try --batch_size "
                        r"1 --grad_accum 2, the same 2 questions a step; no checkpoint in \S+ "
                        r"yet, nothing to continue from; start it again \(--resume starts it "
                        r"over\) with: python \S+ .* --batch_size 1 --grad_accum 2 --resume",
                        line), line
    monkeypatch.undo()
    continue_with(line, train_sft.main)  # no checkpoint: --resume starts it over
    assert [r["step"] for r in train_lines(out)] == [1, 2, 3, 4]


def test_out_of_memory_in_the_periodic_eval_names_eval_batch_size(world, monkeypatch):
    monkeypatch.setattr(training, "evaluate", oom)
    line = stopped_with(train_sft.main, sft_argv(world, world / "eval_oom", "--eval_every", "2"))
    assert "out of memory in the periodic eval: it scores --eval_batch_size 16 sequences at " \
           "once: try --eval_batch_size 8; no checkpoint" in line, line


@pytest.mark.parametrize("phase, flags, advice, changes", [
    ("the update", dict(batch_size=6, grad_accum=4), "try --batch_size 3 --grad_accum 8, the "
     "same 24 questions", {"--batch_size": 3, "--grad_accum": 8}),
    ("the update", dict(batch_size=3, grad_accum=5), "try --batch_size 1 --grad_accum 15",
     {"--batch_size": 1, "--grad_accum": 15}),
    ("sampling", dict(gen_batch_size=1), "lower --max_new_tokens (256: shorter answers), or use "
     "a device with more memory", {}),
    (None, dict(batch_size=1), "lower --gen_batch_size (128) or --max_new_tokens (256", {}),
    ("AdamW's update", {}, "train LoRA adapters (--lora_rank 64, a new run)", {}),
    ("loading the models", {}, "the weights do not fit on the device", {}),
])
def test_what_to_lower_for_each_phase(phase, flags, advice, changes):
    flags = {**faults.run_flags(args_for()), **flags}
    words, changed = faults.lower_memory(phase, flags)
    assert advice in words and changed == changes


def test_every_phase_is_told_by_a_function_the_trainers_run():
    """The traceback's function names that tell a phase are functions the trainers run (a rename
    would leave a phase untold)."""
    import train_distill
    defined = {name for module in (train_sft, train_rl, train_distill, training)
               for name in dir(module)}
    assert set(faults.MEMORY_PHASES) <= defined


def test_the_continuing_command_gives_each_changed_flag_once():
    from harness.cli import with_flags
    argv = ["--batch_size", "8", "--grad_accum=4", "--overwrite", "--lr", "1e-3"]
    assert with_flags(argv, {"--batch_size": 4, "--grad_accum": 8}) == [
        "--overwrite", "--lr", "1e-3", "--batch_size", "4", "--grad_accum", "8"]


def test_the_cpu_allocators_error_is_out_of_memory_too():
    with pytest.raises(RuntimeError) as error:
        torch.empty(2**62, dtype=torch.uint8)  # past any machine's address space
    assert resources.out_of_memory(error.value)
    assert not resources.out_of_memory(RuntimeError("shape mismatch"))


@pytest.mark.skipif(not torch.cuda.is_available(), reason="CUDA's own out of memory needs CUDA")
def test_a_real_cuda_out_of_memory_is_one_line_with_the_peak():
    held = torch.empty(2**20, device="cuda")  # 4 MiB: the step's peak, once new_step resets it
    resources.new_step()
    with pytest.raises(SystemExit) as stop:
        with resources.memory_bound_by("--batch_size", 16, "scoring"):
            torch.empty(2**50, dtype=torch.uint8, device="cuda")  # past any GPU's memory
    assert re.fullmatch(rf"\S+: error: out of memory in scoring, peak 4\.0 MiB of the GPU's "
                        rf"{SIZE}: --batch_size 16 sequences at once; try --batch_size 8",
                        str(stop.value.code)), stop.value.code
    del held


# eval.py: out of memory, a full disk for --out (the scores saved beside the model), --report ----


def eval_argv(world, out, *extra):
    return ["--model", world / "model", "--data_dir", world / "data", "--tasks", "gsm8k",
            "--limit", "2", "--gsm8k_shots", "0", "--max_new_tokens", "8", "--device", "cpu",
            "--out", out, *extra]


def test_eval_out_of_memory_names_batch_size(world, monkeypatch, tmp_path):
    monkeypatch.setattr(ev, "evaluate", oom)
    line = stopped_with(ev.main, eval_argv(world, tmp_path / "r.json", "--batch_size", "6"))
    assert re.fullmatch(r"\S+: error: out of memory in scoring: --batch_size 6 sequences at "
                        r"once; try --batch_size 3", line), line
    assert list(tmp_path.iterdir()) == []


def test_eval_on_a_full_disk_prints_the_scores_and_saves_them_beside_the_model(
        world, monkeypatch, tmp_path, capsys):
    model = tmp_path / "model"  # a model folder of the test's own, to write beside
    M.Qwen3.from_pretrained(world / "model").save_pretrained(model)
    write_byte_tokenizer(model / "tokenizer.json")
    full = tmp_path / "full"
    full.mkdir()
    (full / "r.json").write_text("earlier results")
    write_bytes = Path.write_bytes

    def full_there(self, data):
        if self.parent == full:
            write_bytes(self, data[:len(data) // 2])
            raise FULL
        return write_bytes(self, data)
    monkeypatch.setattr(Path, "write_bytes", full_there)
    argv = eval_argv(world, full / "r.json")
    argv[1] = model
    line = stopped_with(ev.main, argv)
    assert re.fullmatch(rf"\S+: error: {re.escape(str(full))}: no room left on its disk for the "
                        rf"results file \(it needed {SIZE}, {SIZE} free\); the scores are "
                        rf"printed above, and the whole results file went to "
                        rf"{re.escape(str(model / 'r.json'))} instead \(move it to "
                        rf"{re.escape(str(full / 'r.json'))} once there is room\)", line), line
    printed = capsys.readouterr().out
    gsm8k = json.loads((model / "r.json").read_text())["tasks"]["gsm8k"]["metrics"]
    assert f"gsm8k_flexible {100 * gsm8k['exact_match_flexible']:.1f}" in printed
    assert "(not written to" in printed
    assert sorted(p.name for p in full.iterdir()) == ["r.json"]  # no .tmp- file
    assert (full / "r.json").read_text() == "earlier results"  # nothing written before touched


# plot.py and the lab's tables ---------------------------------------------------------------------


def test_plot_and_the_labs_tables_on_a_full_disk_are_one_line(world, straight, tmp_path,
                                                              monkeypatch):
    pytest.importorskip("matplotlib")
    import plot
    (tmp_path / "curves.png").write_bytes(b"an earlier picture")
    monkeypatch.setattr(Path, "write_bytes", half_then_full(Path.write_bytes))
    line = stopped_with(plot.main, [straight, "-o", tmp_path / "curves.png"])
    assert re.fullmatch(rf"\S+: error: {re.escape(str(tmp_path))}: no room left on its disk for "
                        rf"the figure \(it needed {SIZE}, {SIZE} free\); free space there and "
                        "run it again", line), line
    assert [p.name for p in tmp_path.iterdir()] == ["curves.png"]
    assert (tmp_path / "curves.png").read_bytes() == b"an earlier picture"
    # the lab's settings and tables are written whole the same way (resources.write_whole)
    lab = load_script("runs/lab.py")
    line = stopped_with(lab.check_settings, lab.get_args(["--mini", "--out", str(tmp_path)]))
    assert re.fullmatch(rf"\S+: error: {re.escape(str(tmp_path))}: no room left on its disk for "
                        rf"lab\.json \(it needed {SIZE}, {SIZE} free\); free space there and run "
                        "it again", line), line
    assert [p.name for p in tmp_path.iterdir()] == ["curves.png"]


# A real full disk: a small tmpfs ------------------------------------------------------------------


@pytest.fixture
def small_disk(tmp_path):
    """A folder on its own 4 MiB tmpfs (mount needs root; skipped where it fails); resized with
    grow(size)."""
    folder = tmp_path / "small"
    folder.mkdir()
    mounted = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=4m", "tmpfs", str(folder)],
                             capture_output=True)
    if mounted.returncode:
        pytest.skip(f"cannot mount a tmpfs here: {mounted.stderr.decode().strip()}")

    def grow(size):
        subprocess.run(["mount", "-o", f"remount,size={size}", str(folder)], check=True)
    try:
        yield folder, grow
    finally:
        subprocess.run(["umount", "-l", str(folder)], check=False)


def test_a_real_full_disk(world, straight, small_disk):
    """Training into a 4 MiB disk: the space check refuses it (3 checkpoints of 1.5 MiB at once);
    past the check, the third checkpoint finds the disk full; after the disk grows, --resume
    continues to the weights of the run that never stopped. Then eval.py --out and --report."""
    disk, grow = small_disk
    out = disk / "run"
    argv = sft_argv(world, out, "--steps", "6")
    line = stopped_with(train_sft.main, argv)
    assert re.search(r"its disk has 4\.0 MiB free, and this run writes up to", line), line
    line = stopped_with(train_sft.main, argv + ["--skip_space_check"])
    assert re.search(rf"{re.escape(str(out / 'checkpoints'))}: no room left on its disk for the "
                     r"checkpoint of step 6 .* kept \S+step_0000004 \(4 steps done\); continue "
                     r"with: .* --resume$", line), line
    assert sorted(p.name for p in (out / "checkpoints").iterdir()) == ["step_0000002",
                                                                     "step_0000004"]
    assert leftovers(out) == []
    grow("16m")
    continue_with(line, train_sft.main)
    six = world / "straight_6"
    train_sft.main([str(a) for a in sft_argv(world, six, "--steps", "6")])
    same_weights(out, six)

    # eval.py --out into a full disk: the scores printed, the file beside the model, no half
    # file; --report into a file there: cut back
    filler = disk / "filler"
    with open(filler, "wb") as f:
        try:
            while True:
                f.write(b"\0" * 65536)
                f.flush()
        except OSError:
            pass
    results = world / "r.json"
    ev.main([str(a) for a in eval_argv(world, results)])
    line = stopped_with(ev.main, eval_argv(world, disk / "r.json"))
    beside = world / "model" / "r.json"
    assert re.search(rf"{re.escape(str(disk))}: no room left on its disk for the results file "
                     rf".*the whole results file went to {re.escape(str(beside))} instead", line)
    assert json.loads(beside.read_text())["tasks"] == json.loads(results.read_text())["tasks"]
    beside.unlink()
    assert not list(disk.glob("*r.json*"))
    table = disk / "table.md"
    done = subprocess.run(f"{sys.executable} eval.py --report {results} > {table}", shell=True,
                          cwd=ROOT, capture_output=True, text=True)
    assert done.returncode == 1 and done.stderr.count("\n") == 1, done.stderr
    assert re.fullmatch(rf"eval\.py: error: {re.escape(str(disk))}: no room left on its disk "
                        rf"for the printed text \(it needed {SIZE}, {SIZE} free\); free space "
                        r"there and run it again", done.stderr.strip())
    assert table.read_bytes() == b""  # cut back: no half of a table
