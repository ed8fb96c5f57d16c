"""The lab's tables, findings and figures (runs/lab.py calls write_tables at the end of a call).

    OUT/table.json  per run and (base, seed): target, retention tasks, Forgetting, Retention, the
                    log-probability of the right choices and its drop, the minimum detectable
                    forgetting, state NLL, MMD² drift, and for a distillation run its teacher's
                    figures and the quality of the teacher's signal; then mean ± std over every
                    base and seed, the same per base, the findings, each measured on every base,
                    the instruments (each task's MDF per base) and the paper's question (its
                    stress teacher's profile, and whether its OPD student beats it)
    OUT/table.md    the six runs and the positive control (mean ± std), the findings, the
                    instruments and the paper's question
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
# The paper's stress teacher (its Table 2: GSM8K .420 against the base's .448, MMLU and TruthfulQA
# down 16% and 18%): its target 0 to 10 points below its base's, its Retention 75 to 90% (a
# relative loss of 10 to 25%)
PROFILE = dict(target_below=(0, 10), retention_loss=(10, 25))
CONTROL = "sft_control"  # the positive control: a run designed to forget a little
CONTROL_FORGETS = (2, 5)  # points, with a 95% interval that excludes 0


def target_in_profile(below) -> bool:
    """Is a target this many points below its base's in PROFILE (0 excluded: not below)?"""
    low, high = PROFILE["target_below"]
    return low < below <= high


def retention_in_profile(loss) -> bool:
    """Is this relative loss of retention (%) in PROFILE?"""
    least, most = PROFILE["retention_loss"]
    return least <= loss <= most


def mean_of(rows, key):
    values = [r[key] for r in rows if r.get(key) is not None]
    return statistics.mean(values) if values else None


def row_of(results: dict, base: dict, metrics_path=None) -> dict:
    """One run's figures: target accuracy, each retention task, Forgetting, Retention, state NLL,
    MMD², and for distillation the quality of the teacher's signal over the training steps."""
    from harness.report import column_difference, forgetting, headline
    from harness.stats import minimum_detectable
    scores, base_scores = headline(results), headline(base)
    row = {"target": scores["gsm8k_flexible"], "target_strict": scores["gsm8k_strict"],
           "mmlu": scores["mmlu"], "truthfulqa_mc2": scores["truthfulqa_mc2"]}
    row["retained"] = statistics.mean(scores[k] for k in RETENTION_TASKS)
    row["forgetting"] = statistics.mean(base_scores[k] - scores[k] for k in RETENTION_TASKS)
    row["retention"] = 100 * statistics.mean(scores[k] / base_scores[k] for k in RETENTION_TASKS
                                             if base_scores[k])
    # the continuous figure: the mean log-probability of the true choices (nats), and its drop
    logprobs = {k: results["tasks"][k]["metrics"].get("logprob") for k in RETENTION_TASKS}
    base_logprobs = {k: base["tasks"][k]["metrics"].get("logprob") for k in RETENTION_TASKS}
    if None not in (*logprobs.values(), *base_logprobs.values()):
        row.update({f"{k}_logprob": v for k, v in logprobs.items()})
        row["retained_logprob"] = statistics.mean(logprobs.values())
        row["forgetting_logprob"] = statistics.mean(base_logprobs[k] - logprobs[k]
                                                    for k in RETENTION_TASKS)
    # the minimum detectable forgetting of each task and of their mean, from this pair's paired
    # standard error (points)
    for k in RETENTION_TASKS:
        row[f"mdf_{k}"] = minimum_detectable(column_difference(base, results, k)["stderr"])
    row["mdf_forgetting"] = minimum_detectable(forgetting(results, base, RETENTION_TASKS)["stderr"])
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
                    if "retained_logprob" in row and "retained_logprob" in teacher_row:
                        row["minus_teacher_retained_logprob"] = (row["retained_logprob"]
                                                                 - teacher_row["retained_logprob"])
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
    seeds held fixed), over every base and on each; a finding about retention also carries the
    continuous figure, the drop in the log-probability of the true choices, with its interval."""
    base_target = {b: r["target"] for b, r in per["base"].items()}
    out = []

    def gain(run):  # run's target minus its base's, per (base, seed)
        return {k: r["target"] - base_target[k.split("/")[0]] for k, r in per.get(run, {}).items()}

    def figure(run, key):
        return {k: r[key] for k, r in per.get(run, {}).items() if r.get(key) is not None}

    def versus(run, other=None) -> dict:
        """{(base, seed): (run, other's results)}: other is its base, or its teacher's run."""
        def partner(key):
            return (results["base"][key.split("/")[0]] if other is None
                    else results.get(other, {}).get(key))
        pairs = {k: (r, partner(k)) for k, r in results.get(run, {}).items()}
        return {k: pair for k, pair in pairs.items() if pair[1] is not None}

    def finding(claim, values: dict, holds, pairs=None, column=None, sign=1, interval=False,
                logprob=None):
        """interval: the finding holds only where the questions' interval also excludes 0;
        logprob: (the continuous figure per (base, seed), its sign against pairs' difference)."""
        if not values:
            return
        rows = {k: {"value": v} for k, v in values.items()}
        overall = summarize(list(rows.values()))["value"]
        bases = {b: s["value"]["mean"] for b, s in by_base(rows).items()}
        item = item_per_base = continuous = None
        if pairs and column:  # the questions' uncertainty of the same difference
            item = questions_interval(list(pairs.values()), column, sign)
            item_per_base = {b: questions_interval([p for k, p in pairs.items()
                                                    if k.split("/")[0] == b], column, sign)
                             for b in bases}
        if pairs and logprob and logprob[0]:
            continuous = {**summarize([{"value": v} for v in logprob[0].values()])["value"],
                          "item": logprob_interval(list(pairs.values()), logprob[1])}

        def verdict(mean, it):
            return holds(mean) and (not interval or bool(it and it["excludes_zero"]))
        out.append(dict(claim=claim, overall=overall, per_base=bases, item=item,
                        item_per_base=item_per_base, logprob=continuous,
                        holds=verdict(overall["mean"], item),
                        holds_per_base={b: verdict(m, (item_per_base or {}).get(b))
                                        for b, m in bases.items()}))

    def forgets(run, claim, holds, interval=False):  # a run's Forgetting against its base
        finding(claim, figure(run, "forgetting"), holds, versus(run), "forgetting",
                interval=interval, logprob=(figure(run, "forgetting_logprob"), 1))

    finding("mild SFT gains on the target (points)", gain("sft_mild"), lambda m: m > 0,
            versus("sft_mild"), "gsm8k_flexible")
    forgets("sft_mild", "mild SFT forgets <= 2 points", lambda m: m <= 2)
    low, high = CONTROL_FORGETS
    forgets(CONTROL, f"the positive control forgets {low} to {high} points (its interval "
            "excludes 0)", lambda m: low <= m <= high, interval=True)
    below, loss = PROFILE["target_below"], PROFILE["retention_loss"]
    finding(f"stress SFT's target is {below[0]} to {below[1]} points below its base's (points "
            "below)", {k: -v for k, v in gain("sft_stress").items()},
            target_in_profile, versus("sft_stress"), "gsm8k_flexible", sign=-1)
    forgets("sft_stress", "stress SFT forgets (points)", lambda m: m > 0, interval=True)
    finding(f"stress SFT loses {loss[0]} to {loss[1]}% of retention (relative, %)",
            {k: 100 - v for k, v in figure("sft_stress", "retention").items()},
            retention_in_profile)
    finding("light RL gains >= 5 points on the target", gain("rl"), lambda m: m >= 5,
            versus("rl"), "gsm8k_flexible")
    forgets("rl", "light RL forgets <= 2 points", lambda m: m <= 2)
    stress_nll, rl_nll = figure("sft_stress", "state_nll"), figure("rl", "state_nll")
    finding("stress SFT's states have a higher NLL than RL's (nats/token)",
            {k: v - rl_nll[k] for k, v in stress_nll.items() if k in rl_nll}, lambda m: m > 0)
    finding("OPD from the mild teacher recovers >= half of its target gain (fraction)",
            figure("opd_mild", "recovered"), lambda m: m >= 0.5)
    forgets("opd_mild", "OPD from the mild teacher forgets <= 2 points", lambda m: m <= 2)
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
                versus(student, teacher), "forgetting", sign=-1,
                logprob=(figure(student, "minus_teacher_retained_logprob"), -1))
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


def questions_interval(pairs: list, column: str, sign: int):
    """sign x (run - partner) on one column (or base - run on "forgetting") over the pairs, with
    the questions' standard error and 95% interval (report.summarize_seeds); None for no pairs."""
    from harness.report import summarize_seeds
    if not pairs:
        return None
    figures = summarize_seeds(pairs)[column]
    low, high = sorted((sign * figures["low"], sign * figures["high"]))
    return {"stderr": figures["stderr"], "low": low, "high": high,
            "excludes_zero": figures["excludes_zero"]}


def logprob_interval(pairs: list, sign: int):
    """The continuous figure's item-level interval: sign x (partner - run) in the log-probability
    of the true choices (nats), each question's difference averaged over the pairs (paired, as
    summarize_seeds averages the accuracies), then the retention tasks' mean. None where the pairs
    did not all score the same questions or hold no per-question log-probabilities."""
    from harness.report import item_scores
    from harness.stats import average_of_differences, difference, paired_difference
    per_task = []
    for task in RETENTION_TASKS:
        samples = [[r["tasks"][task]["samples"] for r in pair] for pair in pairs]
        if len({tuple(s.get("index") for s in one) for pair in samples for one in pair}) != 1:
            return None
        scores = [[item_scores(one, "logprob") for one in pair] for pair in samples]
        if any(score is None for pair in scores for score in pair):
            return None
        runs, partners = ([statistics.mean(question) for question in zip(*side)]
                          for side in zip(*scores))
        per_task.append(paired_difference(partners, runs))
    mean = average_of_differences(per_task)
    return difference(sign * mean["delta"], mean["stderr"], paired=True)


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


def instruments(per: dict, results: dict) -> list:
    """For each base and retention task (and Forgetting, their mean): its questions, the base's
    score and log-probability of the true choices, and the minimum detectable forgetting (MDF =
    1.96 x the paired standard error of base - run, in points) of the positive control (the mean
    over its seeds) and its range over every run of that base."""
    from harness.report import stderr_of
    rows = []
    for b, base in results["base"].items():
        runs = [row for name, by_key in per.items() if name != "base"
                for key, row in by_key.items() if key.split("/")[0] == b]
        control = [row for key, row in per.get(CONTROL, {}).items() if key.split("/")[0] == b]
        for task in (*RETENTION_TASKS, "forgetting"):
            mdfs = [row[f"mdf_{task}"] for row in runs if row.get(f"mdf_{task}") is not None]
            control_mdfs = [row[f"mdf_{task}"] for row in control
                            if row.get(f"mdf_{task}") is not None]
            figures = {"base": b, "task": task,
                       "mdf_control": statistics.mean(control_mdfs) if control_mdfs else None,
                       "mdf_min": min(mdfs, default=None), "mdf_max": max(mdfs, default=None)}
            if task != "forgetting":
                figures.update(questions=base["tasks"][task]["n"], score=per["base"][b][task],
                               stderr=stderr_of(base, task),
                               logprob=per["base"][b].get(f"{task}_logprob"))
            rows.append(figures)
    return rows


def paper_question(per: dict, teacher="sft_stress", student="opd_stress") -> dict:
    """The paper's stress teacher, asked of the lab's: on which bases and seeds does the teacher
    land in PROFILE (its target 0-10 points below its base's, 10-25% of retention lost), and there,
    does its OPD student beat it on the target and on retention? Each with the teacher's local
    advantage beside it."""
    rows = {}
    for key, row in per.get(teacher, {}).items():
        below = per["base"][key.split("/")[0]]["target"] - row["target"]
        loss = 100 - row["retention"]
        rows[key] = {"target_below": below, "retention_loss": loss,
                     "in_profile": target_in_profile(below) and retention_in_profile(loss)}
        mine = per.get(student, {}).get(key)
        if mine:
            rows[key].update({k: mine.get(k) for k in (
                "minus_teacher_target", "minus_teacher_retained",
                "minus_teacher_retained_logprob", "local_advantage")})
    landed = [r for r in rows.values() if r["in_profile"] and "minus_teacher_target" in r]
    return {"rows": rows, "in_profile": sum(r["in_profile"] for r in rows.values()),
            "of": len(rows), "answered": len(landed),
            "beats_on_target": sum(r["minus_teacher_target"] > 0 for r in landed),
            "beats_on_retention": sum(r["minus_teacher_retained"] > 0 for r in landed)}


# Writing them ---------------------------------------------------------------------------------

COLUMNS = [("target", "Target (GSM8K-format)"), ("mmlu", "MMLU-format"),
           ("truthfulqa_mc2", "TruthfulQA MC2"), ("forgetting", "Forgetting ↓"),
           ("retention", "Retention ↑ %"), ("forgetting_logprob", "Forgetting (log-prob) ↓"),
           ("state_nll", "State NLL"),
           ("mmd2_lexical", "MMD² lexical"), ("mmd2_hidden", "MMD² hidden")]
STUDY_COLUMNS = [("target", "Target"), ("retained", "Retained (MMLU, MC2)"),
                 ("forgetting", "Forgetting ↓"), ("minus_teacher_target", "− teacher: target"),
                 ("minus_teacher_retained", "− teacher: retained"),
                 ("local_quality", "Local quality %"), ("local_advantage", "Local advantage"),
                 ("signal_nll", "Signal NLL"),
                 ("state_nll", "State NLL")]


def digits_of(key) -> int:
    """The decimals a figure is shown with: MMD² and log-probabilities 3, NLLs 2, points 1."""
    return 3 if key.startswith("mmd2") or "logprob" in key else 2 if "nll" in key else 1


def cell(figures, key):
    if key not in figures:
        return "–"
    digits = digits_of(key)
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
    lines = ["", "| finding | mean ± std over runs | questions' 95% interval | per base (its "
             "interval) | log-prob drop, nats [interval] | holds |", "|---|---|---|---|---|---|"]
    for f in found:
        per_base = ", ".join(f"{b}: {m:.2f}" + (f" {interval(f['item_per_base'][b], 1)}"
                                                 if f["item_per_base"] else "")
                             for b, m in f["per_base"].items())
        bases = [b for b, ok in f["holds_per_base"].items() if ok]
        where = ("on every base" if len(bases) == len(f["holds_per_base"])
                 else f"on {', '.join(bases)} only" if bases else "on no base")
        verdict = f"{'yes' if f['holds'] else 'no'} (mean); {where}"
        continuous = "–"
        if f["logprob"]:
            continuous = (f"{f['logprob']['mean']:.3f} ± {f['logprob']['std']:.3f} "
                          f"{interval(f['logprob']['item'], 3)}")
        lines.append(f"| {f['claim']} | {f['overall']['mean']:.2f} ± {f['overall']['std']:.2f} "
                     f"| {interval(f['item'], 1)} | {per_base} | {continuous} | {verdict} |")
    return lines


def interval(item, digits) -> str:
    """'[low, high] *' (* where it excludes 0), or '–'."""
    if not item or item["stderr"] is None:
        return "–"
    star = " *" if item["excludes_zero"] else ""
    return f"[{item['low']:.{digits}f}, {item['high']:.{digits}f}]{star}"


def instruments_markdown(rows) -> list:
    lines = ["", "The instruments: each retention task's questions, the base's score (± its "
             "standard error) and mean log-probability of the true choices, and the minimum "
             "detectable forgetting, MDF = 1.96 x the paired standard error of base - run "
             "(points): of the positive control (mean over its seeds) and over every run.", "",
             "| base | task | questions | base score | base log-prob (nats) | MDF of the control "
             "| MDF over the runs |", "|---|---|---|---|---|---|---|"]
    for r in rows:
        score = f"{r['score']:.1f} ± {r['stderr']:.1f}" if "score" in r else "–"
        spread = (f"{r['mdf_min']:.2f} to {r['mdf_max']:.2f}" if r["mdf_min"] is not None
                  else "–")
        lines.append(f"| {r['base']} | {r['task']} | {r.get('questions', '–')} | {score} | "
                     f"{fmt(r.get('logprob'), 3)} | {fmt(r['mdf_control'])} | {spread} |")
    return lines


def paper_question_markdown(answer) -> list:
    (low, high), (least, most) = PROFILE["target_below"], PROFILE["retention_loss"]
    lines = ["", f"The paper's stress teacher (its target {low} to {high} points below the base's, "
             f"{least} to {most}% of retention lost): the lab's stress teacher lands there on "
             f"{answer['in_profile']} of {answer['of']} bases and seeds; there, its OPD student "
             f"beats it on the target on {answer['beats_on_target']} of {answer['answered']} "
             f"and on retention on {answer['beats_on_retention']} of {answer['answered']}.", "",
             "| base/seed | teacher: below the base (points) | teacher: retention lost (%) | "
             "in profile | student − teacher: target | : retained (points) | : retained "
             "log-prob (nats) | local advantage |", "|---|---|---|---|---|---|---|---|"]
    for key, r in answer["rows"].items():
        cells = [f"{r['target_below']:.1f}", f"{r['retention_loss']:.1f}",
                 "yes" if r["in_profile"] else "no"]
        cells += [fmt(r.get(k), digits) for k, digits in (
            ("minus_teacher_target", 1), ("minus_teacher_retained", 1),
            ("minus_teacher_retained_logprob", 3), ("local_advantage", 1))]
        lines.append(f"| {key} | " + " | ".join(cells) + " |")
    return lines


def write_tables(args, runs):
    per, results = collect(args, runs)
    if not per["base"]:
        print("[lab] no table: no base has results yet", flush=True)
        return
    summary = {name: summarize(list(rows.values())) for name, rows in per.items() if rows}
    points = condition_points(per)
    found = findings(per, results, runs, points)
    measured, answer = instruments(per, results), paper_question(per)
    lab_json = json.loads((args.out / "lab.json").read_text())
    out = {"bases": args.bases, "seeds": args.seeds, "versions": lab_json.get("versions"),
           "per_seed": per, "summary": summary,
           "per_base": {name: by_base(rows) for name, rows in per.items() if rows},
           "findings": found, "instruments": measured, "paper_question": answer,
           "condition": points,
           "condition_r": {y: correlation([p["local_advantage"] for p in points],
                                          [p[y] for p in points])
                           for y in ("minus_teacher_target", "minus_teacher_retained")},
           "condition_sign_agreement": sign_agreement(points),
           "notes": "accuracies, Forgetting and student-minus-teacher in points; Retention in "
                    "percent of the base; spread: the sample std over every base and seed; "
                    "state NLL: mean over training steps of the trainer's state_nll; local "
                    f"quality: the share of the student's states (first {EARLY_STEPS} steps) "
                    "that the teacher's continuation takes to a right answer; log-prob: the mean "
                    "log-probability of the true choices (nats), its drop base - run; MDF: the "
                    "minimum detectable forgetting, 1.96 x the paired standard error (points)"}
    write_whole(args.out / "table.json", json.dumps(out, indent=1) + "\n")  # a full disk: a line
    n = len(args.bases) * len(args.seeds)
    # the six ("base" first: it is always in per) and the positive control
    six = [name for name in (*paper.RUNS, CONTROL) if name in per]
    lines = markdown(summary, six, COLUMNS)
    lines.append(f"\nMean ± std over {n} runs: bases {', '.join(map(str, args.bases))} x seeds "
                 f"{', '.join(map(str, args.seeds))} (each base evaluated once). Forgetting: "
                 "base - run, in points, averaged over MMLU and TruthfulQA MC2; Retention: run / "
                 "base, averaged likewise; Forgetting (log-prob): the drop in the mean "
                 "log-probability of the true choices, in nats, averaged likewise. State NLL: the "
                 "mean over training steps of the NLL of the states each trainer trained on, under "
                 "the learner. MMD²: state drift from the base (eval.py --drift_reference).")
    lines += findings_markdown(found)
    lines += instruments_markdown(measured) + paper_question_markdown(answer)
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


def fmt(r, digits=2):
    return "–" if r is None else f"{r:.{digits}f}"
