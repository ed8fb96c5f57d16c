"""
Optional experiment tracking: --wandb PROJECT sends every metrics.jsonl record to a Weights &
Biases run, --tensorboard writes it to TensorBoard event files in OUT_DIR/tensorboard, each with
the run's flags as its config. MetricsLog (training.py) sends each record as it writes it, on
rank 0 only; metrics.jsonl stays the source of truth (plot.py draws it with neither package).

    python train_rl.py --wandb my-project    # pip install wandb (W&B reads WANDB_API_KEY, ...)
    python train_rl.py --tensorboard         # pip install tensorboard; tensorboard --logdir out

Neither package is imported unless its flag is given, and then at once, when the flags are
parsed: a missing one, or a name W&B refuses, ends in one line before any work. W&B logs online
where its server answers (or WANDB_MODE says otherwise), else offline into OUT_DIR/wandb, saying
so in one line before training (upload later with `wandb sync`).
"""
import argparse
import importlib
import json
import os
import socket
import urllib.parse
from pathlib import Path

from harness.cli import fail
from harness.resources import disk_full, room_for


def add_tracking_flags(parser: argparse.ArgumentParser):
    """--wandb and --tensorboard, for training_args."""
    parser.add_argument("--wandb", metavar="PROJECT", type=wandb_project,
                        help="also send every metrics.jsonl record to this Weights & Biases "
                        "project (offline into OUT_DIR/wandb when W&B cannot be reached)")
    parser.add_argument("--tensorboard", action=TensorBoardFlag,
                        help="also write every metrics.jsonl record as TensorBoard scalars to "
                        "OUT_DIR/tensorboard")


def installed(module: str, package: str):
    """Import `module` now, or stop the parsing with one line saying how to install it."""
    try:
        importlib.import_module(module)
    except ImportError:
        raise argparse.ArgumentTypeError(f"{package} is not installed (pip install {package})")


def wandb_project(name: str) -> str:
    """--wandb's type: a project name as W&B allows one (1 to 128 characters, none of /\\#?%:),
    and wandb installed."""
    refused = sorted(set(name) & set("/\\#?%:"))
    if not name.strip() or len(name) > 128 or refused:
        raise argparse.ArgumentTypeError(f"{name!r} is no W&B project name (1 to 128 characters, "
                                         "none of / \\ # ? % :)")
    installed("wandb", "wandb")
    return name


class TensorBoardFlag(argparse.Action):
    """--tensorboard, a flag without a value that needs the tensorboard package."""

    def __init__(self, option_strings, dest, **kwargs):
        super().__init__(option_strings, dest, nargs=0, default=False, **kwargs)

    def __call__(self, parser, namespace, values, option_string=None):
        try:
            installed("torch.utils.tensorboard", "tensorboard")
        except argparse.ArgumentTypeError as e:
            parser.error(f"argument {option_string}: {e}")
        setattr(namespace, self.dest, True)


class Tracker:
    """Where MetricsLog sends each record besides metrics.jsonl: a W&B run, TensorBoard, both, or
    nowhere (no flag given, or a rank other than 0: Tracker(None))."""

    def __init__(self, args=None, first_step: int = 0):
        self.sinks = []  # (its folder in --out_dir, a function (step, {name: number}) sending one)
        if args is not None and args.wandb:
            with room_for(Path(args.out_dir, "wandb"), "W&B's run"):  # else one line: resources
                self.sinks.append((Path(args.out_dir, "wandb"), start_wandb(args)))
        if args is not None and args.tensorboard:
            folder = Path(args.out_dir, "tensorboard")
            with room_for(folder, "TensorBoard's event file"):
                self.sinks.append((folder, start_tensorboard(args, first_step)))

    def send(self, step: int, figures: dict):
        """One record's numbers (a figure written null, not finite, is left out; so is the list
        of their names). A full disk is one line naming the folder (resources.NoRoom)."""
        numbers = {name: value for name, value in figures.items()
                   if isinstance(value, (int, float)) and not isinstance(value, bool)}
        for folder, sink in self.sinks:
            with room_for(folder, f"the record of step {step}"):
                sink(step, numbers)


def wandb_server_answers(timeout: float = 5.0) -> bool:
    """Can a connection to W&B's server (WANDB_BASE_URL, else api.wandb.ai) be opened?"""
    url = urllib.parse.urlsplit(os.environ.get("WANDB_BASE_URL", "https://api.wandb.ai"))
    try:
        socket.create_connection((url.hostname, url.port or 443), timeout=timeout).close()
        return True
    except OSError:  # no network, no DNS, a firewall
        return False


def start_wandb(args):
    """A W&B run named after --out_dir, its files in OUT_DIR/wandb, the flags as its config.
    WANDB_MODE, when set, decides online or offline; else offline when the server is out of
    reach. A run W&B cannot start (no API key, say) ends here, in one line, before training."""
    import wandb
    mode = os.environ.get("WANDB_MODE")
    if mode is None and not wandb_server_answers():
        mode = "offline"
        print(f"--wandb: W&B's server cannot be reached: logging offline to "
              f"{Path(args.out_dir, 'wandb')} (upload it later: wandb sync "
              f"{Path(args.out_dir, 'wandb', 'offline-run-*')})", flush=True)
    try:
        run = wandb.init(project=args.wandb, name=Path(args.out_dir).resolve().name,
                         config=vars(args), dir=args.out_dir, mode=mode)
    except Exception as e:  # W&B's own errors: no API key, a refused project, ...
        if disk_full(e):
            raise  # one line naming the folder (Tracker's room_for)
        why = str(e).strip().splitlines()[0] if str(e).strip() else ""
        fail(f"--wandb {args.wandb}: W&B could not start a run ({type(e).__name__}: {why}); "
             "log in with `wandb login`, or run with WANDB_MODE=offline")

    def send(step, numbers):
        run.log(numbers, step=step)
    return send


def start_tensorboard(args, first_step: int):
    """A SummaryWriter on OUT_DIR/tensorboard, the flags as its text "flags". A fresh run hides
    the events an earlier run left there; a --resume hides those after its checkpoint's step (the
    steps it does again), as metrics.jsonl drops their lines."""
    from torch.utils.tensorboard import SummaryWriter
    writer = SummaryWriter(Path(args.out_dir, "tensorboard"),
                           purge_step=first_step + 1 if first_step else 0)
    flags = json.dumps(vars(args), indent=1, default=str)
    writer.add_text("flags", "    " + flags.replace("\n", "\n    "))  # markdown: a code block

    def send(step, numbers):
        for name, value in numbers.items():
            writer.add_scalar(name, value, global_step=step)
        writer.flush()  # each record on disk as it is written, as metrics.jsonl's
    return send
