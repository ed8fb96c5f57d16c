"""The lab's tables, findings and figures (runs/lab.py calls write_tables at the end of a call).

    OUT/table.json  per run and (base, seed): target, retention tasks, Forgetting, Retention, state
                    NLL, MMD² drift, and for a distillation run its teacher's figures and the
                    quality of the teacher's signal; then mean ± std over every base and seed, the
                    same per base, and the findings, each measured on every base
    OUT/table.md    the six runs (mean ± std), then the findings
    OUT/distill.md  with --study distill: the distillation matrix and the teacher family
    OUT/lab.png     the six runs over training and their final figures
    OUT/distill.png with --study distill: student minus teacher against the teacher's local quality
"""
import json
import statistics

import paper
from harness.resources import write_whole
from plot import read_metrics

RETENTION_TASKS = ("mmlu", "truthfulqa_mc2")  # the paper's Forgetting and Retention average these
EARLY_STEPS = 5  # a teacher's local quality: its signal on the student's states, first steps


def mean_of(rows, key):
    values = [r[key] for r in rows if r.get(key) is not None]
    return statistics.mean(values) if values else None


def row_of(results: dict, base: dict, metrics_path=None) -> dict:
    """One run's figures: target accuracy, each retention task, Forgetting, Retention, state NLL,
    MMD², and for distillation the quality of the teacher's signal over the training steps."""
    from harness.report import headline
    scores, base_scores = headline(results), headline(base)
    row = {"target": scores["gsm8k_flexible"], "target_strict": scores["gsm8k_strict"],
           "mmlu": scores["mmlu"], "truthfulqa_mc1": scores["truthfulqa_mc1"],
           "truthfulqa_mc2": scores["truthfulqa_mc2"]}
    row["retained"] = statistics.mean(scores[k] for k in RETENTION_TASKS)
    row["forgetting"] = statistics.mean(base_scores[k] - scores[k] for k in RETENTION_TASKS)
    row["retention"] = 100 * statistics.mean(scores[k] / base_scores[k] for k in RETENTION_TASKS
                                             if base_scores[k])
    steps = []  # the training steps' records (plot.py reads metrics.jsonl as it plots them)
    if metrics_path and metrics_path.exists():
        steps = [r for r in read_metrics(metrics_path) if "loss" in r]
    row["state_nll"] = mean_of(steps, "state_nll")
    row["mmd2_lexical"] = results["drift"]["lexical"]["mmd2"] if "drift" in results else 0.0
    row["mmd2_hidden"] = results["drift"]["hidden"]["mmd2"] if "drift" in results else 0.0
    if steps and "signal_nll" in steps[0]:  # distillation: how good was the teacher's signal?
        early = steps[:EARLY_STEPS]
        row["signal_nll"] = mean_of(steps, "signal_nll")
        row["signal_nll_early"] = mean_of(early, "signal_nll")
        if "signal_correct" in steps[0]:
            right = [{"right": r["signal_answered"] * r["signal_correct"]} for r in steps]
            row["local_quality"] = 100 * mean_of(right[:EARLY_STEPS], "right")
            row["local_quality_all"] = 100 * mean_of(right, "right")
    return row


def summarize(rows: list) -> dict:
    """key -> mean and sample std over rows (std 0 for one row)."""
    summary = {}
    for key in rows[0]:
        values = [r[key] for r in rows if r.get(key) is not None]
        if values:
            std = statistics.stdev(values) if len(values) > 1 else 0.0
            summary[key] = {"mean": statistics.mean(values), "std": std, "n": len(values)}
    return summary


def collect(args, runs):
    """({run: {"bB/seedS": row}}, {run: {"bB/seedS": its results}}) for every run with results;
    "base" per base, as "bB"."""
    per, results = {"base": {}}, {"base": {}}
    for b in args.bases:
        base_path = args.out / f"b{b}" / "results" / "base.json"
        if not base_path.exists():
            continue
        base = json.loads(base_path.read_text())
        per["base"][f"b{b}"] = row_of(base, base)
        results["base"][f"b{b}"] = base
        for name, spec in runs.items():
            for s in args.seeds:
                folder = args.out / f"b{b}" / f"seed{s}"
                path = folder / "results" / f"{name}.json"
                if not path.exists():
                    continue
                mine = json.loads(path.read_text())
                results.setdefault(name, {})[f"b{b}/seed{s}"] = mine
                row = row_of(mine, base, folder / name / "metrics.jsonl")
                # the student against its teacher (runs lists each teacher before its students)
                teacher_row = per.get(spec.get("teacher"), {}).get(f"b{b}/seed{s}")
                if teacher_row:
                    row["teacher_target"] = teacher_row["target"]
                    row["minus_teacher_target"] = row["target"] - teacher_row["target"]
                    if row.get("local_quality") is not None:  # P3: better on the student's
                        row["local_advantage"] = row["local_quality"] - teacher_row["target"]
                    row["minus_teacher_retained"] = row["retained"] - teacher_row["retained"]
                    gain = teacher_row["target"] - per["base"][f"b{b}"]["target"]
                    row["teacher_gain"] = gain
                    row["recovered"] = ((row["target"] - per["base"][f"b{b}"]["target"]) / gain
                                        if gain > 0 else None)
                per.setdefault(name, {})[f"b{b}/seed{s}"] = row
    return per, results


def by_base(rows: dict) -> dict:
    """{"bB": summary over that base's seeds}."""
    bases = sorted({key.split("/")[0] for key in rows})
    return {b: summarize([r for k, r in rows.items() if k.split("/")[0] == b]) for b in bases}


# The findings: each a figure per (base, seed) and a test of it -----------------------------------


def findings(per: dict, results: dict, runs: dict, points: list) -> list:
    """The paper's findings as the lab measures them. For each: its figure on every base and seed
    (mean and std over them, the mean per base), whether it holds on the mean (overall and per
    base), and where it compares two runs on the same questions, the questions' own uncertainty:
    the item-level standard error and 95% interval of the difference (report.summarize_seeds, the
    seeds held fixed)."""
    from harness.report import summarize_seeds
    base_target = {b: r["target"] for b, r in per["base"].items()}
    out = []

    def gain(run):  # run's target minus its base's, per (base, seed)
        return {k: r["target"] - base_target[k.split("/")[0]] for k, r in per.get(run, {}).items()}

    def figure(run, key):
        return {k: r[key] for k, r in per.get(run, {}).items() if r.get(key) is not None}

    def versus(run, other=None):
        """(run, other's results) per (base, seed): other is its base, or its teacher's run."""
        def partner(key):
            return (results["base"][key.split("/")[0]] if other is None
                    else results.get(other, {}).get(key))
        pairs = [(r, partner(k)) for k, r in results.get(run, {}).items()]
        return [pair for pair in pairs if pair[1] is not None]

    def finding(claim, values: dict, holds, pairs=None, column=None, sign=1):
        if not values:
            return
        rows = {k: {"value": v} for k, v in values.items()}
        overall = summarize(list(rows.values()))["value"]
        bases = {b: s["value"]["mean"] for b, s in by_base(rows).items()}
        item = None
        if pairs and column:  # the questions' uncertainty of the same difference
            figures = summarize_seeds(pairs)[column]
            low, high = sorted((sign * figures["low"], sign * figures["high"]))
            item = {"stderr": figures["stderr"], "low": low, "high": high,
                    "excludes_zero": figures["excludes_zero"]}
        out.append(dict(claim=claim, overall=overall, per_base=bases, item=item,
                        holds=holds(overall["mean"]),
                        holds_per_base={b: holds(m) for b, m in bases.items()}))

    finding("mild SFT gains on the target (points)", gain("sft_mild"), lambda m: m > 0,
            versus("sft_mild"), "gsm8k_flexible")
    finding("mild SFT forgets <= 2 points", figure("sft_mild", "forgetting"), lambda m: m <= 2,
            versus("sft_mild"), "forgetting")
    finding("stress SFT forgets >= 10 points", figure("sft_stress", "forgetting"),
            lambda m: m >= 10, versus("sft_stress"), "forgetting")
    finding("light RL gains >= 5 points on the target", gain("rl"), lambda m: m >= 5,
            versus("rl"), "gsm8k_flexible")
    finding("light RL forgets <= 2 points", figure("rl", "forgetting"), lambda m: m <= 2,
            versus("rl"), "forgetting")
    stress_nll, rl_nll = figure("sft_stress", "state_nll"), figure("rl", "state_nll")
    finding("stress SFT's states have a higher NLL than RL's (nats/token)",
            {k: v - rl_nll[k] for k, v in stress_nll.items() if k in rl_nll}, lambda m: m > 0)
    finding("OPD from the mild teacher recovers >= half of its target gain (fraction)",
            figure("opd_mild", "recovered"), lambda m: m >= 0.5)
    finding("OPD from the mild teacher forgets <= 2 points", figure("opd_mild", "forgetting"),
            lambda m: m <= 2, versus("opd_mild"), "forgetting")
    for student, spec in runs.items():
        teacher = spec.get("teacher")
        if not teacher or teacher == "sft_mild" or not student.startswith("opd_"):
            continue  # a degraded teacher's on-policy students (the continuation signal's)
        if student.endswith("_kl"):
            continue
        finding(f"{student} beats its teacher on the target (points)",
                figure(student, "minus_teacher_target"), lambda m: m > 0,
                versus(student, teacher), "gsm8k_flexible")
        finding(f"{student} beats its teacher on retention (points)",
                figure(student, "minus_teacher_retained"), lambda m: m > 0,
                versus(student, teacher), "forgetting", sign=-1)
    finding("the one-step KL signal from the stress teacher collapses (its target as a fraction "
            "of the base's, < 0.5)", {k: r["target"] / base_target[k.split("/")[0]]
                                      for k, r in per.get("opd_stress_token_kl", {}).items()
                                      if base_target[k.split("/")[0]] > 0},
            lambda m: m < 0.5)
    by_key = {}  # (base, seed) -> its students' (local advantage, student - teacher) points
    for point in points:
        by_key.setdefault(point["key"], []).append(point)
    finding("the teacher's local advantage foretells whether its student beats it on the target "
            "(share of students, >= 0.8)", {key: sign_agreement(points)
                                             for key, points in by_key.items()
                                             if len(points) > 1}, lambda m: m >= 0.8)
    return out


def sign_agreement(points):
    """The share of points where the local advantage's sign foretells whether the student beats
    its teacher on the target."""
    if not points:
        return None
    agree = [(p["local_advantage"] > 0) == (p["minus_teacher_target"] > 0) for p in points]
    return sum(agree) / len(agree)


def correlation(xs, ys):
    """Pearson's r (None for fewer than 3 points or no spread)."""
    if len(xs) < 3:
        return None
    mx, my = statistics.mean(xs), statistics.mean(ys)
    sxy = sum((x - mx) * (y - my) for x, y in zip(xs, ys))
    sxx = sum((x - mx) ** 2 for x in xs)
    syy = sum((y - my) ** 2 for y in ys)
    return sxy / (sxx * syy) ** 0.5 if sxx and syy else None


def condition_points(per: dict) -> list:
    """One point per OPD student (continuation signal, on-policy) and (base, seed): its teacher's
    local advantage (its local quality on the student's states, first steps, minus its own
    target accuracy) against student minus teacher."""
    points = []
    for name, rows in per.items():
        for key, row in rows.items():
            if row.get("local_advantage") is None:
                continue
            if not name.startswith("opd_") or name.endswith("_kl"):
                continue
            points.append({"run": name, "key": key, **{k: row[k] for k in (
                "local_quality", "local_advantage", "teacher_target", "minus_teacher_target",
                "minus_teacher_retained")}})
    return points


# Writing them ---------------------------------------------------------------------------------

COLUMNS = [("target", "Target (GSM8K-format)"), ("mmlu", "MMLU-format"),
           ("truthfulqa_mc2", "TruthfulQA MC2"), ("forgetting", "Forgetting ↓"),
           ("retention", "Retention ↑ %"), ("state_nll", "State NLL"),
           ("mmd2_lexical", "MMD² lexical"), ("mmd2_hidden", "MMD² hidden")]
STUDY_COLUMNS = [("target", "Target"), ("retained", "Retained (MMLU, MC2)"),
                 ("forgetting", "Forgetting ↓"), ("minus_teacher_target", "− teacher: target"),
                 ("minus_teacher_retained", "− teacher: retained"),
                 ("local_quality", "Local quality %"), ("local_advantage", "Local advantage"),
                 ("signal_nll", "Signal NLL"),
                 ("state_nll", "State NLL")]


def cell(figures, key):
    if key not in figures:
        return "–"
    digits = 3 if key.startswith("mmd2") else 2 if "nll" in key else 1
    return f"{figures[key]['mean']:.{digits}f} ± {figures[key]['std']:.{digits}f}"


def markdown(summary, names, columns) -> list:
    lines = ["| run | " + " | ".join(title for _, title in columns) + " |",
             "|---" * (len(columns) + 1) + "|"]
    for name in names:
        if name in summary:
            cells = [cell(summary[name], key) for key, _ in columns]
            lines.append(f"| {name} | " + " | ".join(cells) + " |")
    return lines


def matrix_markdown(summary) -> list:
    """The paper's Table 1 axes, measured: for each teacher, whose states (rows) x the teacher's
    signal (columns), each cell the student's target and Forgetting (mean ± std)."""
    lines = []
    for teacher in ("mild", "stress"):
        lines += ["", f"From the {teacher} teacher: target % / Forgetting (points)",
                  "", "| states | continuation | token_kl | full_kl |", "|---|---|---|---|"]
        for states, prefix in (("the student's (on-policy)", "opd"),
                               ("the teacher's (off-policy)", "off")):
            cells = []
            for signal in ("", "_token_kl", "_full_kl"):
                figures = summary.get(f"{prefix}_{teacher}{signal}")
                cells.append(f"{cell(figures, 'target')} / {cell(figures, 'forgetting')}"
                             if figures else "–")
            lines.append(f"| {states} | " + " | ".join(cells) + " |")
    return lines


def findings_markdown(found) -> list:
    lines = ["", "| finding | mean ± std over runs | questions' 95% interval | per base | holds |",
             "|---|---|---|---|---|"]
    for f in found:
        per_base = ", ".join(f"{b}: {m:.2f}" for b, m in f["per_base"].items())
        bases = [b for b, ok in f["holds_per_base"].items() if ok]
        where = ("on every base" if len(bases) == len(f["holds_per_base"])
                 else f"on {', '.join(bases)} only" if bases else "on no base")
        verdict = f"{'yes' if f['holds'] else 'no'} (mean); {where}"
        item = "–"
        if f["item"] and f["item"]["stderr"] is not None:
            star = " *" if f["item"]["excludes_zero"] else ""
            item = f"[{f['item']['low']:.1f}, {f['item']['high']:.1f}]{star}"
        lines.append(f"| {f['claim']} | {f['overall']['mean']:.2f} ± {f['overall']['std']:.2f} "
                     f"| {item} | {per_base} | {verdict} |")
    return lines


def write_tables(args, runs):
    per, results = collect(args, runs)
    if not per["base"]:
        print("[lab] no table: no base has results yet", flush=True)
        return
    summary = {name: summarize(list(rows.values())) for name, rows in per.items() if rows}
    points = condition_points(per)
    found = findings(per, results, runs, points)
    lab_json = json.loads((args.out / "lab.json").read_text())
    out = {"bases": args.bases, "seeds": args.seeds, "versions": lab_json.get("versions"),
           "per_seed": per, "summary": summary,
           "per_base": {name: by_base(rows) for name, rows in per.items() if rows},
           "findings": found, "condition": points,
           "condition_r": {y: correlation([p["local_advantage"] for p in points],
                                          [p[y] for p in points])
                           for y in ("minus_teacher_target", "minus_teacher_retained")},
           "condition_sign_agreement": sign_agreement(points),
           "notes": "accuracies, Forgetting and student-minus-teacher in points; Retention in "
                    "percent of the base; spread: the sample std over every base and seed; "
                    "state NLL: mean over training steps of the trainer's state_nll; local "
                    f"quality: the share of the student's states (first {EARLY_STEPS} steps) "
                    "that the teacher's continuation takes to a right answer"}
    write_whole(args.out / "table.json", json.dumps(out, indent=1) + "\n")  # a full disk: a line
    n = len(args.bases) * len(args.seeds)
    six = [name for name in paper.RUNS if name in per]  # "base" first: it is always in per
    lines = markdown(summary, six, COLUMNS)
    lines.append(f"\nMean ± std over {n} runs: bases {', '.join(map(str, args.bases))} x seeds "
                 f"{', '.join(map(str, args.seeds))} (each base evaluated once). Forgetting: "
                 "base - run, in points, averaged over MMLU and TruthfulQA MC2; Retention: run / "
                 "base, averaged likewise. State NLL: the mean over training steps of the NLL of "
                 "the states each trainer trained on, under the learner. MMD²: state drift from "
                 "the base (eval.py --drift_reference).")
    lines += findings_markdown(found)
    table = "\n".join(lines) + "\n"
    write_whole(args.out / "table.md", table)
    print("\n" + table, flush=True)
    study = [name for name in per if name not in six and name != "base"]
    if study:
        lines = markdown(summary, ["sft_mild", "sft_stress", "opd_mild", "opd_stress", *study],
                         STUDY_COLUMNS)
        lines += matrix_markdown(summary)
        r = out["condition_r"]
        agreement = out["condition_sign_agreement"]
        lines.append(f"\nThe teacher's local advantage (local quality - its own target) against "
                     f"student minus teacher, over {len(points)} points (OPD students, "
                     f"continuation signal): Pearson r {fmt(r['minus_teacher_target'])} (target), "
                     f"{fmt(r['minus_teacher_retained'])} (retained); its sign foretells whether "
                     f"the student beats its teacher on the target for "
                     f"{fmt(None if agreement is None else 100 * agreement)}% of them.")
        study_table = "\n".join(lines) + "\n"
        write_whole(args.out / "distill.md", study_table)
        print(study_table, flush=True)
    if not args.no_plot:
        import lab_plot
        lab_plot.plot_lab(args, summary, runs)
        if points:
            lab_plot.plot_condition(args, points)


def fmt(r):
    return "–" if r is None else f"{r:.2f}"
