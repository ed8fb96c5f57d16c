"""Error bars: stats.py's standard errors, paired and unpaired differences against hand
computations and lm-eval's formula; report.py's table (eval.py --report) with its differences and
settings warnings; summarize_seeds for the lab; the paper's published table read with error bars.
(Old results files without per-question scores: test_eval.py's report tests.)"""
import json
import math

import pytest

from harness import report as R
from harness import stats as S
from conftest import load_script


# --------------------------------------------------------------------------------------------------
# stats.py

def test_mean_stderr_is_lm_evals_formula():
    # lm_eval.api.metrics.mean_stderr: sample_stddev / sqrt(n), sample_stddev with n - 1
    # [1, 0, 1, 1, 0]: mean 0.6, squared deviations 3 x 0.16 + 2 x 0.36 = 1.2, / 4 = 0.3
    assert S.mean_stderr([1, 0, 1, 1, 0]) == pytest.approx(math.sqrt(0.3 / 5), rel=1e-12)
    assert S.mean_stderr([1, 0, 1, 1, 0]) == pytest.approx(0.2449489742783178, rel=1e-12)
    # [0.2, 0.9, 0.4]: mean 0.5, squared deviations 0.09 + 0.16 + 0.01 = 0.26, / 2 = 0.13
    assert S.mean_stderr([0.2, 0.9, 0.4]) == pytest.approx(math.sqrt(0.13 / 3), rel=1e-12)
    assert S.mean_stderr([True, False]) == pytest.approx(0.5)  # sqrt(0.5 / 2)
    assert S.mean_stderr([1.0]) is None and S.mean_stderr([]) is None  # lm-eval: N/A
    assert S.mean_stderr([1, 1, 1]) == 0.0
    # from a proportion and n alone: the same number as the 0/1 list
    assert S.proportion_stderr(0.6, 5) == pytest.approx(S.mean_stderr([1, 0, 1, 1, 0]), rel=1e-12)
    assert 100 * S.proportion_stderr(0.448, 500) == pytest.approx(2.2262, abs=1e-4)


@pytest.mark.slow
def test_mean_stderr_is_lm_evals_own_function():
    """Against the installed lm-evaluation-harness (skips without it: not a dependency)."""
    metrics = pytest.importorskip("lm_eval.api.metrics")
    for values in ([1, 0, 1, 1, 0], [0.2, 0.9, 0.4], [0.0] * 3 + [1.0] * 97):
        assert S.mean_stderr(values) == pytest.approx(metrics.mean_stderr(values), rel=1e-12)
    # what lm-eval prints for a mean-aggregated metric (acc, exact_match, TruthfulQA MC2)
    assert metrics.stderr_for_metric(metrics.mean, bootstrap_iters=100000) is metrics.mean_stderr


def test_clustered_stderr_by_hand():
    # mean 0.5, deviations ±0.5; mean_stderr² = (1.5 / 5) / 6 = 0.05; clusters a: +.5 -.5 +.5 (sum
    # 0.5), b: +.5 -.5 (sum 0), c: -.5; cross products = (0.25 + 0 + 0.25 - 1.5) / 36 = -1 / 36
    values, clusters = [1, 0, 1, 1, 0, 0], ["a", "a", "a", "b", "b", "c"]
    assert S.clustered_stderr(values, clusters) == pytest.approx(math.sqrt(0.05 - 1 / 36))
    assert S.clustered_stderr(values, range(6)) == pytest.approx(S.mean_stderr(values))
    # questions that agree within their subject: clustering widens the error
    same = [1, 1, 1, 0, 0, 0]
    assert S.clustered_stderr(same, "aaabbb") > 1.5 * S.mean_stderr(same)


def test_paired_and_unpaired_differences_by_hand():
    run, base = [1, 1, 0, 1, 0], [0, 1, 0, 0, 0]
    d = S.paired_difference(run, base)
    # differences [1, 0, 0, 1, 0]: mean 0.4, sample variance (2 x 0.36 + 3 x 0.16) / 4 = 0.3
    assert d["delta"] == pytest.approx(0.4)
    assert d["stderr"] == pytest.approx(math.sqrt(0.3 / 5))
    assert d["low"] == pytest.approx(0.4 - 1.959963984540054 * math.sqrt(0.06))  # -0.080091
    assert d["high"] == pytest.approx(0.880091, abs=1e-6)
    assert d["paired"] and d["excludes_zero"] is False
    # 40 questions, the run right on 6 more than the base and wrong on none the base had right:
    # paired, the gain is clear; as two independent scores (26/40 vs 20/40) it is not
    base = [1] * 20 + [0] * 20
    run = [1] * 26 + [0] * 14
    paired = S.paired_difference(run, base)
    # 6 ones in 40: mean 0.15, sample variance (6 x 0.85² + 34 x 0.15²) / 39 = 5.1 / 39
    assert paired["stderr"] == pytest.approx(math.sqrt(5.1 / 39 / 40))
    assert paired["low"] > 0 and paired["excludes_zero"]
    unpaired = S.unpaired_difference(0.65, S.mean_stderr(run), 0.5, S.mean_stderr(base))
    assert unpaired["stderr"] == pytest.approx(math.sqrt(0.65 * 0.35 / 39 + 0.25 / 39))
    assert unpaired["low"] < 0 and not unpaired["excludes_zero"] and not unpaired["paired"]
    with pytest.raises(ValueError):
        S.paired_difference([1, 0], [1])
    # Forgetting-like means of differences on independent question sets
    mean = S.average_of_differences([S.difference(2.0, 3.0, True), S.difference(4.0, 4.0, False)])
    assert (mean["delta"], mean["stderr"], mean["paired"]) == (3.0, 2.5, False)
    assert S.unpaired_difference(0.5, None, 0.2, 0.1)["stderr"] is None


def test_permutation_p_value_counts_the_observed_split():
    assert S.permutation_p_value(1.0, [0.5, 1.0, 2.0, 0.1]) == pytest.approx(3 / 5)
    assert S.permutation_p_value(9.0, [0.5, 1.0]) == pytest.approx(1 / 3)  # never 0
    assert S.permutation_p_value(0.3, [0.1 + 0.2]) == 1.0  # equal up to rounding counts as equal


# --------------------------------------------------------------------------------------------------
# report.py on results files with per-question records, as eval.py writes them

def results(path, mmlu, mc2, indices=None, settings=None, gsm8k=None, drift=None):
    """A results file: MMLU questions right (1) or wrong (0), TruthfulQA MC2 scores, GSM8K flexible
    hits (strict: all wrong)."""
    indices = list(range(len(mmlu))) if indices is None else indices
    subjects = ["algebra", "algebra", "law", "law", "law"]
    tasks = {"mmlu": {"metrics": {"acc": S.mean(mmlu)},
                      "samples": [{"index": i, "subject": subjects[k % 5], "pred": 1 - hit,
                                   "gold": 0} for k, (i, hit) in enumerate(zip(indices, mmlu))]},
             "truthfulqa_mc2": {"metrics": {"mc2": S.mean(mc2)},
                                "samples": [{"index": i, "score": s} for i, s in enumerate(mc2)]}}
    if gsm8k is not None:
        tasks["gsm8k"] = {"metrics": {"exact_match_strict": 0.0,
                                      "exact_match_flexible": S.mean(gsm8k)},
                          "samples": [{"index": i, "exact_match": {"strict": 0, "flexible": h}}
                                      for i, h in enumerate(gsm8k)]}
    data = {"model": "m", "settings": settings or {}, "tasks": tasks}
    if drift:
        data["drift"] = drift
    path.write_text(json.dumps(data))
    return str(path)


def test_item_scores_and_stderrs_of_a_task():
    samples = [{"index": 0, "subject": "a", "pred": 1, "gold": 1},
               {"index": 5, "subject": "a", "pred": 2, "gold": 1},
               {"index": 9, "subject": "b", "pred": 0, "gold": 0}]
    assert R.item_scores(samples, "acc") == [1.0, 0.0, 1.0]
    assert R.item_scores([{"index": 0}], "acc") is None  # a file from before error bars
    assert R.item_scores([{"score": None}], "mc2") is None  # a score nulled as not finite
    assert R.task_means(samples, ["acc"]) == {"acc": pytest.approx(2 / 3)}
    metrics = R.with_stderrs({"metrics": {"acc": 2 / 3, "acc_per_subject": {"a": 0.5, "b": 1.0}},
                              "samples": samples})
    assert list(metrics) == ["acc", "acc_stderr", "acc_stderr_clustered", "acc_per_subject"]
    assert metrics["acc_stderr"] == pytest.approx(math.sqrt((2 / 3) * (1 / 3) / 2))
    assert metrics["acc_stderr_clustered"] == pytest.approx(S.clustered_stderr([1, 0, 1], "aab"))


def test_report_paired_differences_by_hand(tmp_path, capsys):
    base = results(tmp_path / "base.json", mmlu=[0, 1, 0, 0, 0], mc2=[0.4, 0.6, 0.5],
                   gsm8k=[0, 0, 1, 1])
    rl = results(tmp_path / "rl.json", mmlu=[1, 1, 0, 1, 0], mc2=[0.4, 0.6, 0.2],
                 gsm8k=[1, 1, 1, 1],
                 drift={"reference": "b", "n_prompts": 100, "max_new_tokens": 128,
                        "temperature": 1.0, "seed": 0,
                        "lexical": {"mmd2": 0.0123, "p_value": 0.002}})
    table = R.report([base, rl])
    lines = table.splitlines()
    # scores ± lm-eval's stderr: MMLU 20 ± sqrt(0.2 / 5) = 20.0 ± 20.0, 60 ± sqrt(.3 / 5) = 24.5
    assert lines[2].startswith("| base | 50.0 ± 28.9 | 0.0 ± 0.0 | 20.0 ± 20.0 | – | 50.0 ± 5.8 |")
    # Forgetting: mean(20 - 60, 50 - 40) = -15; its error from the paired differences, MMLU's
    # (24.5, below) and MC2's ([0, 0, 30]: 10.0) in quadrature: sqrt(600 + 100) / 2 = 13.2
    # MC2 [0.4, 0.6, 0.2]: sample variance 0.08 / 2, stderr sqrt(0.04 / 3) = 11.5 points;
    # Retention: mean(60 / 20, 40 / 50) = 190%
    assert lines[3] == ("| rl | 100.0 ± 0.0 | 0.0 ± 0.0 | 60.0 ± 24.5 | – | 40.0 ± 11.5 "
                        "| -15.0 ± 13.2 | 190.0% | 0.0123 (p 0.002) |")
    # paired: MMLU's differences [1, 0, 0, 1, 0] (above): +40.0 ± 24.5 [-8.0, 88.0]; GSM8K's
    # [1, 1, 0, 0]: +50.0 ± 28.9 [-6.6, 106.6]; MC2's [0, 0, -30]: -10.0 ± 10.0 [-29.6, 9.6]
    row = next(line for line in lines if line.startswith("| rl | +"))
    assert row == ("| rl | +50.0 ± 28.9 [-6.6, 106.6] | +0.0 ± 0.0 [0.0, 0.0] "
                   "| +40.0 ± 24.5 [-8.0, 88.0] | – | -10.0 ± 10.0 [-29.6, 9.6] "
                   "| -15.0 ± 13.2 [-40.9, 10.9] |")
    assert "MMLU's Δ with standard errors clustered by subject (Miller 2024): rl ± " in table
    assert "p: the share of random splits" in table
    assert capsys.readouterr().err == ""  # same questions, same settings: nothing to warn about

    # a clear paired gain is marked; MMLU asked on other questions is compared unpaired, and said
    sure = results(tmp_path / "sure.json", mmlu=[1, 1, 1, 1, 1], mc2=[0.9, 0.9, 0.8],
                   indices=[0, 1, 2, 3, 7], gsm8k=[1, 1, 1, 1])
    row = next(line for line in R.report([base, sure]).splitlines()
               if line.startswith("| sure | +"))
    cells = [c.strip() for c in row.strip("|").split("|")]
    # MC2: [+50, +30, +30]: mean 36.7, sample std 11.5, / sqrt 3 = 6.7; excludes 0
    assert cells[5] == "+36.7 ± 6.7 [23.6, 49.7] *"
    # MMLU unpaired: 100 ± 0 against 20 ± 20: +80.0 ± 20.0 [40.8, 119.2]
    assert cells[3] == "+80.0 ± 20.0 [40.8, 119.2] * †"
    assert "warning: sure scored other mmlu examples than base (--limit/--seed): compared " \
        "unpaired" in capsys.readouterr().err


def test_report_warns_when_runs_differ_in_settings(tmp_path, capsys):
    settings = {"tasks": ["mmlu", "truthfulqa_mc2"], "limit": {"mmlu": 5, "truthfulqa_mc2": 3},
                "seed": 1234, "gsm8k_shots": 5, "mmlu_shots": 5, "dtype": "bfloat16"}
    base = results(tmp_path / "base.json", [0, 1, 0, 0, 0], [0.4, 0.6, 0.5], settings=settings)
    other = {**settings, "tasks": ["mmlu"], "limit": {"mmlu": 4, "truthfulqa_mc2": 3},
             "mmlu_shots": 0, "dtype": "float32"}
    run = results(tmp_path / "run.json", [1, 1, 0, 1, 0], [0.4, 0.6, 0.2], settings=other)
    same = results(tmp_path / "same.json", [1, 1, 0, 1, 0], [0.4, 0.6, 0.2], settings=settings)
    R.report([base, run, same])
    assert capsys.readouterr().err.splitlines() == [
        "warning: run was scored with dtype=float32, base with dtype=bfloat16",
        "warning: run was scored with limit[mmlu]=4, base with limit[mmlu]=5",
        "warning: run was scored with mmlu_shots=0, base with mmlu_shots=5"]
    # and the drift settings: each run against the first one measured
    drift = {"reference": "b", "n_prompts": 100, "max_new_tokens": 128, "temperature": 1.0,
             "seed": 0, "lexical": {"mmd2": 0.01}}
    a = results(tmp_path / "a.json", [1, 1, 0, 1, 0], [0.4, 0.6, 0.2], drift=drift)
    b = results(tmp_path / "b.json", [1, 1, 0, 1, 0], [0.4, 0.6, 0.2],
                drift={**drift, "seed": 3, "lexical": {"mmd2": 0.02}})
    R.report([base, a, b])
    assert capsys.readouterr().err == "warning: b's drift was measured with seed=3, a's with " \
        "seed=0\n"


def test_report_refuses_a_file_that_is_no_results_file(tmp_path):
    (tmp_path / "x.json").write_text('{"tasks": 3}')
    with pytest.raises(SystemExit, match=r"--report .*x.json: not a results file of eval.py"):
        R.report([str(tmp_path / "x.json")])


# --------------------------------------------------------------------------------------------------
# summarize_seeds: what the lab's table can show for each finding

def test_summarize_seeds_by_hand(tmp_path):
    base = json.loads(open(results(tmp_path / "b.json", [0, 1, 0, 0, 0], [0.4, 0.6, 0.5])).read())
    seed0 = results(tmp_path / "s0.json", [1, 1, 0, 1, 0], [0.4, 0.6, 0.5])
    seed1 = results(tmp_path / "s1.json", [1, 1, 1, 0, 1], [0.1, 0.6, 0.5])
    figures = R.summarize_seeds([(seed0, base), (seed1, base)])  # paths or dicts
    assert list(figures) == ["mmlu", "truthfulqa_mc2", "forgetting"]
    mmlu = figures["mmlu"]
    # scores 60 and 80: mean 70, sample std sqrt(200) = 14.1
    assert (mmlu["mean"], mmlu["spread"], mmlu["n"]) == (70.0, pytest.approx(math.sqrt(200)), 2)
    # per question, the run's mean over seeds [100, 100, 50, 50, 50] - the base's [0, 100, 0, 0, 0]
    # = [100, 0, 50, 50, 50]: mean 50, sample variance 5000 / 4, stderr sqrt(1250 / 5) = 15.8
    assert mmlu["delta"] == pytest.approx(50.0)
    assert mmlu["stderr"] == pytest.approx(math.sqrt(250))
    assert mmlu["low"] == pytest.approx(50 - 1.959963984540054 * math.sqrt(250))
    assert mmlu["paired"] and mmlu["excludes_zero"]
    # Forgetting per seed: mean(20 - 60, 50 - 50) = -20, mean(20 - 80, 50 - 40) = -25; its error:
    # MC2 base - run per question [15, 0, 0]: stderr sqrt(75 / 3) = 5, with MMLU's in quadrature
    forgetting = figures["forgetting"]
    assert forgetting["mean"] == forgetting["delta"] == pytest.approx(-22.5)
    assert forgetting["spread"] == pytest.approx(math.sqrt(12.5))
    assert forgetting["stderr"] == pytest.approx(math.sqrt(250 + 25) / 2)
    # seeds scored on other questions: each pair's own error, combined as independent
    seed2 = results(tmp_path / "s2.json", [1, 1, 1, 1, 0], [0.1, 0.6, 0.5], indices=[0, 1, 2, 3, 9])
    mixed = R.summarize_seeds([(seed0, base), (seed2, base)])["mmlu"]
    first = S.paired_difference([100, 100, 0, 100, 0], [0, 100, 0, 0, 0])["stderr"]
    second = math.hypot(S.mean_stderr([100, 100, 100, 100, 0]), S.mean_stderr([0, 100, 0, 0, 0]))
    assert mixed["stderr"] == pytest.approx(math.hypot(first, second) / 2)
    assert mixed["delta"] == pytest.approx(50.0) and not mixed["paired"]


# --------------------------------------------------------------------------------------------------
# The paper's own Table 2, read with error bars (docs/paper.md)

def test_the_published_table_with_error_bars():
    table = load_script("runs/paper.py").published_with_errors()
    gain = 100 * math.sqrt(0.512 * 0.488 / 499 + 0.448 * 0.552 / 499)  # unpaired, n = 500
    assert gain == pytest.approx(3.157, abs=1e-3)
    assert "| base | 44.8 ± 2.2 | 30.0 ± 3.2 | 43.6 ± 2.2 |" in table
    assert "| mild SFT - base, GSM8K | +6.4 ± 3.2 [0.2, 12.6] * † |" in table
    assert ("| OPD from the stress teacher - stress SFT, GSM8K | +4.6 ± 3.1 [-1.6, 10.8] † |"
            in table)
    assert "| light RL - base, GSM8K | +2.4 ± 3.2 [-3.8, 8.6] † |" in table
    assert "| Forgetting of mild SFT | -0.1 ± 2.8 [-5.6, 5.3] † |" in table
    assert "| Forgetting of stress SFT | +6.4 ± 2.7 [1.0, 11.7] * † |" in table
    assert "| Forgetting of OPD from the stress teacher | +1.5 ± 2.8 [-3.9, 7.0] † |" in table
    assert "| Forgetting of light RL | +0.2 ± 2.8 [-5.2, 5.6] † |" in table
