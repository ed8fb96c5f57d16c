"""
Curves of training runs, from their metrics.jsonl, in one PNG.

    python plot.py out/rl                                   # -> curves.png
    python plot.py out/rl out/sft_mild out/opd_stress -o compare.png

One panel per quantity, each run a line in its own color, so that runs of different methods share
the axes where the quantity is the same: the training loss; state_nll, on a log scale (the state
lens at a glance: SFT's dataset states sit high, RL's and OPD's own states low); each trainer's own
figures (RL: reward, pass_rate, response_len; distillation: kl and the teacher's signal figures),
those the runs hold; then each periodic-eval metric, retention and kl_to_start, point by point.
A figure no panel knows still gets a panel, under its own name.

The pieces draw any figure of runs (runs/lab.py's is made of them):

    read_metrics(path)                   a run's records, in order; a damaged line is named
    curves(runs, colors)                 {run: [records of each of its folders (seeds)]} -> Curves
    draw_panel(ax, curves, quantity)     one quantity (QUANTITIES["state_nll"], RETENTION, ...) of
                                         those curves on one matplotlib axis
    quantities_of(curves)                the quantities the curves hold, in QUANTITIES' order
    figure_of(curves, quantities)        a grid of panels, one per quantity
    pyplot()                             matplotlib's pyplot, or None: matplotlib is optional
    save_figure(fig, path, dpi)          the picture written whole (a full disk: one line)
"""
import argparse
import io
import json
import math
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Optional

from harness.cli import ArgumentParser, check_writable_file, fail
from harness.resources import write_whole

# What can be drawn --------------------------------------------------------------------------------


@dataclass(frozen=True)
class Quantity:
    """One panel's quantity: its title and y label, a log scale or not, whether it is measured
    by the periodic eval (drawn as points, joined) or at every step, and how a metrics record gives
    its value (None where the record does not hold it)."""
    name: str
    title: str
    ylabel: str
    read: Callable[[dict], Optional[float]]
    log: bool = False
    per_eval: bool = False


def figure(name: str, title: str, ylabel: str = "", scale: float = 1.0, log: bool = False,
           per_eval: bool = False) -> Quantity:
    """The quantity a record holds under `name`, times `scale` (100: a fraction in %)."""
    def read(record):
        value = record.get(name)
        return None if value is None else scale * value
    return Quantity(name, title, ylabel, read, log=log, per_eval=per_eval)


def retention(record) -> Optional[float]:
    """The mean of MMLU and TruthfulQA MC2 accuracy, in %: the two the paper's Forgetting and
    Retention average."""
    if record.get("mmlu_acc") is None or record.get("truthfulqa_mc2") is None:
        return None
    return 50 * (record["mmlu_acc"] + record["truthfulqa_mc2"])


def answer_len(record) -> Optional[float]:
    """The mean length of a step's answers in tokens: RL logs it as response_len."""
    return record.get("answer_len", record.get("response_len"))


RETENTION = Quantity("retention", "retention (mean of MMLU, TruthfulQA MC2)", "%", retention,
                     per_eval=True)

# Every figure the trainers log, in the order of the panels: the training steps' figures, then the
# periodic eval's (kl_to_start last)
QUANTITIES = {q.name: q for q in [
    figure("loss", "training loss"),
    figure("state_nll", "state NLL of the training states", "nats / token", log=True),
    figure("reward", "reward (RL: mean over the sampled answers)"),
    figure("pass_rate", "pass rate (RL: questions with a right answer)", "fraction"),
    Quantity("answer_len", "answer length (mean)", "tokens", answer_len),
    figure("zero_var_frac", "groups of equal rewards, skipped (RL)", "fraction"),
    figure("kl", "KL to the teacher (distillation) or start (RL)", "nats / token"),
    figure("signal_nll", "student NLL of the teacher's tokens", "nats / token"),
    figure("teacher_nll", "teacher NLL of its continuations", "nats / token"),
    figure("signal_answered", "continuations reaching an answer", "fraction"),
    figure("signal_correct", "continuations' answers right", "fraction"),
    figure("kept_fraction", "samples kept (SFT --states self)", "fraction"),
    figure("grad_norm", "gradient norm (before clipping)"),
    figure("gsm8k_flexible", "GSM8K accuracy (flexible)", "%", scale=100, per_eval=True),
    figure("gsm8k_strict", "GSM8K accuracy (strict)", "%", scale=100, per_eval=True),
    figure("mmlu_acc", "MMLU accuracy", "%", scale=100, per_eval=True),
    figure("truthfulqa_mc1_acc", "TruthfulQA MC1 accuracy", "%", scale=100, per_eval=True),
    figure("truthfulqa_mc2", "TruthfulQA MC2", "%", scale=100, per_eval=True),
    RETENTION,
    figure("kl_to_start", "KL to the starting model, own samples", "nats / token",
           per_eval=True),
]}
# Logged but not drawn: the schedule, the speed, RL's entropy (the same number as its state_nll);
# RL's response_len is drawn as answer_len
NOT_DRAWN = {"step", "lr", "tokens_per_s", "step_s", "entropy", "response_len"}


# Reading runs -------------------------------------------------------------------------------------


def read_metrics(path) -> list:
    """The records of a run's metrics.jsonl, in order; path: the run's folder (a trainer's
    --out_dir) or the file. A last line without its newline that is no record yet (its run is
    writing it, or stopped mid-line) is left out, with a warning that names it; a missing file
    raises FileNotFoundError, any other line that is no record ValueError, in one line."""
    path = Path(path)
    file = path / "metrics.jsonl" if path.is_dir() else path
    if not file.is_file():
        raise FileNotFoundError(f"{path}: no metrics.jsonl here (a trainer's --out_dir holds one)")
    try:
        text = file.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as e:
        raise ValueError(f"{file}: cannot be read ({e})") from None
    lines = text.splitlines()
    records = []
    for number, line in enumerate(lines, start=1):
        try:
            record = json.loads(line)
        except json.JSONDecodeError:
            record = None
        if isinstance(record, dict) and isinstance(record.get("step"), int):
            records.append(record)
        elif number == len(lines) and not text.endswith("\n"):  # MetricsLog writes whole lines
            print(f"warning: {file}: line {number} is torn (a run writing it, or stopped "
                  "mid-line): left out", file=sys.stderr)
        else:
            raise ValueError(f"{file}: line {number} is no metrics record")
    return records


@dataclass
class Curve:
    """One folder's records, drawn as one line per panel: label None for a run's further folders
    (its other seeds), so that the legend names each run once."""
    label: Optional[str]
    color: str
    records: list


def curves(runs: dict, colors: Optional[dict] = None) -> list:
    """runs: {name: [records of each of its folders]} -> one Curve per folder, each run in its color
    (colors[name], else the next of matplotlib's cycle C0, C1, ...)."""
    made = []
    for i, (name, folders) in enumerate(runs.items()):
        color = (colors or {}).get(name, f"C{i % 10}")
        made += [Curve(name if j == 0 else None, color, records)
                 for j, records in enumerate(folders)]
    return made


def quantities_of(curves: list) -> list:
    """The quantities some curve has a value of: QUANTITIES' in their order, then any other number
    the records hold (a figure added after this file), under its own name; a figure only the
    periodic eval's records (those with kl_to_start) hold is drawn point by point."""
    records = [record for curve in curves for record in curve.records]
    held = [q for q in QUANTITIES.values() if any(q.read(r) is not None for r in records)]
    others = sorted({name for r in records for name, value in r.items()
                     if name not in QUANTITIES and name not in NOT_DRAWN
                     and isinstance(value, (int, float)) and not isinstance(value, bool)})
    for name in others:
        per_eval = all("kl_to_start" in r for r in records if name in r)
        held.append(figure(name, name, per_eval=per_eval))
    return held


# Drawing ------------------------------------------------------------------------------------------


def pyplot():
    """matplotlib.pyplot, drawing to files only (the Agg backend), or None without matplotlib."""
    try:
        import matplotlib
    except ImportError:
        return None
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    return plt


def save_figure(fig, path, dpi: int):
    """The figure drawn into memory, then written whole (resources.write_whole): a full disk is
    one line naming the folder and the bytes, and an earlier picture at path stays as it was."""
    picture = io.BytesIO()
    fig.savefig(picture, format=Path(path).suffix.lstrip(".").lower(), dpi=dpi)
    write_whole(path, picture.getvalue(), what="the figure")


def draw_panel(ax, curves: list, quantity: Quantity, title: Optional[str] = None) -> bool:
    """Every curve's values of `quantity` over the steps, on `ax` (a matplotlib axis; pyplot()
    first). Returns whether any curve had a value."""
    from matplotlib.ticker import FormatStrFormatter, FuncFormatter, MaxNLocator
    drawn = False
    for curve in curves:
        points = [(r["step"], quantity.read(r)) for r in curve.records]
        points = [(step, value) for step, value in points if value is not None]
        if not points:
            continue
        steps, values = zip(*points)
        markers = dict(marker="o", markersize=3) if quantity.per_eval else {}
        ax.plot(steps, values, color=curve.color, label=curve.label, alpha=0.8, **markers)
        drawn = True
    ax.set(title=title or quantity.title, xlabel="step", ylabel=quantity.ylabel)
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))  # steps are whole numbers
    if quantity.log and drawn:  # ticks as plain numbers (5.6, not 5.6 x 10^0)
        ax.set_yscale("log")
        ax.yaxis.set_major_formatter(FormatStrFormatter("%g"))
        ax.yaxis.set_minor_formatter(FuncFormatter(  # at 0.2, 0.3 ...: only if they fit
            lambda value, _: f"{value:g}" if within_a_decade(ax) else ""))
    else:  # the values themselves, not an offset added to small ones
        ax.ticklabel_format(axis="y", useOffset=False)
    return drawn


def within_a_decade(ax) -> bool:
    """Does ax's y axis (log scale) span at most a factor of 10? Beyond, its minor ticks'
    labels would pile on top of each other, and the powers of ten are labelled anyway."""
    low, high = ax.get_ylim()
    return high <= 10 * low


def figure_of(curves: list, quantities: list, columns: int = 4):
    """A matplotlib figure: one panel per quantity on a grid `columns` wide, the runs' legend on
    the first."""
    plt = pyplot()
    rows = math.ceil(len(quantities) / columns)
    fig, axes = plt.subplots(rows, columns, figsize=(4.6 * columns, 3.4 * rows), squeeze=False,
                             layout="constrained")  # panels spaced when the figure is drawn
    for ax, quantity in zip(axes.flat, quantities):
        draw_panel(ax, curves, quantity)
    for ax in axes.flat[len(quantities):]:  # the grid's empty places
        ax.axis("off")
    axes.flat[0].legend(fontsize=8)
    return fig


# The command --------------------------------------------------------------------------------------


def main(argv=None):
    parser = ArgumentParser(description=__doc__.strip().split("\n")[0],
                            formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    parser.add_argument("runs", nargs="+", metavar="RUN",
                        help="a trainer's --out_dir (or a metrics.jsonl); each run is one line")
    parser.add_argument("-o", "--out", default="curves.png",
                        help="the figure to write (a name alone: in the current folder), "
                        "replaced if it exists; .png, or .pdf, .svg")
    args = parser.parse_args(argv)
    # Everything checked before drawing: matplotlib, the output's name and folder, the runs
    plt = pyplot()
    if plt is None:
        fail("matplotlib is not installed: pip install matplotlib (plot.py draws with it)")
    from matplotlib.backend_bases import FigureCanvasBase
    if Path(args.out).suffix.lstrip(".").lower() not in FigureCanvasBase.get_supported_filetypes():
        fail(f"-o {args.out}: not a picture's name; end it in .png (or .pdf, .svg)")
    check_writable_file(args.out, "-o")
    runs = {}
    for run in map(Path, args.runs):
        label = str(run.parent if run.name == "metrics.jsonl" else run)  # as typed: out/rl
        try:
            runs[label] = [read_metrics(run)]
        except (FileNotFoundError, ValueError) as e:
            fail(str(e))
    drawn = curves(runs)
    quantities = quantities_of(drawn)
    if not quantities:
        fail(f"{', '.join(runs)}: no figure to draw yet (metrics.jsonl holds no step)")
    # One panel per quantity, every run on each
    fig = figure_of(drawn, quantities)
    save_figure(fig, args.out, dpi=100)
    plt.close("all")
    print(f"wrote {args.out}: {len(quantities)} panels, {len(runs)} run(s)")


if __name__ == "__main__":
    main()
