"""peft's adapter layout, both ways: adapter_config.json + adapter_model.safetensors with peft's tensor names.

FORMAT (what `PeftModel.save_pretrained` writes for a LoRA adapter on a LlamaForCausalLM):
    adapter_config.json        {"peft_type": "LORA", "task_type": "CAUSAL_LM", "r": 8, "lora_alpha": 16,
                                "lora_dropout": 0.0, "target_modules": ["q_proj", "v_proj"], "bias": "none", ...}
    adapter_model.safetensors  base_model.model.<HF module name>.lora_A.weight   (r, in_features)
                               base_model.model.<HF module name>.lora_B.weight   (out_features, r)
    e.g. base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight: "base_model" is the LoraModel inside the
    PeftModel, "model" the LlamaForCausalLM inside it, then the transformers module path; the adapter's name
    ("default") is dropped on save and put back on load.
peft's `target_modules` means: a list -> a module whose name equals an entry or ends in "." + entry; a string ->
a regular expression that must match the whole module name.

This module knows only the layout (names, config, files). lora.py's save_adapter / load_adapter use it; it
never imports lora.py, so there is no circle.

Supported options: r, lora_alpha, lora_dropout, target_modules, use_rslora (scale alpha/sqrt(r)), plus the
bookkeeping fields (base_model_name_or_path, revision, inference_mode, peft_version, task_type CAUSAL_LM, ...).
Anything that changes what the adapter computes and is not implemented here (DoRA, trained biases,
modules_to_save, per-layer rank/alpha patterns, layers_to_transform, fan_in_fan_out, ...) is refused in one line
that names the options, instead of loading an adapter that would compute something else.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save

from course.checkpoint import atomic_write, atomic_write_json
from course.errors import CourseError

CONFIG_NAME = "adapter_config.json"
WEIGHTS_NAME = "adapter_model.safetensors"
PREFIX = "base_model.model."

# Fields that only describe the adapter (or only matter when peft initialises a new one): any value is fine.
BOOKKEEPING = {"base_model_name_or_path", "revision", "inference_mode", "peft_version", "auto_mapping",
               "task_type", "peft_type", "init_lora_weights", "megatron_core", "qalora_group_size",
               "r", "lora_alpha", "lora_dropout", "target_modules", "use_rslora"}
# What each unsupported option must be for the adapter to compute plain LoRA (anything falsy passes too).
PLAIN_VALUES = {"bias": "none", "fan_in_fan_out": False, "use_dora": False}


@dataclass
class AdapterSpec:
    """The parts of a peft LoRA config that decide what the adapter computes."""

    r: int
    alpha: float
    dropout: float
    target_modules: list[str] | str   # peft's semantics (see the module docstring)
    use_rslora: bool = False
    base_model_name_or_path: str | None = None

    @property
    def scale(self) -> float:
        return self.alpha / (self.r ** 0.5 if self.use_rslora else self.r)


def peft_key(hf_module: str, which: str) -> str:
    """The tensor name peft saves for one LoRA matrix (which = "A" or "B") of a module named as transformers names it."""
    return f"{PREFIX}{hf_module}.lora_{which}.weight"


def split_key(key: str) -> tuple[str, str]:
    """peft tensor name -> (HF module name, "A" | "B"); anything else is one clear error."""
    for which in ("A", "B"):
        suffix = f".lora_{which}.weight"
        if key.startswith(PREFIX) and key.endswith(suffix):
            return key[len(PREFIX):-len(suffix)], which
    raise CourseError(f"adapter tensor '{key}' is not a LoRA matrix in peft's layout "
                      f"({PREFIX}<module>.lora_A.weight / .lora_B.weight); only plain LoRA adapters load here")


def adapter_config(spec: AdapterSpec) -> dict:
    """adapter_config.json for `spec`, with every field peft reads set to plain LoRA."""
    return {
        "peft_type": "LORA", "task_type": "CAUSAL_LM", "base_model_name_or_path": spec.base_model_name_or_path,
        "revision": None, "inference_mode": True, "r": spec.r,
        "lora_alpha": int(spec.alpha) if float(spec.alpha).is_integer() else spec.alpha,
        "lora_dropout": spec.dropout, "target_modules": spec.target_modules, "exclude_modules": None,
        "bias": "none", "fan_in_fan_out": False, "use_rslora": spec.use_rslora, "use_dora": False,
        "modules_to_save": None, "init_lora_weights": True, "layers_to_transform": None, "layers_pattern": None,
        "rank_pattern": {}, "alpha_pattern": {}, "lora_bias": False,
    }


def spec_from_config(cfg: dict, source: str = CONFIG_NAME) -> AdapterSpec:
    """Check a peft adapter config and keep what matters; an option we do not implement is one line naming it."""
    if not isinstance(cfg, dict):
        raise CourseError(f"{source}: expected a JSON object, got {type(cfg).__name__}")
    if cfg.get("peft_type", "LORA") != "LORA":
        raise CourseError(f"{source}: peft_type '{cfg.get('peft_type')}' is not supported (only LORA)")
    if cfg.get("task_type") not in (None, "CAUSAL_LM"):
        raise CourseError(f"{source}: task_type '{cfg.get('task_type')}' is not supported (only CAUSAL_LM)")
    bad = []
    for key, value in cfg.items():
        if key in BOOKKEEPING:
            continue
        plain = PLAIN_VALUES.get(key)
        if value in (None, False, {}, [], "", 0) or (plain is not None and value == plain):
            continue
        bad.append(f"{key}={json.dumps(value)}")
    if bad:
        raise CourseError(f"{source}: unsupported peft option(s) {', '.join(bad)}; this LoRA implements plain "
                          "LoRA (r, lora_alpha, lora_dropout, target_modules, use_rslora) only")
    missing = [k for k in ("r", "lora_alpha", "target_modules") if k not in cfg]
    if missing:
        raise CourseError(f"{source}: missing field(s) {', '.join(missing)}")
    r, alpha, targets = cfg["r"], cfg["lora_alpha"], cfg["target_modules"]
    if not isinstance(r, int) or isinstance(r, bool) or r <= 0:
        raise CourseError(f"{source}: r ({r!r}) must be an integer > 0")
    if not isinstance(alpha, (int, float)) or isinstance(alpha, bool):
        raise CourseError(f"{source}: lora_alpha ({alpha!r}) must be a number")
    dropout = cfg.get("lora_dropout", 0.0) or 0.0
    if not isinstance(dropout, (int, float)) or not 0 <= dropout < 1:
        raise CourseError(f"{source}: lora_dropout ({dropout!r}) must be in [0, 1)")
    if isinstance(targets, list) and targets and all(isinstance(t, str) for t in targets):
        targets = sorted(targets)
    elif not (isinstance(targets, str) and targets):
        raise CourseError(f"{source}: target_modules ({targets!r}) must be a list of module names or a regex string")
    return AdapterSpec(r, float(alpha), float(dropout), targets, bool(cfg.get("use_rslora", False)),
                       cfg.get("base_model_name_or_path"))


def write_adapter(out_dir: str | os.PathLike, spec: AdapterSpec, tensors: dict[str, torch.Tensor],
                  extra_config: dict | None = None) -> Path:
    """Write the two files atomically (weights first: a config without its weights never appears)."""
    out = Path(out_dir)
    if out.exists() and not out.is_dir():
        raise CourseError(f"{out} is a file; pass a folder to save the adapter in")
    out.mkdir(parents=True, exist_ok=True)
    data = save({k: v.detach().to("cpu").contiguous() for k, v in tensors.items()}, metadata={"format": "pt"})
    atomic_write(out / WEIGHTS_NAME, lambda f: f.write(data))
    atomic_write_json(out / CONFIG_NAME, {**adapter_config(spec), **(extra_config or {})})
    return out


def read_adapter(path: str | os.PathLike) -> tuple[AdapterSpec, dict[str, torch.Tensor]]:
    """(spec, tensors by peft name) from an adapter folder; a missing, corrupt or unsupported one is one line."""
    folder = Path(path)
    if folder.is_file() and folder.name in (CONFIG_NAME, WEIGHTS_NAME):
        folder = folder.parent
    cfg_path, weights = folder / CONFIG_NAME, folder / WEIGHTS_NAME
    if not cfg_path.is_file():
        raise CourseError(f"{cfg_path} not found; pass a folder written by save_adapter or peft's save_pretrained")
    try:
        cfg = json.loads(cfg_path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise CourseError(f"{cfg_path} is not valid JSON ({e})") from None
    spec = spec_from_config(cfg, str(cfg_path))
    if not weights.is_file():
        hint = " (adapter_model.bin, the old pickle format, is not read: re-save with safetensors)" \
            if (folder / "adapter_model.bin").is_file() else ""
        raise CourseError(f"{weights} not found{hint}")
    try:
        tensors = load_file(weights)
    except (SafetensorError, OSError, ValueError) as e:
        raise CourseError(f"could not read {weights} ({type(e).__name__}: {e}); the file is corrupt or "
                          "truncated") from None
    return spec, tensors
