"""The lab: the paper's findings on a laptop CPU. A synthetic world, a tiny Qwen3 pretrained on it
from scratch, then the paper's six runs with the project's own trainers and eval.py, over several
seeds.

    python runs/lab.py            # everything under runs/out/lab: table.md, table.json, lab.png
    python runs/lab.py --seeds 0  # one seed
    python runs/lab.py --mini     # a miniature of the whole lab in about a minute (the tests
                                  # run it)

The steps, in this order; each prints what it does and how long it took, and is skipped when done:

    world       OUT/data: the world in data/prepare.py's layout (runs/lab_world.py), GSM8K train
                solutions in the base's style A; OUT/data_stress: the same, with train solutions
                in style B
    tokenizer   OUT/tokenizer.json: a byte-level BPE trained on the world's text
    pretrain    OUT/base: a tiny Qwen3 (4 layers, width 128) trained from scratch on packed world
                text, a plain next-token loop (below), saved as a Hugging Face Qwen3 folder
    base        eval.py on the base: OUT/results/base.json
    for each seed S, in OUT/seedS/ (trainer --seed S):
      sft_mild    train_sft.py on style-A gold solutions: few steps, small lr
      sft_stress  train_sft.py --data_dir OUT/data_stress: style-B gold solutions, many steps,
                  large lr
      opd_mild    train_distill.py --teacher OUT/seedS/sft_mild (student: the base)
      opd_stress  train_distill.py --teacher OUT/seedS/sft_stress
      rl          train_rl.py
      each then eval.py --drift_reference OUT/base: OUT/seedS/results/<run>.json
    table       OUT/table.md, OUT/table.json (per run and seed, then mean ± std over seeds) and
                OUT/lab.png

The trainers and eval.py are the project's, unchanged, driven by flags (LAB_* below): each line they
run is printed as a command you can paste. By default they run in this process (no torch import per
step); with --subprocess each is a new Python, as runs/paper.py runs them. Resuming: a run whose
folder holds a final model is not trained again, one with checkpoints continues with --resume, a
results file newer than its model is kept. OUT/lab.json records the settings; a later call with
other settings is refused, except that a run's own flags (LAB_TRAINING) may change while no seed
holds that run: delete OUT/seed*/<run> and OUT/seed*/results/<run>.json to rerun it with new ones.
"""
import argparse
import itertools
import json
import math
import os
import random
import shlex
import statistics
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import lab_world  # noqa: E402
import paper  # noqa: E402  (its has_final_model, has_results, call_main)

ROOT = paper.ROOT
RUNS = ("base", "sft_mild", "sft_stress", "opd_mild", "opd_stress", "rl")

# The base model: a Qwen3 as small as the world allows (0.9M parameters)
MODEL = dict(hidden_size=128, intermediate_size=384, num_hidden_layers=4, num_attention_heads=4,
             num_key_value_heads=2, head_dim=32, rope_theta=10000.0, rms_norm_eps=1e-6,
             tie_word_embeddings=True, max_position_embeddings=1024)
VOCAB = 768
# Pretraining: documents of each kind in these proportions, packed into windows of SEQ tokens
MIX = {"target": 5, "facts": 1, "mmlu": 2, "truthfulqa": 2}
PRETRAIN = dict(tokens=2_500_000, seq=128, batch=32, lr=3e-3, warmup=100, min_lr=3e-4)

# What each run trains: (script, flags beyond --model/--out_dir/--data_dir/--seed). {out}: the
# seed's folder.
# The periodic eval scores the target and both retention tasks (TruthfulQA has 60 questions)
COMMON = ["--device", "cpu", "--grad_accum", "1", "--eval_shots", "0", "--eval_limit", "100",
          "--eval_tasks", "gsm8k,mmlu,truthfulqa_mc2"]
LAB_TRAINING = {
    "sft_mild": ("train_sft.py",
                 ["--steps", "30", "--batch_size", "16", "--lr", "3e-4", "--warmup", "3",
                  "--max_new_tokens", "64", "--eval_every", "10", "--save_every", "10"]),
    "sft_stress": ("train_sft.py",
                   ["--steps", "200", "--batch_size", "16", "--lr", "1e-3", "--warmup", "10",
                    "--max_new_tokens", "64", "--eval_every", "40", "--save_every", "40"]),
    "opd_mild": ("train_distill.py",
                 ["--teacher", "{out}/sft_mild", "--steps", "40", "--batch_size", "16",
                  "--lr", "3e-4", "--warmup", "4", "--max_new_tokens", "64",
                  "--states_per_rollout", "2", "--continuation_tokens", "64",
                  "--eval_every", "10", "--save_every", "10"]),
    "opd_stress": ("train_distill.py",
                   ["--teacher", "{out}/sft_stress", "--steps", "40", "--batch_size", "16",
                    "--lr", "3e-4", "--warmup", "4", "--max_new_tokens", "64",
                    "--states_per_rollout", "2", "--continuation_tokens", "64",
                    "--eval_every", "10", "--save_every", "10"]),
    "rl": ("train_rl.py",
           ["--steps", "60", "--batch_size", "16", "--group_size", "8", "--lr", "5e-5",
            "--std_adv", "--warmup", "4", "--max_new_tokens", "64", "--eval_every", "10",
            "--save_every", "10"]),
}
LAB_EVAL = ["--limit", "gsm8k=400,mmlu=192,truthfulqa=60", "--gsm8k_shots", "0",
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
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out",
                        help="where everything goes (default: runs/out/lab; --mini: "
                             "runs/out/lab_mini)")
    parser.add_argument("--seeds", default="0,1,2",
                        help="comma-separated trainer seeds (default: 0,1,2)")
    parser.add_argument("--only", help=f"comma-separated runs of {','.join(RUNS)} (default: all)")
    parser.add_argument("--mini", action="store_true",
                        help="a miniature of the whole lab, in about a minute")
    parser.add_argument("--subprocess", action="store_true",
                        help="run each trainer and eval in a new Python (default: in this process)")
    parser.add_argument("--threads", type=int, default=1,
                        help="torch threads (default 1: a tiny model runs fastest on one, even on "
                             "a free CPU)")
    parser.add_argument("--no_plot", action="store_true",
                        help="skip the figure (matplotlib is optional)")
    args = parser.parse_args(argv)
    default_out = ROOT / "runs" / "out" / ("lab_mini" if args.mini else "lab")
    args.out = Path(args.out or os.path.relpath(default_out))
    try:
        args.seeds = [int(s) for s in args.seeds.split(",") if s]
    except ValueError:
        parser.error(f"--seeds: expected comma-separated integers, not {args.seeds!r}")
    args.only = [r for r in (args.only or ",".join(RUNS)).split(",") if r]
    unknown = sorted(set(args.only) - set(RUNS))
    if unknown:
        parser.error(f"--only: unknown run(s) {', '.join(unknown)}; choose from {', '.join(RUNS)}")
    if not args.seeds:
        parser.error("--seeds: give at least one seed")
    return args


def say(text):
    print(f"[lab] {text}", flush=True)


def timed(name):
    """Context manager: prints how long the step `name` took."""
    class Timer:
        def __enter__(self):
            self.began = time.time()

        def __exit__(self, kind, *_):
            if kind is None:
                say(f"{name}: done in {time.time() - self.began:.0f} s")
    return Timer()


def check_settings(args):
    """OUT/lab.json: the settings that decide what OUT holds; refuse to mix in runs made with
    others."""
    settings = {"mini": args.mini, "model": MINI_MODEL if args.mini else MODEL, "mix": MIX,
                "pretrain": MINI_PRETRAIN if args.mini else PRETRAIN, "training": LAB_TRAINING,
                "common": COMMON, "eval": LAB_EVAL}
    settings = json.loads(json.dumps(settings))
    path = args.out / "lab.json"
    old = json.loads(path.read_text()) if path.exists() else settings
    # a run whose flags changed may be rerun once no seed holds it (nor its results)
    changed = [name for name in LAB_TRAINING
               if old["training"].get(name) != settings["training"][name]]
    held = [name for name in changed
            if list(args.out.glob(f"seed*/{name}")) + list(args.out.glob(f"seed*/*/{name}.json"))]
    same_rest = all(old.get(k) == settings[k] for k in settings if k != "training")
    if held or not same_rest or set(old["training"]) != set(settings["training"]):
        which = f" (runs {', '.join(held)}: delete OUT/seed*/<run> and its results)" * bool(held)
        raise SystemExit(f"[lab] {args.out} holds a lab made with other settings ({path}){which}: "
                         "use another --out (or delete that folder)")
    args.out.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(settings, indent=1) + "\n")


# --------------------------------------------------------------------------------------------------
# The world, its tokenizer, and pretraining


def make_world(args):
    world = lab_world.World(seed=0)
    sizes = MINI_DATA if args.mini else {}
    for folder, style in (("data", "A"), ("data_stress", "B")):
        if all((args.out / folder / f).exists() for f in paper.DATA_FILES):
            say(f"skip world: {args.out / folder} exists")
            continue
        with timed(f"world ({folder}, style {style} train solutions)"):
            lab_world.write_data(world, args.out / folder, style, **sizes)
    return world


def pretraining_text(world, n_docs, seed):
    """The first n_docs pretraining documents of the stream with this seed."""
    from eval import TRUTHFULQA_PREAMBLE
    return itertools.islice(world.documents(random.Random(seed), MIX, TRUTHFULQA_PREAMBLE), n_docs)


def make_tokenizer(args, world):
    path = args.out / "tokenizer.json"
    if path.exists():
        say(f"skip tokenizer: {path} exists")
        return
    with timed("tokenizer"):
        from eval import TRUTHFULQA_PREAMBLE
        # the pretraining text only (another seed than the pretraining stream's): style B's words
        # are then spelled with tokens the base has read, unlikely states rather than untrained
        # embeddings
        texts = list(pretraining_text(world, 5000, seed=12345)) + [TRUTHFULQA_PREAMBLE]
        tmp = path.with_suffix(".tmp")
        lab_world.train_tokenizer(texts, tmp, VOCAB)
        os.replace(tmp, path)


def pretrain(args, world):
    """A plain next-token loop: documents joined by <|endoftext|>, cut into windows of `seq` tokens,
    AdamW with linear warmup and cosine decay, loss on every token. Saves OUT/base and
    OUT/pretrain.jsonl."""
    folder = args.out / "base"
    if paper.has_final_model(folder):
        say(f"skip pretrain: {folder} holds the base model")
        return
    import torch
    from tqdm import tqdm
    from model import Qwen3, Qwen3Config, Tokenizer
    cfg = MINI_PRETRAIN if args.mini else PRETRAIN
    tokenizer = Tokenizer(args.out / "tokenizer.json")
    began = time.time()
    # The corpus: documents until there are enough tokens for every step
    steps = cfg["tokens"] // (cfg["seq"] * cfg["batch"])
    need, ids = steps * cfg["batch"] * cfg["seq"] + 1, []
    stream = pretraining_text(world, None, seed=0)
    while len(ids) < need:
        for doc in tokenizer.encode_batch(itertools.islice(stream, 2000)):
            ids += doc + [tokenizer.eos_id]
    data = torch.tensor(ids[:need])
    # window w predicts targets[w], the same tokens shifted by one
    windows = data[:-1].view(-1, cfg["seq"])
    targets = data[1:].view(-1, cfg["seq"])
    say(f"pretrain: {steps} steps of {cfg['batch']} x {cfg['seq']} tokens ({need - 1:,} tokens, "
        f"corpus built in {time.time() - began:.0f} s)")
    # The model: Hugging Face's initialisation (normal 0.02; norms 1)
    torch.manual_seed(0)
    shape = MINI_MODEL if args.mini else MODEL
    vocab = math.ceil(tokenizer.n_real_tokens / 64) * 64
    model = Qwen3(Qwen3Config(**shape, vocab_size=vocab, bos_token_id=tokenizer.eos_id,
                              eos_token_id=tokenizer.eos_id))
    with torch.no_grad():
        for name, p in model.named_parameters():
            if not name.endswith("norm.weight"):
                p.normal_(0.0, 0.02)
    optimizer = torch.optim.AdamW(model.parameters(), lr=cfg["lr"], betas=(0.9, 0.95),
                                  weight_decay=0.0)
    order = torch.randperm(len(windows), generator=torch.Generator().manual_seed(0))
    log = []
    bar = tqdm(range(steps), desc="pretrain", mininterval=5)
    for step in bar:
        # the learning rate: linear warmup, then cosine from lr down to min_lr
        progress = max(0.0, (step - cfg["warmup"]) / max(1, steps - cfg["warmup"]))
        lr = min(1.0, (step + 1) / cfg["warmup"]) * (
            cfg["min_lr"] + 0.5 * (cfg["lr"] - cfg["min_lr"]) * (1 + math.cos(math.pi * progress)))
        for group in optimizer.param_groups:
            group["lr"] = lr
        batch = order[step * cfg["batch"]:(step + 1) * cfg["batch"]]
        logits = model(windows[batch])
        loss = torch.nn.functional.cross_entropy(logits.flatten(0, 1), targets[batch].flatten())
        if not torch.isfinite(loss):
            raise SystemExit(f"[lab] pretrain: loss {loss.item()} at step {step}: not finite, "
                             "stopping")
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        log.append({"step": step + 1, "loss": loss.item(), "lr": lr})
        bar.set_postfix(loss=f"{loss.item():.3f}", refresh=False)
    (args.out / "pretrain.jsonl").write_text("".join(json.dumps(r) + "\n" for r in log))
    # atomic; the tokenizer too, so the folder is whole
    model.save_pretrained(folder, tokenizer=tokenizer)
    say(f"pretrain: final loss {sum(r['loss'] for r in log[-20:]) / min(20, len(log)):.3f}; "
        f"done in {time.time() - began:.0f} s")


# --------------------------------------------------------------------------------------------------
# The six runs: the project's trainers and eval.py


def run_step(name, script, argv, args):
    """Print the command, then run it (in this process unless --subprocess); stop the lab if it
    fails."""
    argv = [str(a) for a in argv]
    command = [sys.executable, os.path.relpath(ROOT / script), *argv]
    say(f"{name}: {shlex.join(command)}")
    with timed(name):
        if args.subprocess:
            env = {**os.environ, "OMP_NUM_THREADS": str(args.threads)}
            code = subprocess.run(command, env=env).returncode
        else:
            code = paper.call_main(script, argv)
        if code:
            raise SystemExit(f"[lab] {name} failed (exit status {code}); fix the cause and run "
                             "lab.py again: what finished is skipped, a trainer continues from its "
                             "last checkpoint")


def train(name, seed, args):
    out = args.out / f"seed{seed}"
    data = args.out / ("data_stress" if name == "sft_stress" else "data")
    out_dir = out / name
    if paper.has_final_model(out_dir):
        say(f"skip seed {seed} {name} training: {out_dir} holds its final model")
        return
    script, flags = LAB_TRAINING[name]
    flags = [f.format(out=out) for f in flags]
    if "--teacher" in flags:
        teacher = Path(flags[flags.index("--teacher") + 1])
        if not paper.has_final_model(teacher):
            raise SystemExit(f"[lab] {name} needs its teacher: run lab.py with --only including it")
    argv = [*flags, *COMMON, "--model", args.out / "base", "--out_dir", out_dir, "--data_dir", data,
            "--seed", seed]
    argv += MINI_FLAGS if args.mini else []  # later flags win
    if list((out_dir / "checkpoints").glob("step_*")):
        argv.append("--resume")
    run_step(f"seed {seed} {name} training", script, argv, args)


def evaluate(name, seed, args):
    model = args.out / "base" if name == "base" else args.out / f"seed{seed}" / name
    folder = args.out if name == "base" else args.out / f"seed{seed}"
    results = folder / "results" / f"{name}.json"
    if paper.has_results(results, model):
        say(f"skip {'' if name == 'base' else f'seed {seed} '}{name} eval: {results} exists")
        return
    results.parent.mkdir(parents=True, exist_ok=True)
    argv = ["--model", model, "--out", results, "--data_dir", args.out / "data", *LAB_EVAL]
    argv += MINI_EVAL if args.mini else []
    if name != "base":
        argv += ["--drift_reference", args.out / "base"]
    run_step(f"{'' if name == 'base' else f'seed {seed} '}{name} eval", "eval.py", argv, args)


# --------------------------------------------------------------------------------------------------
# The table: per run and seed, then mean and spread over the seeds


def mean_state_nll(metrics_path: Path):
    """The mean over training steps of the state NLL the trainer logged (its states, under the
    learner)."""
    if not metrics_path.exists():
        return None
    values = [r["state_nll"] for r in map(json.loads, metrics_path.read_text().splitlines())
              if "state_nll" in r]
    return sum(values) / len(values) if values else None


def row_of(results: dict, base: dict, metrics_path=None) -> dict:
    """One run's figures: target accuracy, each retention task, Forgetting, Retention, state NLL,
    MMD²."""
    from eval import headline
    scores, base_scores = headline(results), headline(base)
    row = {"target": scores["gsm8k_flexible"], "target_strict": scores["gsm8k_strict"],
           "mmlu": scores["mmlu"], "truthfulqa_mc1": scores["truthfulqa_mc1"],
           "truthfulqa_mc2": scores["truthfulqa_mc2"]}
    kept = ("mmlu", "truthfulqa_mc2")  # the paper's Forgetting and Retention average these two
    row["forgetting"] = statistics.mean(base_scores[k] - scores[k] for k in kept)
    row["retention"] = 100 * statistics.mean(scores[k] / base_scores[k] for k in kept
                                             if base_scores[k])
    row["state_nll"] = mean_state_nll(metrics_path) if metrics_path else None
    row["mmd2_lexical"] = results["drift"]["lexical"]["mmd2"] if "drift" in results else 0.0
    row["mmd2_hidden"] = results["drift"]["hidden"]["mmd2"] if "drift" in results else 0.0
    return row


COLUMNS = [("target", "Target (GSM8K-format)"), ("mmlu", "MMLU-format"),
           ("truthfulqa_mc2", "TruthfulQA MC2"), ("forgetting", "Forgetting ↓"),
           ("retention", "Retention ↑ %"), ("state_nll", "State NLL"),
           ("mmd2_lexical", "MMD² lexical"), ("mmd2_hidden", "MMD² hidden")]


def table(args):
    base_path = args.out / "results" / "base.json"
    if not base_path.exists():
        say("no table: the base model has no results yet")
        return
    with timed("table"):
        base = json.loads(base_path.read_text())
        per_seed = {"base": {"-": row_of(base, base)}}
        for name in RUNS[1:]:
            for seed in args.seeds:
                path = args.out / f"seed{seed}" / "results" / f"{name}.json"
                if path.exists():
                    row = row_of(json.loads(path.read_text()), base,
                                 args.out / f"seed{seed}" / name / "metrics.jsonl")
                    per_seed.setdefault(name, {})[str(seed)] = row
        summary = {}
        for name, rows in per_seed.items():
            summary[name] = {}
            for key in rows[next(iter(rows))]:
                values = [r[key] for r in rows.values() if r[key] is not None]
                if values:
                    std = statistics.stdev(values) if len(values) > 1 else 0.0
                    summary[name][key] = {"mean": statistics.mean(values), "std": std}
        out = {"seeds": args.seeds, "per_seed": per_seed, "summary": summary,
               "notes": "accuracies and Forgetting in points; Retention in percent of the base; "
                        "spread: the sample std over seeds; state NLL: mean over training steps "
                        "of the trainer's state_nll"}
        (args.out / "table.json").write_text(json.dumps(out, indent=1) + "\n")
        lines = ["| run | " + " | ".join(title for _, title in COLUMNS) + " |",
                 "|---" * (len(COLUMNS) + 1) + "|"]
        for name, figures in summary.items():
            cells = []
            for key, _ in COLUMNS:
                if key not in figures:
                    cells.append("–")
                else:
                    digits = 3 if key.startswith("mmd2") else 2 if key == "state_nll" else 1
                    cells.append(f"{figures[key]['mean']:.{digits}f} ± "
                                 f"{figures[key]['std']:.{digits}f}")
            lines.append(f"| {name} | " + " | ".join(cells) + " |")
        n = len(per_seed.get("rl", per_seed["base"]))
        lines.append(f"\nMean ± std over {n} seed(s) ({', '.join(map(str, args.seeds))}); the base "
                     "is evaluated once. Forgetting: base - run, in points, averaged over MMLU and "
                     "TruthfulQA MC2; Retention: run / base, averaged likewise. State NLL: the "
                     "mean over training steps of the NLL of the states each trainer trained on, "
                     "under the learner. MMD²: state drift from the base (eval.py "
                     "--drift_reference).")
        (args.out / "table.md").write_text("\n".join(lines) + "\n")
    print("\n" + (args.out / "table.md").read_text(), flush=True)
    if not args.no_plot:
        plot(args, summary)


def plot(args, summary):
    """OUT/lab.png: per method, the state NLL of its training states, its target accuracy and its
    retention accuracy over the training steps (seed by seed), and the final table as bars
    (mean ± std). matplotlib is optional."""
    try:
        import matplotlib
    except ImportError:
        say("no figure: matplotlib is not installed (pip install matplotlib)")
        return
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    colors = {"base": "gray", "sft_mild": "tab:blue", "sft_stress": "tab:red",
              "opd_mild": "tab:cyan", "opd_stress": "tab:orange", "rl": "tab:green"}
    fig, axes = plt.subplots(1, 5, figsize=(25, 4.2))
    for name in RUNS[1:]:
        for i, seed in enumerate(args.seeds):
            path = args.out / f"seed{seed}" / name / "metrics.jsonl"
            if not path.exists():
                continue
            records = [json.loads(line) for line in path.read_text().splitlines()]
            steps = [r for r in records if "state_nll" in r]
            evals = [r for r in records if "gsm8k_flexible" in r]
            label = name if i == 0 else None
            axes[0].plot([r["step"] for r in steps], [r["state_nll"] for r in steps],
                         color=colors[name], alpha=0.7, label=label)
            axes[1].plot([r["step"] for r in evals], [100 * r["gsm8k_flexible"] for r in evals],
                         color=colors[name], alpha=0.7, marker="o", markersize=3, label=label)
            # retention: the mean of the two retention tasks, as Forgetting averages them
            kept = [r for r in evals if "mmlu_acc" in r and "truthfulqa_mc2" in r]
            axes[2].plot([r["step"] for r in kept],
                         [50 * (r["mmlu_acc"] + r["truthfulqa_mc2"]) for r in kept],
                         color=colors[name], alpha=0.7, marker="o", markersize=3, label=label)
    axes[0].set(title="state NLL of the training states", xlabel="step", ylabel="nats / token",
                yscale="log")
    axes[1].set(title="target accuracy during training (100 test questions)", xlabel="step",
                ylabel="%")
    axes[2].set(title="retention during training (mean of MMLU, TruthfulQA MC2)", xlabel="step",
                ylabel="%")
    axes[0].legend(fontsize=8)
    names = list(summary)
    panels = ((axes[3], ("target", "mmlu", "truthfulqa_mc2"), "final accuracy (mean ± std)"),
              (axes[4], ("forgetting", "state_nll"), "Forgetting (points) and state NLL"))
    for ax, keys, title in panels:
        width = 0.8 / len(names)
        for j, name in enumerate(names):
            means = [summary[name].get(k, {}).get("mean", 0) for k in keys]
            stds = [summary[name].get(k, {}).get("std", 0) for k in keys]
            ax.bar([i + j * width for i in range(len(keys))], means, width, yerr=stds,
                   color=colors[name], label=name, capsize=2)
        ax.set_xticks([i + 0.4 - width / 2 for i in range(len(keys))], keys)
        ax.set_title(title)
    axes[3].legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(args.out / "lab.png", dpi=110)
    plt.close(fig)
    say(f"figure: {args.out / 'lab.png'}")


def main(argv=None):
    args = get_args(argv)
    import torch
    torch.set_num_threads(args.threads)
    if str(ROOT) not in sys.path:
        sys.path.insert(0, str(ROOT))
    began = time.time()
    check_settings(args)
    world = make_world(args)
    make_tokenizer(args, world)
    pretrain(args, world)
    if "base" in args.only:
        evaluate("base", None, args)
    for seed in args.seeds:
        for name in RUNS[1:]:
            if name in args.only:
                train(name, seed, args)
                evaluate(name, seed, args)
    table(args)
    say(f"finished in {time.time() - began:.0f} s; everything is in {args.out}")


if __name__ == "__main__":
    main()
