"""runs/paper.py: --smoke runs the whole pipeline (data, base, two SFTs, two OPDs, RL, six evals)
into a complete Table 2; a second invocation skips everything; a lost final model resumes from its
checkpoint; and the pipeline's guards (other settings, a missing teacher, a failing step) stop it
with a clear line."""
import json
import re
import subprocess
import sys
import time

import pytest

from conftest import ROOT, load_script

pytestmark = pytest.mark.usefixtures("one_thread")  # tiny models run faster on one thread

paper = load_script("runs/paper.py")

# a score or Forgetting ± its standard error, a Retention, an MMD² with its p-value
NUMBER = re.compile(r"-?\d+\.\d+( ± \d+\.\d+|%| \(p [01]\.\d{3}\))")
# a difference from the base ± its standard error [95% interval], maybe marked
DIFFERENCE = re.compile(r"[+-]\d+\.\d+ ± \d+\.\d+ \[-?\d+\.\d+, -?\d+\.\d+\]( \*)?")


def table_rows(out, table=0):
    """{run: its cells} from OUT/table.md's Table 2 (table=0) or its differences from the base (1),
    in the table's order."""
    lines = [text for text in (out / "table.md").read_text().split("\n\n")
             if text.startswith("| run |")][table].splitlines()
    first, last = ("GSM8K (flex)", "Retention ↑ | Drift (MMD²)") if table == 0 else \
        ("Δ GSM8K (flex)", "Forgetting ↓")
    assert lines[0].startswith(f"| run | {first} |")
    assert lines[0].endswith(f"| {last} |")
    return {cells[0]: cells[1:] for cells in ([c.strip() for c in line.strip("|").split("|")]
                                              for line in lines[2:] if line.startswith("| "))}


def test_smoke_pipeline_makes_the_table_then_skips_then_resumes(shared_data, tmp_path, capsys):
    out, data = tmp_path / "out", tmp_path / "data"
    argv = ["--smoke", "--out", str(out), "--data_dir", str(data), "--source", str(shared_data)]
    paper.main(argv + ["--in_process"])
    log = capsys.readouterr().out

    # every step printed its command with this Python before it ran
    for step, script in [("data", "prepare.py"), ("base eval", "eval.py"),
                         ("sft_mild training", "train_sft.py"),
                         ("sft_stress training", "train_sft.py"),
                         ("opd_mild training", "train_distill.py"),
                         ("opd_stress training", "train_distill.py"),
                         ("rl training", "train_rl.py"),
                         ("rl eval", "eval.py"), ("table", "eval.py")]:
        assert re.search(rf"\[paper\] {step}: {re.escape(sys.executable)} \S*{script} ", log), step
    assert "--preset stress" in log
    assert f"--teacher {out / 'sft_stress'}" in log

    rows = table_rows(out)
    assert list(rows) == ["base", "sft_mild", "sft_stress", "opd_mild", "opd_stress", "rl"]
    for name, cells in rows.items():
        assert len(cells) == 8
        # the base has no Forgetting, Retention or drift
        filled = cells[:5] if name == "base" else cells
        assert all(NUMBER.fullmatch(c) for c in filled), (name, cells)
        assert name != "base" or cells[5:] == ["–", "–", "–"]
    # each run's paired differences from the base, on the same questions
    differences = table_rows(out, table=1)
    assert list(differences) == list(rows)[1:]
    assert all(DIFFERENCE.fullmatch(c) for cells in differences.values() for c in cells), \
        differences
    # each row scores its own model, on the same seeded subsets, drift against the base
    for name in rows:
        results = json.loads((out / "results" / f"{name}.json").read_text())
        assert results["model"] == str(out / ("smoke_base" if name == "base" else name))
        assert results["settings"]["limit"] == {"gsm8k": 2, "mmlu": 12, "truthfulqa_mc1": 2,
                                                "truthfulqa_mc2": 2}
        assert ("drift" in results) == (name != "base")
        assert name == "base" or results["drift"]["reference"] == str(out / "smoke_base")

    # again, through the command line: everything is done, so nothing runs
    began = time.time()
    again = subprocess.run([sys.executable, str(ROOT / "runs" / "paper.py"), *argv],
                           capture_output=True, text=True)
    assert again.returncode == 0, again.stderr
    assert time.time() - began < 15
    skipped = re.findall(r"\[paper\] skip (.+?):", again.stdout)
    runs = [f"{name} {what}" for name in list(rows)[1:] for what in ("training", "eval")]
    assert skipped == ["data", "smoke_base", "base eval"] + runs + ["table"]
    assert "| opd_stress |" in again.stdout

    # the RL run lost its final model: it is finished from its checkpoint, evaluated again, and the
    # table rewritten
    (out / "rl" / "model.safetensors").unlink()
    table_before = (out / "table.md").stat().st_mtime
    paper.main(argv + ["--in_process"])
    log = capsys.readouterr().out
    assert re.search(r"\[paper\] rl training: .*train_rl\.py .* --resume\n", log)
    assert "[paper] rl eval: " in log
    assert "[paper] table: " in log
    assert "skip opd_stress training" in log
    assert "skip opd_stress eval" in log
    assert (out / "table.md").stat().st_mtime > table_before
    assert list(table_rows(out)) == list(rows)


def fake_data(tmp_path):
    for name in paper.DATA_FILES:
        (tmp_path / "data" / name).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / "data" / name).write_text("")
    return ["--out", str(tmp_path / "out"), "--data_dir", str(tmp_path / "data"), "--in_process"]


def test_an_out_dir_made_with_other_settings_is_refused(tmp_path):
    common = fake_data(tmp_path)
    (tmp_path / "out").mkdir()
    settings = {"model": "smoke", "smoke": True, "steps": 2}
    (tmp_path / "out" / "pipeline.json").write_text(json.dumps(settings))
    with pytest.raises(SystemExit, match="holds a pipeline run with .* use another --out"):
        paper.main(common + ["--model", "some/model", "--only", "base"])


def test_opd_without_its_teacher_stops_before_training(tmp_path, capsys):
    with pytest.raises(SystemExit,
                       match=r"opd_stress needs its teacher .*sft_stress.*--only "
                             r"sft_stress,opd_stress"):
        paper.main(fake_data(tmp_path) + ["--model", "some/model", "--only", "opd_stress"])
    assert "skip data" in capsys.readouterr().out


def test_a_failing_step_stops_the_pipeline_with_its_command(tmp_path, capsys):
    missing = tmp_path / "no_such_model"
    with pytest.raises(SystemExit,
                       match=r"base eval failed \(exit status 1\): .*eval\.py --model "
                             r".*no_such_model"):
        paper.main(fake_data(tmp_path) + ["--model", str(missing), "--only", "base,rl"])
    assert "rl training" not in capsys.readouterr().out  # nothing after the failure ran
