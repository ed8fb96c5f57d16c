"""eval.py's results files, written whole (write_results) and read: each headline score with its
standard error, the differences of two runs with theirs, the table `eval.py --report` prints, and a
run's figures over seeds for a table of findings (runs/lab.py).

    python eval.py --report base.json rl.json sft_mild.json   # the paper's Table 2, error bars
    summarize_seeds([(rl_seed0, base), (rl_seed1, base)])     # one run over seeds, with its errors

Every error bar comes from the per-question records a results file keeps (each task's "samples",
each with its "index" in the full test split). A score's standard error is lm-eval's mean_stderr
over its questions. Two runs that scored the same questions (the same indices, in the same order)
are compared question by question: Δ is the mean of the per-question differences, with their
standard error (stats.paired_difference). Runs scored on other questions fall back to unpaired
errors, and the table says so. A results file from before error bars still reads: where its
samples hold no per-question score, the error bar is a dash.
"""
import json
import sys
import tempfile
from pathlib import Path

from harness.cli import fail, finite_or_null
from harness.resources import NoRoom, write_whole
from harness.stats import (average_of_differences, clustered_stderr, mean, mean_stderr,
                           paired_difference, sample_stddev, unpaired_difference)

# The table's columns, in the paper's order: (column, its title, task, metric)
COLUMNS = (("gsm8k_flexible", "GSM8K (flex)", "gsm8k", "exact_match_flexible"),
           ("gsm8k_strict", "GSM8K (strict)", "gsm8k", "exact_match_strict"),
           ("mmlu", "MMLU", "mmlu", "acc"),
           ("truthfulqa_mc1", "TruthfulQA MC1", "truthfulqa_mc1", "acc"),
           ("truthfulqa_mc2", "TruthfulQA MC2", "truthfulqa_mc2", "mc2"))
# One question's score for each metric, from its record in eval.py's samples
ITEM_SCORE = {"exact_match_strict": lambda s: s["exact_match"]["strict"],
              "exact_match_flexible": lambda s: s["exact_match"]["flexible"],
              # MMLU; TruthfulQA MC1, whose gold is 0 (the true answer is listed first)
              "acc": lambda s: s["pred"] == s["gold"],
              "mc2": lambda s: s["score"],
              # MMLU, TruthfulQA: the log-probability of the true choices (eval.choice_logprob)
              "logprob": lambda s: s["logprob"]}
# What decides the drift figure (the rest of results.json's "drift" is measured)
DRIFT_SETTINGS = ("reference", "n_prompts", "max_new_tokens", "temperature", "seed",
                  "n_permutations")

# Per-question scores, and the metrics eval.py computes from them ---------------------------------


def item_scores(samples: list, metric: str):
    """Each question's score for `metric` (1.0 or 0.0, MC2's probability of the true answers), in
    the samples' order; None where the samples do not hold it (a results file from before error
    bars, a score nulled as not finite, a metric such as acc_per_subject) or there are none."""
    if not samples:
        return None
    try:
        return [float(ITEM_SCORE[metric](s)) for s in samples]
    except (KeyError, TypeError):
        return None


def task_means(samples: list, metrics) -> dict:
    """{metric: its mean over the questions}: a task's scores, as eval.py records them."""
    return {metric: mean(item_scores(samples, metric)) for metric in metrics}


def with_stderrs(task: dict) -> dict:
    """A task's metrics with lm-eval's `<metric>_stderr` after each metric scored question by
    question; MMLU's acc also gets `acc_stderr_clustered`, clustered by subject (Miller 2024)."""
    metrics = {}
    for name, value in task["metrics"].items():
        metrics[name] = value
        scores = item_scores(task["samples"], name)
        if scores is None:  # acc_per_subject: a dict, not a question's score
            continue
        metrics[f"{name}_stderr"] = mean_stderr(scores)
        subjects = [s.get("subject") for s in task["samples"]]
        if None not in subjects:
            metrics[f"{name}_stderr_clustered"] = clustered_stderr(scores, subjects)
    return metrics


# Headline scores, their errors and differences, in points ----------------------------------------


def headline(results: dict) -> dict:
    """One number per task, in percent: GSM8K flexible and strict, MMLU, TruthfulQA MC1 and MC2
    (a task whose metrics are null, not finite, is left out)."""
    tasks = results["tasks"]
    scores = {column: tasks[task]["metrics"][metric] for column, _, task, metric in COLUMNS
              if task in tasks}
    return {column: 100 * score for column, score in scores.items() if score is not None}


def points(results: dict, column: str):
    """(per-question scores in points or None, the questions' indices) of one headline column."""
    _, _, task, metric = next(c for c in COLUMNS if c[0] == column)
    samples = results["tasks"][task].get("samples", [])
    scores = item_scores(samples, metric)
    indices = [s.get("index") for s in samples]
    return (None if scores is None else [100 * score for score in scores]), indices


def headline_stderrs(results: dict) -> dict:
    """{column: the standard error of headline(results)[column], in points, or None}."""
    return {column: stderr_of(results, column) for column in headline(results)}


def stderr_of(results: dict, column: str):
    """The standard error of headline(results)[column], in points (None: no per-question
    scores)."""
    scores, _ = points(results, column)
    return None if scores is None else mean_stderr(scores)


def column_difference(a: dict, b: dict, column: str) -> dict:
    """a - b on one headline column, in points (stats.difference's dict): paired question by
    question when both scored the same questions in the same order, else unpaired. MMLU's paired
    difference also gets "stderr_clustered", by subject."""
    (scores_a, indices_a), (scores_b, indices_b) = points(a, column), points(b, column)
    if scores_a is None or scores_b is None or indices_a != indices_b:
        return unpaired_difference(headline(a)[column], stderr_of(a, column),
                                   headline(b)[column], stderr_of(b, column))
    paired = paired_difference(scores_a, scores_b)
    if column == "mmlu":  # questions come in subjects: also the clustered error (Miller 2024)
        subjects = [s.get("subject") for s in a["tasks"]["mmlu"]["samples"]]
        differences = [x - y for x, y in zip(scores_a, scores_b)]
        paired["stderr_clustered"] = None if None in subjects else \
            clustered_stderr(differences, subjects)
    return paired


def forgetting(run: dict, base: dict, kept: tuple) -> dict:
    """The paper's Forgetting, base - run averaged over the retention columns `kept` (MMLU and
    TruthfulQA), with its error: the columns' questions are independent samples."""
    return average_of_differences([column_difference(base, run, column) for column in kept])


def format_score(score: float, stderr) -> str:
    return f"{score:.1f} ± {'–' if stderr is None else f'{stderr:.1f}'}"


def format_difference(d: dict) -> str:
    """'+2.4 ± 1.5 [-0.5, 5.3] *': Δ ± its standard error [95% interval], * where the interval
    excludes 0, † where it is unpaired."""
    if d["stderr"] is None:
        return f"{d['delta']:+.1f} ± –"
    text = f"{d['delta']:+.1f} ± {d['stderr']:.1f} [{d['low']:.1f}, {d['high']:.1f}]"
    return text + (" *" if d["excludes_zero"] else "") + ("" if d["paired"] else " †")


# The table of eval.py --report --------------------------------------------------------------------


def scores_line(results: dict) -> str:
    """Each headline score with its standard error, in points: "gsm8k_flexible 45.2 ± 1.4, ..."."""
    errors = headline_stderrs(results)
    return ", ".join(f"{name} {format_score(score, errors[name])}"
                     for name, score in headline(results).items())


def write_results(path, results: dict, beside=None):
    """Write a results file whole (resources.write_whole: a failure leaves an older file as it
    was). NaN becomes null (no_nan). Where path's disk is full, the scores are printed and the
    whole file goes, under its name, to the folder `beside` names (eval.py's: the model's) or
    else to the system's temporary folder, the first with room that holds no file of that name;
    then the one line (NoRoom) says where it went."""
    text = json.dumps(no_nan(results), indent=1, allow_nan=False)
    try:
        write_whole(path, text, what="the results file")
    except NoRoom as full:
        print(f"{scores_line(results)} (not written to {path}: its disk is full)", flush=True)
        saved = write_elsewhere(Path(path).name, text, [beside, tempfile.gettempdir()])
        where = (f"the whole results file went to {saved} instead (move it to {path} once there "
                 "is room)" if saved else "no other folder had room for the whole file")
        raise NoRoom(full.folder, full.what, full.needed,
                     then=f"the scores are printed above, and {where}") from None


def write_elsewhere(name: str, text: str, folders: list):
    """name written whole into the first of folders (None or not a folder: passed over) that has
    room and holds no file of that name; returns its path, or None."""
    for folder in folders:
        if folder is None or not Path(folder).is_dir() or Path(folder, name).exists():
            continue
        try:
            write_whole(Path(folder, name), text)
            return Path(folder, name)
        except (NoRoom, OSError):  # full too, or not writable: the next one
            continue
    return None


def no_nan(results: dict) -> dict:
    """JSON has no NaN: a task with any non-finite number (a model whose log-likelihoods overflow)
    gets null metrics and the reason, never a score computed from NaN (MMLU's argmax would read 25%,
    not 'broken')."""
    for name, task in results["tasks"].items():
        task, n = finite_or_null(task)
        results["tasks"][name] = task
        if n:
            task["metrics"] = {k: None for k in task["metrics"]}
            task["invalid"] = f"{n} numbers are NaN or infinite: the model's outputs are not finite"
            print(f"warning: {name}: {task['invalid']}; its metrics are null", file=sys.stderr)
    return finite_or_null(results)[0]


def read_results(path) -> dict:
    try:
        results = json.loads(Path(path).read_text(encoding="utf-8"))
        results["tasks"].items()
    except (OSError, ValueError, KeyError, AttributeError, TypeError) as e:
        fail(f"--report {path}: not a results file of eval.py ({type(e).__name__}: {e})")
    return results


def setting_differences(a: dict, b: dict, keys=None) -> list:
    """(setting, a's value, b's value) for each setting both record and that differs; a dict
    setting (limit) is compared entry by entry ('limit[gsm8k]'), over the entries both hold."""
    differences = []
    shared = a.keys() & b.keys() if keys is None else [k for k in keys if k in a and k in b]
    for key in shared:
        if isinstance(a[key], dict) and isinstance(b[key], dict):
            differences += [(f"{key}[{k}]", a[key][k], b[key][k]) for k in a[key].keys() & b[key]
                            if a[key][k] != b[key][k]]
        elif a[key] != b[key]:
            differences.append((key, a[key], b[key]))
    return sorted(differences)


def warn_about_differences(runs: list):
    """One line on stderr for each setting a run was scored with that differs from the base's
    (shots, limits, seeds, dtype, ...), each task it scored on other questions, and each drift
    setting that differs from the first drift measured: such numbers do not compare."""
    base_name, base = runs[0]
    drifts = [(name, results["drift"]) for name, results in runs if "drift" in results]
    for name, results in runs[1:]:
        settings = {k: v for k, v in results.get("settings", {}).items() if k != "tasks"}
        for key, value, base_value in setting_differences(settings, base.get("settings", {})):
            print(f"warning: {name} was scored with {key}={value}, {base_name} with "
                  f"{key}={base_value}", file=sys.stderr)
        for task in sorted(results["tasks"].keys() & base["tasks"].keys()):
            scored = [s.get("index") for s in results["tasks"][task].get("samples", [])]
            if scored != [s.get("index") for s in base["tasks"][task].get("samples", [])]:
                print(f"warning: {name} scored other {task} examples than {base_name} "
                      "(--limit/--seed): compared unpaired", file=sys.stderr)
    for name, drift in drifts[1:]:
        first_name, first = drifts[0]
        for key, value, first_value in setting_differences(drift, first, DRIFT_SETTINGS):
            print(f"warning: {name}'s drift was measured with {key}={value}, {first_name}'s with "
                  f"{key}={first_value}", file=sys.stderr)


def report(paths: list, truthfulqa: str = "mc2") -> str:
    """Markdown: Table 2 with error bars, then each run's paired differences against the base (the
    first file). Forgetting (base - post, in points) and Retention (post / base) are averaged over
    TruthfulQA (MC1 or MC2) and MMLU, the paper's definition. Drift is the lexical state MMD²
    against the file's --drift_reference, where it has one, with its permutation p-value."""
    runs = [(Path(path).stem, read_results(path)) for path in paths]
    warn_about_differences(runs)
    base_name, base = runs[0]
    kept = ("mmlu", f"truthfulqa_{truthfulqa}")
    base_scores = headline(base)
    lines = ["| run | " + " | ".join(title for _, title, _, _ in COLUMNS)
             + " | Forgetting ↓ | Retention ↑ | Drift (MMD²) |",
             "|---" * (len(COLUMNS) + 4) + "|"]
    for name, results in runs:
        scores, errors = headline(results), headline_stderrs(results)
        cells = [format_score(scores[c], errors[c]) if c in scores else "–"
                 for c, _, _, _ in COLUMNS]
        comparable = all(k in scores and base_scores.get(k) for k in kept)  # base 0: no ratio
        if name != base_name and comparable:
            forgot = forgetting(results, base, kept)
            retention = mean(scores[k] / base_scores[k] for k in kept)
            cells += [format_score(forgot["delta"], forgot["stderr"]), f"{100 * retention:.1f}%"]
        else:
            cells += ["–", "–"]
        cells.append(drift_cell(results))
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    lines.append(f"\nScores in percent ± their standard error (lm-eval's: the sample std over "
                 f"questions / √n; ± –: one question, or a file without per-question scores). "
                 f"Forgetting and Retention average {titles(kept)} against {base_name}.")
    drifts = [results["drift"] for _, results in runs if "drift" in results]
    settings = {f"{d['reference']} ({d['n_prompts']} GSM8K prompts, {d['max_new_tokens']} new "
                f"tokens, temperature {d['temperature']}, seed {d['seed']})" for d in drifts}
    for drift in sorted(settings):  # one line per setting: compare runs within one
        lines.append(f"Drift: lexical state MMD² against {drift}.")
    if any("p_value" in d["lexical"] for d in drifts):
        lines.append("p: the share of random splits of the two runs' states, by prompt, whose MMD² "
                     "is at least as large (a permutation test: small p, drift beyond sampling "
                     "noise).")
    if len(runs) > 1:
        lines += [""] + differences_table(runs, kept)
    return "\n".join(lines)


def titles(columns) -> str:
    """'MMLU and TruthfulQA MC2': the titles of some columns."""
    return " and ".join(title for column, title, _, _ in COLUMNS if column in columns)


def drift_cell(results: dict) -> str:
    if "drift" not in results:
        return "–"
    lexical = results["drift"]["lexical"]
    p_value = f" (p {lexical['p_value']:.3f})" if lexical.get("p_value") is not None else ""
    return f"{lexical['mmd2']:.4f}{p_value}"


def differences_table(runs: list, kept: tuple) -> list:
    """The markdown lines of each run's differences from the base (the first run), in points."""
    base_name, base = runs[0]
    lines = [f"Differences from {base_name}, in points: Δ ± its standard error [95% interval]",
             "", "| run | " + " | ".join(f"Δ {title}" for _, title, _, _ in COLUMNS)
             + " | Forgetting ↓ |", "|---" * (len(COLUMNS) + 2) + "|"]
    clustered = []
    for name, results in runs[1:]:
        scores, base_scores = headline(results), headline(base)
        both = [c for c, _, _, _ in COLUMNS if c in scores and c in base_scores]
        deltas = {c: column_difference(results, base, c) for c in both}
        cells = [format_difference(deltas[c]) if c in deltas else "–" for c, _, _, _ in COLUMNS]
        comparable = all(k in both for k in kept)
        cells.append(format_difference(forgetting(results, base, kept)) if comparable else "–")
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
        if deltas.get("mmlu", {}).get("stderr_clustered") is not None:
            clustered.append(f"{name} ± {deltas['mmlu']['stderr_clustered']:.1f}")
    lines.append(f"\nΔ: run - {base_name}, the mean of the per-question differences when both "
                 "scored the same questions (paired), with its standard error; * the 95% interval "
                 "excludes 0; † unpaired (other questions): the two standard errors in quadrature. "
                 f"Forgetting: {base_name} - run, averaged over {titles(kept)}.")
    if clustered:
        lines.append("MMLU's Δ with standard errors clustered by subject (Miller 2024): "
                     + ", ".join(clustered) + ".")
    return lines


# A run over seeds (and bases), for a table of findings --------------------------------------------


def summarize_seeds(pairs: list, truthfulqa: str = "mc2") -> dict:
    """One run's figures over seeds (and bases), each with its uncertainty.

    pairs: [(run, base), ...], one per (base, seed): the run's results and those of the base it
    was trained from, each a results file's path or its loaded dict.
    Returns {column: figures} for each headline column every run and base holds, and
    "forgetting" (base - run averaged over MMLU and TruthfulQA MC2, or MC1), in points:
        mean, spread     the run's score (Forgetting: the forgetting) over the pairs: the mean and
                         the sample std (0.0 for one pair): the variation over seeds (and bases)
        delta            run - base (Forgetting: the forgetting), the mean over the pairs
        stderr           delta's item-level standard error: the questions are a sample, the seeds
                         held fixed. Pairs that all scored the same questions are compared
                         question by question, each question's difference averaged over the pairs
                         first; else the pairs' own errors combine as independent samples
        low, high, excludes_zero, paired   delta's 95% interval from that stderr; all pairs paired
        n                the number of pairs
    """
    pairs = [tuple(x if isinstance(x, dict) else read_results(x) for x in pair) for pair in pairs]
    columns = [c for c, _, _, _ in COLUMNS if all(c in headline(r) for pair in pairs for r in pair)]
    figures = {column: summary(pairs, column) for column in columns}
    kept = ("mmlu", f"truthfulqa_{truthfulqa}")
    if all(column in columns for column in kept):
        forgot = [forgetting(run, base, kept)["delta"] for run, base in pairs]
        # base - run per column (its run - base, negated: the same per-question averaging and
        # error), then the two columns' mean
        delta = average_of_differences([{**figures[column], "delta": -figures[column]["delta"]}
                                        for column in kept])
        figures["forgetting"] = {"mean": mean(forgot), "spread": spread(forgot), **delta,
                                 "n": len(pairs)}
    return figures


def summary(pairs: list, column: str) -> dict:
    """summarize_seeds' figures of one headline column."""
    runs_points = [points(run, column) for run, _ in pairs]
    bases_points = [points(base, column) for _, base in pairs]
    indices = {tuple(i) for _, i in runs_points + bases_points}
    if len(indices) == 1 and all(s is not None for s, _ in runs_points + bases_points):
        # each question's score averaged over the pairs, then the paired difference of the means
        run_means = [mean(question) for question in zip(*(s for s, _ in runs_points))]
        base_means = [mean(question) for question in zip(*(s for s, _ in bases_points))]
        delta = paired_difference(run_means, base_means)
    else:
        delta = average_of_differences([column_difference(run, base, column)
                                        for run, base in pairs])
    scores = [headline(run)[column] for run, _ in pairs]
    return {"mean": mean(scores), "spread": spread(scores), **delta, "n": len(pairs)}


def spread(values: list) -> float:
    return sample_stddev(values) if len(values) > 1 else 0.0
