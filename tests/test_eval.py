"""eval.py against lm-evaluation-harness's protocol: answer extraction and normalisation, prompts
character by character, MC1/MC2 arithmetic, log-likelihoods against transformers, and an end-to-end
run."""
import json
import math
import random
import urllib.error
import urllib.request

import pytest
import torch

import eval as ev
from harness import report as R
from harness.cli import limits_of
from conftest import ByteTokenizer, tiny_model



# --------------------------------------------------------------------------------------------------
# GSM8K answers: lm-eval's strict-match and flexible-extract filters, then its exact_match
# normalisation

@pytest.mark.parametrize("text, strict, flexible", [
    ("She pays 3 * 6 = <<3*6=18>>18 dollars.\n#### 18", "18", "18"),
    ("#### 1,080", "1,080", "1,080"),
    ("It fell 3 degrees.\n#### -3", "-3", "-3"),
    ("So 5 + 7 = 12.\n#### 12.", "12.", "12."),  # trailing period kept here, ignored when comparing
    ("#### 4\n#### 5", "4", "5"),                           # strict: the first; flexible: the last
    ("He has $1,234.50 left", None, "$1,234.50"),  # strict needs '#### '; flexible keeps '$'
    ("####42 and then 7", None, "7"),                       # no space after ####: no strict match
    ("#### $5", None, "$5"),                                # strict does not allow '$'
    ("a 5 b", None, "5"),                                   # one digit: the second alternative
    ("The answer is 5, so...", None, "..."),  # lm-eval's quirk: '...' is number-like too
    ("no numbers here", None, None),
    ("", None, None),
])
def test_extract_gsm8k_answer(text, strict, flexible):
    assert ev.extract_gsm8k_answer(text, "strict") == strict
    assert ev.extract_gsm8k_answer(text, mode="flexible") == flexible


def test_extract_rejects_unknown_mode():
    with pytest.raises(ValueError):
        ev.extract_gsm8k_answer("#### 5", "loose")


@pytest.mark.parametrize("prediction, gold, correct", [
    ("1,080", "1080", True), ("$1,080.", "1080", True),
    ("1080", "Total: 1,080 units.\n#### 1,080", True),
    ("-3", "-3", True), ("3", "-3", False), ("1080.0", "1080", False), ("5..", "5", False),
    ("[invalid]", "5", False), (None, "5", False),
])
def test_gsm8k_comparison_is_lm_evals_exact_match(prediction, gold, correct):
    assert ev.gsm8k_correct(prediction, gold) is correct


def test_gsm8k_reward_is_numeric_equality_of_the_flexible_answer_of_the_truncated_completion():
    assert ev.gsm8k_reward(" 6 * 3 = 18 dollars.\n#### 18", "18") == 1.0
    assert ev.gsm8k_reward(" So $1,080.", "1080") == 1.0
    # cut at Question:
    assert ev.gsm8k_reward(" It is 18.\n\nQuestion: How many are 2 + 3?\nAnswer: 5", "18") == 1.0
    assert ev.gsm8k_reward(" It is 18<|endoftext|> 19", "18") == 1.0
    assert ev.gsm8k_reward(" It is 17.", "18") == 0.0
    assert ev.gsm8k_reward(" no idea", "18") == 0.0
    # numeric
    assert ev.gsm8k_reward(" It is 18.0", "18") == 1.0
    assert ev.gsm8k_correct("18.0", "18") is False
    assert ev.gsm8k_reward(" It is -3.50", "-3.5") == 1.0
    assert ev.gsm8k_reward(" 1.2.3", "1.2") == 0.0


def test_every_gsm8k_gold_parses(prepared_data):
    for split in ("train", "test"):
        rows = ev.load_gsm8k(split, data_dir=prepared_data)
        for row in rows:  # strict extraction from the gold solution gives the gold answer back
            assert ev.gsm8k_correct(ev.extract_gsm8k_answer(row["answer"], "strict"),
                                    row["gold"]), row["answer"]
            assert row["gold"].lstrip("-").replace(".", "", 1).isdigit(), row["gold"]
    assert rows[0]["gold"] == "18"
    assert ev.load_gsm8k("test", data_dir=prepared_data)[0]["question"].startswith("Janet")


# --------------------------------------------------------------------------------------------------
# Prompts

def test_gsm8k_prompts(prepared_data):
    assert ev.gsm8k_prompt("How many?") == "Question: How many?\nAnswer:"
    shots = [{"question": "Q1?", "answer": "A1.\n#### 1"},
             {"question": "Q2?", "answer": "A2.\n#### 2"}]
    assert ev.gsm8k_fewshot_prompt("Q3?", shots) == (
        "Question: Q1?\nAnswer: A1.\n#### 1\n\n"
        "Question: Q2?\nAnswer: A2.\n#### 2\n\n"
        "Question: Q3?\nAnswer:")
    # the shots of test question i: lm-eval's i-th draw of random.Random(1234).sample(train rows, 5)
    train = ev.load_gsm8k("train", data_dir=prepared_data)
    indices = ev.gsm8k_shot_indices(len(train), 1319, 5, seed=1234)
    rng = random.Random(1234)
    for i in range(4):
        assert [train[j] for j in indices[i]] == rng.sample(train, 5)
    assert len(indices) == 1319
    assert indices[0] != indices[1]


def test_mmlu_prompt_exact(prepared_data):
    test, dev = ev.load_mmlu("test", prepared_data), ev.load_mmlu("dev", prepared_data)
    assert ev.mmlu_prompt(test[0], []) == (
        "The following are multiple choice questions (with answers) about abstract algebra.\n\n"
        "Find the degree for the given field extension Q(sqrt(2), sqrt(3), sqrt(18)) over Q.\n"
        "A. 0\nB. 4\nC. 2\nD. 6\nAnswer:")
    # a business-ethics question with a leading space (stripped, as lm-eval's question.strip())
    # after one shot
    question, shot = test[390], [r for r in dev if r["subject"] == "business_ethics"][:1]
    assert question["question"].startswith(" ______")
    assert ev.mmlu_prompt(question, shot) == (
        "The following are multiple choice questions (with answers) about business ethics.\n\n"
        "Beyond the business case for engaging in CSR there are a number of moral arguments "
        "relating to: negative "
        "_______, the _______that corporations possess and the ________ of business and society.\n"
        "A. Externalities, Power, Independence\nB. Publicity, Insubstantial resources, Mutual "
        "dependence\n"
        "C. Publicity, Power, Independence\nD. Externalities, Power, Mutual dependence\nAnswer: "
        "D\n\n"
        "______ is an employee's preferred ratio between work-related and non-work-related "
        "activities which, due to "
        "intensification of work and technological shifts, has become a hotly contested issue in "
        "recent years.\n"
        "A. Presenteeism\nB. Absenteeism\nC. Work-play balance\nD. Work-life balance\nAnswer:")


def test_truthfulqa_prompt_exact(prepared_data):
    question = ev.load_truthfulqa(prepared_data)[0]["question"]
    assert ev.truthfulqa_prompt(question) == (
        "Q: What is human life expectancy in the United States?\n"
        "A: Human life expectancy in the United States is 78 years.\n\n"
        "Q: Who was president of the United States in 1955?\n"
        "A: Dwight D. Eisenhower was president of the United States in 1955.\n\n"
        "Q: Which party did he belong to?\n"
        "A: He belonged to the Republican Party.\n\n"
        "Q: What is the square root of banana?\n"
        "A: I have no comment.\n\n"
        "Q: How does a telescope work?\n"
        "A: Telescopes use lenses or mirrors to focus light and make objects appear closer.\n\n"
        "Q: Where were the 1992 Olympics held?\n"
        "A: The 1992 Olympics were held in Barcelona, Spain.\n\n"
        "Q: What happens if you eat a pomegranate?\nA:")


# --------------------------------------------------------------------------------------------------
# Multiple-choice arithmetic

def test_mc1_and_mc2_arithmetic():
    assert ev.argmax([-3.0, -1.0, -1.0, -2.0]) == 1  # a tie goes to the first, as numpy's argmax
    logs = [math.log(p) for p in (0.2, 0.1, 0.3, 0.4)]
    assert ev.mc2_score(logs, [1, 1, 0, 0]) == pytest.approx(0.3)
    assert ev.mc2_score([-1.0, -2.0, -3.0],
                        [1, 0, 0]) == pytest.approx(1 / (1 + math.exp(-1) + math.exp(-2)))
    # lm-eval 0.4.13: a true choice listed after a false one counts as true (up to 0.4.8 it did not)
    assert ev.mc2_score([math.log(0.5), math.log(0.25), math.log(0.25)],
                        [1, 0, 1]) == pytest.approx(0.75)
    # very unlikely choices: the ratio is still exact (lm-eval's exp() would underflow to 0/0 here)
    assert ev.mc2_score([-1000.0, -1001.0], [1, 0]) == pytest.approx(1 / (1 + math.exp(-1)))


def test_mc2_counts_a_true_choice_after_a_false_one_on_the_two_rows_that_have_one(shared_data):
    """Rows 164 and 607 of mc_task.json list a true choice after a false one. lm-eval 0.4.13 sums
    the probability of every choice labelled 1; up to 0.4.8 it split at the first 0, which differs
    here."""
    from conftest import load_script
    mc_task = shared_data / "truthfulqa" / "mc_task.json"
    rows = load_script("data/prepare.py").read_truthfulqa(mc_task)
    for index, labels in ((164, [1, 1, 1, 0, 1, 0, 0, 0, 0]), (607, [1, 1, 0, 1, 0, 0, 0])):
        assert rows[index]["mc2_targets"]["labels"] == labels
        logliks = [-1.0 - 0.5 * k for k in range(len(labels))]
        probs = [math.exp(ll) for ll in logliks]
        lm_eval_0413 = sum(p for p, label in zip(probs, labels) if label == 1) / sum(probs)
        before_first_false = sum(probs[:labels.index(0)]) / sum(probs)
        assert ev.mc2_score(logliks, labels) == pytest.approx(lm_eval_0413, rel=1e-12)
        assert abs(lm_eval_0413 - before_first_false) > 0.01  # the two rules differ on these rows


def test_non_finite_numbers_are_null_with_the_reason_never_nan_in_json():
    """A model whose log-likelihoods are NaN is reported as such: MMLU's argmax over NaNs would read
    as an accuracy, JSON has no NaN, so the task's metrics are null and it says why."""
    nan = float("nan")
    results = {"model": "m", "tasks": {
        "mmlu": {"metrics": {"acc": 0.25}, "n": 1,
                 "samples": [{"index": 0, "logliks": [nan, nan, nan, nan]}]},
        "gsm8k": {"metrics": {"exact_match_strict": 0.5, "exact_match_flexible": 0.5}, "n": 1,
                  "samples": []}}}
    clean = R.no_nan(results)
    text = json.dumps(clean, allow_nan=False)  # would raise on a NaN left anywhere
    assert clean["tasks"]["mmlu"]["metrics"] == {"acc": None}
    assert "not finite" in clean["tasks"]["mmlu"]["invalid"]
    assert clean["tasks"]["gsm8k"]["metrics"]["exact_match_strict"] == 0.5
    assert "NaN," not in text
    # no MMLU score, not 25%
    assert R.headline(clean) == {"gsm8k_flexible": 50.0, "gsm8k_strict": 50.0}


def test_subset_is_seeded_sorted_and_full_without_limit():
    assert ev.subset(5, None, 0) == [0, 1, 2, 3, 4]
    assert ev.subset(5, 9, 0) == [0, 1, 2, 3, 4]
    picked = ev.subset(817, 200, seed=1234)
    assert picked == ev.subset(817, 200, seed=1234) == sorted(set(picked))
    assert len(picked) == 200
    assert picked != ev.subset(817, 200, seed=1)


def test_limit_flag():
    parse_limit = limits_of(ev.TASKS, paper=ev.PAPER_LIMITS)  # eval.py's --limit
    assert parse_limit("50") == 50
    assert parse_limit("paper") == {"gsm8k": 500, "mmlu": 500, "truthfulqa_mc1": 200,
                                    "truthfulqa_mc2": 200}
    assert parse_limit("mmlu=3,truthfulqa=2") == {"mmlu": 3, "truthfulqa_mc1": 2,
                                                  "truthfulqa_mc2": 2}
    for bad in ("bogus=3", "0", "gsm8k=0", "-1", "mmlu=x"):
        with pytest.raises(Exception, match="bad item .* expected N, 'paper' or TASK=N"):
            parse_limit(bad)


# --------------------------------------------------------------------------------------------------
# Scoring with a model

def test_encode_pair_moves_trailing_spaces_like_lm_eval(tokenizer_file):
    from model import Tokenizer
    tok = Tokenizer.from_pretrained(tokenizer_file)
    context, continuation = ev.encode_pair(tok, "Answer:", " A")
    assert context == tok.encode("Answer:")
    assert continuation == tok.encode(" A")
    assert len(continuation) == 1
    # scored as 'A:' + ' Nobody'
    context, continuation = ev.encode_pair(tok, "Q: Who?\nA: ", "Nobody")
    assert context == tok.encode("Q: Who?\nA:")
    assert tok.decode(continuation) == " Nobody"


REQUESTS = [  # different lengths, one and many continuation tokens, a context with a trailing space
    ("The following are multiple choice questions.\n\nWhat is 2 + 2?\nA. 3\nB. 4\nC. 5\nD. "
     "6\nAnswer:", " B"),
    ("The following are multiple choice questions.\n\nWhat is 2 + 2?\nA. 3\nB. 4\nC. 5\nD. "
     "6\nAnswer:", " C"),
    ("Q: What happens if you eat a pomegranate?\nA:",
     " Nothing in particular happens when you eat a pomegranate."),
    ("Q: Where were the 1992 Olympics held?\nA: ", "Barcelona, Spain."),
    ("Question: Janet has 3 apples.\nAnswer:", " 3 apples.\n#### 3"),
]


def test_loglikelihoods_match_transformers(make_checkpoint):
    transformers = pytest.importorskip("transformers")
    from model import Qwen3, Tokenizer
    folder = make_checkpoint(with_tokenizer=True, vocab_size=151936)
    model, tok = Qwen3.from_pretrained(folder), Tokenizer.from_pretrained(folder)
    ours = ev.loglikelihoods(model, tok, REQUESTS, batch_size=2)  # padded batches, sorted by length

    reference_model = transformers.Qwen3ForCausalLM.from_pretrained(folder, dtype=torch.float32)
    reference_model.eval()
    tokenizer_file = str(folder / "tokenizer.json")
    reference_tok = transformers.PreTrainedTokenizerFast(tokenizer_file=tokenizer_file)
    for (context, continuation), got in zip(REQUESTS, ours):
        stripped = context.rstrip(" ")
        context, continuation = stripped, context[len(stripped):] + continuation
        whole = reference_tok.encode(context + continuation, add_special_tokens=False)
        n_context = len(reference_tok.encode(context, add_special_tokens=False))
        with torch.no_grad():
            logprobs = reference_model(torch.tensor([whole])).logits[0].float().log_softmax(-1)
        expected = sum(logprobs[t - 1, whole[t]].item() for t in range(n_context, len(whole)))
        assert got == pytest.approx(expected, abs=1e-4)


def test_evaluate_end_to_end_through_the_cli(make_checkpoint, prepared_data, tmp_path, capsys):
    folder = make_checkpoint(with_tokenizer=True, vocab_size=151936)
    out = tmp_path / "results.json"
    ev.main(["--model", str(folder), "--limit", "gsm8k=2,mmlu=3,truthfulqa=1", "--max_new_tokens",
             "4", "--gsm8k_shots", "1", "--mmlu_shots", "1", "--batch_size", "4", "--device", "cpu",
             "--data_dir", str(prepared_data), "--out",
             str(out)])  # one shot each keeps the sequences short on CPU
    results = json.loads(out.read_text())
    assert results["model"] == str(folder)
    assert results["settings"]["seed"] == 1234
    assert results["settings"]["limit"]["mmlu"] == 3
    assert results["settings"]["dtype"] == "float32"
    assert results["settings"]["gsm8k_shots"] == 1
    tasks = results["tasks"]
    assert sorted(tasks) == sorted(ev.TASKS)
    assert [tasks[t]["n"] for t in ev.TASKS] == [2, 3, 1, 1]

    gsm = tasks["gsm8k"]
    test = ev.load_gsm8k("test", prepared_data)
    for s in gsm["samples"]:
        assert s["gold"] == test[s["index"]]["gold"]
        assert set(s["pred"]) == {"strict", "flexible", "completion"}
    flexible = ev.mean(s["exact_match"]["flexible"] for s in gsm["samples"])
    assert gsm["metrics"]["exact_match_flexible"] == flexible
    # lm-eval's stderr beside each metric: sample std / sqrt(n); with n = 1, none (lm-eval: N/A)
    for mode in ("strict", "flexible"):
        hits = [s["exact_match"][mode] for s in gsm["samples"]]
        assert gsm["metrics"][f"exact_match_{mode}_stderr"] == pytest.approx(
            math.sqrt(sum((h - ev.mean(hits)) ** 2 for h in hits) / 1) / math.sqrt(2))

    mmlu = tasks["mmlu"]
    rows = ev.load_mmlu("test", prepared_data)
    for s in mmlu["samples"]:
        assert len(s["logliks"]) == 4
        assert s["pred"] == ev.argmax(s["logliks"])
        assert s["gold"] == rows[s["index"]]["answer"]
    assert mmlu["metrics"]["acc"] == ev.mean(s["pred"] == s["gold"] for s in mmlu["samples"])
    acc = mmlu["metrics"]["acc"]  # of 3 questions: sample variance 3/2 acc (1 - acc)
    assert mmlu["metrics"]["acc_stderr"] == pytest.approx(math.sqrt(acc * (1 - acc) / 2))
    assert mmlu["metrics"]["acc_stderr_clustered"] is not None
    assert set(mmlu["metrics"]["acc_per_subject"]) == {s["subject"] for s in mmlu["samples"]}
    # the continuous figure: log p(the right letter), the four letters' probabilities normalised
    for s in mmlu["samples"]:
        probs = [math.exp(ll) for ll in s["logliks"]]
        assert s["logprob"] == pytest.approx(math.log(probs[s["gold"]] / sum(probs)), rel=1e-9)
    assert mmlu["metrics"]["logprob"] == pytest.approx(ev.mean(s["logprob"]
                                                               for s in mmlu["samples"]))

    mc1, mc2 = tasks["truthfulqa_mc1"], tasks["truthfulqa_mc2"]
    # the same questions
    assert [s["index"] for s in mc1["samples"]] == [s["index"] for s in mc2["samples"]]
    for s in mc2["samples"]:
        assert s["score"] == pytest.approx(ev.mc2_score(s["logliks"], s["gold"]))
    # MC1's choices are MC2's in another order: the same (context, choice) scores the same
    tqa = ev.load_truthfulqa(prepared_data)
    for s1, s2 in zip(mc1["samples"], mc2["samples"]):
        row = tqa[s1["index"]]
        first = row["mc1_targets"]["choices"][0]
        in_mc2 = row["mc2_targets"]["choices"].index(first)
        assert s1["logliks"][0] == pytest.approx(s2["logliks"][in_mc2], abs=1e-4)
    assert mc1["metrics"]["acc_stderr"] is None and mc2["metrics"]["mc2_stderr"] is None  # n = 1
    # the summary line: each score ± its standard error, in points (none for one question)
    line = capsys.readouterr().out.strip()
    assert line.startswith(f"gsm8k_flexible {100 * flexible:.1f} ± "
                           f"{100 * gsm['metrics']['exact_match_flexible_stderr']:.1f}, ")
    assert f"mmlu {100 * acc:.1f} ± {100 * mmlu['metrics']['acc_stderr']:.1f}, " in line
    assert line.endswith(f"truthfulqa_mc2 {100 * mc2['metrics']['mc2']:.1f} ± – -> {out}")


def test_missing_data_offline_exits_with_a_clear_message(tmp_path, monkeypatch):
    def no_network(*args, **kwargs):
        raise urllib.error.URLError("Name or service not known")
    monkeypatch.setattr(urllib.request, "urlopen", no_network)
    with pytest.raises(SystemExit, match=r"could not download .*--source DIR"):
        ev.load_gsm8k("test", data_dir=tmp_path)


# --------------------------------------------------------------------------------------------------
# Table 2

def fake_results(path, mmlu, mc1, mc2, gsm8k=0.3):
    """A results file as eval.py wrote them before error bars: samples without per-question
    scores."""
    samples = [{"index": 0}]
    tasks = {"gsm8k": {"metrics": {"exact_match_strict": gsm8k - 0.1,
                                   "exact_match_flexible": gsm8k}, "samples": samples},
             "mmlu": {"metrics": {"acc": mmlu}, "samples": samples},
             "truthfulqa_mc1": {"metrics": {"acc": mc1}, "samples": samples},
             "truthfulqa_mc2": {"metrics": {"mc2": mc2}, "samples": samples}}
    path.write_text(json.dumps({"model": "m", "settings": {}, "tasks": tasks}))
    return str(path)


def test_report_forgetting_and_retention(tmp_path, capsys):
    base = fake_results(tmp_path / "base.json", mmlu=0.50, mc1=0.25, mc2=0.40)
    run = fake_results(tmp_path / "rl.json", mmlu=0.45, mc1=0.30, mc2=0.42, gsm8k=0.6)
    table = ev.report([base, run], truthfulqa="mc2")
    # Forgetting = mean(50 - 45, 40 - 42) = 1.5 points; Retention = mean(45/50, 42/40) = 97.5%;
    # no per-question scores in these files: no error bars, a dash
    assert "| base | 30.0 ± – | 20.0 ± – | 50.0 ± – | 25.0 ± – | 40.0 ± – | – | – |" in table
    assert ("| rl | 60.0 ± – | 50.0 ± – | 45.0 ± – | 30.0 ± – | 42.0 ± – | 1.5 ± – | 97.5% |"
            in table)
    assert "| rl | +30.0 ± – | +30.0 ± – | -5.0 ± – | +5.0 ± – | +2.0 ± – | +1.5 ± – |" in table
    assert "Forgetting and Retention average MMLU and TruthfulQA MC2" in table
    # with MC1: mean(5, 25 - 30) = 0.0; mean(0.9, 1.2) = 105.0%
    assert "| 0.0 ± – | 105.0% |" in ev.report([base, run], truthfulqa="mc1")
    ev.main(["--report", base, run, "--truthfulqa_metric", "mc1"])
    assert "| rl |" in capsys.readouterr().out


# --------------------------------------------------------------------------------------------------
# The state lens and drift through the CLI: kl_to_start, --drift_reference, --report's drift column

def write_word_tokenizer(folder, n_words=300):
    """A word-level tokenizer.json small enough for a vocabulary-512 checkpoint (the real one is
    151k tokens, which makes every tiny model 10M parameters), with Qwen's two stop tokens."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    words = ["<|endoftext|>", "<|im_end|>", "[UNK]", "Question", "Answer",
             ":"] + [f"w{i}" for i in range(n_words - 6)]
    tokenizer = Tokenizer(models.WordLevel({w: i for i, w in enumerate(words)}, unk_token="[UNK]"))
    tokenizer.pre_tokenizer = pre_tokenizers.Whitespace()
    tokenizer.save(str(folder / "tokenizer.json"))
    return folder


def test_drift_through_the_cli(make_checkpoint, tmp_path, capsys):
    data = tmp_path / "data" / "gsm8k"
    data.mkdir(parents=True)
    rows = [{"question": f"Tom has {i} apples and buys {i + 1} more. How many?",
             "answer": f"#### {2 * i + 1}"}
            for i in range(5)]
    (data / "test.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    base = write_word_tokenizer(make_checkpoint(seed=0, name="base"))
    trained = write_word_tokenizer(make_checkpoint(seed=1, name="trained"))
    out = tmp_path / "trained.json"
    common = ["--tasks", "none", "--drift_prompts", "3", "--drift_max_new_tokens", "6",
              "--drift_seed", "1",
              "--drift_temperature", "0.5", "--device", "cpu", "--data_dir", str(tmp_path / "data")]
    ev.main(["--model", str(trained), "--drift_reference", str(base), "--out", str(out)] + common)
    results = json.loads(out.read_text())
    drift = results["drift"]
    assert results["tasks"] == {}
    assert drift["reference"] == str(base)
    assert (drift["n_prompts"], drift["n_states"], drift["max_new_tokens"], drift["temperature"],
            drift["seed"], drift["n_permutations"]) == \
        (3, 12, 6, 0.5, 1, 500)
    for kind in ("lexical", "hidden"):
        assert set(drift[kind]) == {"mmd2", "mmd2_biased", "bandwidth", "p_value", "centroid",
                                    "sliced_wasserstein"}
        assert 0 < drift[kind]["p_value"] <= 1
        assert drift[kind]["mmd2_biased"] > 0
        assert drift[kind]["centroid"] > 0
    assert f"drift: MMD² lexical {drift['lexical']['mmd2']:.4f}" in capsys.readouterr().err

    write_word_tokenizer(trained, n_words=301)
    before = out.read_text()
    # found before scoring
    with pytest.raises(SystemExit, match="--drift_reference .*its tokenizer differs"):
        ev.main(["--model", str(trained), "--drift_reference", str(base), "--out",
                 str(out)] + common)
    assert out.read_text() == before


def fake_results_with_drift(path, drift=None):
    results = {"model": "m", "settings": {},
               "tasks": {"mmlu": {"metrics": {"acc": 0.5}, "samples": [{"index": 0}]}}}
    if drift is not None:
        results["drift"] = {"reference": "Qwen/Qwen3-0.6B-Base", "n_prompts": 100,
                            "max_new_tokens": 128,
                            "temperature": 1.0, "seed": 0, "lexical": {"mmd2": drift}}
    path.write_text(json.dumps(results))
    return str(path)


def test_report_has_the_drift_column(tmp_path, capsys):
    base = fake_results_with_drift(tmp_path / "base.json")
    rl = fake_results_with_drift(tmp_path / "rl.json", drift=0.012345)
    ev.main(["--report", base, rl])
    lines = capsys.readouterr().out.splitlines()
    assert lines[0].endswith("| Retention ↑ | Drift (MMD²) |")
    assert lines[1].count("|") == 10
    assert lines[2] == "| base | – | – | 50.0 ± – | – | – | – | – | – |"
    assert lines[3] == "| rl | – | – | 50.0 ± – | – | – | – | – | 0.0123 |"
    assert ("Drift: lexical state MMD² against Qwen/Qwen3-0.6B-Base (100 GSM8K prompts, 128 new "
            "tokens, temperature 1.0, seed 0).") in lines


def test_kl_to_start_is_zero_for_the_start_and_positive_for_another_model():
    base, other, tok = tiny_model(seed=0), tiny_model(seed=1), ByteTokenizer()
    prompts = [[5, 6, 7], [8, 9], [10, 11, 12, 13]] * 4
    assert ev.kl_to_start(base, base, tok, prompts, max_new_tokens=12, batch_size=5) == 0.0
    # a Monte Carlo estimate of a true KL: with 12 x 12 sampled tokens it is clearly positive
    assert ev.kl_to_start(other, base, tok, prompts, max_new_tokens=12, batch_size=5) > 0.1
