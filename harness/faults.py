"""
What a fault costs a training run: nothing that was saved. One run at a time in an --out_dir, a
stop that says what was kept and the command that continues, metrics.jsonl repaired after a crash,
and the flags that only the model and the data can check, checked before any work.

    hold_out_dir     a lock in --out_dir for the life of the run (rank 0): a second run or
                     --resume into it is refused, naming the live process. fcntl.flock's lock
                     belongs to the open file, so the OS drops it when the process ends, however
                     it ends: a killed run never leaves a stale lock
    training_run     a trainer's main(): SIGINT (Ctrl-C) ends it at once, SIGTERM (a scheduler's
                     notice before preemption) at the end of the current step, after a checkpoint
                     (stop_requested), each in one line (cli.stops_cleanly); then the lock goes
    what_ran_out     out of disk or memory in one line: the folder and the bytes, or the phase
                     and its flags with values to try; the command that continues
    start_metrics    metrics.jsonl as the run starts: on --resume the lines up to its checkpoint,
                     a last line torn by a crash or power cut dropped; the run's flags beside it
    check_run_fits   every sequence a step samples fits the model's positions; the periodic eval
                     has its --eval_shots examples
"""
import fcntl
import json
import os
import socket
import sys
import time
import traceback
from pathlib import Path

import torch.distributed as dist

from eval import gsm8k_prompt, load_gsm8k, most_mmlu_shots
from harness.cli import RECEIVED, Stop, command_line, fail, stops_cleanly
from harness.parallel import rank_and_world, reduced
from harness.resources import NoRoom, out_of_memory, peak_memory, write_whole
from model import read_json

LOCK = ".lock"  # in --out_dir while a run writes there: its process id and host (and torchrun)
FLAGS = "args.json"  # in --out_dir: the flags of the run that wrote metrics.jsonl

RUN = {}  # the run this process trains: out_dir, its flags, and on rank 0 the lock's open file


# One run per --out_dir ----------------------------------------------------------------------------


def hold_out_dir(args):
    """Lock args.out_dir for this run, or end in one line naming the process that holds it. Rank 0
    takes the lock; under torchrun the other processes wait until it has (wait_for_rank_0)."""
    out = Path(args.out_dir)
    if rank_and_world()[0] != 0:
        RUN.update(out_dir=out, flags=run_flags(args))  # for this process's one-line stops
        return wait_for_rank_0(out / LOCK)
    created = not out.exists()
    try:
        out.mkdir(parents=True, exist_ok=True)
        lock = take_lock(out / LOCK)
    except OSError as e:
        fail(f"--out_dir {out}: cannot write there ({e.strerror or e})")
    if lock is None:
        holder = (out / LOCK).read_text(errors="replace").split("\n")[0] or "another process"
        fail(f"--out_dir {out}: another run ({holder}) is writing there; wait for it to end, "
             "or choose another --out_dir")
    os.write(lock, f"process {os.getpid()} on {socket.gethostname()}\n{torchrun_job()}\n".encode())
    RUN.update(out_dir=out, lock=lock, created=created, flags=run_flags(args))


def torchrun_job() -> str:
    """What every process of this torchrun (this attempt of it) shares and no other run does: its
    rendezvous. Empty without torchrun."""
    names = ("TORCHELASTIC_RUN_ID", "MASTER_ADDR", "MASTER_PORT", "TORCHELASTIC_RESTART_COUNT")
    return " ".join(os.environ.get(name, "") for name in names).strip()


def wait_for_rank_0(lock: Path, patience=600):
    """Under torchrun, a process other than rank 0 waits for rank 0 to hold the lock (its file
    names this torchrun). If rank 0 cannot, it ends, and torchrun sends the others SIGTERM: they
    end then, quietly (rank 0 said why), rather than wait in the process group that rank 0 never
    joins."""
    began = time.time()
    while not (lock.exists() and torchrun_job() in lock.read_text(errors="replace")):
        if RECEIVED:
            raise Stop(min(RECEIVED))
        if time.time() - began > patience:
            fail(f"--out_dir {lock.parent}: rank 0 has not locked it in {patience} s")
        time.sleep(0.05)


def take_lock(path: Path):
    """The open, locked file at path; None while another process holds it. A run removes its lock
    file as it ends, so a file opened just then is no longer the lock: open the new one."""
    while True:
        fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)
            return None
        try:
            if os.stat(path).st_ino == os.fstat(fd).st_ino:
                os.ftruncate(fd, 0)
                return fd
        except FileNotFoundError:
            pass
        os.close(fd)


def release_out_dir():
    """The run's end, however it ended: the lock goes, and a start that failed before writing
    anything leaves no empty folders (checkpoints/, an --out_dir it made) behind."""
    if "lock" not in RUN:  # not rank 0, or it never held the lock
        RUN.clear()
        return
    out = RUN["out_dir"]
    (out / LOCK).unlink(missing_ok=True)  # before the lock is released: see take_lock
    os.close(RUN["lock"])
    for folder in [out / "checkpoints", *[out] * RUN["created"]]:
        try:
            folder.rmdir()  # only if empty
        except OSError:
            pass
    RUN.clear()


def run_flags(args) -> dict:
    """The flags that make a run what it is (all but --resume, --overwrite and
    --skip_space_check), as JSON reads them back (tuples as lists)."""
    flags = json.loads(json.dumps(vars(args), default=str))
    return {k: v for k, v in flags.items() if k not in ("resume", "overwrite", "skip_space_check")}


def same_flags(args) -> bool:
    """Was the run whose metrics.jsonl is in --out_dir started with these flags: is this the
    same command?"""
    try:
        return read_json(Path(args.out_dir) / FLAGS) == run_flags(args)
    except (OSError, ValueError):
        return False


# Stops: what was kept, the command that continues -------------------------------------------------


def last_checkpoint(out_dir):
    """The newest checkpoint folder in out_dir/checkpoints, or None."""
    saved = sorted(Path(out_dir, "checkpoints").glob("step_*"))
    return saved[-1] if saved else None


def how_to_continue(out_dir) -> str:
    """After a step that failed: the last checkpoint and --resume, or that there is none yet."""
    saved = last_checkpoint(out_dir)
    if saved is None:
        return "no checkpoint was saved yet: start again with --overwrite"
    return f"the last good checkpoint is {saved}: continue with --resume"


def what_training_kept(script, argv, changes=None) -> str:
    """The rest of a stopped trainer's line: its last checkpoint and the command that continues
    from it, or that there is none and the same command starts again. changes: flags that the
    command gives new values (a lower --gen_batch_size): then --resume starts it over, since a
    run stopped before its first checkpoint is refused other flags without it."""
    if not RUN:
        return f"it had not started; run it again with: {command_line(script, argv)}"
    saved = last_checkpoint(RUN["out_dir"])
    if saved is None:
        how = ("with the same command (or --resume, which starts over)" if not changes else
               "(--resume starts it over) with")
        return (f"no checkpoint in {RUN['out_dir']} yet, nothing to continue from; start it "
                f"again {how}: {command_line(script, argv, bool(changes), changes)}")
    return (f"kept {saved} ({int(saved.name.removeprefix('step_'))} steps done); continue with: "
            f"{command_line(script, argv, resume=True, changes=changes)}")


def training_run(main):
    """A trainer's main(argv): stopped in one line (cli.stops_cleanly), SIGTERM at the end of a
    step, and out of disk or memory in one line too (what_ran_out); the --out_dir lock released
    however it ends."""
    return stops_cleanly(main, kept=what_training_kept, sigterm_waits=True,
                         at_end=release_out_dir, ran_out=what_ran_out)


# Out of disk, out of memory: one line, the flags to lower, the command that continues ----------

# What ran out of memory, told by the trainer's function in the traceback: the phases of a step
MEMORY_PHASES = {"setup": "loading the models", "starting_model": "loading the models",
                 "frozen_model": "loading the models", "collect_states": "sampling",
                 "fit_states": "the update", "apply_reward": "the update",
                 "apply_teacher": "the update", "optimizer_step": "AdamW's update",
                 "periodic_eval": "the periodic eval"}


def what_ran_out(script, argv, error):
    """A trainer's line when it ran out of disk (resources.NoRoom: its folder, the bytes) or of
    memory (its phase, the peak, the flags to lower with their values and values to try); then
    the last checkpoint and the command that continues from it. None for any other error."""
    if not RUN:  # (the run had not begun)
        return None
    if isinstance(error, NoRoom):
        return (f"{error.problem()}; free space there (or move {RUN['out_dir']} to a larger disk "
                f"and pass its new --out_dir), then: {what_training_kept(script, argv)}")
    if not out_of_memory(error):
        return None
    names = [frame.name for frame in traceback.extract_tb(error.__traceback__)]
    phase = next((MEMORY_PHASES[name] for name in names if name in MEMORY_PHASES), None)
    advice, changes = lower_memory(phase, RUN["flags"])
    return (f"out of memory in {phase or 'the run'}{peak_memory()}: {advice}; "
            f"{what_training_kept(script, argv, changes)}")


def lower_memory(phase, flags: dict):
    """(What to lower, in words, with each flag's value and a value to try; {flag: that value}
    for the command that continues) for the phase of a step that ran out of memory."""
    sampled, micro, accum = flags["gen_batch_size"], flags["batch_size"], flags["grad_accum"]
    if phase == "sampling" and sampled > 1:
        return (f"it samples --gen_batch_size {sampled} sequences at once: try "
                f"--gen_batch_size {sampled // 2}", {"--gen_batch_size": sampled // 2})
    if phase == "the update" and micro > 1:  # smaller micro-batches, more of them: the same step
        smaller = max(d for d in range(1, micro) if micro % d == 0)
        more = accum * micro // smaller
        return (f"its micro-batches hold --batch_size {micro} questions, --grad_accum {accum} a "
                f"step: try --batch_size {smaller} --grad_accum {more}, the same "
                f"{micro * accum} questions a step",
                {"--batch_size": smaller, "--grad_accum": more})
    scored = flags["eval_batch_size"]
    if phase == "the periodic eval" and scored > 1:
        return (f"it scores --eval_batch_size {scored} sequences at once: try --eval_batch_size "
                f"{scored // 2}", {"--eval_batch_size": scored // 2})
    less_per_gpu = ("train LoRA adapters (--lora_rank 64, a new run) or shard the model over "
                    "GPUs (torchrun ... --fsdp)")
    if phase == "AdamW's update":
        return ("AdamW's state (two numbers for each trained weight) does not fit beside the "
                f"model: {less_per_gpu}", {})
    if phase == "loading the models":
        return (f"the weights do not fit on the device: {less_per_gpu}, or take a smaller "
                "--model", {})
    lower = []  # what is left to lower (in a phase not told: everything)
    if sampled > 1 and phase != "the update":
        lower.append(f"--gen_batch_size ({sampled})")
    if micro > 1 and phase != "sampling":
        lower.append(f"--batch_size ({micro}, with --grad_accum ({accum}) raised to keep the step)")
    lower.append(f"--max_new_tokens ({flags['max_new_tokens']}: shorter answers)")
    return f"lower {' or '.join(lower)}, or use a device with more memory", {}


def stop_requested() -> bool:
    """At the end of each step, asked by every process together: has SIGTERM reached any of them?
    Then all of them save a checkpoint (under FSDP each writes its shards) and stop."""
    return reduced(float("SIGTERM" in RECEIVED), op=dist.ReduceOp.MAX) > 0


# metrics.jsonl ------------------------------------------------------------------------------------


def start_metrics(path: Path, first_step: int):
    """metrics.jsonl as a run starts at first_step (rank 0): after --resume its lines up to the
    checkpoint's step, afresh none. A crash or power cut can tear the last line, the one being
    written, which is past the checkpoint's step: it is dropped. Rewritten whole (a temporary
    file, renamed), with the run's flags beside it, so that a rerun knows the same command."""
    lines = []
    if path.exists() and first_step:
        lines = path.read_text(encoding="utf-8", errors="replace").splitlines()
    kept = []
    for number, line in enumerate(lines, start=1):
        try:
            row = json.loads(line)
        except json.JSONDecodeError:
            if number < len(lines):
                fail(f"{path}:{number}: not valid JSON, a damaged metrics file (only its last "
                     "line can be torn by a crash); repair or remove that line")
            print(f"warning: {path}: its last line is torn (a crash while it was written); "
                  "dropped", file=sys.stderr)
            break
        if row["step"] <= first_step:
            kept.append(line + "\n")
    path.parent.mkdir(parents=True, exist_ok=True)
    write_whole(path, "".join(kept))
    if RUN:
        write_whole(RUN["out_dir"] / FLAGS, json.dumps(RUN["flags"], indent=1) + "\n")


# The flags that only the model and the data can check ---------------------------------------------


def check_run_fits(args, config, tokenizer):
    """Before any work: the longest sequence a step samples (the longest GSM8K prompt, train or
    test, then --max_new_tokens, and distillation's --continuation_tokens) fits in the model's
    positions; the periodic eval's tasks have --eval_shots examples for their few-shot prompts
    (eval.py checks its own --gsm8k_shots and --mmlu_shots the same way)."""
    train = load_gsm8k("train", args.data_dir)
    flag = f"--max_new_tokens {args.max_new_tokens}"
    new_tokens = args.max_new_tokens
    if getattr(args, "signal", None) == "continuation":
        flag += f" with --continuation_tokens {args.continuation_tokens}"
        new_tokens += args.continuation_tokens
    room = config.max_position_embeddings - new_tokens  # for the prompt
    # A byte-level BPE (Qwen's) has at most a token per byte: only a prompt of more bytes than
    # that room can overflow it, and only those are tokenized (all 8,800 would take seconds)
    prompts = [gsm8k_prompt(q["question"]) for q in train + load_gsm8k("test", args.data_dir)]
    longer = [prompt for prompt in prompts if len(prompt.encode()) > room]
    longest = max(map(len, tokenizer.encode_batch(longer)), default=0)
    if longest > room:
        fail(f"{flag}: with the longest GSM8K prompt's {longest} tokens, more than the model's "
             f"{config.max_position_embeddings} positions")
    tasks = args.eval_tasks if args.eval_every else ()
    if "gsm8k" in tasks and args.eval_shots > len(train):
        fail(f"--eval_shots {args.eval_shots}: more than the GSM8K train split's {len(train)} "
             "examples")
    if "mmlu" in tasks:  # each subject's first --eval_shots dev rows
        fewest = most_mmlu_shots(args.data_dir)
        if args.eval_shots > fewest:
            fail(f"--eval_shots {args.eval_shots}: more than the {fewest} MMLU dev examples some "
                 "subjects have")
