"""Shared test fixtures: the reference data in ../shared/data, tiny random-init Qwen3 models, and
what the trainer tests share (a byte-level tokenizer, reading a run's metrics and final model).

Nothing here downloads anything: tests run offline on random weights and real data/tokenizer
files, and the tests that need ../shared/data skip when it is absent.

Trainer runs use tiny random models and real GSM8K (from ../shared/data). Most use a byte-level
tokenizer (256 byte tokens + <|endoftext|>, <|im_end|>), so that a vocab-512 model can read GSM8K
and a step takes milliseconds; with Qwen's tokenizer the model needs its 151,936-row vocabulary,
and one CPU step takes seconds. test_train_sft.py runs one step with the real tokenizer.
"""
import importlib.util
import json
import os
import shutil
import signal
import subprocess
from argparse import Namespace
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
SHARED_DATA = ROOT.parent / "shared" / "data"

# A Qwen3 shape small enough for CPU tests, with GQA (4 query heads share 2 KV heads) and a
# head_dim that is not hidden_size // num_heads, as in the real models.
TINY = dict(vocab_size=512, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
            num_attention_heads=4, num_key_value_heads=2, head_dim=32, rope_theta=10000.0,
            rms_norm_eps=1e-6, tie_word_embeddings=True, max_position_embeddings=2048,
            bos_token_id=1, eos_token_id=2)


# The parity tests run on every device this machine has: CPU always, CUDA where there is one
DEVICES = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])


@pytest.fixture(scope="session")
def shared_data() -> Path:
    """../shared/data, or skip the test when it is absent."""
    if not (SHARED_DATA / "README.md").exists():
        pytest.skip("../shared/data is absent")
    return SHARED_DATA


@pytest.fixture(scope="session")
def tokenizer_file(shared_data) -> Path:
    return shared_data / "qwen3-0.6b" / "tokenizer.json"


def run_whole(command, timeout: float, **kwargs) -> subprocess.CompletedProcess:
    """subprocess.run with captured text output, in a process group of its own that is killed
    whole on a timeout: torchrun's worker processes go with it instead of lingering."""
    child = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                             start_new_session=True, **kwargs)
    try:
        stdout, stderr = child.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(child.pid, signal.SIGKILL)
        child.communicate()
        raise
    return subprocess.CompletedProcess(command, child.returncode, stdout, stderr)


def load_script(relative_path):
    """A file of this repo that is no package module (data/prepare.py, runs/paper.py), imported
    by path."""
    path = ROOT / relative_path
    spec = importlib.util.spec_from_file_location(path.stem, path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="session")
def prepared_data(shared_data, tmp_path_factory) -> Path:
    """Every dataset, prepared by data/prepare.py from ../shared/data: what --data_dir points to."""
    out = tmp_path_factory.mktemp("data")
    load_script("data/prepare.py").prepare(out_dir=out, source=shared_data)
    return out


@pytest.fixture
def one_thread():
    """Tiny models run faster on one thread: two OpenMP threads spend more time waiting for each
    other (much more on a busy machine) than computing. Trainer tests use it for every test."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def tiny_config(**overrides):
    """A Qwen3Config for a tiny model; any field can be overridden (e.g. vocab_size=151936)."""
    from model import Qwen3Config
    return Qwen3Config(**{**TINY, **overrides})


def tiny_model(seed=0, **overrides):
    """A random-init tiny Qwen3 in fp32. Norm weights are randomised too, so that a wrong norm
    shows."""
    from model import Qwen3
    torch.manual_seed(seed)
    model = Qwen3(tiny_config(**overrides))
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("norm.weight"):
                p.copy_(1.0 + 0.1 * torch.randn_like(p))
            else:
                p.copy_(0.05 * torch.randn_like(p))
    return model.eval()


@pytest.fixture
def make_checkpoint(tmp_path):
    """Factory: write a tiny random checkpoint folder in the Hugging Face layout and return its
    path. With with_tokenizer=True the real Qwen tokenizer.json is copied in (skips without
    ../shared/data)."""
    def make(seed=0, with_tokenizer=False, name="ckpt", **overrides):
        out = tmp_path / name
        model = tiny_model(seed=seed, **overrides)
        model.save_pretrained(out)
        if with_tokenizer:
            tok = SHARED_DATA / "qwen3-0.6b" / "tokenizer.json"
            if not tok.exists():
                pytest.skip("../shared/data is absent")
            shutil.copy(tok, out / "tokenizer.json")
        return out
    return make


def read_json(path):
    return json.loads(Path(path).read_text())


# The trainers' runs ------------------------------------------------------------------------------

# a byte-level tokenizer.json (token i is byte i, then the two stop tokens): runs/paper.py's
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
    """The training steps' lines of a run's metrics.jsonl (not the evals')."""
    lines = (Path(out_dir) / "metrics.jsonl").read_text().splitlines()
    return [row for row in map(json.loads, lines) if "loss" in row]


def assert_final_model(out_dir, steps):
    """The run wrote a loadable Hugging Face folder and one metrics line per step."""
    from model import Qwen3, Tokenizer
    loaded = Qwen3.from_pretrained(out_dir)
    assert Tokenizer.from_pretrained(out_dir).stop_ids
    assert all(torch.isfinite(p).all() for p in loaded.parameters())
    assert [row["step"] for row in train_lines(out_dir)] == list(range(1, steps + 1))
    return loaded


def args_for(**overrides):
    """The shared flags' defaults, as a trainer would parse them, with overrides."""
    from harness.flags import training_args
    return Namespace(**{**vars(training_args("test").parse_args([])), **overrides})


@pytest.fixture(scope="session")
def byte_model_dir(tmp_path_factory) -> Path:
    """One tiny random model (vocab 512) with runs/paper.py's byte-level tokenizer, shared by the
    session: for tests that only need some loadable model folder. Do not write into it."""
    out = tmp_path_factory.mktemp("byte_model") / "model"
    tiny_model(seed=0).save_pretrained(out)
    write_byte_tokenizer(out / "tokenizer.json")
    return out


class ByteTokenizer:
    """Enough of a tokenizer for state_drift on a vocabulary-512 model: a token per byte; ids print
    as words."""
    stop_ids, n_real_tokens = [2], 300

    def encode_batch(self, texts):
        return [list(t.encode()) for t in texts]

    def decode(self, ids):
        return " ".join(f"t{i}" for i in ids)
