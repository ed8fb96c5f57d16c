"""Bad input through the real entry points, as a user types it: every case runs the script in a new
Python and must end with a non-zero exit status, one line on stderr that names the flag or file at
fault, no traceback, and every file a user cares about (a finished model, metrics.jsonl, a results
file, the model it was given) byte for byte as it was. Each case fails before any heavy work, so the
cases run two at a time in a few seconds each. The Hugging Face hub paths are tested in-process,
with snapshot_download patched (the hub is unreachable here).
"""
import hashlib
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import huggingface_hub
import pytest
import tokenizers
import torch

import model as M
from harness import checkpoint
from conftest import ROOT, tiny_model

# --------------------------------------------------------------------------------------------------
# A small world of good and bad inputs, built once per session


def write_jsonl(path, rows):
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(row) + "\n" for row in rows))


def write_tiny_data(folder):
    """Prepared data in data/prepare.py's format, a few rows of each file (their counts are not
    checked)."""
    gsm8k = [{"question": f"What is {i} + 1?", "answer": f"{i} + 1 = {i + 1}.\n#### {i + 1}"}
             for i in range(8)]
    write_jsonl(folder / "gsm8k" / "train.jsonl", gsm8k)
    write_jsonl(folder / "gsm8k" / "test.jsonl", gsm8k[:4])
    mmlu = [{"subject": subject, "question": f"Q{i}?", "choices": ["a", "b", "c", "d"],
             "answer": i % 4}
            for subject in ("anatomy", "virology") for i in range(5)]
    write_jsonl(folder / "mmlu" / "dev.jsonl", mmlu)
    write_jsonl(folder / "mmlu" / "test.jsonl", mmlu[:4])
    targets = {"mc1_targets": {"choices": ["yes", "no"], "labels": [1, 0]},
               "mc2_targets": {"choices": ["yes", "no", "sure"], "labels": [1, 0, 1]}}
    write_jsonl(folder / "truthfulqa" / "mc.jsonl", [{"question": "Is it?", **targets}] * 2)


def data_variant(world, name, relative, content):
    """A copy of the good data with one file replaced (bytes or text)."""
    folder = world / name
    shutil.copytree(world / "data", folder)
    (folder / relative).write_bytes(content if isinstance(content, bytes) else content.encode())
    return folder


def model_variant(world, model, name, change):
    folder = world / name
    shutil.copytree(model, folder)
    change(folder)
    return folder


def checkpoint_of(out_dir, net, lora_rank=0):
    """A real checkpoint (checkpoint.save_checkpoint) of `net`, full or LoRA, after 2 steps."""
    if lora_rank:
        M.add_lora(net, lora_rank, 2 * lora_rank)
    optimizer = torch.optim.AdamW([p for p in net.parameters() if p.requires_grad], lr=1e-3)
    checkpoint.save_checkpoint(out_dir, net, optimizer, 2)
    return out_dir


@pytest.fixture(scope="session")
def world(byte_model_dir, tmp_path_factory):
    w = tmp_path_factory.mktemp("bad_input")
    paths = {"model": byte_model_dir, "data": w / "data", "fresh": w / "fresh", "w": w}
    write_tiny_data(w / "data")
    gsm8k_lines = (w / "data" / "gsm8k" / "train.jsonl").read_text().splitlines(keepends=True)
    bad_json = "".join(gsm8k_lines[:2]) + "{oops\n" + "".join(gsm8k_lines[3:])
    paths["data_bad_json"] = data_variant(w, "data_bad_json", "gsm8k/train.jsonl", bad_json)
    paths["data_no_gold"] = data_variant(w, "data_no_gold", "gsm8k/train.jsonl",
                                         gsm8k_lines[0] + json.dumps(
        {"question": "Q?", "answer": "The answer is 5."}) + "\n")
    bad_answer = {"subject": "anatomy", "question": "Q?", "choices": list("abcd"), "answer": 7}
    paths["data_mmlu_answer"] = data_variant(w, "data_mmlu_answer", "mmlu/test.jsonl",
                                             json.dumps(bad_answer))
    three = {**bad_answer, "choices": ["a", "b", "c"], "answer": 0}
    paths["data_mmlu_choices"] = data_variant(w, "data_mmlu_choices", "mmlu/test.jsonl",
                                              json.dumps(three))
    paths["data_empty"] = data_variant(w, "data_empty", "gsm8k/test.jsonl", "")
    paths["data_latin1"] = data_variant(w, "data_latin1", "truthfulqa/mc.jsonl",
                                        b'{"question": "caf\xe9"}\n')
    raw = w / "raw" / "gsm8k"
    raw.mkdir(parents=True)
    (raw / "train.jsonl").write_bytes(b'{"question": "caf\xe9?", "answer": "#### 1"}\n')
    (raw / "test.jsonl").write_text(gsm8k_lines[0])
    paths["raw"] = raw.parent

    model = byte_model_dir
    paths["truncated"] = model_variant(w, model, "truncated",
                                       lambda f: (f / "model.safetensors").write_bytes(
        (f / "model.safetensors").read_bytes()[:5000]))
    paths["broken_tokenizer"] = model_variant(
        w, model, "broken_tokenizer",
        lambda f: (f / "tokenizer.json").write_text('{"version": "1.0", '))
    paths["bad_config"] = model_variant(w, model, "bad_config",
                                        lambda f: (f / "config.json").write_text("{"))
    paths["no_config"] = model_variant(w, model, "no_config",
                                       lambda f: (f / "config.json").unlink())

    def nan_weights(folder):
        net = tiny_model(seed=1)
        with torch.no_grad():
            net.layers[0].mlp.up_proj.weight[0, 0] = float("nan")
        net.save_pretrained(folder)
    paths["nan_model"] = model_variant(w, model, "nan_model", nan_weights)

    def other_tokenizer(folder):
        tok = tokenizers.Tokenizer.from_file(str(folder / "tokenizer.json"))
        tok.add_special_tokens(["<|other|>"])
        tok.save(str(folder / "tokenizer.json"))
    paths["other_tokenizer"] = model_variant(w, model, "other_tokenizer", other_tokenizer)
    paths["teacher"] = model_variant(w, model, "teacher", lambda f: None)  # another folder

    # --out_dir folders holding an earlier run's work
    paths["finished"] = model_variant(w, model, "finished",
                                      lambda f: (f / "metrics.jsonl").write_text(
        '{"step": 1, "loss": 2.5}\n'))
    paths["ckpt_only"] = checkpoint_of(w / "ckpt_only", tiny_model(seed=0))
    (paths["ckpt_only"] / "metrics.jsonl").write_text('{"step": 2, "loss": 2.5}\n')
    paths["metrics_only"] = w / "metrics_only"
    write_jsonl(paths["metrics_only"] / "metrics.jsonl", [{"step": 1, "loss": 2.5}])
    paths["ckpt_no_meta"] = checkpoint_of(w / "ckpt_no_meta", tiny_model(seed=0))
    (paths["ckpt_no_meta"] / "checkpoints" / "step_0000002" / "meta.json").unlink()
    paths["ckpt_lora"] = checkpoint_of(w / "ckpt_lora", tiny_model(seed=0), lora_rank=2)
    paths["ckpt_shape"] = checkpoint_of(w / "ckpt_shape", tiny_model(seed=0, intermediate_size=96))
    paths["a_file"] = w / "a_file"
    paths["a_file"].write_text("not a folder\n")
    paths["results"] = w / "results.json"
    paths["results"].write_text('{"model": "earlier", "tasks": {}}\n')
    paths["latin1_prompt"] = w / "prompt.txt"
    paths["latin1_prompt"].write_bytes(b"caf\xe9\n")
    return paths


# --------------------------------------------------------------------------------------------------
# The cases: (id, script, arguments, what the one line must say, files that must not change)

TRAIN = "--model {model} --data_dir {data} --device cpu"
FRESH = "--out_dir {fresh}/{id}"
EVAL = "--model {model} --data_dir {data} --device cpu --out {results}"
SAMPLE = "--model {model} --device cpu --max_new_tokens 4"
KEPT = ("model", "results")  # every case: the model it was given, the results file

CASES = [
    # models: missing, damaged, NaN
    ("missing_model", "train_rl.py", f"--model {{w}}/no/such/model {FRESH} --device cpu",
     "no such model folder", ()),
    ("truncated_safetensors", "train_sft.py",
     f"--model {{truncated}} --data_dir {{data}} {FRESH} --device cpu",
     "model.safetensors: not a readable safetensors file", ("truncated",)),
    ("broken_tokenizer", "eval.py",
     "--model {broken_tokenizer} --data_dir {data} --device cpu --out {results}",
     "tokenizer.json: not a readable tokenizer.json", ("broken_tokenizer",)),
    ("bad_config_json", "sample.py", "--model {bad_config} --device cpu",
     "config.json: not a valid JSON file", ()),
    ("no_config", "train_rl.py", f"--model {{no_config}} {FRESH} --device cpu", "no config.json",
     ()),
    ("missing_teacher", "train_distill.py", f"{TRAIN} {FRESH} --teacher {{w}}/no/teacher",
     "--teacher", ()),
    ("nan_weights", "eval.py",
     "--model {nan_model} --data_dir {data} --device cpu --out {results} --tasks mmlu",
     "NaN or infinite", ("nan_model",)),
    ("drift_other_tokenizer", "eval.py",
     f"{EVAL} --tasks gsm8k --drift_reference {{other_tokenizer}}", "--drift_reference", ()),
    # --out_dir: an earlier run is never overwritten without --resume or --overwrite, and is checked
    # first
    ("out_dir_finished_rl", "train_rl.py", f"{TRAIN} --out_dir {{finished}}",
     "holds a finished model", ("finished",)),
    ("out_dir_finished_sft", "train_sft.py", f"{TRAIN} --out_dir {{finished}}",
     "holds a finished model", ("finished",)),
    ("out_dir_finished_opd", "train_distill.py",
     f"{TRAIN} --out_dir {{finished}} --teacher {{teacher}}", "--overwrite", ("finished",)),
    ("out_dir_checkpoints", "train_rl.py", f"{TRAIN} --out_dir {{ckpt_only}}", "holds checkpoints",
     ("ckpt_only",)),
    ("out_dir_metrics", "train_sft.py", f"{TRAIN} --out_dir {{metrics_only}}",
     "holds metrics.jsonl", ("metrics_only",)),
    ("out_dir_is_a_file", "train_rl.py", f"{TRAIN} --out_dir {{a_file}}", "--out_dir", ("a_file",)),
    ("out_dir_unwritable", "train_sft.py", f"{TRAIN} --out_dir {{a_file}}/run",
     "cannot write there", ("a_file",)),
    ("resume_and_overwrite", "train_rl.py", f"{TRAIN} --out_dir {{ckpt_only}} --resume --overwrite",
     "choose one", ("ckpt_only",)),
    ("resume_finished_without_checkpoints", "train_distill.py",
     f"{TRAIN} --out_dir {{finished}} --teacher {{teacher}} --resume",
     "holds a finished model and no checkpoint", ("finished",)),
    ("resume_no_meta", "train_rl.py", f"{TRAIN} --out_dir {{ckpt_no_meta}} --resume",
     "no meta.json", ("ckpt_no_meta",)),
    ("resume_lora_into_full", "train_rl.py", f"{TRAIN} --out_dir {{ckpt_lora}} --resume",
     "LoRA adapters", ("ckpt_lora",)),
    ("resume_other_shape", "train_sft.py",
     f"{TRAIN} --out_dir {{ckpt_shape}} --resume --lora_rank 0", "has shape", ("ckpt_shape",)),
    # trainer flags
    ("steps_0", "train_rl.py", f"{TRAIN} {FRESH} --steps 0", "--steps", ()),
    ("batch_size_0", "train_sft.py", f"{TRAIN} {FRESH} --batch_size 0", "--batch_size", ()),
    ("grad_accum_negative", "train_distill.py",
     f"{TRAIN} {FRESH} --teacher {{teacher}} --grad_accum -1", "--grad_accum", ()),
    ("lr_nan", "train_rl.py", f"{TRAIN} {FRESH} --lr nan", "--lr", ()),
    ("lr_0", "train_sft.py", f"{TRAIN} {FRESH} --lr 0", "--lr", ()),
    ("group_size_1", "train_rl.py", f"{TRAIN} {FRESH} --group_size 1", "--group_size", ()),
    ("rl_greedy", "train_rl.py", f"{TRAIN} {FRESH} --temperature 0", "--temperature", ()),
    ("ppo_epochs_0", "train_rl.py", f"{TRAIN} {FRESH} --ppo_epochs 0", "--ppo_epochs", ()),
    ("max_new_tokens_0", "train_rl.py", f"{TRAIN} {FRESH} --max_new_tokens 0", "--max_new_tokens",
     ()),
    ("warmup_past_the_run", "train_rl.py", f"{TRAIN} {FRESH} --steps 5 --warmup 6", "--warmup 6",
     ()),
    ("no_cuda", "train_sft.py", f"--model {{model}} --data_dir {{data}} {FRESH} --device cuda",
     "--device", ()),
    ("periodic_eval_limit_0", "train_rl.py", f"{TRAIN} {FRESH} --eval_limit 0", "--eval_limit", ()),
    ("epochs_0", "train_sft.py", f"{TRAIN} {FRESH} --epochs 0", "--epochs", ()),
    ("rft_greedy_group", "train_sft.py", f"{TRAIN} {FRESH} --states self --temperature 0",
     "--temperature", ()),
    ("opd_greedy", "train_distill.py", f"{TRAIN} {FRESH} --teacher {{teacher}} --temperature 0",
     "--temperature", ()),
    ("states_per_rollout_0", "train_distill.py",
     f"{TRAIN} {FRESH} --teacher {{teacher}} --states_per_rollout 0", "--states_per_rollout", ()),
    ("kl_coef_negative", "train_rl.py", f"{TRAIN} {FRESH} --kl_coef -1", "--kl_coef", ()),
    ("lora_rank_negative", "train_sft.py", f"{TRAIN} {FRESH} --lora_rank -4", "--lora_rank", ()),
    # data files that are damaged name their file (and line)
    ("data_not_json", "train_rl.py",
     f"--model {{model}} --data_dir {{data_bad_json}} --device cpu {FRESH}",
     "train.jsonl:3: not valid JSON", ()),
    ("data_no_gold", "train_sft.py",
     f"--model {{model}} --data_dir {{data_no_gold}} --device cpu {FRESH}",
     "train.jsonl:2: the answer does not end in a parseable '#### N'", ()),
    ("mmlu_answer_outside_a_d", "eval.py", f"{EVAL} --tasks mmlu --data_dir {{data_mmlu_answer}}",
     "test.jsonl:1: the answer is 7", ()),
    ("mmlu_three_choices", "eval.py", f"{EVAL} --tasks mmlu --data_dir {{data_mmlu_choices}}",
     "list of 4 answers", ()),
    ("empty_split", "eval.py", f"{EVAL} --tasks gsm8k --data_dir {{data_empty}}",
     "test.jsonl: no rows", ()),
    ("data_not_utf8", "eval.py", f"{EVAL} --tasks truthfulqa_mc2 --data_dir {{data_latin1}}",
     "mc.jsonl: not UTF-8", ()),
    ("release_not_utf8", "data/prepare.py", "--source {raw} --out {w}/prepared --datasets gsm8k",
     "train.jsonl: not UTF-8", ()),
    # eval.py's flags, all found before any scoring
    ("eval_unknown_task", "eval.py", f"{EVAL} --tasks gsm8k,bogus", "--tasks", ()),
    ("eval_limit_0", "eval.py", f"{EVAL} --limit 0", "--limit", ()),
    ("eval_limit_task_0", "eval.py", f"{EVAL} --limit gsm8k=0", "--limit", ()),
    ("eval_out_unwritable", "eval.py",
     "--model {model} --data_dir {data} --device cpu --out {a_file}/r.json", "--out", ("a_file",)),
    ("eval_batch_size_0", "eval.py", f"{EVAL} --batch_size 0", "--batch_size", ()),
    ("eval_gsm8k_shots_beyond_split", "eval.py", f"{EVAL} --tasks gsm8k --gsm8k_shots 9",
     "--gsm8k_shots 9", ()),
    ("eval_mmlu_shots_beyond_dev", "eval.py", f"{EVAL} --tasks mmlu --mmlu_shots 6",
     "--mmlu_shots 6", ()),
    ("eval_drift_prompts_1", "eval.py", f"{EVAL} --drift_reference {{model}} --drift_prompts 1",
     "--drift_prompts", ()),
    ("eval_report_missing", "eval.py", "--report {w}/missing.json", "--report", ()),
    ("eval_no_cuda", "eval.py", f"{EVAL} --device cuda", "--device", ()),
    # sample.py
    ("sample_temperature_negative", "sample.py", f"{SAMPLE} --temperature -1", "--temperature", ()),
    ("sample_top_p_above_1", "sample.py", f"{SAMPLE} --top_p 1.5", "--top_p", ()),
    ("sample_top_k_0", "sample.py", f"{SAMPLE} --top_k 0", "--top_k", ()),
    ("sample_num_samples_0", "sample.py", f"{SAMPLE} --num_samples 0", "--num_samples", ()),
    ("sample_prompt_not_utf8", "sample.py", f"{SAMPLE} --prompt_file {{latin1_prompt}}",
     "--prompt_file", ()),
    ("sample_too_long", "sample.py", "--model {model} --device cpu --max_new_tokens 5000",
     "--max_new_tokens", ()),
    # bench.py, data/prepare.py, runs/paper.py
    ("bench_batch_sizes", "bench.py", "--preset micro --device cpu --batch_size 1,x",
     "--batch_size", ()),
    ("bench_new_tokens_0", "bench.py", "--preset micro --device cpu --new_tokens 0", "--new_tokens",
     ()),
    ("bench_unknown_section", "bench.py", "--suite gpu --device cpu --sections fsdp,bogus",
     "--sections", ()),
    ("prepare_no_source", "data/prepare.py", "--source {w}/no_source --out {w}/prepared",
     "--source", ()),
    ("prepare_unknown_dataset", "data/prepare.py", "--datasets gsm8k,imagenet --out {w}/prepared",
     "--datasets", ()),
    ("paper_steps_0", "runs/paper.py", "--smoke --steps 0 --out {w}/paper", "--steps", ()),
    ("paper_unknown_run", "runs/paper.py", "--smoke --only base,bogus --out {w}/paper", "--only",
     ()),
]


def digest(path: Path) -> str:
    """A hash of a file's bytes, or of every file under a folder with its name."""
    h = hashlib.sha256()
    for file in sorted([path] if path.is_file() else path.rglob("*")):
        if file.is_file():
            h.update(str(file.relative_to(path.parent)).encode() + file.read_bytes())
    return h.hexdigest()


# Each case is a new process running its script as __main__, as `python SCRIPT ARGS` does. Starting
# ~70 Pythons that each import torch would take minutes on two cores, so one driver process imports
# the libraries once and forks a child per case: the child sets sys.argv and sys.path[0] as the
# interpreter would, runs the script with runpy, and ends as the interpreter ends (a SystemExit's
# message on stderr and its status; any other exception's traceback and status 1). Nothing of the
# project is imported before the fork, so every script loads its own modules. (test_faults.py's
# launcher forks its children the same way.)
FORK_CASE = r"""
import json, os, runpy, signal, sys, traceback
import huggingface_hub, numpy, safetensors.torch, tokenizers, torch, tqdm  # the slow imports, once
import torch.distributed.checkpoint, torch.distributed.fsdp  # (checkpoint.py's, 0.8 s)
with torch.device("meta"):  # what torch imports when a model is first built on the meta device
    torch.nn.Embedding(2, 2)

def fork_case(case, stdout_fd=None, close=()):
    # A child running case["script"] with case["argv"]; returns its pid. stdout_fd: its stdout
    # (a pipe), else the file case["log"] + ".out"; stderr goes to case["log"] + ".err". close:
    # the parent's file descriptors the child must not hold (a pipe's other end)
    pid = os.fork()
    if pid:
        return pid
    for fd in close:
        os.close(fd)
    os.dup2(os.open(os.devnull, os.O_RDONLY), 0)
    if stdout_fd is None:
        stdout_fd = os.open(case["log"] + ".out", os.O_WRONLY | os.O_CREAT | os.O_TRUNC)
    os.dup2(stdout_fd, 1)
    os.dup2(os.open(case["log"] + ".err", os.O_WRONLY | os.O_CREAT | os.O_TRUNC), 2)
    os.chdir(case["cwd"])
    sys.argv, sys.path[0] = [case["script"], *case["argv"]], os.path.dirname(case["script"])
    signal.alarm(60)  # a case that started real work: killed, and the test says so
    code = 0
    try:
        runpy.run_path(case["script"], run_name="__main__")
    except SystemExit as e:
        code = e.code if isinstance(e.code, int) else 0 if e.code is None else 1
        if not isinstance(e.code, (int, type(None))):
            print(e.code, file=sys.stderr)
    except BaseException:
        traceback.print_exc()
        code = 1
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)
"""
DRIVER = FORK_CASE + r"""
cases, results = json.load(sys.stdin), {}
for case in cases:
    _, status = os.waitpid(fork_case(case), 0)
    code = os.waitstatus_to_exitcode(status)
    results[case["id"]] = dict(returncode=code, stdout=open(case["log"] + ".out").read(),
                               stderr=open(case["log"] + ".err").read())
print(json.dumps(results))
"""


@pytest.fixture(scope="session")
def outcomes(world):
    """Every case run once, with a digest of every protected file before and after them all."""
    protected = sorted({key for case in CASES for key in case[4]} | set(KEPT))
    before = {key: digest(world[key]) for key in protected}
    (world["w"] / "logs").mkdir()
    cases = [dict(id=case_id, script=str(ROOT / script), cwd=str(world["w"]),
                  log=str(world["w"] / "logs" / case_id),
                  argv=[a.format(id=case_id, **world) for a in arguments.split()])
             for case_id, script, arguments, _, _ in CASES]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONWARNINGS": "ignore"}
    done = subprocess.run([sys.executable, "-c", DRIVER], input=json.dumps(cases),
                          capture_output=True, text=True, env=env, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    results = {k: subprocess.CompletedProcess(k, **v) for k, v in json.loads(done.stdout).items()}
    return results, before, {key: digest(world[key]) for key in protected}


def test_there_are_at_least_40_cases():
    assert len(CASES) >= 40
    assert len({case[0] for case in CASES}) == len(CASES)


@pytest.mark.parametrize("case", CASES, ids=[case[0] for case in CASES])
def test_bad_input_ends_in_one_line_naming_it_and_loses_nothing(case, outcomes):
    case_id, _, _, expected, protected = case
    results, before, after = outcomes
    done = results[case_id]
    lines = [line for line in done.stderr.splitlines() if line.strip()]
    assert done.returncode != 0, done.stdout[-2000:]
    assert "Traceback" not in done.stderr + done.stdout, done.stderr[-3000:]
    assert len(lines) == 1, done.stderr
    assert lines[0].startswith(f"{Path(case[1]).name}: error: ")  # one prefix, argparse's
    assert expected in lines[0]
    for key in (*protected, *KEPT):
        assert before[key] == after[key], f"{key} changed"


# --------------------------------------------------------------------------------------------------
# The Hugging Face hub, patched: the default model id reaches snapshot_download, local folders never
# do

QWEN3_REPOS = [f"Qwen/Qwen3-{size}{base}" for size in ("0.6B", "1.7B", "4B", "8B")
               for base in ("", "-Base")]


@pytest.fixture
def fake_hub(monkeypatch, byte_model_dir):
    """snapshot_download replaced by one that records the repo id and returns the tiny model's
    folder."""
    calls = []

    def snapshot_download(repo_id, **kwargs):
        calls.append(repo_id)
        return str(byte_model_dir)
    monkeypatch.setattr(huggingface_hub, "snapshot_download", snapshot_download)
    return calls


def test_every_qwen3_repo_id_reaches_the_hub_and_loads(fake_hub, byte_model_dir):
    for repo in QWEN3_REPOS:
        assert M.resolve_model_dir(repo) == byte_model_dir
    assert fake_hub == QWEN3_REPOS
    assert isinstance(M.Qwen3.from_pretrained("Qwen/Qwen3-0.6B-Base"), M.Qwen3)
    assert M.Tokenizer.from_pretrained("Qwen/Qwen3-0.6B-Base").stop_ids


def test_local_folders_never_reach_the_hub(fake_hub, byte_model_dir, tmp_path, monkeypatch):
    monkeypatch.chdir(byte_model_dir.parent)
    for local in (byte_model_dir, str(byte_model_dir), "model", "./model"):
        assert Path(M.resolve_model_dir(local)).resolve() == byte_model_dir.resolve()
    for missing in (tmp_path / "gone", "./gone", "../a/b", "a/b/c", "~/model"):
        with pytest.raises(FileNotFoundError, match="no such model folder"):
            M.resolve_model_dir(missing)
    assert fake_hub == []


def test_an_unreachable_hub_is_one_line_that_says_so(monkeypatch, tmp_path):
    def offline(repo_id, **kwargs):
        message = "Cannot reach https://huggingface.co\n(many lines)"
        raise huggingface_hub.errors.LocalEntryNotFoundError(message)
    monkeypatch.setattr(huggingface_hub, "snapshot_download", offline)
    import train_rl
    # `python train_rl.py` as typed, apart from where it writes
    with pytest.raises(SystemExit) as stop:
        train_rl.main(["--out_dir", str(tmp_path / "out"), "--device", "cpu"])
    message = str(stop.value.code)
    assert "\n" not in message
    assert ": error: --model: Qwen/Qwen3-0.6B-Base: " in message
    assert "Hugging Face hub could not be reached" in message


# --------------------------------------------------------------------------------------------------
# Checkpoints: verified, kept two deep, a damaged newest one falls back to the one before


def test_a_truncated_newest_checkpoint_falls_back_to_the_one_before(tmp_path, capsys):
    net = tiny_model(seed=0).requires_grad_(True)
    optimizer = torch.optim.AdamW(net.parameters(), lr=1e-3)
    checkpoint.save_checkpoint(tmp_path, net, optimizer, 2)
    with torch.no_grad():
        net.embed_tokens.weight.add_(1.0)
    expected = net.embed_tokens.weight.detach().clone()
    for step in (4, 6):
        checkpoint.save_checkpoint(tmp_path, net, optimizer, step)
    folders = sorted(p.name for p in (tmp_path / "checkpoints").iterdir())
    assert folders == ["step_0000004", "step_0000006"]  # the newest two, nothing half-written
    assert {oct(p.stat().st_mode)[-3:] for p in (tmp_path / "checkpoints").rglob("*.*")} == {"644"}
    newest = tmp_path / "checkpoints" / "step_0000006" / "state.safetensors"
    newest.write_bytes(newest.read_bytes()[:-100])
    fresh = tiny_model(seed=5).requires_grad_(True)
    assert checkpoint.load_checkpoint(tmp_path, fresh, torch.optim.AdamW(fresh.parameters())) == 4
    warning = capsys.readouterr().err
    assert "step_0000006" in warning
    assert "resuming from the checkpoint before it" in warning
    assert torch.equal(fresh.embed_tokens.weight, expected)


def test_saved_models_are_world_readable(tmp_path):
    tiny_model().save_pretrained(tmp_path / "m")
    assert {oct(p.stat().st_mode)[-3:] for p in (tmp_path / "m").iterdir()} == {"644"}
