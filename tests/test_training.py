"""harness/training.py, the training harness: the lr schedule, the data order, the starting model,
checkpoints and --resume (through train_sft.py's main), the non-finite stop, a bad --model, and
torchrun on two CPU processes."""
import json
import math
from argparse import Namespace

import pytest
import torch
from safetensors.torch import load_file

import eval as ev
from harness import training as T
from conftest import (ROOT, ByteTokenizer, args_for, assert_final_model, run_whole, train_lines,
                      write_byte_tokenizer)
from model import Qwen3, Tokenizer

pytestmark = pytest.mark.usefixtures("one_thread")


def test_lr_schedule_warms_up_then_decays_to_zero():
    args = args_for(lr=1.0, warmup=4, steps=104)
    assert [T.lr_at(s, args) for s in range(4)] == [0.25, 0.5, 0.75, 1.0]
    assert T.lr_at(54, args) == pytest.approx(0.5)  # cosine: half way down at the middle
    assert T.lr_at(103, args) == pytest.approx(0.0, abs=1e-3)
    assert T.lr_at(79, args) == pytest.approx(0.5 * (1 + math.cos(math.pi * 0.75)))


def test_batches_cover_each_epoch_once_and_split_ranks(monkeypatch):
    items = list(range(10))
    batches = [T.batch_at(items, step, 5, seed=3) for step in range(4)]
    assert sorted(batches[0] + batches[1]) == items  # epoch 1: every item once
    assert sorted(batches[2] + batches[3]) == items  # epoch 2: every item once
    assert batches[0] + batches[1] != batches[2] + batches[3]  # a new shuffle each epoch
    assert T.batch_at(items, 1, 5, seed=3) == batches[1]  # any step's batch, without replaying
    monkeypatch.setenv("WORLD_SIZE", "2")
    per_rank = []
    for rank in (0, 1):
        monkeypatch.setenv("RANK", str(rank))
        per_rank.append(T.batch_at(items, 0, 5, seed=3))
    assert sorted(per_rank[0] + per_rank[1]) == items  # ranks see different examples


def test_step_seeds_differ_across_steps_and_runs():
    seeds = {T.step_seed(seed, step) for seed in range(3) for step in range(1000)}
    assert len(seeds) == 3000


def test_the_starting_model_computes_what_the_learner_did_under_autocast(make_checkpoint):
    # Full fine-tuning trains fp32 master weights under bf16 autocast; a bf16 copy of the start
    # would compute slightly differently (fp32 embeddings and norms stay fp32 under autocast), so
    # the start is held in fp32.
    folder = make_checkpoint(seed=4)
    write_byte_tokenizer(folder / "tokenizer.json")  # a model folder, as --model names one
    learner = Qwen3.from_pretrained(folder)  # the fp32 master weights
    prompts = [[5, 6, 7], [8, 9]] * 3
    tok = ByteTokenizer()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        args = Namespace(model=str(folder), lora_rank=0, fsdp=False)
        start = T.starting_model(args, learner.device, torch.bfloat16)
        assert start.dtype == torch.float32
        assert ev.kl_to_start(learner, start, tok, prompts, max_new_tokens=8) == 0.0
        bf16_copy = Qwen3.from_pretrained(folder, dtype=torch.bfloat16)
        assert ev.kl_to_start(learner, bf16_copy, tok, prompts, max_new_tokens=8) != 0.0


def test_metrics_log_writes_null_for_a_non_finite_figure(tmp_path):
    log = T.MetricsLog(tmp_path, steps=2)
    log.log(1, loss=1.5, kl_to_start=float("inf"), tokens=10)
    row = json.loads((tmp_path / "metrics.jsonl").read_text())
    assert row["loss"] == 1.5
    assert row["kl_to_start"] is None
    assert row["not_finite"] == ["kl_to_start"]
    # a fresh start (not --resume) keeps none of an earlier run's lines
    T.MetricsLog(tmp_path, steps=2)
    assert (tmp_path / "metrics.jsonl").read_text() == ""


def test_periodic_eval_scores_each_of_eval_tasks(prepared_data, byte_model_dir, tmp_path, capsys):
    """--eval_tasks picks eval.py's tasks for the periodic eval; each task's main metric is logged
    under its own name, the very number eval.evaluate gives on the same subset."""
    import train_rl
    with pytest.raises(SystemExit):  # a task eval.py does not know: one line naming the flag
        train_rl.get_args(["--eval_tasks", "gsm8k,mmlux"])
    assert "--eval_tasks: expected some of gsm8k,mmlu," in capsys.readouterr().err
    assert args_for().eval_tasks == ("gsm8k",)  # the default: the target only, as before
    tasks = ("gsm8k", "mmlu", "truthfulqa_mc1", "truthfulqa_mc2")
    args = train_rl.get_args(["--eval_tasks", ",".join(tasks), "--eval_limit", "3", "--steps", "1",
                              "--eval_every", "1", "--eval_shots", "1", "--model",
                              str(byte_model_dir), "--data_dir", str(prepared_data),
                              "--max_new_tokens", "4", "--device", "cpu"])
    assert args.eval_tasks == tasks
    model = Qwen3.from_pretrained(byte_model_dir)
    tokenizer = Tokenizer.from_pretrained(byte_model_dir)
    T.periodic_eval(1, model, tokenizer, T.MetricsLog(tmp_path, steps=1), args, torch.float32)
    row = json.loads((tmp_path / "metrics.jsonl").read_text())
    want = ev.evaluate(model, tokenizer, tasks, limit=3, data_dir=prepared_data, gsm8k_shots=1,
                       mmlu_shots=1)["tasks"]
    assert set(row) == {"step", "kl_to_start", "gsm8k_flexible", "gsm8k_strict", "mmlu_acc",
                        "truthfulqa_mc1_acc", "truthfulqa_mc2", "mmlu_logprob",
                        "truthfulqa_mc1_logprob", "truthfulqa_mc2_logprob"}
    assert row["gsm8k_flexible"] == want["gsm8k"]["metrics"]["exact_match_flexible"]
    assert row["mmlu_acc"] == want["mmlu"]["metrics"]["acc"]
    assert row["truthfulqa_mc1_acc"] == want["truthfulqa_mc1"]["metrics"]["acc"]
    assert row["truthfulqa_mc2"] == want["truthfulqa_mc2"]["metrics"]["mc2"]
    assert 0 < row["truthfulqa_mc2"] < 1  # a real score, not a default
    # the continuous figure: the log of MC2's own score, question by question
    assert row["truthfulqa_mc2_logprob"] == want["truthfulqa_mc2"]["metrics"]["logprob"]
    assert row["truthfulqa_mc2_logprob"] == pytest.approx(ev.mean(
        math.log(s["score"]) for s in want["truthfulqa_mc2"]["samples"]), rel=1e-9)


# Checkpoints, --resume and the non-finite stop, through train_sft.py's main -------------------


def run_sft(data_dir, model_dir, out_dir, *extra):
    import train_sft
    train_sft.main(["--model", str(model_dir), "--out_dir", str(out_dir), "--data_dir",
                    str(data_dir), "--steps", "4", "--batch_size", "2", "--grad_accum", "1",
                    "--lora_rank", "0", "--lr", "3e-3", "--warmup", "1", "--eval_every", "0",
                    "--save_every", "2", *extra])


@pytest.mark.parametrize("lora", [[], ["--lora_rank", "4"]], ids=["full", "lora"])
def test_resume_is_bit_identical(lora, prepared_data, byte_model, tmp_path, monkeypatch):
    """Killed during step 3 and resumed from the step-2 checkpoint, a run ends with exactly the
    weights and losses of an uninterrupted one (full fine-tuning: every weight has AdamW state;
    LoRA: the adapters have, and the PEFT adapter written beside the model is the same too)."""
    import train_sft
    model_dir = byte_model()
    run_sft(prepared_data, model_dir, tmp_path / "straight", *lora)

    fit_states, calls = train_sft.fit_states, []

    def dies_in_step_3(*args, **kwargs):
        calls.append(1)
        if len(calls) == 3:
            raise KeyboardInterrupt
        return fit_states(*args, **kwargs)
    monkeypatch.setattr(train_sft, "fit_states", dies_in_step_3)
    with pytest.raises(SystemExit) as stop:  # a Ctrl-C ends main in one line (test_faults.py)
        run_sft(prepared_data, model_dir, tmp_path / "resumed", *lora)
    assert stop.value.code == 130
    monkeypatch.setattr(train_sft, "fit_states", fit_states)
    checkpoints = tmp_path / "resumed" / "checkpoints"
    assert [p.name for p in checkpoints.iterdir()] == ["step_0000002"]
    run_sft(prepared_data, model_dir, tmp_path / "resumed", "--resume", *lora)

    for weights in ["model.safetensors"] + ["adapter/adapter_model.safetensors"] * bool(lora):
        a, b = (load_file(tmp_path / run / weights) for run in ("straight", "resumed"))
        assert a.keys() == b.keys()
        assert all(torch.equal(a[k], b[k]) for k in a)
    assert (tmp_path / "resumed" / "adapter").exists() == bool(lora)
    losses = [[row["loss"] for row in train_lines(tmp_path / run)]
              for run in ("straight", "resumed")]
    assert losses[0] == losses[1]
    kept = sorted(p.name for p in checkpoints.iterdir())
    assert kept == ["step_0000002", "step_0000004"]  # the newest and the one before it


def test_overwrite_replaces_an_earlier_run_and_stale_temporary_folders_go(prepared_data,
                                                                          byte_model, tmp_path):
    """--overwrite starts afresh (the earlier run's checkpoints would pass for this one's); a
    folder that an interrupted save left behind is removed; the earlier final model stays until
    the new one replaces it, and so does its LoRA adapter (this run fine-tunes fully)."""
    model_dir = byte_model()
    out = tmp_path / "run"
    run_sft(prepared_data, model_dir, out, "--lora_rank", "4")  # 4 steps, checkpoints at 2, 4
    assert (out / "adapter" / "adapter_config.json").exists()
    (out / ".tmp-interrupted").mkdir()
    (out / "checkpoints" / ".tmp-interrupted").mkdir()
    with pytest.raises(SystemExit, match="holds a finished model"):
        run_sft(prepared_data, model_dir, out, "--steps", "2")
    run_sft(prepared_data, model_dir, out, "--steps", "2", "--overwrite")
    assert sorted(p.name for p in (out / "checkpoints").iterdir()) == ["step_0000002"]
    assert not list(out.glob(".tmp-*"))
    assert [row["step"] for row in train_lines(out)] == [1, 2]
    assert not (out / "adapter").exists()


def test_non_finite_loss_stops_and_keeps_the_last_good_checkpoint(prepared_data, byte_model,
                                                                  tmp_path, monkeypatch):
    import train_sft
    fit_states, calls = train_sft.fit_states, []

    def nan_in_step_3(*args, **kwargs):
        calls.append(1)
        loss = fit_states(*args, **kwargs)
        return float("nan") if len(calls) == 3 else loss
    monkeypatch.setattr(train_sft, "fit_states", nan_in_step_3)
    stop = "step 3: loss nan.*not finite.*last good checkpoint is .*step_0000002"
    with pytest.raises(SystemExit, match=stop):
        run_sft(prepared_data, byte_model(), tmp_path / "run")
    checkpoint = tmp_path / "run" / "checkpoints" / "step_0000002"
    assert (checkpoint / "meta.json").exists()
    assert not (tmp_path / "run" / "model.safetensors").exists()
    calls.clear()  # in step 1, before any checkpoint: the message must not point to one
    monkeypatch.setattr(train_sft, "fit_states", lambda *args, **kwargs: float("nan"))
    with pytest.raises(SystemExit, match="step 1: .*not finite, stopping; no checkpoint was saved"):
        run_sft(prepared_data, byte_model(name="other"), tmp_path / "run2")
    weights = load_file(checkpoint / "state.safetensors")
    assert all(torch.isfinite(t).all() for k, t in weights.items() if t.is_floating_point())


def test_checkpoint_holds_only_safetensors_and_json(prepared_data, byte_model, tmp_path):
    run_sft(prepared_data, byte_model(), tmp_path / "run", "--lora_rank", "4", "--steps", "2")
    checkpoint = tmp_path / "run" / "checkpoints" / "step_0000002"
    assert sorted(p.name for p in checkpoint.iterdir()) == ["meta.json", "state.safetensors"]
    tensors = load_file(checkpoint / "state.safetensors")
    meta = json.loads((checkpoint / "meta.json").read_text())
    assert meta["step"] == 2
    assert tensors["rng.torch"].dtype == torch.uint8
    # LoRA: only the adapters are trained, so only they are saved, with their AdamW state
    assert all("lora" in k for k in tensors if k.startswith("param."))
    adam_state = {k.split(".")[-1] for k in tensors if k.startswith("adam.")}
    assert adam_state == {"step", "exp_avg", "exp_avg_sq"}


def test_a_bad_model_flag_is_one_line_naming_the_flag(tmp_path, make_checkpoint):
    import train_distill
    import train_rl
    missing = tmp_path / "missing"
    with pytest.raises(SystemExit, match=r"^\S+: error: --model: .*missing: no such model folder"):
        train_rl.main(["--model", str(missing), "--out_dir", str(tmp_path / "out"),
                       "--device", "cpu"])
    with pytest.raises(SystemExit, match=r"^\S+: error: --model: .*missing: no such model folder"):
        ev.main(["--model", str(missing), "--tasks", "gsm8k"])
    no_tokenizer = make_checkpoint()  # weights and config, but no tokenizer.json
    with pytest.raises(SystemExit, match=r"^\S+: error: --teacher: .*no tokenizer.json"):
        train_distill.frozen_model(str(no_tokenizer), "--teacher", device="cpu",
                                   dtype=torch.float32)


@pytest.mark.slow
@pytest.mark.parametrize("script, extra", [
    ("train_rl.py", ["--group_size", "4", "--max_new_tokens", "8", "--kl_coef", "0.1"]),
    ("train_sft.py", ["--lora_rank", "4"]),
])
def test_ddp_with_torchrun_on_two_cpu_processes(script, extra, prepared_data, byte_model, tmp_path):
    """The same script under torchrun (gloo on CPU): ranks train on disjoint data, gradients and
    token counts are reduced, only rank 0 writes, and the run ends with a loadable model."""
    import sys
    out = tmp_path / "out"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
           str(ROOT / script), "--model", str(byte_model()), "--data_dir", str(prepared_data),
           "--out_dir", str(out), "--device", "cpu", "--steps", "2", "--batch_size", "1",
           "--grad_accum", "2", "--eval_every", "0", "--save_every", "1", *extra]
    finished = run_whole(cmd, timeout=300)
    assert finished.returncode == 0, finished.stderr[-2000:]
    assert_final_model(out, steps=2)
