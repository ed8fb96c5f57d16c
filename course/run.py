"""Your functions, trained: one of the lab's runs (runs/lab.py: its world, its base, its command)
with your exercise's functions in place of the project's, against the project's own run on the
same base and seed, and the figures side by side, the one that matters first.

    python course/run.py rl              # train_rl.py with your group_advantages, policy_loss,
                                         # state_nll (the first call also pretrains the base)
    python course/run.py opd --mini      # in miniature: seconds, and numbers that mean nothing
    python course/run.py rl --solutions  # the project's functions in your place: the same numbers

TARGET          the lab's run      your functions in it (exercise)
  sft           sft_mild           target_nll (1), eq. 5
  forgetting    sft_stress         target_nll (1); mmd2 (3) in its eval's drift
  rl            rl                 group_advantages (4), policy_loss (6), state_nll (2)
  rl_kl         rl --kl_coef 0.1   the same and k3_kl (5)
  opd           opd_mild           target_nll (1), eq. 7; state_nll (2)
  opd_stress    opd_stress         the same, from the stress teacher
  token_kl      opd_mild_token_kl  token_kl_loss (7)
  full_kl       opd_mild_full_kl   next_token_kl (8)

First your functions meet their graders (course/test_ex*.py): an exercise not written yet stops
it in one line; a function that fails a check is trained anyway, with a warning: see what your
mistake does to the run. Then `runs/lab.py --only base,RUN` makes, in --out (default
runs/out/course; what is done is skipped), the world, the tokenizer, the base, any teacher, and
the project's own run with its eval (rl_kl is no lab run: this script trains its reference the
same way). Last, the same commands run in this process with your functions swapped into the
project's modules, into OUT/bB/seedS/course/TARGET (replaced at each call) and
OUT/bB/seedS/results/course/TARGET.json, on one torch thread as the lab's steps. On one core
the base takes about 5 minutes (once), a run as long as the lab's (RL about 3 minutes).
"""
import argparse
import contextlib
import importlib
import json
import os
import shutil
import sys
from pathlib import Path
from unittest import mock

COURSE = Path(__file__).resolve().parent
ROOT = COURSE.parent
sys.path[:0] = [str(COURSE), str(ROOT / "runs"), str(ROOT)]
import grading  # noqa: E402  (the exercises, their solutions and their graders)
import lab  # noqa: E402  (runs/lab.py: the world, the bases, the runs and their commands)
import lab_table  # noqa: E402  (a run's figures)
import paper  # noqa: E402  (call_main)
from harness.cli import ArgumentParser, fail, nonnegative_int  # noqa: E402


def target(run, swaps, figure="target", flags=None):
    """A lab run, the functions swapped into it ("module.function" -> exercise), the figure
    that matters, flags changed from the lab's (its reference is then trained here)."""
    return dict(run=run, swaps=swaps, figure=figure, flags=flags or {})


SFT = {"train_sft.target_nll": "ex1_target_nll"}
RL = {"train_rl.group_advantages": "ex4_group_advantages",
      "train_rl.policy_loss": "ex6_policy_loss", "train_rl.state_nll": "ex2_state_nll"}
OPD = {"train_distill.target_nll": "ex1_target_nll", "train_distill.state_nll": "ex2_state_nll"}
TARGETS = {
    "sft": target("sft_mild", SFT),
    "forgetting": target("sft_stress", {**SFT, "harness.stats.mmd2": "ex3_mmd2"}, "forgetting"),
    "rl": target("rl", RL),
    "rl_kl": target("rl", {**RL, "train_rl.k3_kl": "ex5_k3_kl"}, flags={"kl_coef": "0.1"}),
    "opd": target("opd_mild", OPD),
    "opd_stress": target("opd_stress", OPD),
    "token_kl": target("opd_mild_token_kl", {"train_distill.token_kl_loss": "ex7_token_kl_loss"}),
    "full_kl": target("opd_mild_full_kl", {"train_distill.next_token_kl": "ex8_next_token_kl"}),
}


def get_args(argv=None):
    parser = ArgumentParser(prog="course/run.py", description=__doc__,
                            formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("target", choices=TARGETS, help="which run, with which of your functions")
    parser.add_argument("--base", type=nonnegative_int, default=1,
                        help="the lab's base (pretraining seed; default 1)")
    parser.add_argument("--seed", type=nonnegative_int, default=3,
                        help="the trainer's seed, the same for both runs (default 3)")
    parser.add_argument("--mini", action="store_true",
                        help="the lab's miniature: seconds, numbers that mean nothing")
    parser.add_argument("--solutions", action="store_true",
                        help="the project's functions in place of yours (the same numbers as "
                             "the project's run: a check of this script)")
    parser.add_argument("--out", help="the lab's folder for the world, the base, the project's "
                                      "runs and yours (default: runs/out/course; --mini: "
                                      "runs/out/course_mini)")
    args = parser.parse_args(argv)
    default_out = ROOT / "runs" / "out" / ("course_mini" if args.mini else "course")
    args.out = Path(args.out or os.path.relpath(default_out))
    return args


def say(text):
    print(f"[course] {text}", flush=True)


def swapped_in(args) -> dict:
    """{"module.function": the function to put there}: yours, checked by its grader first (an
    exercise not written stops here, before any work), or with --solutions the project's."""
    swaps = {}
    for place, exercise in TARGETS[args.target]["swaps"].items():
        function = grading.function_of(exercise, solution=args.solutions)
        try:
            failed = grading.failures(exercise, function)
        except NotImplementedError as error:
            fail(f"{error}: write it first (python -m pytest course/test_{exercise}.py grades it)")
        except Exception as error:  # noqa: BLE001  (yours crashed on the grader's inputs)
            fail(f"course/{exercise}.py: {function.__name__} raised {error!r} on its grader's "
                 f"inputs (python -m pytest course/test_{exercise}.py shows where)")
        for check, message in failed:
            say(f"warning: your {function.__name__} fails {check}: {message}")
        if failed:
            say(f"training with your {function.__name__} anyway: see what it does")
        swaps[place] = function
    return swaps


def lab_call(args, only) -> list:
    """runs/lab.py's flags for this base, seed and folder, --only these runs."""
    return ["--out", str(args.out), "--bases", str(args.base), "--seeds", str(args.seed),
            "--only", ",".join(only), "--no_plot", *(["--mini"] if args.mini else [])]


def run_steps(name, spec, lab_args, swaps=None):
    """The lab's train and eval commands for run `name` (spec: its script, flags, data, teacher),
    in this process, with swaps' functions in place of the project's; those already done are
    skipped (lab.training's rule)."""
    with contextlib.ExitStack() as stack:
        for place, function in (swaps or {}).items():
            module, attribute = place.rsplit(".", 1)
            stack.enter_context(mock.patch.object(importlib.import_module(module), attribute,
                                                  function))
        for step in lab.training(lab_args.bases[0], lab_args.seeds[0], name, spec, lab_args):
            script, *argv = step["command"]
            say(f"{step['name']}: {' '.join(map(str, [script, *argv]))}")
            code = paper.call_main(script, [str(a) for a in argv])
            if code:
                fail(f"{step['name']} failed (exit status {code})")


def prerequisites(run, own_reference) -> list:
    """runs/lab.py's --only: the base, and the project's run (its teacher comes with it); for a
    run that is no lab run (own_reference), its teacher alone."""
    teacher = lab.all_runs()[run]["teacher"]
    if own_reference:
        return ["base", *([teacher] if teacher else [])]
    return ["base", run]


@contextlib.contextmanager
def torch_threads(n):
    """n torch threads inside, as the lab's steps run (the same numbers as theirs)."""
    import torch
    before = torch.get_num_threads()
    torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(before)


def figures(folder, name, base) -> dict:
    """lab_table's figures of run `name` in OUT/bB/seedS (folder) against its base's results."""
    results = json.loads((folder / "results" / f"{name}.json").read_text())
    return lab_table.row_of(results, base, folder / name / "metrics.jsonl")


def shown(key, value) -> str:
    return lab_table.fmt(value, lab_table.digits_of(key))


def print_rows(args, spec, rows, swaps):
    """The runs' figures side by side, one line a figure, the one that matters marked."""
    yours_are = ("the project's again (--solutions)" if args.solutions
                 else "your " + ", ".join(function.__name__ for function in swaps.values()))
    flags = "".join(f" --{name} {value}" for name, value in spec["flags"].items())
    print(f"\n{args.target}: {spec['run']}{flags} on base {args.base}, seed {args.seed}; the "
          f"project's functions against yours: {yours_are}")
    widths = [max(16, len(name) + 2) for name in rows]
    print(f"{'':24}" + "".join(f"{name:>{width}}" for name, width in zip(rows, widths)))
    for key, title in lab_table.COLUMNS:
        cells = [f"{shown(key, row.get(key)):>{width}}"
                 for row, width in zip(rows.values(), widths)]
        mark = "   <- the figure that matters" if key == spec["figure"] else ""
        print(f"{title:24}" + "".join(cells) + mark)


def main(argv=None):
    args = get_args(argv)
    spec = TARGETS[args.target]
    swaps = swapped_in(args)  # before any work: an exercise not written ends here
    # The world, the base, a teacher and the project's run, as runs/lab.py makes them
    own_reference = bool(spec["flags"])  # no lab run: its reference is trained below
    lab_flags = lab_call(args, prerequisites(spec["run"], own_reference))
    say(f"the world, the base and the project's runs: runs/lab.py {' '.join(lab_flags)}")
    lab.main(lab_flags)
    lab_args = lab.get_args(lab_flags)
    lab_run = lab.all_runs()[spec["run"]]
    course_run = {**lab_run, "flags": lab.changed(lab_run["flags"], **spec["flags"])}
    folder = args.out / f"b{args.base}" / f"seed{args.seed}"
    reference = f"course/{args.target}_reference" if own_reference else spec["run"]
    yours = f"course/{args.target}"
    with torch_threads(lab_args.threads):
        if own_reference:
            run_steps(reference, course_run, lab_args)
        if (folder / yours).exists():  # your functions may have changed since: trained again
            say(f"replacing your last run, {folder / yours}")
            shutil.rmtree(folder / yours)
        (folder / "results" / f"{yours}.json").unlink(missing_ok=True)
        run_steps(yours, course_run, lab_args, swaps)
    # Both runs' figures, and a student's teacher's
    base = json.loads((args.out / f"b{args.base}" / "results" / "base.json").read_text())
    rows = {"the project's": figures(folder, reference, base),
            "yours": figures(folder, yours, base)}
    if lab_run["teacher"]:
        rows[f"teacher ({lab_run['teacher']})"] = figures(folder, lab_run["teacher"], base)
    print_rows(args, spec, rows, swaps)
    return rows

if __name__ == "__main__":
    from harness.cli import stops_cleanly
    stops_cleanly(main, kept="what finished is kept (run it again: the lab's steps are skipped, "
                  "yours runs again)")()
