"""
LoRA adapters in PEFT's format, out and in. A LoRA run writes its adapter beside its merged model
(OUT_DIR/adapter: adapter_config.json, and adapter_model.safetensors under PEFT's tensor names),
which PEFT's PeftModel.from_pretrained and vLLM's LoRA support load onto the base model; and every
script that loads a model for a flag (cli.load_model) loads such a folder too: its base model with
the adapter merged into the weights.

    write_adapter(model, out_dir, base)   the run's adapter, in OUT_DIR/adapter (a full
                                          fine-tune removes an earlier run's)
    is_adapter(folder)                    a folder with adapter_config.json
    adapter_base(folder)                  the base model its config names
    merge_adapter(model, folder)          the adapter's updates added to the base's weights

A tensor of model.py's LoRALinear at layers.0.self_attn.q_proj (lora_a (rank, in), lora_b (out,
rank)) is PEFT's base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight (and lora_B),
the same matrices; the update is (lora_alpha / r) B A in both.
"""
import json
import math
import os
import shutil
import tempfile
from pathlib import Path

import torch
from safetensors.torch import save_file

from model import LORA_TARGETS, LoRALinear, load_safetensors, make_readable, read_json

ADAPTER_DIR = "adapter"  # in a LoRA run's --out_dir, beside the merged model
CONFIG = "adapter_config.json"
WEIGHTS = "adapter_model.safetensors"
PREFIX = "base_model.model.model."  # PEFT's path to the decoder of a Qwen3ForCausalLM
# A plain LoRA's settings, as write_adapter writes them: merge_adapter refuses any other value
# (DoRA, trained biases, modules_to_save, per-module ranks or alphas)
PLAIN_LORA = {"use_dora": False, "modules_to_save": None, "bias": "none", "fan_in_fan_out": False,
               "rank_pattern": {}, "alpha_pattern": {}}


def write_adapter(model, out_dir, base: str):
    """With LoRA: its adapters as a PEFT adapter of `base` (the run's --model: a hub id as it is,
    a folder as an absolute path), in out_dir/adapter, atomically (each file renamed into place).
    Without: an adapter that an earlier run left in out_dir is removed (--overwrite replaced
    that run). Returns the adapter's folder, or None."""
    folder = Path(out_dir) / ADAPTER_DIR
    lora = {name: m for name, m in model.named_modules() if isinstance(m, LoRALinear)}
    if not lora:
        shutil.rmtree(folder, ignore_errors=True)
        return None
    # one rank and scale for every module (add_lora's); alpha = scale x rank, an int if it is one
    first = next(iter(lora.values()))
    rank = first.lora_a.shape[0]
    alpha = first.scale * rank
    alpha = round(alpha) if math.isclose(alpha, round(alpha)) else alpha
    targets = [t for t in LORA_TARGETS if any(name.endswith("." + t) for name in lora)]
    base = str(Path(base).resolve()) if Path(base).is_dir() else str(base)
    # vLLM's LoRA loader reads r, lora_alpha, target_modules; it refuses modules_to_save, DoRA
    config = dict(peft_type="LORA", task_type="CAUSAL_LM", base_model_name_or_path=base, r=rank,
                  lora_alpha=alpha, target_modules=targets, lora_dropout=0.0, inference_mode=True,
                  init_lora_weights=True, use_rslora=False, **PLAIN_LORA)
    tensors = {}
    for name, module in lora.items():  # fp32 (B, A as trained), PEFT's names
        tensors[f"{PREFIX}{name}.lora_A.weight"] = module.lora_a.detach().cpu().contiguous()
        tensors[f"{PREFIX}{name}.lora_B.weight"] = module.lora_b.detach().cpu().contiguous()
    folder.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=folder, prefix=".tmp-") as tmp:
        save_file(tensors, Path(tmp, WEIGHTS), metadata={"format": "pt"})
        Path(tmp, CONFIG).write_text(json.dumps(config, indent=2) + "\n")
        for name in (WEIGHTS, CONFIG):
            make_readable(Path(tmp, name))
            os.replace(Path(tmp, name), folder / name)
    return folder


def is_adapter(folder) -> bool:
    return (Path(folder) / CONFIG).is_file()


def adapter_base(folder) -> str:
    """The base model an adapter's config names (base_model_name_or_path)."""
    base = read_json(Path(folder) / CONFIG).get("base_model_name_or_path")
    if not base:
        raise ValueError(f"{Path(folder) / CONFIG}: names no base_model_name_or_path")
    return base


def merge_adapter(model, folder):
    """Add a PEFT LoRA adapter's updates (lora_alpha / r) B A (rsLoRA's: / √r) to the weights of
    `model`, its base, as LoRALinear.weight merges them (so that this equals the merged model a
    run saved, to the bit). What this cannot apply (DoRA, biases, modules_to_save, per-module
    ranks) or a tensor of another shape or module is refused, naming the file."""
    config_file = Path(folder) / CONFIG
    config = read_json(config_file)
    numbers = [config.get("r"), config.get("lora_alpha")]
    if config.get("peft_type") != "LORA" or not all(isinstance(n, (int, float)) for n in numbers):
        raise ValueError(f"{config_file}: not a LoRA adapter's config (peft_type LORA, r, "
                         "lora_alpha)")
    for key, plain in PLAIN_LORA.items():
        if config.get(key) and config[key] != plain:
            raise ValueError(f"{config_file}: {key} {config[key]!r} is not supported here")
    rank = config["r"]
    scale = config["lora_alpha"] / (math.sqrt(rank) if config.get("use_rslora") else rank)
    weights_file = Path(folder) / WEIGHTS
    tensors = load_safetensors(weights_file)  # PEFT's name -> tensor
    modules = dict(model.named_modules())  # model.py's name -> module
    merged = 0
    with torch.no_grad():
        for key in sorted(k for k in tensors if k.endswith(".lora_A.weight")):
            name = key.removeprefix(PREFIX).removesuffix(".lora_A.weight")
            a = tensors.pop(key)  # (r, in)
            b = tensors.pop(f"{PREFIX}{name}.lora_B.weight", None)  # (out, r)
            base = modules.get(name) if key.startswith(PREFIX) else None
            if base is None or name.rsplit(".", 1)[-1] not in LORA_TARGETS:
                raise ValueError(f"{weights_file}: {key}: no LoRA target of this model")
            shapes = [(rank, base.in_features), (base.out_features, rank)]
            if b is None or [tuple(a.shape), tuple(b.shape)] != shapes:
                raise ValueError(f"{weights_file}: {key}: expected lora_A and lora_B of shapes "
                                 f"{shapes[0]} and {shapes[1]}")
            update = scale * b.float().to(base.weight.device) @ a.float().to(base.weight.device)
            base.weight.copy_(base.weight + update.to(base.weight.dtype))
            merged += 1
    if tensors or not merged:  # a lora_B without its lora_A, another tensor, or none at all
        raise ValueError(f"{weights_file}: unexpected tensor {sorted(tensors)[0]}" if tensors
                         else f"{weights_file}: holds no LoRA tensors")
