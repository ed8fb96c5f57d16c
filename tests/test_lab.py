"""runs/lab.py: the synthetic world is right and in the real formats, and the whole lab runs end to
end in miniature (world, tokenizer, pretraining, six runs over two seeds, table) and resumes; a slow
test runs one full seed and checks the two most robust findings."""
import json
import re
import shutil

import pytest

from conftest import load_script

pytestmark = pytest.mark.usefixtures("one_thread")  # tiny models run faster on one thread

lab = load_script("runs/lab.py")
world_module = lab.lab_world


def test_world_problems_solutions_and_facts_agree():
    from eval import extract_gsm8k_answer, gsm8k_reward
    world = world_module.World(seed=0)
    rng = __import__("random").Random(0)
    for _ in range(200):
        p = world.problem(rng)
        value = p["steps"][0][0]
        for a, op, k, b in p["steps"]:  # each step starts where the last ended and computes right
            assert (a == value and b == (a + k if op == "+" else a - k)
                    and 0 <= b <= world_module.MAX_VALUE)
            value = b
        a_text, b_text = world.solution(p, "A"), world.solution(p, "B")
        assert extract_gsm8k_answer(a_text) == extract_gsm8k_answer(b_text) == str(p["gold"])
        assert gsm8k_reward(a_text, str(p["gold"])) == gsm8k_reward(b_text, str(p["gold"])) == 1.0
        # style B: the same sums in digits, in another layout and phrasing (no line of style A's)
        sums = [f"{a} {op} {k} = {b}" for a, op, k, b in p["steps"]]
        pattern = r"\d+ [-+] \d+ = \d+"
        assert re.findall(pattern, b_text) == re.findall(pattern, a_text) == sums
        assert b_text.startswith("Step 1, ") and f"{p['name']} has" not in b_text
        assert "\n" in b_text.split("####")[0]
    for subject, rows in world.mmlu.items():
        for key, row in rows.items():
            assert (row["choices"][row["answer"]] == world.facts[subject][key]
                    and len(set(row["choices"])) == 4)
            assert row["question"] == world_module.SUBJECTS[subject][0].format(key=key)
    assert len(world.mmlu_rows()) == sum(n for _, _, n, _ in world_module.SUBJECTS.values())
    # the pretraining stream holds every kind of document, its MMLU drills in the eval's format
    from eval import mmlu_question
    mix = {"target": 1, "facts": 1, "mmlu": 1, "truthfulqa": 1}
    docs = list(__import__("itertools").islice(world.documents(rng, mix, "PRE"), 400))
    assert any(d.startswith("Question: ") and "\n#### " in d for d in docs)
    assert any(mmlu_question(r) + " " + "ABCD"[r["answer"]] in d
               for d in docs for r in world.mmlu_rows())


def test_world_data_reads_as_the_real_data(tmp_path):
    """eval.py's loaders read the files as they read data/prepare.py's, with the same fields and
    counts."""
    from eval import load_gsm8k, load_mmlu, load_truthfulqa, mmlu_prompt
    world = world_module.World(seed=0)
    world_module.write_data(world, tmp_path / "a", "A", n_train=50, n_test=20)
    world_module.write_data(world, tmp_path / "b", "B", n_train=50, n_test=20)
    train_a, train_b = load_gsm8k("train", tmp_path / "a"), load_gsm8k("train", tmp_path / "b")
    assert len(train_a) == 50 and len(load_gsm8k("test", tmp_path / "a")) == 20
    # same problems, other style
    assert [r["question"] for r in train_a] == [r["question"] for r in train_b]
    assert [r["gold"] for r in train_a] == [r["gold"] for r in train_b]
    assert all(a["answer"] != b["answer"] for a, b in zip(train_a, train_b))
    assert load_gsm8k("test", tmp_path / "a") == load_gsm8k("test", tmp_path / "b")
    test = load_mmlu("test", tmp_path / "a")
    assert len(test) == sum(n for _, _, n, _ in world_module.SUBJECTS.values())
    assert set(test[0]) == {"subject", "question", "choices", "answer"}
    assert mmlu_prompt(test[0], []).endswith("\nD. " + test[0]["choices"][3] + "\nAnswer:")
    tqa = load_truthfulqa(tmp_path / "a")
    assert len(tqa) == world_module.N_CREATURES
    assert all(r["mc1_targets"]["labels"][0] == 1 and sum(r["mc2_targets"]["labels"]) == 2
               for r in tqa)


def test_world_stress_data_and_the_long_tail_of_facts():
    """The stress data: the same questions, a third of the solutions in style B, the rest in the
    base's style A, and as sloppy as the pretraining corpus (most 3-step solutions stop a step
    early, with a wrong answer). Pretraining reads the k-th of n facts RARITY ** (k / (n - 1)) as
    often as the first."""
    world = world_module.World(seed=0)
    plain, stress = world.gsm8k_rows(2000, 1, "A"), world.gsm8k_rows(2000, 1, "sloppy_stress")
    assert [r["question"] for r in plain] == [r["question"] for r in stress]
    in_b = [r["answer"].startswith("Step 1, ") for r in stress]
    assert abs(sum(in_b) / len(in_b) - world_module.B_SHARE["stress"]) < 0.03
    three_steps = [(a, b) for a, b in zip(plain, stress) if a["answer"].count(" = ") == 3]
    stopped = [b["answer"].count(" = ") == 2 for _, b in three_steps]
    assert abs(sum(stopped) / len(stopped) - world_module.SLOPPY) < 0.05
    for (a, b), early in zip(three_steps, stopped):  # the answer of step 2, or the right one
        assert (b["answer"].split("#### ")[1] != a["answer"].split("#### ")[1]) == early
    import random
    frequency = world.frequency["creatures"]
    names = list(frequency)
    assert frequency[names[0]] == 1.0 and frequency[names[-1]] == pytest.approx(
        world_module.RARITY)
    rng, drawn = random.Random(0), []
    for _ in range(3000):
        three = world.common(rng, "creatures", 3)
        assert len(set(three)) == 3
        drawn += three
    # the commonest tenth and the rarest drawn about as often as their frequencies say (a
    # weighted sample without replacement of 3 of 384 is near proportional)
    tenth = len(names) // 10
    common, rare = set(names[:tenth]), set(names[-tenth:])
    ratio = sum(frequency[n] for n in rare) / sum(frequency[n] for n in common)
    counted = sum(n in rare for n in drawn) / sum(n in common for n in drawn)
    assert 0.75 * ratio < counted < 1.25 * ratio


def test_world_slip_style_misreads_then_computes_right():
    """The slip teacher's data: the same questions, style A, the start misread as the first change
    in the problems where that stays within the world (about two thirds), every step right."""
    world = world_module.World(seed=0)
    plain, slip = world.gsm8k_rows(300, 1, "A"), world.gsm8k_rows(300, 1, "slip")
    assert [r["question"] for r in plain] == [r["question"] for r in slip]
    changed = [(a, b) for a, b in zip(plain, slip) if a["answer"] != b["answer"]]
    assert 0.5 < len(changed) / len(plain) < 0.8
    for a, b in changed:
        first_change = int(re.search(r"\d+ [-+] (\d+) =", a["answer"]).group(1))
        assert b["answer"].split(" has ")[1].startswith(f"{first_change} ")
        sums = re.findall(r"(\d+) ([-+]) (\d+) = (\d+)", b["answer"])
        for x, op, k, y in sums:
            assert int(y) == (int(x) + int(k) if op == "+" else int(x) - int(k))
        assert b["answer"].endswith(f"#### {sums[-1][3]}")
        assert b["answer"].split("####")[1] != a["answer"].split("####")[1]


def test_mini_lab_end_to_end_then_skips(tmp_path, capsys, monkeypatch):
    out = tmp_path / "lab"
    lab.main(["--mini", "--out", str(out), "--bases", "0", "--seeds", "0,1", "--jobs", "2"])
    log = capsys.readouterr().out
    for step in ("world: ", "tokenizer", "b0 pretrain", "b0 base eval", "b0 seed0 sft_stress train",
                 "b0 seed1 opd_stress train", "b0 seed1 rl eval", "finished in"):
        assert f"[lab] {step}" in log, step
    assert re.search(r"\[lab\] b0 seed0 sft_stress train: \S+ \S*train_sft\.py "
                     r".*--data_dir \S*data_stress", log)
    assert re.search(r"opd_mild train: .*--teacher_temperature 0 .*--teacher \S*b0/seed0/sft_mild",
                     log)
    # the positive control: the stress data, gently
    assert re.search(r"\[lab\] b0 seed1 sft_control train: \S+ \S*train_sft\.py .*--lr 1e-4 "
                     r".*--data_dir \S*data_stress", log)
    # each step's own output went to its log
    assert "sft_mild" in (out / "logs" / "b0_seed0_sft_mild_train.log").read_text()

    # the base is a Hugging Face Qwen3 folder with the world's tokenizer, which our Tokenizer reads
    # back exactly
    from model import Qwen3, Tokenizer
    tokenizer = Tokenizer.from_pretrained(out / "b0" / "base")
    text = "Question: Ann has 5 pens.\nAnswer: 5 + 3 = 8.\n#### 8"
    assert tokenizer.decode(tokenizer.encode(text)) == text and tokenizer.stop_ids
    model = Qwen3.from_pretrained(out / "b0" / "base")
    assert model.config.vocab_size >= tokenizer.n_real_tokens
    losses = [json.loads(line)["loss"]
              for line in (out / "b0" / "pretrain.jsonl").read_text().splitlines()]
    assert losses[-1] < losses[0] - 0.5  # pretraining learned something
    # same machine, same seed, same code: the same base, bit for bit; another seed: another base
    again = tmp_path / "again"
    again.mkdir()
    shutil.copy(out / "tokenizer.json", again / "tokenizer.json")
    lab.pretrain(again, 0, mini=True)
    lab.pretrain(again, 1, mini=True)
    weights = (out / "b0" / "base" / "model.safetensors").read_bytes()
    assert (again / "b0" / "base" / "model.safetensors").read_bytes() == weights
    assert (again / "b1" / "base" / "model.safetensors").read_bytes() != weights

    table = json.loads((out / "table.json").read_text())
    assert set(table["summary"]) == {*lab.SIX, "sft_control"}
    assert set(table["per_seed"]["rl"]) == {"b0/seed0", "b0/seed1"}
    assert table["versions"] == [lab.code_version()]  # one code version made all of it
    for name, rows in table["per_seed"].items():
        for row in rows.values():
            keys = ("target", "mmlu", "truthfulqa_mc2", "forgetting", "retention", "mmd2_lexical")
            assert all(isinstance(row[k], float) for k in keys), (name, row)
            # RL logs a state NLL only on steps with a group that earned different rewards (none,
            # in miniature)
            assert name in ("base", "rl") or row["state_nll"] > 0, name
    assert table["summary"]["base"]["forgetting"]["mean"] == 0.0
    sft = table["per_seed"]["sft_mild"]["b0/seed0"]
    metrics = (out / "b0" / "seed0" / "sft_mild" / "metrics.jsonl").read_text()
    records = [json.loads(line) for line in metrics.splitlines()]
    nlls = [r["state_nll"] for r in records if "state_nll" in r]
    # the mean of what the trainer logged
    assert sft["state_nll"] == pytest.approx(sum(nlls) / len(nlls))
    base = json.loads((out / "b0" / "results" / "base.json").read_text())
    rl = json.loads((out / "b0" / "seed1" / "results" / "rl.json").read_text())
    assert table["per_seed"]["rl"]["b0/seed1"]["forgetting"] == pytest.approx(
        50 * (base["tasks"]["mmlu"]["metrics"]["acc"] - rl["tasks"]["mmlu"]["metrics"]["acc"]
              + base["tasks"]["truthfulqa_mc2"]["metrics"]["mc2"]
              - rl["tasks"]["truthfulqa_mc2"]["metrics"]["mc2"]))
    # a distillation run reads its teacher's signal: the quality the trainer logged
    opd = table["per_seed"]["opd_mild"]["b0/seed0"]
    assert {"local_quality", "signal_nll", "minus_teacher_target"} <= set(opd)
    claims = [f["claim"] for f in table["findings"]]
    assert {"stress SFT forgets (points)", "the positive control forgets 2 to 5 points (its "
            "interval excludes 0)"} <= set(claims)
    text = (out / "table.md").read_text()
    assert "| sft_stress |" in text and "| sft_control |" in text
    # the instruments: the new retention tasks' questions, the continuous figure, the MDF
    for row in (*table["per_seed"]["sft_control"].values(), *table["per_seed"]["rl"].values()):
        assert row["mdf_mmlu"] >= 0 and row["mdf_forgetting"] >= 0
        assert row["mmlu_logprob"] <= 0 and isinstance(row["forgetting_logprob"], float)
    assert {(r["base"], r["task"]) for r in table["instruments"]} == {
        ("b0", "mmlu"), ("b0", "truthfulqa_mc2"), ("b0", "forgetting")}
    assert table["instruments"][0]["questions"] == 8  # MINI_EVAL's mmlu=8
    assert set(table["paper_question"]["rows"]) == {"b0/seed0", "b0/seed1"}
    assert "The paper's stress teacher" in text and "The instruments" in text

    # the study's runs, some of them: a teacher of the family with its student, and the matrix's
    # one-step KL signal; distill.md and the condition's points
    lab.main(["--mini", "--out", str(out), "--bases", "0", "--seeds", "0,1", "--study",
              "distill", "--only", "opd_mixed,opd_stress_token_kl", "--no_plot"])
    log = capsys.readouterr().out
    assert "b0 seed1 sft_mixed train" in log and "data_mixed" in log
    table = json.loads((out / "table.json").read_text())
    assert {"opd_mixed", "opd_stress_token_kl", "sft_mixed"} <= set(table["per_seed"])
    points = table["condition"]  # the on-policy students of the continuation signal
    assert sorted(p["run"] for p in points) == ["opd_mild"] * 2 + ["opd_mixed"] * 2 + [
        "opd_stress"] * 2
    mixed = table["per_seed"]["opd_mixed"]["b0/seed0"]
    teacher = table["per_seed"]["sft_mixed"]["b0/seed0"]
    assert mixed["minus_teacher_target"] == pytest.approx(mixed["target"] - teacher["target"])
    assert mixed["local_advantage"] == pytest.approx(mixed["local_quality"] - teacher["target"])
    assert "| opd_mixed |" in (out / "distill.md").read_text()

    # again: everything is done, so every step is skipped
    lab.main(["--mini", "--out", str(out), "--bases", "0", "--seeds", "0,1", "--no_plot"])
    log = capsys.readouterr().out
    assert "every step is done" in log
    assert not re.search(r"\[lab\] b0 .* (train|eval): ", log)

    # other settings in the same folder are refused
    with pytest.raises(SystemExit, match="other settings"):
        lab.main(["--out", str(out), "--seeds", "0"])
    # one run's flags may change once no base and seed holds that run
    spec = lab.RUNS["rl"]
    args = lab.get_args(["--mini", "--out", str(out)])
    monkeypatch.setitem(lab.RUNS, "rl", {**spec, "flags": [*spec["flags"], "--kl_coef", "0.1"]})
    with pytest.raises(SystemExit, match=r"other settings .*\(runs rl: delete"):
        lab.check_settings(args)
    for path in [*out.glob("b*/seed*/rl"), *out.glob("b*/seed*/results/rl.json")]:
        if path.is_dir():
            shutil.rmtree(path)
        else:
            path.unlink()
    lab.check_settings(args)
    assert "--kl_coef" in json.loads((out / "lab.json").read_text())["training"]["rl"]["flags"]
    # the periodic eval scored retention too, for the figure's retention panel
    evals = [r for r in records if "gsm8k_flexible" in r]
    assert evals and all({"mmlu_acc", "truthfulqa_mc2"} <= set(r) for r in evals)


def test_a_run_interrupted_before_its_first_checkpoint_starts_over(tmp_path):
    """A folder with a metrics.jsonl but no checkpoint (an interrupted start) is trained with
    --overwrite; one with a checkpoint continues with --resume."""
    args = lab.get_args(["--mini", "--out", str(tmp_path / "lab"), "--bases", "0", "--seeds", "0"])
    run_dir = args.out / "b0" / "seed0" / "sft_mild"
    run_dir.mkdir(parents=True)
    (run_dir / "metrics.jsonl").write_text('{"step": 1, "loss": 1.0}\n')
    [train] = [t for t in lab.plan(args) if t["name"] == "b0 seed0 sft_mild train"]
    assert "--overwrite" in train["command"] and "--resume" not in train["command"]
    (run_dir / "checkpoints" / "step_0000001").mkdir(parents=True)
    [train] = [t for t in lab.plan(args) if t["name"] == "b0 seed0 sft_mild train"]
    assert "--resume" in train["command"] and "--overwrite" not in train["command"]


@pytest.mark.parametrize("flags,message", [
    (["--threads", "0"], "--threads"), (["--jobs", "0"], "--jobs"),
    (["--seeds", "a"], "--seeds"), (["--bases", ""], "--bases"), (["--only", "x"], "--only")])
def test_bad_lab_flags_end_in_one_line(flags, message, tmp_path, capsys):
    with pytest.raises(SystemExit) as stop:
        lab.get_args(["--out", str(tmp_path / "lab"), *flags])
    said = capsys.readouterr().err + (stop.value.code if isinstance(stop.value.code, str) else "")
    assert message in said and len(said.strip().splitlines()) == 1


def test_lab_out_naming_a_file_ends_in_one_line(tmp_path, capsys):
    (tmp_path / "file").write_text("x")
    for out in (tmp_path / "file", tmp_path / "file" / "below"):
        with pytest.raises(SystemExit) as stop:
            lab.get_args(["--out", str(out)])
        said = capsys.readouterr().err + str(stop.value.code)
        assert "--out" in said and len(said.strip().splitlines()) == 1


@pytest.mark.slow
def test_one_full_seed_shows_the_robust_findings(tmp_path):
    out = tmp_path / "lab"
    lab.main(["--out", str(out), "--bases", "0", "--seeds", "0", "--no_plot"])
    rows = json.loads((out / "table.json").read_text())["per_seed"]
    key = "b0/seed0"
    assert rows["sft_stress"][key]["forgetting"] > rows["sft_mild"][key]["forgetting"]
    assert rows["sft_stress"][key]["state_nll"] > rows["rl"][key]["state_nll"]


def test_a_second_lab_on_the_same_out_is_refused(tmp_path):
    out = tmp_path / "lab"
    out.mkdir()
    lock = lab.hold(out)  # a lab.py running there
    try:
        with pytest.raises(SystemExit, match=r"another lab.py \(process \d+ on .*\) is running"):
            lab.main(["--mini", "--out", str(out)])
    finally:
        (out / ".lock").unlink()
        __import__("os").close(lock)


@pytest.mark.slow
def test_ctrl_c_stops_the_lab_in_one_line_and_a_rerun_continues(tmp_path):
    import signal
    import subprocess
    import sys
    import time
    out = tmp_path / "lab"
    command = [sys.executable, str(lab.ROOT / "runs" / "lab.py"), "--mini", "--out", str(out),
               "--bases", "0", "--seeds", "0", "--no_plot"]
    process = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    while not (out / "b0" / "base" / "model.safetensors").exists():  # a step or two in
        time.sleep(0.2)
    process.send_signal(signal.SIGINT)
    _, err = process.communicate(timeout=120)
    assert process.returncode == 130
    assert err.strip().splitlines()[-1].startswith("lab.py: stopped by SIGINT; the steps that "
                                                   "finished are kept")
    assert not (out / ".lock").exists()
    done = subprocess.run(command, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0 and "finished in" in done.stdout
