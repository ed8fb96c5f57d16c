"""The lab: the paper's findings on a laptop CPU. A synthetic world, tiny Qwen3 bases pretrained on
it from scratch, then the paper's six runs with the project's own trainers and eval.py, over
several bases and seeds, from one command.

    python runs/lab.py                  # bases 1,2 x seeds 3,4,5: runs/out/lab/table.md, lab.png
    python runs/lab.py --bases 1 --seeds 3      # one base, one seed (about 10 minutes)
    python runs/lab.py --study distill  # and the distillation study: distill.md, distill.png
    python runs/lab.py --mini           # a miniature of all of it in about a minute (the tests)

The steps; each prints its command and how long it took, and is skipped when done:

    world       OUT/data: the world in data/prepare.py's layout (runs/lab_world.py), GSM8K train
                solutions in the base's style A; OUT/data_stress: the stress data (the base's own
                sloppy style A, a third in style B); for the study's teachers OUT/data_b (style
                B), OUT/data_mixed (2/3 in style B, 1/3 in A) and OUT/data_slip (style A, most
                problems misread: the second number taken for the first)
    tokenizer   OUT/tokenizer.json: a byte-level BPE trained on the world's text
    for each base B (--bases; a base is a pretraining seed: its initialisation and its corpus):
      pretrain  OUT/bB/base: a tiny Qwen3 (4 layers, width 128) trained from scratch on packed
                world text, a plain next-token loop (below), saved as a Hugging Face Qwen3 folder
      base eval eval.py on the base: OUT/bB/results/base.json
      for each seed S (--seeds: the trainers' --seed), in OUT/bB/seedS/:
        sft_mild    train_sft.py on style-A gold solutions: few steps, small lr
        sft_stress  train_sft.py on the stress data, at a larger lr: the paper's stress
                    teacher's profile (its target a few points below the base's, 10-25% of
                    retention lost)
        opd_mild    train_distill.py --teacher OUT/bB/seedS/sft_mild (student: the base)
        opd_stress  train_distill.py --teacher OUT/bB/seedS/sft_stress
        rl          train_rl.py
        sft_control the positive control: the stress data, gently (it forgets 2 to 5 points)
        each then eval.py --drift_reference OUT/bB/base: OUT/bB/seedS/results/<run>.json
        --study distill adds the STUDY runs (below): the distillation matrix (the three
        signals x on- and off-policy states, from either teacher) and a family of teachers
        (sft_mixed, sft_slip, sft_stress_lora), each with its OPD student
    table       OUT/table.md, OUT/table.json (per run, base and seed; mean ± std over every base
                and seed; the findings, each on every base; the instruments' minimum detectable
                forgetting; the paper's question of its stress teacher) and OUT/lab.png; with
                --study distill also OUT/distill.md and OUT/distill.png (runs/lab_table.py)

Each step runs in its own process, forked from this one (no torch import per step), --jobs of them
at once (default: one per CPU core), each on one torch thread: results do not depend on --jobs. A
step's output goes to OUT/logs/<step>.log. The trainers and eval.py are the project's, unchanged,
driven by flags (RUNS, STUDY, COMMON, LAB_EVAL below): the command printed for each step can be
pasted. Resuming: a run whose folder holds a final model is not trained again, one with checkpoints
continues with --resume, one interrupted before its first checkpoint starts over (--overwrite), and
a results file newer than its model is kept. OUT/lab.json records the settings, the commit and the
torch version; a later call with other settings is refused, except that a run's own flags may
change while no seed holds that run (delete OUT/b*/seed*/<run> and its results to rerun it).

Seeds: the lab's settings (OPD's above all: a greedy teacher, --lr 1e-4; the stress and control
recipes) and its world (the study's teachers, the facts' long tail) were chosen on bases 0, 3, 4
with seeds 0, 1, 2 (TUNING); the default call reports bases 1, 2 and seeds 3, 4, 5, never used
for a choice.
"""
import argparse
import importlib
import itertools
import json
import math
import multiprocessing
import multiprocessing.connection
import os
import random
import shlex
import shutil
import socket
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import lab_table  # noqa: E402
import lab_world  # noqa: E402
import paper  # noqa: E402  (its has_final_model, has_results, call_main)
from harness.cli import fail  # noqa: E402  (paper.py put the project on the path)
from harness.resources import room_for, size, write_whole  # noqa: E402

ROOT = paper.ROOT
SIX = paper.RUNS  # the paper's six rows: base, sft_mild, sft_stress, opd_mild, opd_stress, rl
TUNING = dict(bases=[0, 3, 4], seeds=[0, 1, 2])  # where the settings were chosen: not reported
BASES, SEEDS = "1,2", "3,4,5"  # the default call: never used for a choice
BUDGET_MINUTES = dict(default=45, one=15, study=60)  # 2 CPU cores; printed at the end of a call

# The base model: a Qwen3 as small as the world allows (0.9M parameters)
MODEL = dict(hidden_size=128, intermediate_size=384, num_hidden_layers=4, num_attention_heads=4,
             num_key_value_heads=2, head_dim=32, rope_theta=10000.0, rms_norm_eps=1e-6,
             tie_word_embeddings=True, max_position_embeddings=1024)
VOCAB = 768
# Pretraining: documents of each kind in these proportions, packed into windows of SEQ tokens
MIX = {"target": 5, "facts": 1, "mmlu": 2, "truthfulqa": 2}
PRETRAIN = dict(tokens=2_500_000, seq=128, batch=32, lr=3e-3, warmup=100, min_lr=3e-4)

# What each run trains: its script, its data (OUT/<data>), its teacher (a run of the same base and
# seed) and its flags beyond --model/--out_dir/--data_dir/--seed/--teacher. The periodic eval
# scores the target and both retention tasks (100 questions each)
COMMON = ["--device", "cpu", "--grad_accum", "1", "--eval_shots", "0", "--eval_limit", "100",
          "--eval_tasks", "gsm8k,mmlu,truthfulqa_mc2"]
# The stress SFT, with the paper's stress teacher's profile (its target a few points below its
# base's, 10-25% of retention lost; chosen on TUNING): the stress data (the base's own sloppy
# style A, a third of it in style B) for 60 steps at lr 5e-4. The positive control, a gentle
# stress designed to forget a little (2 to 5 points): the same data, 120 steps at lr 1e-4
STRESS = ["--steps", "60", "--batch_size", "16", "--lr", "5e-4", "--warmup", "6",
          "--max_new_tokens", "64", "--eval_every", "20", "--save_every", "20"]
CONTROL = ["--steps", "120", "--batch_size", "16", "--lr", "1e-4", "--warmup", "12",
           "--max_new_tokens", "64", "--eval_every", "30", "--save_every", "30"]
# Hard SFT: the study's teachers, each trained as the lab's first stress teacher was (style B)
HARD = ["--steps", "200", "--batch_size", "16", "--lr", "1e-3", "--warmup", "10",
        "--max_new_tokens", "64", "--eval_every", "40", "--save_every", "40"]
# OPD: the teacher continues up to 64 tokens (enough to reach '#### N') from 2 random prefix
# states of each of the student's answers, greedily (--teacher_temperature 0: chosen on TUNING)
OPD = ["--steps", "40", "--batch_size", "16", "--lr", "1e-4", "--warmup", "4",
       "--max_new_tokens", "64", "--states_per_rollout", "2", "--continuation_tokens", "64",
       "--teacher_temperature", "0", "--eval_every", "10", "--save_every", "10"]


def run(script, flags, data="data", teacher=None):
    return dict(script=script, flags=flags, data=data, teacher=teacher)


def changed(flags: list, **values) -> list:
    """flags with some values changed or added: changed(HARD, lr="3e-4", lora_rank="64")."""
    flags = list(flags)
    for name, value in values.items():
        flag = f"--{name}"
        if flag in flags:
            flags[flags.index(flag) + 1] = value
        else:
            flags += [flag, value]
    return flags


RUNS = {
    "sft_mild": run("train_sft.py", ["--steps", "30", "--batch_size", "16", "--lr", "3e-4",
                                     "--warmup", "3", "--max_new_tokens", "64", "--eval_every",
                                     "10", "--save_every", "10"]),
    "sft_stress": run("train_sft.py", STRESS, data="data_stress"),
    "opd_mild": run("train_distill.py", OPD, teacher="sft_mild"),
    "opd_stress": run("train_distill.py", OPD, teacher="sft_stress"),
    "rl": run("train_rl.py", ["--steps", "60", "--batch_size", "16", "--group_size", "8",
                              "--lr", "5e-5", "--std_adv", "--warmup", "4", "--max_new_tokens",
                              "64", "--eval_every", "10", "--save_every", "10"]),
    lab_table.CONTROL: run("train_sft.py", CONTROL, data="data_stress"),
}
# --study distill: the paper's Table 1 axes measured (the signal x whose states, from either
# teacher), and teachers that span its condition P3, each with its OPD student. Their periodic
# eval is off (the final eval scores them; the study's budget)
STUDY_OPD = changed(OPD, eval_every="0")
STUDY = {}
for teacher in ("mild", "stress"):
    STUDY[f"opd_{teacher}_token_kl"] = run("train_distill.py",
                                           changed(STUDY_OPD, signal="token_kl"),
                                           teacher=f"sft_{teacher}")
    STUDY[f"opd_{teacher}_full_kl"] = run("train_distill.py", changed(STUDY_OPD, signal="full_kl"),
                                          teacher=f"sft_{teacher}")
    STUDY[f"off_{teacher}"] = run("train_distill.py", changed(STUDY_OPD, states="teacher"),
                                  teacher=f"sft_{teacher}")
    STUDY[f"off_{teacher}_full_kl"] = run("train_distill.py",
                                          changed(STUDY_OPD, states="teacher", signal="full_kl"),
                                          teacher=f"sft_{teacher}")
HARD_QUIET = changed(HARD, eval_every="0")
FAMILY = {  # teacher -> (its data, its flags): a failure of trajectory, and the paper's LoRA
    "sft_mixed": ("data_mixed", HARD_QUIET),  # trained hard, 2/3 of it in style B, 1/3 A
    "sft_slip": ("data_slip", HARD_QUIET),  # as hard, on solutions that misread a number
    "sft_stress_lora": ("data_b", changed(HARD_QUIET, lr="5e-4", lora_rank="64",
                                          lora_alpha="128")),  # the paper's LoRA recipe, style B
}
MORE = {  # --only's alone (not in the study's budget): more teachers measured on TUNING
    "sft_overtrain": ("data", HARD_QUIET),  # the base's own style, trained hard
    "sft_hard": ("data_b", HARD_QUIET),  # style B trained hard: the lab's first stress teacher
}
for name, (data, flags) in FAMILY.items():
    STUDY[name] = run("train_sft.py", flags, data=data)
    STUDY[name.replace("sft_", "opd_")] = run("train_distill.py", STUDY_OPD, teacher=name)
EXTRA = {}
for name, (data, flags) in MORE.items():
    EXTRA[name] = run("train_sft.py", flags, data=data)
    EXTRA[name.replace("sft_", "opd_")] = run("train_distill.py", STUDY_OPD, teacher=name)

LAB_EVAL = ["--tasks", "gsm8k,mmlu,truthfulqa_mc2", "--limit", "gsm8k=400", "--gsm8k_shots", "0",
            "--mmlu_shots", "0", "--max_new_tokens", "64", "--batch_size", "64", "--device", "cpu",
            "--drift_prompts", "100", "--drift_max_new_tokens", "64"]

# --mini: the same steps, every one tiny (its numbers mean nothing; it checks the lab runs end to
# end)
MINI_MODEL = dict(MODEL, hidden_size=32, intermediate_size=64, num_hidden_layers=1, head_dim=8)
MINI_PRETRAIN = dict(PRETRAIN, tokens=20_000, seq=64, batch=8, warmup=5)
MINI_FLAGS = ["--steps", "2", "--warmup", "1", "--eval_every", "2", "--save_every", "1",
              "--eval_limit", "2", "--batch_size", "2", "--max_new_tokens", "8"]
MINI_EVAL = ["--limit", "gsm8k=4,mmlu=8,truthfulqa=4", "--drift_prompts", "4",
             "--drift_max_new_tokens", "8", "--max_new_tokens", "8"]
MINI_DATA = dict(n_train=64, n_test=16)


def get_args(argv=None):
    from harness.cli import (ArgumentParser, check_writable_dir, list_of,  # one-line errors
                             nonnegative_int, positive_int)
    parser = ArgumentParser(prog="lab.py", description=__doc__,
                            formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out",
                        help="where everything goes (default: runs/out/lab; --mini: "
                             "runs/out/lab_mini)")
    parser.add_argument("--bases", type=list_of(nonnegative_int), default=BASES,
                        help=f"comma-separated base (pretraining) seeds (default: {BASES})")
    parser.add_argument("--seeds", type=list_of(nonnegative_int), default=SEEDS,
                        help=f"comma-separated trainer seeds (default: {SEEDS})")
    parser.add_argument("--only", help=f"comma-separated runs of {','.join(['base', *RUNS])} "
                        "or of the study (default: those, and with --study distill the study's; "
                        "a student's teacher comes with it)")
    parser.add_argument("--study", choices=("distill",),
                        help="distill: also the distillation matrix and the teacher family")
    parser.add_argument("--mini", action="store_true",
                        help="a miniature of the whole lab, in about a minute")
    parser.add_argument("--jobs", type=positive_int, default=os.cpu_count() or 1,
                        help="steps run at once, each in its own process on one torch thread "
                             "(default: the CPU cores)")
    parser.add_argument("--threads", type=positive_int, default=1,
                        help="torch threads per step (default 1: a tiny model runs fastest on "
                             "one)")
    parser.add_argument("--no_plot", action="store_true",
                        help="skip the figures (matplotlib is optional)")
    args = parser.parse_args(argv)
    default_out = ROOT / "runs" / "out" / ("lab_mini" if args.mini else "lab")
    args.out = Path(args.out or os.path.relpath(default_out))
    every = ["base", *RUNS, *(STUDY if args.study else [])]  # the six and the control
    args.only = [r for r in (args.only or ",".join(every)).split(",") if r]
    unknown = sorted(set(args.only) - set(SIX) - set(all_runs()))
    if unknown or not args.only:
        parser.error(f"--only: unknown run(s) {', '.join(unknown) or '(none given)'}; choose "
                     f"from {', '.join(['base', *RUNS])} (--study distill's: "
                     f"{', '.join(STUDY)}; more: {', '.join(EXTRA)})")
    check_writable_dir(args.out, "--out")
    return args


def say(text):
    print(f"[lab] {text}", flush=True)


def code_version() -> dict:
    """The commit the lab ran (with '+changes' when the tree differs from it) and torch's
    version."""
    import torch
    commit = "unknown (not a git checkout)"
    try:
        head = subprocess.run(["git", "rev-parse", "HEAD"], cwd=ROOT, capture_output=True,
                              text=True, check=True).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"],
                               cwd=ROOT, capture_output=True, text=True).stdout.strip()
        commit = head + ("+changes" if dirty else "")
    except (OSError, subprocess.CalledProcessError):
        pass
    return {"commit": commit, "torch": torch.__version__}


def all_runs() -> dict:
    """Every run --only may name but base, in the order they start (each teacher before its
    students): the six's, the study's, the extra teachers'."""
    return {**RUNS, **STUDY, **EXTRA}


def selected_runs(args) -> dict:
    """The runs this call makes (--only's), in the order they are started: the six's, then the
    study's."""
    every = all_runs()
    runs = {name: spec for name, spec in every.items() if name in args.only}
    for name, spec in list(runs.items()):  # a teacher is trained when its student is
        if spec["teacher"] and spec["teacher"] not in runs:
            runs = {spec["teacher"]: every[spec["teacher"]], **runs}
    return runs


def check_settings(args):
    """OUT/lab.json: the settings that decide what OUT holds; refuse to mix in runs made with
    others."""
    settings = {"mini": args.mini, "model": MINI_MODEL if args.mini else MODEL, "mix": MIX,
                "world": lab_world.settings(),
                "pretrain": MINI_PRETRAIN if args.mini else PRETRAIN,
                "training": all_runs(), "common": COMMON, "eval": LAB_EVAL}
    settings = json.loads(json.dumps(settings))
    path = args.out / "lab.json"
    old = json.loads(path.read_text()) if path.exists() else settings
    # a run whose flags changed may be rerun once no base and seed holds it (nor its results)
    changed = [name for name in settings["training"]
               if old["training"].get(name) not in (None, settings["training"][name])]
    held = [name for name in changed
            if list(args.out.glob(f"b*/seed*/{name}"))
            + list(args.out.glob(f"b*/seed*/results/{name}.json"))]
    same_rest = all(old.get(k) == settings[k] for k in settings if k != "training")
    if held or not same_rest:
        which = (f" (runs {', '.join(held)}: delete OUT/b*/seed*/<run> and its results)"
                 if held else "")
        fail(f"--out {args.out} holds a lab made with other settings ({path}){which}: use "
             "another --out (or delete that folder)")
    # every commit and torch version that has worked in OUT: one, for a table made afresh
    versions = old.get("versions", [])
    version = code_version()
    if version not in versions:
        versions.append(version)
    if len(versions) > 1:
        say(f"note: {args.out} holds work of {len(versions)} code versions ({path})")
    write_whole(path, json.dumps({**settings, "versions": versions}, indent=1) + "\n")


# --------------------------------------------------------------------------------------------------
# The world, its tokenizer, and pretraining


WORLD_DATA = {"data": "A", "data_stress": "sloppy_stress", "data_b": "B", "data_slip": "slip",
              "data_mixed": "mixed"}


def make_world(args):
    world = lab_world.World(seed=0)
    sizes = MINI_DATA if args.mini else {}
    for folder, style in WORLD_DATA.items():
        if all((args.out / folder / f).exists() for f in paper.DATA_FILES):
            continue
        lab_world.write_data(world, args.out / folder, style, **sizes)
        say(f"world: {args.out / folder} (train solutions in style {style})")
    return world


def pretraining_text(world, n_docs, seed):
    """The first n_docs pretraining documents of the stream with this seed."""
    from eval import TRUTHFULQA_PREAMBLE
    return itertools.islice(world.documents(random.Random(seed), MIX, TRUTHFULQA_PREAMBLE), n_docs)


def make_tokenizer(args, world):
    path = args.out / "tokenizer.json"
    if path.exists():
        return
    from eval import TRUTHFULQA_PREAMBLE
    # the pretraining text only (another seed than any base's stream): style B's words are then
    # spelled with tokens the base has read, unlikely states rather than untrained embeddings
    texts = list(pretraining_text(world, 5000, seed=12345)) + [TRUTHFULQA_PREAMBLE]
    tmp = path.with_suffix(".tmp")
    with room_for(args.out, "the tokenizer", partial=[tmp]):  # a full disk: one line
        lab_world.train_tokenizer(texts, tmp, VOCAB)
        os.replace(tmp, path)
    say(f"tokenizer: {path}")


def pretrain(out: Path, base: int, mini: bool):
    """Base `base`: a plain next-token loop over documents joined by <|endoftext|>, cut into
    windows of `seq` tokens, AdamW with linear warmup and cosine decay, loss on every token. Its
    seed picks the initialisation, the corpus and its order. Saves OUT/bB/base and
    OUT/bB/pretrain.jsonl."""
    import torch
    from tqdm import tqdm
    from model import Qwen3, Qwen3Config, Tokenizer
    cfg = MINI_PRETRAIN if mini else PRETRAIN
    tokenizer = Tokenizer(out / "tokenizer.json")
    # The corpus: documents until there are enough tokens for every step
    steps = cfg["tokens"] // (cfg["seq"] * cfg["batch"])
    need = steps * cfg["batch"] * cfg["seq"] + 1
    ids = []
    stream = pretraining_text(lab_world.World(seed=0), None, seed=base)
    while len(ids) < need:
        for doc in tokenizer.encode_batch(itertools.islice(stream, 2000)):
            ids += doc + [tokenizer.eos_id]
    data = torch.tensor(ids[:need])
    # window w predicts targets[w], the same tokens shifted by one
    windows = data[:-1].view(-1, cfg["seq"])
    targets = data[1:].view(-1, cfg["seq"])
    print(f"pretrain base {base}: {steps} steps of {cfg['batch']} x {cfg['seq']} tokens "
          f"({need - 1:,} tokens)", flush=True)
    # The model: Hugging Face's initialisation (normal 0.02; norms 1)
    torch.manual_seed(base)
    shape = MINI_MODEL if mini else MODEL
    vocab = math.ceil(tokenizer.n_real_tokens / 64) * 64
    model = Qwen3(Qwen3Config(**shape, vocab_size=vocab, bos_token_id=tokenizer.eos_id,
                              eos_token_id=tokenizer.eos_id))
    with torch.no_grad():
        for name, p in model.named_parameters():
            if not name.endswith("norm.weight"):
                p.normal_(0.0, 0.02)
    optimizer = torch.optim.AdamW(model.parameters(), lr=cfg["lr"], betas=(0.9, 0.95),
                                  weight_decay=0.0)
    order = torch.randperm(len(windows), generator=torch.Generator().manual_seed(base))
    log = []
    bar = tqdm(range(steps), desc=f"pretrain base {base}", mininterval=5)
    for step in bar:
        # the learning rate: linear warmup, then cosine from lr down to min_lr
        progress = max(0.0, (step - cfg["warmup"]) / max(1, steps - cfg["warmup"]))
        cosine = 0.5 * (cfg["lr"] - cfg["min_lr"]) * (1 + math.cos(math.pi * progress))
        lr = min(1.0, (step + 1) / cfg["warmup"]) * (cfg["min_lr"] + cosine)
        for group in optimizer.param_groups:
            group["lr"] = lr
        batch = order[step * cfg["batch"]:(step + 1) * cfg["batch"]]
        logits = model(windows[batch])
        loss = torch.nn.functional.cross_entropy(logits.flatten(0, 1), targets[batch].flatten())
        if not torch.isfinite(loss):
            raise SystemExit(f"pretrain: loss {loss.item()} at step {step}: not finite, stopping")
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        log.append({"step": step + 1, "loss": loss.item(), "lr": lr})
        bar.set_postfix(loss=f"{loss.item():.3f}", refresh=False)
    folder = out / f"b{base}"
    folder.mkdir(parents=True, exist_ok=True)
    write_whole(folder / "pretrain.jsonl", "".join(json.dumps(r) + "\n" for r in log))
    # atomic; the tokenizer too, so the folder is whole
    with room_for(folder / "base", "the base model"):
        model.save_pretrained(folder / "base", tokenizer=tokenizer)
    print(f"pretrain base {base}: final loss "
          f"{sum(r['loss'] for r in log[-20:]) / min(20, len(log)):.3f}", flush=True)


# --------------------------------------------------------------------------------------------------
# The plan: every step as a task, with the tasks it needs


def task(name, needs, command=None, action=None, cost=10):
    """A step: a command ([script, *argv], run with the project's main) or an action (a function
    and its arguments); `needs`: the names of the tasks that must finish first; `cost`: its
    rough seconds on one core, for the ETA."""
    return dict(name=name, needs=needs, command=command, action=action, cost=cost)


COSTS = {"pretrain": 300, "sft_stress": 100, "rl": 130, "sft_mild": 40, "eval": 15}


def plan(args) -> list:
    """Every task of this call, in the order they are started when their needs are met, and
    without those already done."""
    tasks = []
    runs = selected_runs(args)
    for base in args.bases:
        folder = args.out / f"b{base}"
        if not paper.has_final_model(folder / "base"):
            tasks.append(task(f"b{base} pretrain", [], action=(pretrain, args.out, base,
                                                               args.mini),
                              cost=COSTS["pretrain"]))
        if "base" in args.only:
            tasks += evaluation(f"b{base} base", folder / "base", folder / "results" / "base.json",
                                args, needs=[f"b{base} pretrain"])
        for seed in args.seeds:
            for name, spec in runs.items():
                tasks += training(base, seed, name, spec, args)
    done = {t["name"] for t in tasks}
    for t in tasks:  # what is done already is needed by nobody
        t["needs"] = [n for n in t["needs"] if n in done]
    return tasks


def training(base, seed, name, spec, args) -> list:
    """The tasks of one run: train (unless its final model exists), then evaluate."""
    folder = args.out / f"b{base}" / f"seed{seed}"
    out_dir = folder / name
    step = f"b{base} seed{seed} {name}"
    tasks = []
    if not paper.has_final_model(out_dir):
        argv = [*spec["flags"], *COMMON, "--model", args.out / f"b{base}" / "base", "--out_dir",
                out_dir, "--data_dir", args.out / spec["data"], "--seed", seed]
        if spec["teacher"]:
            argv += ["--teacher", folder / spec["teacher"]]
        argv += MINI_FLAGS if args.mini else []  # later flags win
        if list((out_dir / "checkpoints").glob("step_*")):
            argv.append("--resume")  # interrupted: continue from its last checkpoint
        elif out_dir.exists():
            argv.append("--overwrite")  # interrupted before its first checkpoint: start over
        needs = [f"b{base} pretrain"] + ([f"b{base} seed{seed} {spec['teacher']} train"]
                                         if spec["teacher"] else [])
        cost = COSTS.get(name, 75 if spec["script"] == "train_distill.py" else 100)
        tasks.append(task(f"{step} train", needs, command=[spec["script"], *argv], cost=cost))
    return tasks + evaluation(step, out_dir, folder / "results" / f"{name}.json", args,
                              needs=[f"{step} train"], base=args.out / f"b{base}" / "base")


def evaluation(step, model, results, args, needs, base=None) -> list:
    """The task that scores `model` into `results` (unless done), with its state drift from
    `base` if given."""
    if paper.has_results(results, model) and paper.has_final_model(model):
        return []
    argv = ["--model", model, "--out", results, "--data_dir", args.out / "data", *LAB_EVAL]
    argv += MINI_EVAL if args.mini else []
    if base:
        argv += ["--drift_reference", base]
    return [task(f"{step} eval", needs, command=["eval.py", *argv], cost=COSTS["eval"])]


# --------------------------------------------------------------------------------------------------
# Running the plan: --jobs processes at once


def run_task(task, log_path, threads):
    """In a child process: the task, its output (stdout and stderr) to log_path."""
    import torch
    torch.set_num_threads(threads)
    log_path.parent.mkdir(parents=True, exist_ok=True)
    with open(log_path, "w", buffering=1) as log:
        os.dup2(log.fileno(), 1)  # what C code and child processes write, too
        os.dup2(log.fileno(), 2)
        sys.stdout = sys.stderr = log  # (a caller may have replaced them: pytest does)
        if task["command"]:
            script, *argv = task["command"]
            code = paper.call_main(script, [str(a) for a in argv])
        else:
            function, *arguments = task["action"]
            function(*arguments)
            code = 0
        sys.stdout.flush()
        sys.stderr.flush()
    sys.exit(code)


def run_all(tasks, args):
    """Start each task in its own process once the tasks it needs are done, at most --jobs at
    once; print each one's command when it starts and its time when it ends; on a failure, stop
    the others and say where its log is."""
    methods = multiprocessing.get_all_start_methods()
    context = multiprocessing.get_context("fork" if "fork" in methods else "spawn")
    pending, running, finished = list(tasks), {}, set()
    total = sum(t["cost"] for t in tasks)
    began = time.time()
    done_cost = 0
    try:
        while pending or running:
            for t in [t for t in pending if all(n in finished for n in t["needs"])]:
                if len(running) == args.jobs:
                    break
                pending.remove(t)
                log = args.out / "logs" / (t["name"].replace(" ", "_") + ".log")
                shown = t["name"]
                if t["command"]:
                    script, *argv = t["command"]
                    shown += ": " + shlex.join([sys.executable, os.path.relpath(ROOT / script),
                                                *map(str, argv)])
                say(shown)
                process = context.Process(target=run_task, args=(t, log, args.threads))
                process.start()
                running[process.sentinel] = (t, process, log, time.time())
            ready = multiprocessing.connection.wait(list(running))
            for sentinel in ready:
                t, process, log, started = running.pop(sentinel)
                process.join()
                if process.exitcode:
                    tail = log.read_text(errors="replace").strip().splitlines()[-1:] or [""]
                    stop(running)
                    free = size(shutil.disk_usage(args.out).free)  # (a full disk cuts a log)
                    fail(f"{t['name']} failed (exit status {process.exitcode}; its log {log} ends "
                         f"{tail[0][:200]!r}; {free} free on the disk of {args.out}); fix the "
                         "cause and run lab.py again: what finished is skipped, a trainer "
                         "continues from its last checkpoint")
                finished.add(t["name"])
                done_cost += t["cost"]
                elapsed = time.time() - began
                left = elapsed / done_cost * (total - done_cost)
                say(f"{t['name']}: done in {time.time() - started:.0f} s ({len(finished)}/"
                    f"{len(tasks)} steps, {elapsed / 60:.0f} min so far, about {left / 60:.0f} "
                    "min left)")
    except KeyboardInterrupt:  # Ctrl-C, or SIGTERM: the steps running stop as they would alone
        stop(running)  # (a trainer at SIGTERM saves a checkpoint first)
        raise


def stop(running):
    """SIGTERM to each step still running (a trainer ends its step and saves a checkpoint), and
    wait for them."""
    for _, process, _, _ in running.values():
        process.terminate()
    for _, process, _, _ in running.values():
        process.join()


def budget(args) -> str:
    """Which of BUDGET_MINUTES this call falls under."""
    if args.study:
        return "study"
    return "one" if len(args.bases) * len(args.seeds) == 1 else "default"


def hold(out: Path) -> int:
    """OUT/.lock, held while this call runs (the OS drops it when the process ends, however it
    ends): a second lab.py on the same OUT is refused, naming the first."""
    from harness.faults import take_lock
    lock = take_lock(out / ".lock")
    if lock is None:
        holder = (out / ".lock").read_text(errors="replace").strip() or "another process"
        fail(f"--out {out}: another lab.py ({holder}) is running there; wait for it to end")
    os.write(lock, f"process {os.getpid()} on {socket.gethostname()}\n".encode())
    return lock


def main(argv=None):
    args = get_args(argv)
    began = time.time()
    lock = hold(args.out)
    try:
        run_lab(args, began)
    finally:
        (args.out / ".lock").unlink(missing_ok=True)  # before the lock goes: see take_lock
        os.close(lock)


def run_lab(args, began):
    import torch  # once, here: every step's process starts with it (and the trainers) imported
    torch.set_num_threads(args.threads)
    for module in ("eval", "train_sft", "train_rl", "train_distill"):
        importlib.import_module(module)
    check_settings(args)
    world = make_world(args)
    make_tokenizer(args, world)
    tasks = plan(args)
    if tasks:
        say(f"{len(tasks)} steps to run, {args.jobs} at a time")
    else:
        say("every step is done")
    run_all(tasks, args)
    lab_table.write_tables(args, all_runs())  # every run with results in OUT
    minutes = (time.time() - began) / 60
    kind = budget(args)
    say(f"finished in {minutes:.1f} min (the budget for this kind of call, {kind}: "
        f"{BUDGET_MINUTES[kind]} min on 2 CPU cores); everything is in {args.out}")


if __name__ == "__main__":
    from harness.cli import stops_cleanly
    stops_cleanly(main, kept="the steps that finished are kept (run it again: what finished is "
                  "skipped, a trainer continues from its last checkpoint)")()
