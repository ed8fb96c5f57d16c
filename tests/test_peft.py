"""LoRA against PEFT 0.21: model.py's LoRALinear computes what PEFT's LoRA layer computes on all
seven targets, its initialisation is PEFT's, its merged save is merge_and_unload's; and the
adapter a LoRA run writes (harness/adapter.py) is one PeftModel.from_pretrained loads with no
missing or unexpected keys and that gives the merged model's logits, holds what vLLM's LoRA loader
requires, and loads in eval.py and sample.py. Skipped without PEFT (requirements-dev.txt)."""
import json
import math
import warnings

import pytest
import torch
from safetensors.torch import load_file

import eval as ev
import sample
from conftest import tiny_model
from harness.adapter import ADAPTER_DIR, merge_adapter
from harness.cli import load_model
from model import LORA_TARGETS, LoRALinear, Qwen3, add_lora

peft = pytest.importorskip("peft")
transformers = pytest.importorskip("transformers")

pytestmark = pytest.mark.usefixtures("one_thread")

RANK, ALPHA = 4, 12


def hf_model(folder):
    return transformers.Qwen3ForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()


def lora_pair(folder, seed=0):
    """The model in `folder` with LoRA, ours and PEFT's, holding the same random A and B (B
    nonzero, so that the adapters change the outputs)."""
    ours = Qwen3.from_pretrained(folder)
    add_lora(ours, RANK, ALPHA)
    config = peft.LoraConfig(r=RANK, lora_alpha=ALPHA, target_modules=list(LORA_TARGETS),
                             lora_dropout=0.0, task_type="CAUSAL_LM")
    theirs = peft.get_peft_model(hf_model(folder), config)
    decoder = theirs.base_model.model.model  # Qwen3ForCausalLM.model: what our Qwen3 is
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, module in ours.named_modules():
            if isinstance(module, LoRALinear):
                module.lora_a.copy_(0.1 * torch.randn(module.lora_a.shape, generator=g))
                module.lora_b.copy_(0.1 * torch.randn(module.lora_b.shape, generator=g))
                layer = decoder.get_submodule(name)
                layer.lora_A["default"].weight.copy_(module.lora_a)
                layer.lora_B["default"].weight.copy_(module.lora_b)
    return ours, theirs


def test_lora_forward_equals_pefts_on_all_seven_targets(make_checkpoint):
    ours, theirs = lora_pair(make_checkpoint(seed=1))
    peft_layers = {name.removeprefix("base_model.model.model.")
                   for name, m in theirs.named_modules() if isinstance(m, peft.tuners.lora.Linear)}
    our_layers = {name for name, m in ours.named_modules() if isinstance(m, LoRALinear)}
    assert peft_layers == our_layers
    assert {name.rsplit(".", 1)[-1] for name in our_layers} == set(LORA_TARGETS)
    decoder = theirs.base_model.model.model
    x = torch.randn(3, 5, 128, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        for name in sorted(our_layers):  # each target, alone
            module = ours.get_submodule(name)
            inputs = x[..., :module.base.in_features]
            torch.testing.assert_close(module(inputs), decoder.get_submodule(name)(inputs),
                                       rtol=1e-5, atol=1e-6)
            assert decoder.get_submodule(name).scaling["default"] == module.scale
        idx = torch.randint(0, 512, (2, 17), generator=torch.Generator().manual_seed(2))
        torch.testing.assert_close(ours(idx), theirs(input_ids=idx).logits, rtol=1e-4,
                                   atol=1e-5)


def test_the_merged_save_is_merge_and_unload(make_checkpoint, tmp_path):
    ours, theirs = lora_pair(make_checkpoint(seed=2, tie_word_embeddings=False))
    ours.save_pretrained(tmp_path / "merged")
    saved = load_file(tmp_path / "merged" / "model.safetensors")
    merged = theirs.merge_and_unload().state_dict()
    assert saved.keys() == merged.keys()
    for name, tensor in saved.items():
        torch.testing.assert_close(tensor, merged[name], rtol=1e-6, atol=1e-7, msg=name)


def test_lora_initialisation_is_pefts(make_checkpoint):
    """From the same random state, our A is PEFT's (kaiming-uniform, a=√5, as nn.Linear's
    default), B is zero in both, and the scale is alpha / rank."""
    theirs = peft.get_peft_model(hf_model(make_checkpoint(seed=3)), peft.LoraConfig(
        r=RANK, lora_alpha=ALPHA, target_modules=list(LORA_TARGETS), lora_dropout=0.0))
    decoder = theirs.base_model.model.model
    for name in ("layers.0.self_attn.q_proj", "layers.1.mlp.down_proj"):
        layer = decoder.get_submodule(name)
        torch.manual_seed(11)
        layer.reset_lora_parameters("default", init_lora_weights=True)  # PEFT's initialisation
        torch.manual_seed(11)
        ours = LoRALinear(layer.base_layer, RANK, ALPHA)
        assert torch.equal(ours.lora_a, layer.lora_A["default"].weight)
        assert torch.equal(ours.lora_b, layer.lora_B["default"].weight)
        assert not ours.lora_b.any()
        assert ours.scale == layer.scaling["default"] == ALPHA / RANK
    bound = math.sqrt(6 / ((1 + 5) * 64))  # kaiming-uniform's bound at a=√5, fan_in 64
    assert ours.lora_a.abs().max() <= bound


# The adapter a LoRA run writes --------------------------------------------------------------------


def run_lora_sft(data_dir, model, out):
    """A two-step LoRA run of train_sft.py (rank 4, alpha 12) from `model` into `out`."""
    import train_sft
    with torch.random.fork_rng():
        train_sft.main(["--model", str(model), "--out_dir", str(out), "--data_dir", str(data_dir),
                        "--steps", "2", "--batch_size", "2", "--grad_accum", "1", "--lora_rank",
                        str(RANK), "--lora_alpha", str(ALPHA), "--lr", "1e-2", "--warmup", "1",
                        "--eval_every", "0", "--save_every", "0"])


@pytest.fixture
def lora_run(prepared_data, byte_model, tmp_path):
    """A LoRA run: its --out_dir and --model."""
    base = byte_model(seed=4)
    run_lora_sft(prepared_data, base, tmp_path / "run")
    return tmp_path / "run", base


def test_a_lora_run_writes_an_adapter_that_peft_loads(lora_run):
    """PeftModel.from_pretrained on the base: no missing or unexpected keys, and the merged
    model's logits; the config holds what vLLM's LoRA loader reads (r, lora_alpha,
    target_modules) and nothing it refuses (modules_to_save, DoRA)."""
    out, base = lora_run
    adapter = out / ADAPTER_DIR
    config = json.loads((adapter / "adapter_config.json").read_text())
    assert (config["r"], config["lora_alpha"]) == (RANK, ALPHA)
    assert sorted(config["target_modules"]) == sorted(LORA_TARGETS)
    assert config["modules_to_save"] is None and config["use_dora"] is False
    assert config["base_model_name_or_path"] == str(base.resolve())
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        loaded = peft.PeftModel.from_pretrained(hf_model(base), adapter)
    assert not [w for w in caught if "keys" in str(w.message)]  # PEFT's missing-keys warning
    result = loaded.load_adapter(adapter, adapter_name="again")  # the load result itself
    assert result.unexpected_keys == []
    assert [k for k in result.missing_keys if "lora" in k] == []
    loaded.set_adapter("default")
    lora_a = loaded.base_model.model.model.layers[0].self_attn.q_proj.lora_A["default"].weight
    assert lora_a.abs().max() > 0  # the run's adapter, not a fresh one
    idx = torch.randint(0, 258, (2, 19), generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        torch.testing.assert_close(loaded(input_ids=idx).logits, hf_model(out)(idx).logits,
                                   rtol=1e-4, atol=1e-5)
        assert not torch.allclose(hf_model(base)(idx).logits, hf_model(out)(idx).logits)


def test_eval_and_sample_load_an_adapter_folder(lora_run, prepared_data, tmp_path):
    """load_model (every script's) merges an adapter into its base to the bit of the run's
    merged model; --base_model names the base where the config's is gone, and is refused with a
    full model; sample.py samples, and eval.py scores, what they do with the merged model."""
    out, base = lora_run
    adapter = out / ADAPTER_DIR
    merged, _ = load_model(str(out), "--model")
    from_adapter, tokenizer = load_model(str(adapter), "--model")
    ours = merged.hf_state_dict()
    assert all(torch.equal(t, ours[k]) for k, t in from_adapter.hf_state_dict().items())
    moved = tmp_path / "moved_base"
    base.rename(moved)  # the base the config names is gone: one line, then --base_model
    with pytest.raises(SystemExit, match=r"--model .*adapter: its base model: .*no such model"):
        ev.main(["--model", str(adapter), "--tasks", "gsm8k", "--out", str(tmp_path / "r.json")])
    again, _ = load_model(str(adapter), "--model", base=str(moved))
    assert all(torch.equal(t, ours[k]) for k, t in again.hf_state_dict().items())
    with pytest.raises(SystemExit, match=r"--base_model .*is no LoRA adapter folder"):
        sample.main(["--model", str(out), "--base_model", str(moved), "--device", "cpu"])
    flags = ["--max_new_tokens", "6", "--num_samples", "1", "--device", "cpu"]
    assert (sample.main(["--model", str(adapter), "--base_model", str(moved), *flags])
            == sample.main(["--model", str(out), *flags]))
    flags = ["--tasks", "truthfulqa_mc2", "--limit", "3", "--data_dir", str(prepared_data),
             "--device", "cpu"]
    ev.main(["--model", str(adapter), "--base_model", str(moved), "--out",
             str(tmp_path / "adapter.json"), *flags])
    ev.main(["--model", str(out), "--out", str(tmp_path / "merged.json"), *flags])
    scored = [json.loads((tmp_path / f"{run}.json").read_text())["tasks"]["truthfulqa_mc2"]
              for run in ("adapter", "merged")]
    assert scored[0]["samples"] == scored[1]["samples"]


def test_an_adapter_trained_from_an_adapter_loads_through_both(lora_run, prepared_data,
                                                               tmp_path):
    """A LoRA run whose --model is an adapter folder: its adapter's base is that folder, and
    load_model merges both, to the bit of the second run's merged model."""
    first, _ = lora_run
    run_lora_sft(prepared_data, first / ADAPTER_DIR, tmp_path / "second")
    merged, _ = load_model(str(tmp_path / "second"), "--model")
    nested, _ = load_model(str(tmp_path / "second" / ADAPTER_DIR), "--model")
    ours = merged.hf_state_dict()
    assert all(torch.equal(t, ours[k]) for k, t in nested.hf_state_dict().items())


def test_a_bad_adapter_is_refused_naming_the_file(make_checkpoint, tmp_path):
    base = make_checkpoint(seed=5)
    model = tiny_model(seed=5)
    add_lora(model, RANK, ALPHA)
    from harness.adapter import write_adapter
    write_adapter(model, tmp_path, base=str(base))
    folder = tmp_path / ADAPTER_DIR
    config = json.loads((folder / "adapter_config.json").read_text())
    (folder / "adapter_config.json").write_text(json.dumps({**config, "use_dora": True}))
    with pytest.raises(ValueError, match="adapter_config.json: use_dora True is not supported"):
        merge_adapter(Qwen3.from_pretrained(base), folder)
    (folder / "adapter_config.json").write_text(json.dumps({**config, "r": 8}))
    with pytest.raises(ValueError, match=r"adapter_model.safetensors: .*lora_A.weight: "
                                         r"expected lora_A and lora_B of shapes \(8, "):
        merge_adapter(Qwen3.from_pretrained(base), folder)
