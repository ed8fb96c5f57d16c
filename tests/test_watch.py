"""No silent no-ops (harness/watch.py): each warning, at the step its threshold says and once per
run of bad steps; said in one line and kept in metrics.jsonl; picked up where it was after
--resume; and triggered by real runs: RL whose groups all score alike and whose answers are all
cut off, distillation whose teacher never reaches an answer, a run that learns nothing."""
import json

import pytest

import train_distill
import train_rl
from harness.training import MetricsLog
from harness.watch import STEPS_RUNNING, Watch
from conftest import train_lines

pytestmark = pytest.mark.usefixtures("one_thread")

GOOD = dict(grad_norm=0.5, zero_var_frac=0.25, truncated_frac=0.0, signal_answered=0.5)


def names(warnings):
    return [w.split(":")[0] for w in warnings]


@pytest.mark.parametrize("rule,figure,bad,fine", [
    ("equal_rewards", "zero_var_frac", 0.75, 0.5),
    ("cut_off", "truncated_frac", 0.6, 0.5),
    ("no_answer", "signal_answered", 0.04, 0.05),
])
def test_each_rule_speaks_at_its_fifth_bad_step_in_a_row_and_once(rule, figure, bad, fine):
    """Bad for 4 steps, then fine (at the threshold): nothing; then bad for 7: one warning, at
    the 5th; then fine and bad for 5 again: a second one."""
    watch = Watch(steps=100)
    values = [bad] * 4 + [fine] + [bad] * 7 + [fine] + [bad] * 5
    said = {}
    for step, value in enumerate(values, start=1):
        warnings = watch.check(step, {**GOOD, figure: value})
        if warnings:
            said[step] = warnings
    assert list(said) == [4 + 1 + STEPS_RUNNING, 13 + STEPS_RUNNING]
    assert all(names(w) == [rule] for w in said.values())
    assert f"for {STEPS_RUNNING} steps running ({figure} {bad:.2f})" in said[10][0]


def test_no_signal_after_five_steps_and_at_the_end_of_a_run_that_learned_nothing():
    watch = Watch(steps=7)
    said = {step: watch.check(step, {"grad_norm": 0.0}) for step in range(1, 8)}
    assert {step: names(w) for step, w in said.items() if w} == {5: ["no_signal"],
                                                                 7: ["no_signal"]}
    assert "no step so far carried a signal" in said[5][0]
    assert "not one of the run's 7 steps carried a signal" in said[7][0]
    one_step_learned = Watch(steps=7)  # a single step with a gradient: no end note
    assert not [w for step in range(1, 8)
                for w in one_step_learned.check(step, {"grad_norm": float(step == 3)})]


def test_a_warning_is_one_line_and_kept_in_metrics_jsonl_and_resume_goes_on(tmp_path, capsys):
    """Through MetricsLog as a trainer logs: the step line, then the warning's line; the step's
    record holds it under "warnings". A run resumed at step 3 replays the kept records, so the
    warning falls at step 5, as it did in the uninterrupted run."""
    figures = dict(loss=0.0, grad_norm=0.0, zero_var_frac=1.0, lr=1e-5)
    log = MetricsLog(tmp_path, steps=8)
    for step in range(1, 6):
        log.log(step, **figures, tokens=10)
    printed = capsys.readouterr().out.splitlines()
    warned = [line for line in printed if line.startswith("warning:")]
    assert warned == [line for line in printed[-2:]]  # after step 5's line, one line each
    assert [w.split(": ")[1] for w in warned] == ["step 5", "step 5"]
    records = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert [bool(r.get("warnings")) for r in records] == [False] * 4 + [True]
    assert names(records[4]["warnings"]) == ["equal_rewards", "no_signal"]
    straight = (tmp_path / "metrics.jsonl").read_text()
    (tmp_path / "metrics.jsonl").write_text("".join(straight.splitlines(True)[:3]))
    log.log(3, kl_to_start=0.1)  # an eval's record between them changes nothing
    resumed = MetricsLog(tmp_path, steps=8, first_step=3)
    assert resumed.watch.seen == 3
    resumed.log(4, **figures, tokens=10)
    resumed.log(5, **figures, tokens=10)
    records = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert names(records[-1]["warnings"]) == ["equal_rewards", "no_signal"]


def test_an_rl_run_on_nothing_says_so(prepared_data, byte_model, tmp_path, monkeypatch):
    """Every answer scores 0 (equal rewards in every group, no gradient) and every answer runs to
    --max_new_tokens 4 (a random model rarely stops): equal_rewards, cut_off and no_signal at step
    5, and at the last step, the end note."""
    monkeypatch.setattr(train_rl, "gsm8k_reward", lambda text, gold: 0.0)
    out = tmp_path / "rl"
    train_rl.main(["--model", str(byte_model()), "--out_dir", str(out), "--data_dir",
                   str(prepared_data), "--steps", "6", "--batch_size", "2", "--grad_accum", "1",
                   "--group_size", "4", "--max_new_tokens", "4", "--eval_every", "0",
                   "--save_every", "0"])
    rows = train_lines(out)
    assert all(row["zero_var_frac"] == 1.0 and row["truncated_frac"] > 0.5 for row in rows)
    warned = {row["step"]: names(row["warnings"]) for row in rows if "warnings" in row}
    assert warned == {5: ["equal_rewards", "cut_off", "no_signal"], 6: ["no_signal"]}


def test_a_distillation_whose_teacher_never_answers_says_so(prepared_data, byte_model, tmp_path):
    """Continuations of one token from a random teacher never reach a '#### N' answer."""
    out = tmp_path / "opd"
    train_distill.main(["--model", str(byte_model(seed=0)), "--teacher",
                        str(byte_model(seed=1, name="teacher")), "--out_dir", str(out),
                        "--data_dir", str(prepared_data), "--steps", "5", "--batch_size", "1",
                        "--grad_accum", "1", "--max_new_tokens", "4", "--continuation_tokens",
                        "1", "--states_per_rollout", "1", "--eval_every", "0",
                        "--save_every", "0"])
    rows = train_lines(out)
    assert all(row["signal_answered"] == 0.0 and row["grad_norm"] > 0 for row in rows)
    warned = {row["step"]: names(row["warnings"]) for row in rows if "warnings" in row}
    assert warned == {5: ["no_answer"]}
