"""parallel.py under torchrun: two CPU processes (gloo) with DDP and with FSDP2 train to the same
weights as one process on the same global batch, for all three trainers; a sharded checkpoint
resumes to the same result; the final folder loads in transformers. Each run is a new torchrun
(about 10 s), so these are slow tests."""
import os
import shutil
import sys

import pytest
import torch

from conftest import ROOT, run_whole, train_lines
from model import Qwen3, load_safetensors

pytestmark = pytest.mark.slow

# The trainer's main() behind a reward that varies (a random model never earns one, and RL skips
# groups whose rewards are all equal): the parity of the answer's length, as test_train_rl's
DRIVER = """
import sys
sys.path.insert(0, {root!r})
import train_rl, train_sft, train_distill
train_rl.gsm8k_reward = lambda text, gold: float(len(text) % 2)
{{"rl": train_rl, "sft": train_sft, "distill": train_distill}}[sys.argv[1]].main(sys.argv[2:])
"""
SHARED = ["--device", "cpu", "--steps", "2", "--warmup", "1", "--eval_every", "0",
          "--grad_accum", "2", "--lr", "1e-2"]
METHOD = {  # each: --batch_size per process is 1 under torchrun, 2 in the one process
    "sft": [],
    "rl": ["--group_size", "2", "--max_new_tokens", "8"],
    "distill": ["--max_new_tokens", "8", "--states_per_rollout", "2",
                "--continuation_tokens", "4"],
}


def run(tmp_path, method, out, processes, *flags):
    driver = tmp_path / "driver.py"
    driver.write_text(DRIVER.format(root=str(ROOT)))
    launcher = [sys.executable]
    if processes > 1:
        launcher += ["-m", "torch.distributed.run", "--standalone",
                     f"--nproc_per_node={processes}"]
    batch_size = str(2 // processes)
    cmd = [*launcher, str(driver), method, "--out_dir", str(out), "--batch_size", batch_size,
           *SHARED, *METHOD[method], *flags]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    finished = run_whole(cmd, timeout=180, env=env, cwd=tmp_path)
    errors = [line for line in finished.stderr.splitlines() if "Error" in line or "error:" in line]
    assert finished.returncode == 0, "\n".join(errors[-5:]) or finished.stderr[-3000:]
    return out


def assert_same_training(out, reference, tolerance=1e-3):
    """The same gradient at every step (its norm, to float rounding: a gradient summed rather
    than averaged over GPUs would double it), and so the same weights. AdamW divides each update
    by the gradient's running scale, which magnifies rounding in the tiniest gradients to ~1e-4
    of a weight at lr 1e-2: hence the weights' looser tolerance."""
    norms = [row["grad_norm"] for row in train_lines(out)]
    reference_norms = [row["grad_norm"] for row in train_lines(reference)]
    assert norms == pytest.approx(reference_norms, rel=1e-5)
    a = load_safetensors(out / "model.safetensors")
    b = load_safetensors(reference / "model.safetensors")
    assert a.keys() == b.keys()
    worst = max((a[k].float() - b[k].float()).abs().max().item() for k in a)
    assert worst <= tolerance


@pytest.mark.parametrize("method", ["sft", "rl", "distill"])
def test_ddp_and_fsdp_train_as_one_process_on_the_same_global_batch(method, prepared_data,
                                                                    byte_model, tmp_path):
    model = byte_model(seed=0)
    teacher = byte_model(seed=1, name="teacher")
    flags = ["--model", str(model), "--data_dir", str(prepared_data)]
    if method == "distill":
        flags += ["--teacher", str(teacher)]
    one = run(tmp_path, method, tmp_path / "one", 1, *flags)
    start = load_safetensors(model / "model.safetensors")
    trained = load_safetensors(one / "model.safetensors")
    assert max((trained[k] - start[k]).abs().max().item() for k in start) > 1e-2  # it learned
    assert_same_training(run(tmp_path, method, tmp_path / "ddp", 2, *flags), one)
    assert_same_training(run(tmp_path, method, tmp_path / "fsdp", 2, *flags, "--fsdp"), one)


def test_fsdp_with_lora_trains_as_one_process(prepared_data, byte_model, tmp_path):
    flags = ["--model", str(byte_model()), "--data_dir", str(prepared_data), "--lora_rank", "4"]
    one = run(tmp_path, "sft", tmp_path / "one", 1, *flags)
    assert_same_training(run(tmp_path, "sft", tmp_path / "fsdp", 2, *flags, "--fsdp"), one)


def test_a_sharded_checkpoint_resumes_to_the_same_weights(prepared_data, byte_model, tmp_path):
    flags = ["--model", str(byte_model()), "--data_dir", str(prepared_data), "--fsdp",
             "--save_every", "1"]
    whole = run(tmp_path, "sft", tmp_path / "whole", 2, *flags)
    # The same run stopped after step 1: its step-1 checkpoint (one safetensors file per process)
    stopped = tmp_path / "stopped"
    shutil.copytree(tmp_path / "whole", stopped)
    shutil.rmtree(stopped / "checkpoints" / "step_0000002")
    for name in ("model.safetensors", "config.json", "tokenizer.json"):
        (stopped / name).unlink()
    shards = list((stopped / "checkpoints" / "step_0000001").glob("*.safetensors"))
    assert len(shards) == 2
    run(tmp_path, "sft", stopped, 2, *flags, "--resume")
    assert_same_training(stopped, whole, tolerance=0.0)  # bit for bit


def test_the_final_fsdp_folder_loads_in_transformers(prepared_data, byte_model, tmp_path):
    transformers = pytest.importorskip("transformers")
    flags = ["--model", str(byte_model()), "--data_dir", str(prepared_data), "--fsdp"]
    run(tmp_path, "sft", tmp_path / "fsdp", 2, *flags)
    theirs = transformers.Qwen3ForCausalLM.from_pretrained(tmp_path / "fsdp").eval()
    ours = Qwen3.from_pretrained(tmp_path / "fsdp")
    idx = torch.tensor([[1, 2, 3, 4, 5]])
    with torch.no_grad():
        assert (ours(idx) - theirs(idx).logits).abs().max().item() < 1e-4
