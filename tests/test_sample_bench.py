"""sample.py and bench.py end to end, in-process, on tiny random checkpoints."""
import os

import pytest

import bench
from conftest import read_json
import sample


@pytest.fixture
def checkpoint(make_checkpoint):
    """A tiny random checkpoint with the real Qwen tokenizer (so vocab 151936)."""
    return make_checkpoint(with_tokenizer=True, vocab_size=151936, hidden_size=64)


def run_sample(checkpoint, *extra):
    return sample.main(["--model", str(checkpoint), "--num_samples", "3", "--max_new_tokens", "8",
                        "--device", "cpu", *extra])


def test_sample_prints_every_completion_and_is_seeded(checkpoint, tmp_path, capsys):
    prompt = tmp_path / "prompt.txt"
    prompt.write_text("Question: what is 2 + 2?\nAnswer:")
    first = run_sample(checkpoint, "--prompt_file", str(prompt), "--seed", "7")
    printed = capsys.readouterr().out
    assert len(first) == 3
    assert all(isinstance(c, str) and c for c in first)
    assert printed.startswith("Question: what is 2 + 2?\nAnswer:")
    assert all(f"sample {i}/3" in printed for i in (1, 2, 3))
    assert all(c in printed for c in first)
    assert run_sample(checkpoint, "--prompt_file", str(prompt), "--seed", "7") == first
    assert len(set(first)) > 1  # three different samples of one prompt


def test_sample_greedy(checkpoint):
    greedy = run_sample(checkpoint, "--prompt", "Hello", "--temperature", "0", "--top_k", "5")
    assert len(greedy) == 3
    assert greedy[0] == greedy[1] == greedy[2]


def test_sample_clear_errors(checkpoint, tmp_path, capsys):
    with pytest.raises(SystemExit):
        run_sample(checkpoint, "--prompt_file", str(tmp_path / "missing.txt"))
    assert "missing.txt: no such file" in capsys.readouterr().err
    with pytest.raises(SystemExit, match="--model: .*no_model: no such model folder"):
        sample.main(["--model", str(tmp_path / "no_model"), "--device", "cpu"])
    for bad, message in ((["--top_p", "0"], "--top_p: must be > 0 and <= 1"),
                         (["--top_k", "0"], "--top_k: must be >= 1")):
        with pytest.raises(SystemExit):
            run_sample(checkpoint, *bad)
        assert message in capsys.readouterr().err


@pytest.mark.parametrize("skip_hf", [False, True])
def test_bench_micro_runs_both(tmp_path, skip_hf):
    if not skip_hf:
        pytest.importorskip("transformers")
    argv = ["--preset", "micro", "--device", "cpu", "--batch_size", "1,2", "--prompt_len", "4",
            "--new_tokens", "4", "--repeats", "1", "--train_batch_size", "2", "--train_len", "8",
            "--json", str(tmp_path / "b.json")]
    # without transformers (fast), two spreads x two temperatures: a model per spread
    settings = ["--skip_hf", "--temperature", "0.7,1", "--logit_std", "3,0"] if skip_hf else []
    result = bench.main(argv + settings)
    names = ["ours"] if skip_hf else ["ours", "transformers"]
    rows = [(r["logit_std"], r["temperature"], r["batch_size"]) for r in result["generation"]]
    if skip_hf:
        assert rows == [(s, t, b) for s in (3.0, 0.0) for t in (0.7, 1.0) for b in (1, 2)]
    else:
        assert rows == [(3.0, 0.7, 1), (3.0, 0.7, 2)]
    for row in result["generation"]:
        assert all(row[n]["tokens_per_s"] > 0 and row[n]["peak_mib"] > 0 for n in names)
        assert ("ratio" in row) == (not skip_hf)
    assert result["generation"][0]["ours"]["decode_tokens_per_s"] > 0
    assert result["training"]["tokens_per_s"] > 0
    assert "| logit std | temperature | batch |" in result["markdown"]
    assert (tmp_path / "b.json").exists()


@pytest.mark.slow  # ~40 s: four trainers and eval
def test_bench_gpu_suite_runs_the_trainers_and_eval_on_cpu(tmp_path, tokenizer_file, prepared_data):
    # The prepared GPU run (issue 13), shrunk to a CPU check: every section fills its figures
    argv = ["--suite", "gpu", "--preset", "micro", "--device", "cpu", "--small", "--skip_hf",
            "--tokenizer", str(tokenizer_file), "--data_dir", str(prepared_data),
            "--batch_size", "2", "--prompt_len", "4", "--new_tokens", "4", "--repeats", "1",
            "--train_batch_size", "2", "--train_len", "8", "--train_steps", "2",
            "--eval_limit", "4", "--json", str(tmp_path / "gpu.json")]
    result = bench.main(argv)
    assert result["config"]["vocab_size"] == 151936  # the real vocabulary, whatever the preset
    for name in ("rl", "rl_eager_decode", "opd", "sft_stress"):
        run = result["trainers"][name]
        assert run["steps"] == 2
        assert len(run["step_s"]) == 2
        assert run["seconds_per_step"] > 0
    assert result["trainers"]["rl"]["last_step"]["response_len"] == 8  # no early stop: full length
    assert result["eval"]["gsm8k"]["limit"] == 4
    assert result["eval"]["mmlu"]["seconds"] > 0
    assert result["eval"]["gsm8k_graph_equals_eager"] is True
    assert result["pipeline_hours"]["total"] > 0
    assert read_json(tmp_path / "gpu.json")["pipeline_hours"] == result["pipeline_hours"]
    # issue 19's sections: the eager step at long context profiled, --fsdp in one process,
    # training at larger batches with the attention kernels it ran
    profiled = result["decode_profile"]
    assert profiled["eager_ms_per_step"] > 0
    assert "Self CPU" in profiled["eager_profile"]  # torch.profiler's table
    for name in ("rl", "opd", "sft_stress"):
        assert result["fsdp"][name]["steps"] == 2, result["fsdp"][name]
    assert "WORLD_SIZE" not in os.environ  # the group of one is gone, its variables too
    for size in ("2", "4"):
        assert result["training_sizes"][size]["tokens_per_s"] > 0
        assert any("scaled_dot_product" in op
                   for op in result["training_sizes"][size]["attention_ops"])
    assert "--fsdp, one process, rl step" in result["markdown"]
