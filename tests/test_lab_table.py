"""runs/lab_table.py's instruments and findings on hand-made results: the minimum detectable
forgetting computed by hand from a results pair, the continuous retention figure, and each new
finding (the positive control, the paper's stress profile, the paper's question) on tables where
it holds and on others where it fails."""
import json
import math
from argparse import Namespace

import pytest

from conftest import load_script

lab = load_script("runs/lab.py")
lab_table = lab.lab_table

N = 200  # questions of each retention task (and of the target)


def results(target=40, mmlu_lost=0, mmlu_won=0, mc2_drop=0.0, logprob_drop=0.0, churn=0):
    """A results file as eval.py writes it. The base (all defaults) is right on the target's first
    `target`% of questions and on MMLU's first 70%, with MC2 scores of .7 ± .05 (alternating) and
    log-probabilities of -.5 ± .1. A run loses `mmlu_lost` of those MMLU questions and wins
    `mmlu_won` of the others (`churn` more of each: a flip both ways), and moves every MC2 score
    down by mc2_drop and every log-probability down by logprob_drop."""
    hits = [i < target * N // 100 for i in range(N)]
    right = [(i < 0.7 * N and not i < mmlu_lost + churn) or (0.7 * N <= i < 0.7 * N + mmlu_won
                                                              + churn) for i in range(N)]
    wiggle = [(-1) ** i for i in range(N)]
    logprobs = [-0.5 + 0.1 * w - logprob_drop for w in wiggle]
    gsm8k = [{"index": i, "exact_match": {"strict": h, "flexible": h}} for i, h in enumerate(hits)]
    mmlu = [{"index": i, "subject": "s", "pred": 0 if r else 1, "gold": 0, "logprob": lp}
            for i, (r, lp) in enumerate(zip(right, logprobs))]
    mc2 = [{"index": i, "score": 0.7 + 0.05 * w - mc2_drop, "logprob": lp}
           for i, (w, lp) in enumerate(zip(wiggle, logprobs))]
    mean = lambda values: sum(values) / len(values)  # noqa: E731
    return {"tasks": {
        "gsm8k": {"n": N, "samples": gsm8k, "metrics": {"exact_match_flexible": mean(hits),
                                                        "exact_match_strict": mean(hits)}},
        "mmlu": {"n": N, "samples": mmlu, "metrics": {"acc": mean(right), "logprob": mean(
            [s["logprob"] for s in mmlu])}},
        "truthfulqa_mc2": {"n": N, "samples": mc2, "metrics": {
            "mc2": mean([s["score"] for s in mc2]), "logprob": mean([s["logprob"] for s in mc2])}}}}


def test_minimum_detectable_forgetting_by_hand():
    """MDF = 1.96 x the paired standard error of base - run, from the per-question differences."""
    base = results()
    run = results(mmlu_lost=8, mmlu_won=2, mc2_drop=0.03)
    row = lab_table.row_of(run, base)
    # MMLU: 8 questions lost (+100 points each), 2 won (-100), 190 the same (0): the mean 3 points
    differences = [100.0] * 8 + [-100.0] * 2 + [0.0] * 190
    mean = sum(differences) / N
    variance = sum((d - mean) ** 2 for d in differences) / (N - 1)
    assert mean == 3.0 and variance == pytest.approx((8 * 97 ** 2 + 2 * 103 ** 2 + 190 * 9) / 199)
    assert row["mdf_mmlu"] == pytest.approx(1.959963984540054 * math.sqrt(variance / N))
    assert row["mdf_mmlu"] == pytest.approx(3.0787, abs=1e-4)  # the same, as a number
    # MC2: every score 3 points lower, the same for every question: no spread, nothing undetected
    assert row["mdf_truthfulqa_mc2"] == pytest.approx(0.0, abs=1e-9)
    # Forgetting, the mean of the two tasks: its error sqrt(SE_mmlu² + SE_mc2²) / 2
    assert row["mdf_forgetting"] == pytest.approx(row["mdf_mmlu"] / 2)
    assert row["forgetting"] == pytest.approx((3.0 + 3.0) / 2)
    # the continuous figure: the mean log-probability of the true choices, and its drop
    drifted = lab_table.row_of(results(logprob_drop=0.02), base)
    assert drifted["forgetting"] == 0.0 and drifted["forgetting_logprob"] == pytest.approx(0.02)
    assert drifted["mmlu_logprob"] == pytest.approx(-0.52)


def write_lab(out, runs_results: dict, bases=(1, 2), seeds=(3, 4)):
    """A lab folder of hand-made results: {run: function (base, seed) -> results}."""
    for b in bases:
        path = out / f"b{b}" / "results" / "base.json"
        path.parent.mkdir(parents=True)
        path.write_text(json.dumps(results()))
        for s in seeds:
            folder = out / f"b{b}" / f"seed{s}" / "results"
            folder.mkdir(parents=True)
            for name, make in runs_results.items():
                (folder / f"{name}.json").write_text(json.dumps(make(b, s)))
    (out / "lab.json").write_text("{}")
    return Namespace(out=out, bases=list(bases), seeds=list(seeds), no_plot=True)


RUNS = {"sft_stress": lab.run("train_sft.py", []), lab_table.CONTROL: lab.run("train_sft.py", []),
        "opd_stress": lab.run("train_distill.py", [], teacher="sft_stress")}


@pytest.mark.parametrize("control,stress,holds", [
    # the control forgets 3 points, few questions move: detected; stress 5 points below the base
    # on the target, 15% of retention lost: the paper's profile; its student beats it on both
    (dict(mmlu_lost=6, mc2_drop=0.03), dict(target=35, mmlu_lost=21, mc2_drop=0.105), True),
    # the control forgets 1 point; stress gains on the target and loses 40%: no finding holds
    (dict(mmlu_lost=2, mc2_drop=0.01), dict(target=60, mmlu_lost=56, mc2_drop=0.28), False),
    # the control forgets 3 points, but amid churn (20 lost, 20 won more): its interval holds 0
    (dict(mmlu_lost=6, mc2_drop=0.03, churn=20), dict(target=45, mmlu_lost=56, mc2_drop=0.28),
     False),
])
def test_findings_hold_and_fail_on_hand_made_tables(tmp_path, control, stress, holds):
    student = dict(target=38, mmlu_lost=3, mc2_drop=0.01, logprob_drop=0.01)
    args = write_lab(tmp_path, {"sft_stress": lambda b, s: results(**stress),
                                lab_table.CONTROL: lambda b, s: results(**control),
                                "opd_stress": lambda b, s: results(**student)})
    lab_table.write_tables(args, RUNS)
    table = json.loads((tmp_path / "table.json").read_text())
    found = {f["claim"].split(" (")[0]: f for f in table["findings"]}
    control_finding = found["the positive control forgets 2 to 5 points"]
    assert control_finding["holds"] is holds
    assert all(ok is holds for ok in control_finding["holds_per_base"].values())
    assert found["stress SFT's target is 0 to 10 points below its base's"]["holds"] is holds
    assert found["stress SFT loses 10 to 25% of retention"]["holds"] is holds
    answer = table["paper_question"]
    assert answer["of"] == 4 and answer["in_profile"] == (4 if holds else 0)
    assert answer["answered"] == answer["beats_on_retention"] == (4 if holds else 0)
    assert answer["beats_on_target"] == (4 if holds else 0)  # 38% against the teacher's 35%
    # the continuous figure beside the student's retention: 0.01 nats better than no change,
    # against its teacher (which did not move its log-probabilities)
    retention = found["opd_stress beats its teacher on retention"]
    assert retention["logprob"]["mean"] == pytest.approx(-0.01)
    assert retention["logprob"]["item"]["excludes_zero"]  # every question moved the same way
    text = (tmp_path / "table.md").read_text()
    assert "| b1 | mmlu | 200 | 70.0 ± 3.2 | -0.500 |" in text  # the instruments' table
    assert f"lands there on {answer['in_profile']} of 4" in text


def test_control_mdf_in_the_instruments_is_the_mean_of_its_seeds(tmp_path):
    args = write_lab(tmp_path, {lab_table.CONTROL: lambda b, s: results(mmlu_lost=4 + s)})
    lab_table.write_tables(args, {lab_table.CONTROL: RUNS[lab_table.CONTROL]})
    table = json.loads((tmp_path / "table.json").read_text())
    rows = {(r["base"], r["task"]): r for r in table["instruments"]}
    per = table["per_seed"][lab_table.CONTROL]
    assert rows[("b1", "mmlu")]["mdf_control"] == pytest.approx(
        (per["b1/seed3"]["mdf_mmlu"] + per["b1/seed4"]["mdf_mmlu"]) / 2)
    assert rows[("b1", "mmlu")]["mdf_min"] == per["b1/seed3"]["mdf_mmlu"]  # 7 lost, not 8
    assert rows[("b2", "forgetting")]["mdf_max"] == per["b2/seed4"]["mdf_forgetting"]
