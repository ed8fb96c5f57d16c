"""The paper's Table 2 from one command, on one GPU: base, mild and stress SFT, OPD from either SFT
teacher, light RL, each evaluated on the paper's subsets with its state drift from the base.

    python runs/paper.py                                  # Qwen/Qwen3-0.6B-Base, under runs/out
    python runs/paper.py --source ~/releases              # offline: data/prepare.py --source first
    python runs/paper.py --smoke --source ../shared/data  # the pipeline on a tiny model (CPU)
    python runs/paper.py --only base,sft_mild             # some rows; the table shows what exists
    python runs/paper.py --published                      # the paper's own table, with error bars

The steps, in this order; each prints its command, then runs it with this Python (one process per
step; with --in_process, its main() in this one), and the first failure stops the pipeline there:

    data        data/prepare.py --out DATA_DIR [--source DIR], unless DATA_DIR holds the files
    base        eval.py --model MODEL --limit paper (500 GSM8K, 500 MMLU, 200 TruthfulQA, seeded)
    sft_mild    train_sft.py --preset mild, then eval.py ... --drift_reference MODEL
    sft_stress  train_sft.py --preset stress, then its eval
    opd_mild    train_distill.py --teacher OUT/sft_mild (student: MODEL), then its eval
    opd_stress  train_distill.py --teacher OUT/sft_stress, then its eval
    rl          train_rl.py, then its eval
    table       eval.py --report OUT/results/base.json ... > OUT/table.md  (every score ± its
                standard error, Forgetting, Retention, MMD² with its permutation p-value; then
                each run's paired differences from the base, with 95% intervals)

Every trainer starts from MODEL with its own defaults (see its --help); --steps overrides them all.
Re-running resumes: a run whose folder holds a final model (model.safetensors, config.json,
tokenizer.json) is not trained again, one with checkpoints but no final model continues with
--resume, and a results file newer than its model is not evaluated again. OUT/pipeline.json records
--model, --smoke and --steps, and a later run with other values is refused rather than mixed in.
Ctrl-C (SIGINT) or SIGTERM is passed on to the step that runs, which stops as it would alone (a
trainer after a checkpoint, on SIGTERM), and then the pipeline stops, in one line each.

Layout: OUT/<run>/ (final model, checkpoints/, metrics.jsonl), OUT/results/<run>.json, OUT/table.md.

--smoke runs every step the same way, with tiny settings, on a random 2-layer Qwen3 that reads bytes
(a byte-level tokenizer.json, 258 tokens) built into OUT/smoke_base, on the real data: ~3 minutes on
2 CPU cores, ~20 s with --in_process (most of the 3 minutes is each new Python importing torch). Its
numbers mean nothing; it checks that the pipeline runs end to end.

Time on one H200, computed from the measured step and eval times of `bench.py --suite gpu`
(docs/performance.md): about 1.9 hours. RL 28 min (200 steps of 7.7 s: 128 sampled answers of up
to 256 tokens), each OPD 19 min (200 steps of 5.1 s), stress SFT 29 min (1,170 LoRA steps of
1.2 s), mild SFT 7 min, six final evals 10 min, the trainers' periodic GSM8K evals (--eval_every)
included. On a 24 GB RTX 3090 (a fifth of the bandwidth, a fourteenth of the bf16 throughput)
expect several times longer.
"""
import argparse
import contextlib
import io
import json
import os
import shlex
import signal
import subprocess
import sys
import tempfile
import time
import traceback
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:  # harness/, and the scripts that --in_process runs
    sys.path.insert(0, str(ROOT))
from harness.cli import (ArgumentParser, Stop, check_device, check_writable_dir,  # noqa: E402
                         fail, positive_int, stops_cleanly)
from harness.resources import write_whole  # noqa: E402

RUNS = ("base", "sft_mild", "sft_stress", "opd_mild", "opd_stress", "rl")
TASKS = "gsm8k,mmlu,truthfulqa_mc1,truthfulqa_mc2"
DATA_FILES = ("gsm8k/train.jsonl", "gsm8k/test.jsonl", "mmlu/dev.jsonl", "mmlu/test.jsonl",
              "truthfulqa/mc.jsonl")
FINAL_MODEL = ("model.safetensors", "config.json", "tokenizer.json")

# What each run trains: (script, its flags beyond --model/--out_dir/--data_dir/--device)
TRAINING = {"sft_mild": ("train_sft.py", ["--preset", "mild"]),
            "sft_stress": ("train_sft.py", ["--preset", "stress"]),
            "opd_mild": ("train_distill.py", ["--teacher", "{out}/sft_mild"]),
            "opd_stress": ("train_distill.py", ["--teacher", "{out}/sft_stress"]),
            "rl": ("train_rl.py", []),}

# --smoke: a 2-layer Qwen3 over bytes, and settings that make every step take about a second on a
# CPU
SMOKE_CONFIG = dict(vocab_size=320, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                    num_attention_heads=4, num_key_value_heads=2, head_dim=16, rope_theta=10000.0,
                    rms_norm_eps=1e-6, tie_word_embeddings=True, max_position_embeddings=16384,
                    bos_token_id=256, eos_token_id=256)
SMOKE_STEPS = 2
SMOKE_SHORT = ["--batch_size", "2", "--grad_accum", "1", "--warmup", "1", "--eval_every", "0",
               "--save_every", "1"]
SMOKE_ROLLOUT = ["--max_new_tokens", "8"]
# on top of --steps; learning rates ~100x the real ones, so that 2 steps move the model visibly
SMOKE_TRAINING = {
    "sft_mild": ["--lr", "1e-2"],
    "sft_stress": ["--lr", "5e-2"],
    "opd_mild": ["--lr", "1e-2", *SMOKE_ROLLOUT, "--states_per_rollout", "2",
                 "--continuation_tokens", "4"],
    "opd_stress": ["--lr", "1e-2", *SMOKE_ROLLOUT, "--states_per_rollout", "2",
                   "--continuation_tokens", "4"],
    "rl": ["--lr", "1e-2", *SMOKE_ROLLOUT, "--group_size", "2"],  # no reward: it stays put
}
# Short prompts (0-shot MMLU) and answers; 12 MMLU questions, so that the random base scores above 0
# there (Retention divides by it)
SMOKE_EVAL = ["--limit", "gsm8k=2,mmlu=12,truthfulqa=2", "--gsm8k_shots", "1", "--mmlu_shots", "0",
              "--max_new_tokens", "8", "--drift_prompts", "4", "--drift_max_new_tokens", "8"]

# The paper's Table 2 as published (Qwen3-0.6B-Base): accuracies on GSM8K, TruthfulQA and MMLU, of
# 500, 200 and 500 questions. Its questions and per-question scores are not published, so its
# differences can be read only unpaired.
PUBLISHED = {"base": (0.448, 0.300, 0.436),
             "mild SFT": (0.512, 0.295, 0.444),
             "stress SFT": (0.420, 0.245, 0.364),
             "OPD from the stress teacher": (0.466, 0.275, 0.430),
             "light RL": (0.472, 0.290, 0.442)}
PUBLISHED_TASKS = (("GSM8K", 500), ("TruthfulQA", 200), ("MMLU", 500))
# Its claimed gains on GSM8K: (run, against)
PUBLISHED_CLAIMS = (("mild SFT", "base"), ("OPD from the stress teacher", "stress SFT"),
                    ("light RL", "base"))


def get_args(argv=None):
    parser = ArgumentParser(description=__doc__,
                            formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out",
                        help="where everything goes (default: the repo's runs/out; --smoke: "
                             "runs/out/smoke)")
    parser.add_argument("--model", default="Qwen/Qwen3-0.6B-Base",
                        help="the base model, folder or hub id (--smoke: ignored, a tiny random "
                             "one is built)")
    parser.add_argument("--device",
                        help="passed to every step (default: theirs, cuda when there is one; "
                             "--smoke: cpu)")
    parser.add_argument("--data_dir", default=os.path.relpath(ROOT / "data"),
                        help="prepared data, shared by every step (default: the repo's data/)")
    parser.add_argument("--source",
                        help="prepare --data_dir from this local copy of the releases (offline), "
                             "if it is not prepared yet; without it, data/prepare.py downloads")
    parser.add_argument("--smoke", action="store_true",
                        help="the whole pipeline on a tiny random model, in minutes")
    parser.add_argument("--steps", type=positive_int,
                        help="training steps of every trainer (default: each trainer's own; "
                             f"--smoke: {SMOKE_STEPS})")
    parser.add_argument("--only",
                        help=f"comma-separated runs to do, of {','.join(RUNS)} (default: all)")
    parser.add_argument("--published", action="store_true",
                        help="print the paper's published Table 2 read with error bars (unpaired, "
                             "from its accuracies and numbers of questions) and exit")
    parser.add_argument("--in_process", action="store_true",
                        help="call each step's main() in this process instead of a new Python: no "
                             "isolation, but no "
                             "start-up cost per step (the tests use it for --smoke)")
    args = parser.parse_args(argv)
    if args.published:  # nothing to run, nothing written
        return args
    args.out = Path(args.out
                    or os.path.relpath(ROOT / "runs" / "out" / ("smoke" if args.smoke else "")))
    args.data_dir = Path(args.data_dir)
    if args.smoke:
        args.model = str(args.out / "smoke_base")
        args.device = args.device or "cpu"
        args.steps = args.steps or SMOKE_STEPS
    args.only = [r for r in (args.only or ",".join(RUNS)).split(",") if r]
    unknown = sorted(set(args.only) - set(RUNS))
    if unknown or not args.only:
        parser.error(f"--only: unknown run(s) {', '.join(unknown) or '(none given)'}; choose from "
                     f"{', '.join(RUNS)}")
    if args.source and not Path(args.source).is_dir():
        parser.error(f"--source {args.source}: no such folder")
    if args.device:
        check_device(args.device)
    check_writable_dir(args.out, "--out")
    return args


# --------------------------------------------------------------------------------------------------
# Running a step: print the command, run it, stop on failure


def say(text):
    print(f"[paper] {text}", flush=True)


def run_step(name, script, argv, args, stdout_to=None):
    """Run ROOT/script with argv: a new Python, or main(argv) in this one with --in_process.
    stdout_to: a file that gets its standard output (written whole, once the step succeeded)."""
    command = [sys.executable, os.path.relpath(ROOT / script), *map(str, argv)]
    shown = shlex.join(command) + (f" > {shlex.quote(os.path.relpath(stdout_to))}" if stdout_to
                                   else "")
    say(f"{name}: {shown}")
    began, captured = time.time(), io.StringIO()
    if args.in_process:
        code = call_main(script, [str(a) for a in argv], captured if stdout_to else None)
    else:
        step = subprocess.Popen(command, stdout=subprocess.PIPE if stdout_to else None, text=True)
        try:
            captured.write(step.communicate()[0] or "")
        except KeyboardInterrupt as stop:  # SIGINT or SIGTERM (cli.Stop): the step has it too,
            name = getattr(stop, "signal", "SIGINT")  # or has it now, and stops as it would
            step.send_signal(signal.Signals[name])  # alone (a trainer: at its end of step)
            step.wait()
            raise
        code = step.returncode
    stopped_by = {130: "SIGINT", -2: "SIGINT", 143: "SIGTERM", -15: "SIGTERM"}.get(code)
    if stopped_by:  # the step's own line said what it kept
        raise Stop(stopped_by)
    if code:
        fail(f"{name} failed (exit status {code}): {shown}; fix the cause and run paper.py again: "
             "what finished is skipped, a trainer continues from its last checkpoint")
    if stdout_to:
        write_whole(stdout_to, captured.getvalue())  # whole, or (a full disk) one line
    say(f"{name}: done in {time.time() - began:.0f} s")


def call_main(script, argv, stdout=None):
    """main(argv) of ROOT/script in this process; returns an exit status as a new process would."""
    import importlib
    import runpy
    redirect = contextlib.redirect_stdout(stdout) if stdout else contextlib.nullcontext()
    try:
        with redirect:
            if "/" in script:  # data/prepare.py: not an importable module name
                runpy.run_path(str(ROOT / script), run_name="prepare")["main"](argv)
            else:
                importlib.import_module(script.removesuffix(".py")).main(argv)
    except SystemExit as e:
        if e.code in (None, 0):
            return 0
        if not isinstance(e.code, int):
            print(e.code, file=sys.stderr)
        return e.code if isinstance(e.code, int) else 1
    except Exception:
        traceback.print_exc()
        return 1
    return 0


# --------------------------------------------------------------------------------------------------
# What is done already


def has_final_model(folder: Path) -> bool:
    return all((folder / name).exists() for name in FINAL_MODEL)


def has_results(path: Path, model) -> bool:
    """A readable results file, written after the model it scores (a retrained model is evaluated
    again)."""
    try:
        json.loads(path.read_text())
    except (OSError, ValueError):
        return False
    weights = Path(model) / "model.safetensors"
    return not weights.exists() or path.stat().st_mtime >= weights.stat().st_mtime


def check_settings(args):
    """OUT/pipeline.json: the settings that decide what is in OUT. Refuse to mix in a run with
    others."""
    settings = {"model": args.model if not args.smoke else "smoke", "smoke": args.smoke,
                "steps": args.steps}
    path = args.out / "pipeline.json"
    old = json.loads(path.read_text()) if path.exists() else settings
    if old != settings:
        fail(f"{args.out} holds a pipeline run with {old}, and this one asks for {settings}: "
             "use another --out (or delete that folder)")
    args.out.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(settings) + "\n")


# --------------------------------------------------------------------------------------------------
# The steps


def prepare_data(args):
    if all((args.data_dir / f).exists() for f in DATA_FILES):
        say(f"skip data: {args.data_dir} is prepared")
        return
    run_step("data", "data/prepare.py",
             ["--out", args.data_dir, *(["--source", args.source] if args.source else [])], args)


def write_byte_tokenizer(path):
    """A byte-level tokenizer.json: token i is byte i (GPT-2's byte alphabet), then <|endoftext|>
    (256) and <|im_end|> (257). Any text encodes, one token a byte."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    alphabet = sorted(pre_tokenizers.ByteLevel.alphabet())
    tok = Tokenizer(models.BPE(vocab={c: i for i, c in enumerate(alphabet)}, merges=[]))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.add_special_tokens(["<|endoftext|>", "<|im_end|>"])
    tok.save(str(path))


def build_smoke_base(args, seed=0):
    folder = Path(args.model)
    if has_final_model(folder):
        say(f"skip smoke_base: {folder} exists")
        return
    import torch
    from model import Qwen3, Qwen3Config
    say(f"smoke_base: a random {SMOKE_CONFIG['num_hidden_layers']}-layer Qwen3 (hidden "
        f"{SMOKE_CONFIG['hidden_size']}, "
        f"vocab {SMOKE_CONFIG['vocab_size']}) with a byte-level tokenizer -> {folder}")
    torch.manual_seed(seed)
    model = Qwen3(Qwen3Config(**SMOKE_CONFIG))
    with torch.no_grad():
        for name, p in model.named_parameters():
            if not name.endswith("norm.weight"):
                p.normal_(0.0, 0.02)  # Hugging Face's initializer_range; norms stay 1
    folder.mkdir(parents=True, exist_ok=True)
    # the tokenizer last: a whole model or none
    with tempfile.TemporaryDirectory(dir=folder) as tmp:
        write_byte_tokenizer(Path(tmp) / "tokenizer.json")
        model.save_pretrained(folder)
        os.replace(Path(tmp) / "tokenizer.json", folder / "tokenizer.json")


def common_flags(args):
    return ["--data_dir", args.data_dir, *(["--device", args.device] if args.device else [])]


def train(name, args):
    out_dir = args.out / name
    if has_final_model(out_dir):
        say(f"skip {name} training: {out_dir} holds its final model")
        return
    script, flags = TRAINING[name]
    flags = [f.format(out=args.out) for f in flags]
    teacher = flags[flags.index("--teacher") + 1] if "--teacher" in flags else None
    if teacher and not has_final_model(Path(teacher)):
        fail(f"{name} needs its teacher {teacher}: run {Path(teacher).name} first (e.g. --only "
             f"{Path(teacher).name},{name})")
    argv = [*flags, "--model", args.model, "--out_dir", out_dir, *common_flags(args)]
    if args.steps:
        argv += ["--steps", args.steps]
    if args.smoke:
        argv += SMOKE_SHORT + SMOKE_TRAINING[name]
    if list((out_dir / "checkpoints").glob("step_*")):
        argv.append("--resume")
    elif out_dir.exists():  # this pipeline's own folder, from a run stopped before a checkpoint
        argv.append("--overwrite")
    run_step(f"{name} training", script, argv, args)


def evaluate(name, args):
    model = args.model if name == "base" else args.out / name
    results = args.out / "results" / f"{name}.json"
    if has_results(results, model):
        say(f"skip {name} eval: {results} exists")
        return
    results.parent.mkdir(parents=True, exist_ok=True)
    argv = ["--model", model, "--tasks", TASKS, "--out", results, *common_flags(args)]
    argv += SMOKE_EVAL if args.smoke else ["--limit", "paper"]
    if name != "base":
        argv += ["--drift_reference", args.model]
    run_step(f"{name} eval", "eval.py", argv, args)


def table(args):
    """OUT/table.md from the results there, base first; rewritten when a results file is newer than
    it."""
    paths = [args.out / "results" / f"{name}.json" for name in RUNS]
    paths = [p for p in paths if p.exists()]
    out = args.out / "table.md"
    if not paths or paths[0].stem != "base":
        say("no table: the base model has no results yet")
        return
    # the first table's rows (the differences from the base follow it, after a blank line)
    rows = [line.split("|")[1].strip() for line in out.read_text().split("\n\n")[0].splitlines()[2:]
            if line.startswith("| ")] \
        if out.exists() else []
    if rows == [p.stem for p in paths] and all(out.stat().st_mtime >= p.stat().st_mtime
                                               for p in paths):
        say(f"skip table: {out} is up to date")
    else:
        run_step("table", "eval.py", ["--report", *paths], args, stdout_to=out)
    print("\n" + out.read_text(), flush=True)
    missing = [name for name in RUNS if name not in {p.stem for p in paths}]
    if missing:
        say(f"the table lacks {', '.join(missing)}: run paper.py again to add them")


def published_with_errors() -> str:
    """The paper's Table 2 read with error bars, from its accuracies and numbers of questions alone
    (markdown): each score ± lm-eval's standard error, then each claimed GSM8K gain and each run's
    Forgetting (base - run, averaged over TruthfulQA and MMLU) with its unpaired error and 95%
    interval. TruthfulQA counts as a proportion: exact for MC1; for MC2, a mean of probabilities,
    its standard error is at most that."""
    from harness.report import format_difference, format_score
    from harness.stats import average_of_differences, proportion_stderr, unpaired_difference

    def score(run, task):  # (percent, its standard error in points)
        accuracy, n = PUBLISHED[run][task], PUBLISHED_TASKS[task][1]
        return 100 * accuracy, 100 * proportion_stderr(accuracy, n)

    def difference(a, b, task):
        return unpaired_difference(*score(a, task), *score(b, task))
    lines = ["| run | " + " | ".join(f"{name} (n = {n})" for name, n in PUBLISHED_TASKS) + " |",
             "|---" * (len(PUBLISHED_TASKS) + 1) + "|"]
    for run in PUBLISHED:
        lines.append(f"| {run} | " + " | ".join(format_score(*score(run, task))
                                                for task in range(len(PUBLISHED_TASKS))) + " |")
    lines += ["", "| difference, in points | Δ ± its standard error [95% interval] |", "|---|---|"]
    for run, against in PUBLISHED_CLAIMS:
        gain = difference(run, against, 0)
        lines.append(f"| {run} - {against}, GSM8K | {format_difference(gain)} |")
    for run in list(PUBLISHED)[1:]:
        forgot = average_of_differences([difference("base", run, task) for task in (1, 2)])
        lines.append(f"| Forgetting of {run} | {format_difference(forgot)} |")
    lines.append("\n* the 95% interval excludes 0; † unpaired (the standard errors in quadrature).")
    return "\n".join(lines)


def main(argv=None):
    args = get_args(argv)
    if args.published:
        print(published_with_errors())
        return
    began = time.time()
    check_settings(args)
    prepare_data(args)
    if args.smoke:
        build_smoke_base(args)
    for name in RUNS:
        if name in args.only:
            if name != "base":
                train(name, args)
            evaluate(name, args)
    table(args)
    say(f"finished in {time.time() - began:.0f} s; everything is in {args.out}")


if __name__ == "__main__":
    stops_cleanly(main, kept="what finished is kept (run again, it is skipped, and a stopped "
                  "trainer continues from its last checkpoint)")()
