"""
What every entry point shares for bad input: check it all before any work starts, and end a bad
flag or file with one line that names it, never a traceback.

    parser = ArgumentParser(description=...)
    parser.add_argument("--steps", type=positive_int)   # "--steps: must be >= 1, got 0"
    args = parser.parse_args()
    check_device(args.device)      # "error: --device cuda: CUDA is not available on this machine"
"""
import argparse
import json
import math
import os
import tempfile
from pathlib import Path

from safetensors.torch import load_file


def fail(message: str):
    """End the program with one line on stderr and exit status 1."""
    raise SystemExit(f"error: {message}")


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


def resolve_warmup(args, length: str):
    """An explicit --warmup must fit in the run; the default, 10 steps, shrinks to a shorter run."""
    if args.warmup is not None and args.warmup > args.steps:
        fail(f"--warmup {args.warmup}: longer than the run ({length})")
    args.warmup = min(DEFAULT_WARMUP, args.steps) if args.warmup is None else args.warmup


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


def progress(iterable=None, **kwargs):
    """A tqdm bar with rate and ETA on stderr, shown only on a terminal (never in logs or tests)."""
    from tqdm import tqdm
    return tqdm(iterable, **{"disable": None, "dynamic_ncols": True, **kwargs})


# Files: a damaged one is named in one line; what is written is readable by all ----------------


def read_json(path: Path) -> dict:
    try:
        return json.loads(Path(path).read_text(encoding="utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise ValueError(f"{path}: not a valid JSON file ({e})") from None


def load_safetensors(path: Path) -> dict:
    """load_file, with a file that is truncated or no safetensors at all named in one line."""
    try:
        return load_file(path)
    except Exception as e:  # safetensors' own error type, OSError, ...
        raise ValueError(f"{path}: not a readable safetensors file, truncated or damaged? "
                         f"({e})") from None


def make_readable(path: Path):
    """rw-r--r-- (folders rwxr-xr-x) under the umask, as any saved file: safetensors writes its
    own files rw-------."""
    umask = os.umask(0)
    os.umask(umask)
    path.chmod((0o777 if path.is_dir() else 0o666) & ~umask)


def read_safetensors(folder: Path) -> dict:
    """All tensors of a model folder: model.safetensors or its index's shards; never pickles."""
    index = folder / "model.safetensors.index.json"
    if index.exists():
        shards = sorted(set(read_json(index)["weight_map"].values()))
    elif (folder / "model.safetensors").exists():
        shards = ["model.safetensors"]
    else:
        raise FileNotFoundError(f"{folder}: no model.safetensors or model.safetensors.index.json "
                                "(only safetensors weights are loaded, never .bin/.pt pickles)")
    missing = [shard for shard in shards if not (folder / shard).exists()]
    if missing:
        raise FileNotFoundError(f"{folder / missing[0]}: shard named in the index is missing")
    return {name: t for shard in shards for name, t in load_safetensors(folder / shard).items()}
