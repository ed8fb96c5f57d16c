"""Shared test fixtures: the reference data in ../shared/data and tiny random-init Qwen3 models.

Nothing here downloads anything: tests run offline on random weights and real data/tokenizer files,
and the tests that need ../shared/data skip when it is absent.
"""
import importlib.util
import json
import shutil
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


def load_script(relative_path):
    """A file of this repo that is no package module (data/prepare.py, runs/paper.py), imported by path."""
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


def tiny_config(**overrides):
    """A Qwen3Config for a tiny model; any field can be overridden (e.g. vocab_size=151936)."""
    from model import Qwen3Config
    return Qwen3Config(**{**TINY, **overrides})


def tiny_model(seed=0, **overrides):
    """A random-init tiny Qwen3 in fp32. Norm weights are randomised too, so that a wrong norm shows."""
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
    """Factory: write a tiny random checkpoint folder in the Hugging Face layout and return its path.

    With with_tokenizer=True the real Qwen tokenizer.json is copied in (skips without ../shared)."""
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


@pytest.fixture(scope="session")
def byte_model_dir(tmp_path_factory) -> Path:
    """One tiny random model (vocab 512) with runs/paper.py's byte-level tokenizer, shared by the session:
    for tests that only need some loadable model folder. Do not write into it."""
    out = tmp_path_factory.mktemp("byte_model") / "model"
    tiny_model(seed=0).save_pretrained(out)
    load_script("runs/paper.py").write_byte_tokenizer(out / "tokenizer.json")
    return out
