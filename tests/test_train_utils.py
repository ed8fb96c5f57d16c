"""The training utilities in model.py, and the fixtures the trainer tests share.

Trainer runs use tiny random models and real GSM8K (from ../shared/data). Most use a byte-level
tokenizer (256 byte tokens + <|endoftext|>, <|im_end|>), so that a vocab-512 model can read GSM8K and a
step takes milliseconds; with Qwen's tokenizer the model needs its 151,936-row vocabulary, and one CPU
step takes seconds. test_train_sft.py runs one step with the real tokenizer and vocabulary.
"""
import json
import math
from argparse import Namespace
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

import eval as ev
import model as M
from conftest import ROOT, load_script, tiny_model


# -----------------------------------------------------------------------------------------------
# Shared fixtures (imported by test_train_sft.py, test_train_rl.py and test_train_distill.py)


@pytest.fixture(autouse=True)
def one_thread():
    """Tiny models run faster on one thread: two OpenMP threads spend more time waiting for each other
    (much more on a busy machine) than computing."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


# a byte-level tokenizer.json (token i is byte i, then the two stop tokens): runs/paper.py's, for --smoke
write_byte_tokenizer = load_script("runs/paper.py").write_byte_tokenizer


@pytest.fixture
def byte_model(tmp_path):
    """Factory: a tiny random model folder (vocab 512) with the byte-level tokenizer."""
    def make(seed=0, name="byte_model", **overrides):
        out = tmp_path / name
        tiny_model(seed=seed, **overrides).save_pretrained(out)
        write_byte_tokenizer(out / "tokenizer.json")
        return out
    return make


def train_lines(out_dir):
    return [row for row in map(json.loads, (Path(out_dir) / "metrics.jsonl").read_text().splitlines()) if "loss" in row]


def assert_final_model(out_dir, steps):
    """The run wrote a loadable Hugging Face folder and one metrics line per step."""
    loaded = M.Qwen3.from_pretrained(out_dir)
    assert M.Tokenizer.from_pretrained(out_dir).stop_ids
    assert all(torch.isfinite(p).all() for p in loaded.parameters())
    assert [row["step"] for row in train_lines(out_dir)] == list(range(1, steps + 1))
    return loaded


def args_for(**overrides):
    """The shared flags' defaults, as a trainer would parse them, with overrides."""
    return Namespace(**{**vars(M.training_args("test").parse_args([])), **overrides})


# -----------------------------------------------------------------------------------------------
# The utilities


def test_lr_schedule_warms_up_then_decays_to_zero():
    args = args_for(lr=1.0, warmup=4, steps=104)
    assert [M.lr_at(s, args) for s in range(4)] == [0.25, 0.5, 0.75, 1.0]
    assert M.lr_at(54, args) == pytest.approx(0.5)  # cosine: half way down at the middle
    assert M.lr_at(103, args) == pytest.approx(0.0, abs=1e-3)
    assert M.lr_at(79, args) == pytest.approx(0.5 * (1 + math.cos(math.pi * 0.75)))


def test_batches_cover_each_epoch_once_and_split_ranks(monkeypatch):
    items = list(range(10))
    batches = [ev.batch_at(items, step, 5, seed=3) for step in range(4)]
    assert sorted(batches[0] + batches[1]) == items and sorted(batches[2] + batches[3]) == items
    assert batches[0] + batches[1] != batches[2] + batches[3]  # a new shuffle each epoch
    assert ev.batch_at(items, 1, 5, seed=3) == batches[1]  # any step's batch, without replaying the others
    monkeypatch.setenv("WORLD_SIZE", "2")
    per_rank = []
    for rank in (0, 1):
        monkeypatch.setenv("RANK", str(rank))
        per_rank.append(ev.batch_at(items, 0, 5, seed=3))
    assert sorted(per_rank[0] + per_rank[1]) == items  # ranks see different examples


def test_completion_logprobs_are_the_completion_tokens_only():
    """Right-padded batch of different lengths: each completion's log-probs equal a plain log-softmax of
    the full logits of that sequence alone; prompts and padding are masked out."""
    model = tiny_model(seed=5)
    seqs, starts = [[5, 6, 7, 8, 9, 10], [11, 12, 13], [3, 4, 5, 6, 7, 8, 9, 1, 2]], [2, 1, 7]
    logprobs, mask = M.completion_logprobs(model, seqs, starts, temperature=0.7)
    assert mask.tolist() == [[1, 1, 1, 1], [1, 1, 0, 0], [1, 1, 0, 0]]
    for b, (seq, start) in enumerate(zip(seqs, starts)):
        full = (model(torch.tensor([seq]))[0] / 0.7).log_softmax(-1)
        expected = full[torch.arange(start - 1, len(seq) - 1), torch.tensor(seq[start:])]
        assert torch.allclose(logprobs[b, :len(seq) - start], expected, atol=1e-5)
        assert (logprobs[b, len(seq) - start:] == 0).all()
    # vocab_limit: normalised over the first tokens only, as the sampler draws them
    limited, _ = M.completion_logprobs(model, seqs[:1], starts[:1], vocab_limit=300)
    full = model(torch.tensor([seqs[0]]))[0, :, :300].log_softmax(-1)
    assert torch.allclose(limited[0], full[torch.arange(1, 5), torch.tensor(seqs[0][2:])], atol=1e-5)


def test_rollout_ends_at_the_token_that_completes_a_stop_string(tmp_path):
    write_byte_tokenizer(tmp_path / "tok.json")
    tok = M.Tokenizer.from_pretrained(tmp_path / "tok.json")
    text = " 5 apples.\n\nQuestion: how many"

    class Scripted:  # a stand-in model that always "samples" the same text
        device = torch.device("cpu")

        def generate(self, prompts, max_new_tokens, **kw):
            return [tok.encode(text) for _ in prompts]
    out = ev.rollout(Scripted(), tok, [[1], [2]], 64, 1.0, 0, stop_strings=("Question:",))
    assert tok.decode(out[0]) == " 5 apples.\n\nQuestion:" and out[0] == out[1]
    assert ev.rollout(Scripted(), tok, [[1]], 64, 1.0, 0)[0] == tok.encode(text)


def test_lora_model_saves_merged_with_the_same_logits(tmp_path):
    model = tiny_model(seed=6)
    M.add_lora(model, rank=4, alpha=8)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_b" in name:
                p.normal_(0, 0.05)  # a trained adapter: B no longer zero
    idx = torch.randint(0, 512, (2, 11))
    with torch.no_grad():
        expected = model(idx)
        model.save_pretrained(tmp_path / "merged")
        merged = M.Qwen3.from_pretrained(tmp_path / "merged")
        assert not any("lora" in k for k in load_file(tmp_path / "merged" / "model.safetensors"))
        assert (merged(idx) - expected).abs().max() < 1e-5


def run_sft(data_dir, model_dir, out_dir, *extra):
    import train_sft
    train_sft.main(["--model", str(model_dir), "--out_dir", str(out_dir), "--data_dir", str(data_dir), "--steps", "4",
                    "--batch_size", "2", "--grad_accum", "1", "--lora_rank", "0", "--lr", "3e-3", "--warmup", "1",
                    "--eval_every", "0", "--save_every", "2", *extra])


def test_resume_is_bit_identical(prepared_data, byte_model, tmp_path, monkeypatch):
    """Killed during step 3 and resumed from the step-2 checkpoint, a run ends with exactly the weights and
    losses of an uninterrupted one (full fine-tuning: every weight has AdamW state)."""
    import train_sft
    model_dir = byte_model()
    run_sft(prepared_data, model_dir, tmp_path / "straight")

    fit_states, calls = train_sft.fit_states, []

    def dies_in_step_3(*args, **kwargs):
        calls.append(1)
        if len(calls) == 3:
            raise KeyboardInterrupt
        return fit_states(*args, **kwargs)
    monkeypatch.setattr(train_sft, "fit_states", dies_in_step_3)
    with pytest.raises(KeyboardInterrupt):
        run_sft(prepared_data, model_dir, tmp_path / "resumed")
    monkeypatch.setattr(train_sft, "fit_states", fit_states)
    assert [p.name for p in (tmp_path / "resumed" / "checkpoints").iterdir()] == ["step_0000002"]
    run_sft(prepared_data, model_dir, tmp_path / "resumed", "--resume")

    a, b = (load_file(tmp_path / run / "model.safetensors") for run in ("straight", "resumed"))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    losses = [[row["loss"] for row in train_lines(tmp_path / run)] for run in ("straight", "resumed")]
    assert losses[0] == losses[1]
    kept = sorted(p.name for p in (tmp_path / "resumed" / "checkpoints").iterdir())
    assert kept == ["step_0000002", "step_0000004"]  # the newest and the one before it


def test_overwrite_replaces_an_earlier_run_and_stale_temporary_folders_go(prepared_data, byte_model, tmp_path):
    """--overwrite starts afresh (the earlier run's checkpoints would pass for this one's); a folder that an
    interrupted save left behind is removed; the earlier final model stays until the new one replaces it."""
    model_dir, out = byte_model(), tmp_path / "run"
    run_sft(prepared_data, model_dir, out)  # 4 steps, checkpoints at 2 and 4
    (out / ".tmp-interrupted").mkdir()
    (out / "checkpoints" / ".tmp-interrupted").mkdir()
    with pytest.raises(SystemExit, match="holds a finished model"):
        run_sft(prepared_data, model_dir, out, "--steps", "2")
    run_sft(prepared_data, model_dir, out, "--steps", "2", "--overwrite")
    assert sorted(p.name for p in (out / "checkpoints").iterdir()) == ["step_0000002"]
    assert not list(out.glob(".tmp-*"))
    assert [row["step"] for row in train_lines(out)] == [1, 2]


def test_non_finite_loss_stops_and_keeps_the_last_good_checkpoint(prepared_data, byte_model, tmp_path, monkeypatch):
    import train_sft
    fit_states, calls = train_sft.fit_states, []

    def nan_in_step_3(*args, **kwargs):
        calls.append(1)
        loss = fit_states(*args, **kwargs)
        return float("nan") if len(calls) == 3 else loss
    monkeypatch.setattr(train_sft, "fit_states", nan_in_step_3)
    with pytest.raises(SystemExit, match="step 3: loss nan.*not finite.*last good checkpoint is .*step_0000002"):
        run_sft(prepared_data, byte_model(), tmp_path / "run")
    checkpoint = tmp_path / "run" / "checkpoints" / "step_0000002"
    assert (checkpoint / "meta.json").exists() and not (tmp_path / "run" / "model.safetensors").exists()
    calls.clear()  # in step 1, before any checkpoint: the message must not point to one
    monkeypatch.setattr(train_sft, "fit_states", lambda *args, **kwargs: float("nan"))
    with pytest.raises(SystemExit, match="step 1: .*not finite, stopping; no checkpoint was saved yet"):
        run_sft(prepared_data, byte_model(name="other"), tmp_path / "run2")
    weights = load_file(checkpoint / "state.safetensors")
    assert all(torch.isfinite(t).all() for k, t in weights.items() if t.is_floating_point())


def test_checkpoint_holds_only_safetensors_and_json(prepared_data, byte_model, tmp_path):
    run_sft(prepared_data, byte_model(), tmp_path / "run", "--lora_rank", "4", "--steps", "2")
    checkpoint = tmp_path / "run" / "checkpoints" / "step_0000002"
    assert sorted(p.name for p in checkpoint.iterdir()) == ["meta.json", "state.safetensors"]
    tensors, meta = load_file(checkpoint / "state.safetensors"), json.loads((checkpoint / "meta.json").read_text())
    assert meta["step"] == 2 and tensors["rng.torch"].dtype == torch.uint8
    assert all("lora" in k for k in tensors if k.startswith("param."))  # LoRA: only the adapters are trained
    assert {k.split(".")[-1] for k in tensors if k.startswith("adam.")} == {"step", "exp_avg", "exp_avg_sq"}


def test_a_bad_model_flag_is_one_line_naming_the_flag(tmp_path, make_checkpoint):
    import train_distill
    import train_rl
    missing = tmp_path / "missing"
    with pytest.raises(SystemExit, match=r"^--model: .*missing: no such model folder"):
        train_rl.main(["--model", str(missing), "--out_dir", str(tmp_path / "out"), "--device", "cpu"])
    with pytest.raises(SystemExit, match=r"^--model: .*missing: no such model folder"):
        ev.main(["--model", str(missing), "--tasks", "gsm8k"])
    no_tokenizer = make_checkpoint()  # weights and config, but no tokenizer.json
    with pytest.raises(SystemExit, match=r"^--teacher: .*no tokenizer.json"):
        train_distill.load_teacher(args_for(teacher=str(no_tokenizer), model="student"), None, None, "cpu",
                                   torch.float32)


@pytest.mark.slow
@pytest.mark.parametrize("script, extra", [
    ("train_rl.py", ["--group_size", "4", "--max_new_tokens", "8", "--kl_coef", "0.1"]),
    ("train_sft.py", ["--lora_rank", "4"]),
])
def test_ddp_with_torchrun_on_two_cpu_processes(script, extra, prepared_data, byte_model, tmp_path):
    """The same script under torchrun (gloo on CPU): ranks train on disjoint data, gradients and token counts
    are reduced, only rank 0 writes, and the run ends with a loadable model."""
    import subprocess
    import sys
    out = tmp_path / "out"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", str(ROOT / script),
           "--model", str(byte_model()), "--data_dir", str(prepared_data), "--out_dir", str(out), "--device", "cpu",
           "--steps", "2", "--batch_size", "1", "--grad_accum", "2", "--eval_every", "0", "--save_every", "1", *extra]
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    assert_final_model(out, steps=2)
