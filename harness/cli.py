"""
What every entry point shares for bad input: check it all before any work starts, and end a bad
flag or file with one line that names it, never a traceback. An interrupt ends in one line too.
Long work shows a progress bar with an ETA (progress).

    parser = ArgumentParser(description=...)
    parser.add_argument("--steps", type=positive_int)   # "--steps: must be >= 1, got 0"
    args = parser.parse_args()
    check_device(args.device)   # "eval.py: error: --device cuda: CUDA is not available on ..."

    stops_cleanly(main, kept="...")()   # Ctrl-C: "eval.py: stopped by SIGINT; ...; run it again"
"""
import argparse
import functools
import math
import os
import shlex
import signal
import sys
import tempfile
import threading
from pathlib import Path


def fail(message: str):
    """End the program with one line on stderr and exit status 1, prefixed as argparse prefixes
    its errors: "train_rl.py: error: ..."."""
    raise SystemExit(error_line(message))


def error_line(message: str) -> str:
    """The one line of a program's error: "train_rl.py: error: ..." (fail's, resources.NoRoom's)."""
    return f"{os.path.basename(sys.argv[0])}: error: {message}"


class ArgumentParser(argparse.ArgumentParser):
    """argparse, except that a bad flag ends with one line (the script, the flag, what is wrong)
    instead of the usage text: who mistyped one flag should see that flag, not forty others."""

    def error(self, message):
        self.exit(2, f"{self.prog}: error: {message} (see --help)\n")



# Argument types: argparse names the flag, e.g. "argument --lr: must be > 0, got 'nan'"


def _number(kind, text, low, low_open, high=None, high_open=False):
    try:
        value = kind(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected {'an integer' if kind is int else 'a number'}, "
                                         f"got {text!r}") from None
    too_low = value <= low if low_open else value < low
    too_high = high is not None and (value >= high if high_open else value > high)
    if not math.isfinite(value) or too_low or too_high:
        bound = f"{'>' if low_open else '>='} {low}"
        if high is not None:
            bound += f" and {'<' if high_open else '<='} {high}"
        raise argparse.ArgumentTypeError(f"must be {bound}, got {text!r}")
    return value


def positive_int(text):
    return _number(int, text, 1, low_open=False)


def nonnegative_int(text):
    return _number(int, text, 0, low_open=False)


def positive_float(text):
    return _number(float, text, 0, low_open=True)


def nonnegative_float(text):
    return _number(float, text, 0, low_open=False)


def probability(text):
    """A top-p: in (0, 1]."""
    return _number(float, text, 0, low_open=True, high=1)


# Checks that need more than one flag, or the machine


def list_of(parse):
    """An argument type: a comma-separated list of values, each checked by parse, as a tuple."""
    def parse_list(text):
        items = [item for item in text.split(",") if item]
        if not items:
            raise argparse.ArgumentTypeError(f"expected a comma-separated list, got {text!r}")
        return tuple(parse(item) for item in items)
    return parse_list


def subset_of(choices):
    """An argument type: a comma-separated list of some of `choices`, returned as a tuple."""
    def parse(text):
        picked = tuple(c for c in text.split(",") if c)
        if not picked or set(picked) - set(choices):
            raise argparse.ArgumentTypeError(f"expected some of {','.join(choices)}, got {text!r}")
        return picked
    return parse


def limits_of(tasks, **named):
    """An argument type: how many questions of each task to score. 'N' for every task, a name in
    `named` (such as paper=PAPER_LIMITS, a dict per task), or 'TASK=N,...' where TASK may name
    several tasks by their common prefix ('truthfulqa' sets both MC1 and MC2). N >= 1."""
    def parse(text):
        if text in named:
            return dict(named[text])
        if text.isdigit() and int(text) > 0:
            return int(text)
        limits = {}
        for item in text.split(","):
            name, _, value = item.partition("=")
            matched = [task for task in tasks if task == name or task.startswith(name + "_")]
            if not matched or not value.isdigit() or int(value) == 0:  # 0 would score nothing
                raise argparse.ArgumentTypeError(f"bad item {item!r}: expected N, "
                                                 f"{', '.join(map(repr, named))} or TASK=N, "
                                                 "with N >= 1")
            limits.update({task: int(value) for task in matched})
        return limits
    return parse


def check_device(device: str, flag: str = "--device"):
    """A device torch knows, and CUDA only where there is CUDA."""
    import torch
    try:
        kind = torch.device(device).type
    except RuntimeError:
        fail(f"{flag}: {device!r} is not a device (cpu, cuda, cuda:1, ...)")
    if kind == "cuda" and not torch.cuda.is_available():
        fail(f"{flag} {device}: CUDA is not available on this machine (use --device cpu)")
    if kind not in ("cpu", "cuda", "mps"):
        fail(f"{flag} {device}: only cpu and cuda are supported")


def check_writable_dir(folder, flag: str):
    """Create `folder` if needed and prove that a file can be written there, before any work."""
    folder = Path(folder)
    try:
        folder.mkdir(parents=True, exist_ok=True)
        with tempfile.NamedTemporaryFile(dir=folder, prefix=".write-test-"):
            pass
    except OSError as e:
        fail(f"{flag} {folder}: cannot write there ({e.strerror or e})")


def check_writable_file(path, flag: str):
    """The file can be (re)written: its folder is writable, and it is not a folder itself."""
    path = Path(path)
    if path.is_dir():
        fail(f"{flag} {path}: is a folder, expected a file name")
    check_writable_dir(path.parent if str(path.parent) else Path("."), flag)
    if path.exists() and not os.access(path, os.W_OK):
        fail(f"{flag} {path}: the file exists and cannot be written")


def check_other_model(flag: str, name: str, other_flag: str, other: str):
    """A model flag that must name another model than other_flag does (a --teacher is not the
    student): the same name, or the same folder by another path, is refused."""
    folders = Path(name).is_dir() and Path(other).is_dir()
    same = os.path.samefile(name, other) if folders else name == other
    if same:
        fail(f"{flag} {name}: is {other_flag} itself; it must be another model")


def load_model(name, flag: str, device="cpu", dtype=None, like=None, base=None):
    """(model, tokenizer) from a folder or hub id, for the flag that named it: a missing or
    damaged model, or weights that hold NaN, end in one line naming the flag. A LoRA adapter's
    folder (PEFT's, such as a LoRA run's OUT_DIR/adapter) is its base model, named by `base`
    (--base_model) or else by its config, with the adapter merged in (harness/adapter.py).
    like=(who, model, tokenizer): a model compared with that one token by token (a teacher with
    its student, a model with its drift reference) must share its vocabulary, or that is one line
    too."""
    import torch
    from harness.adapter import adapter_base, is_adapter, merge_adapter
    from model import Qwen3, Tokenizer
    if base is not None and not is_adapter(name):
        fail(f"--base_model {base}: {flag} {name} is no LoRA adapter folder (it has no "
             "adapter_config.json); give --base_model only with an adapter")
    try:
        if is_adapter(name):  # its base model (itself perhaps an adapter), the adapter merged in
            model, tokenizer = load_model(base or adapter_base(name), f"{flag} {name}: its base "
                                          "model", device=device, dtype=dtype)
            merge_adapter(model, name)
        else:
            tokenizer = Tokenizer.from_pretrained(name)  # first: it is quick to find broken
            model = Qwen3.from_pretrained(name, device=device, dtype=dtype or torch.float32)
    except (FileNotFoundError, ValueError) as e:
        fail(f"{flag}: {e}")
    if not all(torch.isfinite(p).all() for p in model.parameters()):
        fail(f"{flag} {name}: its weights hold NaN or infinite values, so every number it gave "
             "would be meaningless")
    if like is not None:
        who, other, other_tokenizer = like
        same = tokenizer.tok.get_vocab(True) == other_tokenizer.tok.get_vocab(True)
        if not same or model.config.vocab_size != other.config.vocab_size:
            fail(f"{flag} {name}: its tokenizer differs from that of {who}; the two models are "
                 "compared token by token, so they must share one vocabulary")
    return model, tokenizer


def progress(iterable=None, **kwargs):
    """A tqdm bar with rate and ETA on stderr, shown only on a terminal (never in logs or tests).
    tqdm comes with huggingface_hub."""
    from tqdm import tqdm
    return tqdm(iterable, **{"disable": None, "dynamic_ncols": True, **kwargs})


def finite_or_null(x):
    """(x with every NaN or infinite float in its dicts and lists replaced by None, how many were).
    JSON has no NaN: a results or metrics file holds null there, and whoever writes it says why."""
    if isinstance(x, float) and not math.isfinite(x):
        return None, 1
    if isinstance(x, (dict, list)):
        items = x.items() if isinstance(x, dict) else enumerate(x)
        cleaned = {k: finite_or_null(v) for k, v in items}
        found = sum(n for _, n in cleaned.values())
        values = {k: v for k, (v, _) in cleaned.items()}
        return (values if isinstance(x, dict) else list(values.values())), found
    return x, 0



# Interrupts: one line, saying what was kept and the command that continues ----------------------


class Stop(KeyboardInterrupt):
    """The stop a signal asked for. A KeyboardInterrupt, so that what cleans up after Ctrl-C
    (subprocess, tqdm) cleans up after SIGTERM's stop too."""

    def __init__(self, signal_name: str):
        super().__init__(signal_name)
        self.signal = signal_name


RECEIVED = set()  # the signals this process received in the current main(): {"SIGTERM"}, ...


def stops_cleanly(main, kept, sigterm_waits=False, at_end=None, ran_out=None):
    """main(argv) of a script, ended by SIGINT (Ctrl-C) or SIGTERM with one line on stderr and exit
    status 128 + the signal's number, instead of a traceback: what was kept, and the command that
    continues. kept: a text (and the same command runs it again), or a function (script, argv) ->
    the rest of the line (a trainer's: its last checkpoint and the command with --resume).
    sigterm_waits: SIGTERM only notes the stop, which a trainer makes at the end of its step
    (faults.stop_requested). at_end: run however main ended (a trainer's lock goes). ran_out: a
    function (script, argv, error) -> the line for an error that is running out of disk or
    memory, None for any other (a trainer's: faults.what_ran_out). Under torchrun every process
    stops and rank 0 alone says so."""
    script = Path(getattr(sys.modules.get(main.__module__), "__file__", None) or sys.argv[0])
    if main.__module__ == "__main__":  # the script as it was typed
        script = Path(sys.argv[0])

    @functools.wraps(main)
    def run(argv=None):
        argv = sys.argv[1:] if argv is None else [str(a) for a in argv]
        previous = catch_signals(sigterm_waits)
        try:
            return main(argv)
        except BaseException as error:
            line = ran_out(script, argv, error) if ran_out else None
            if line:  # out of disk or memory: one line, from the process that ran out
                raise SystemExit(f"{script.name}: error: {line}") from None
            name = getattr(error, "signal", "SIGINT" if isinstance(error, KeyboardInterrupt)
                           else None)
            rank = int(os.environ.get("RANK", 0))  # parallel.rank_and_world's, without torch
            if name is None and RECEIVED and rank != 0 and not isinstance(error, SystemExit):
                name = min(RECEIVED)  # a stop elsewhere broke this process's collective call
            if name is None:  # an error of the program's own: as it is
                raise
            if rank == 0:
                rest = kept(script, argv) if callable(kept) else (
                    f"{kept}; run it again with: {command_line(script, argv)}")
                print(f"{script.name}: stopped by {name}; {rest}", file=sys.stderr, flush=True)
            raise SystemExit(128 + signal.Signals[name].value) from None
        finally:
            for signum in previous:  # nothing stops the end itself
                signal.signal(signum, signal.SIG_IGN)
            if at_end:
                at_end()
            for signum, handler in previous.items():
                signal.signal(signum, handler)
            RECEIVED.clear()
    return run


def catch_signals(sigterm_waits: bool) -> dict:
    """Handle SIGINT and SIGTERM (from the main thread, the only one that can; a signal the
    process was started ignoring, as a background job ignores SIGINT, stays ignored). Returns the
    handlers they replace."""
    if threading.current_thread() is not threading.main_thread():
        return {}
    previous = {s: signal.getsignal(s) for s in (signal.SIGINT, signal.SIGTERM)}
    handlers = {signal.SIGINT: stop_now, signal.SIGTERM: note if sigterm_waits else stop_now}
    for signum, handler in handlers.items():
        if previous[signum] not in (signal.SIG_IGN, None):
            signal.signal(signum, handler)
    return {s: h for s, h in previous.items() if h is not None}


def stop_now(signum, frame):
    """Stop where the program is. Further signals are ignored while it ends (torchrun passes a
    Ctrl-C on to its processes, which had it already from the terminal)."""
    note(signum, frame)
    for s in (signal.SIGINT, signal.SIGTERM):
        signal.signal(s, signal.SIG_IGN)
    raise Stop(signal.Signals(signum).name)


def note(signum, frame):
    RECEIVED.add(signal.Signals(signum).name)


def command_line(script, argv, resume=False, changes=None) -> str:
    """The command that runs script with argv again (under torchrun, a torchrun command); with
    resume, continuing the run (--resume in place of --overwrite); changes: {flag: value} to give
    (a lower --gen_batch_size after running out of memory)."""
    argv = with_flags(argv, changes or {})
    if resume:
        argv = [a for a in argv if a != "--overwrite"]
        if "--resume" not in argv:
            argv.append("--resume")
    launcher = ["python"]
    world = int(os.environ.get("WORLD_SIZE", 1))
    if world > 1:
        per_node = int(os.environ.get("LOCAL_WORLD_SIZE", world))
        nodes = [f"--nnodes={world // per_node}"] if world > per_node else []
        launcher = ["torchrun", *nodes, f"--nproc_per_node={per_node}"]
    return shlex.join([*launcher, str(script), *argv])


def with_flags(argv, changes: dict) -> list:
    """argv with each flag of changes ({"--batch_size": 4}) set to its value: given at the end,
    and taken out where argv gave it ("--batch_size 8" or "--batch_size=8")."""
    kept = []
    values = iter(argv)
    for arg in values:
        flag, equals, _ = arg.partition("=")
        if flag not in changes:
            kept.append(arg)
        elif not equals:
            next(values, None)  # its value, the next argument
    return kept + [str(item) for flag, value in changes.items() for item in (flag, value)]
