"""LoRA from scratch: freeze the pretrained weights, train a low-rank update B A beside each chosen linear layer.

PAPER: LoRA: Low-Rank Adaptation of Large Language Models, Hu, Shen, Wallis, Allen-Zhu, Li, Wang, Wang, Chen, 2021.
    h = W0 x + (alpha / r) * B A x,   W0 (out x in) frozen,  A (r x in),  B (out x r),  r << min(in, out).
    A starts random (Kaiming-uniform), B starts at zero, so training starts from exactly the pretrained model;
    alpha / r keeps the size of the update roughly independent of r (no re-tuning of the learning rate when r
    changes). After training, W0 + (alpha/r) B A can be merged into one matrix: no extra inference cost.
PAPER CONTEXT: Intrinsic Dimensionality Explains the Effectiveness of Language Model Fine-Tuning, Aghajanyan,
    Zettlemoyer, Gupta, 2020: fine-tuning a pretrained model works in a random subspace of a few hundred to a
    few thousand dimensions; LoRA bets that the weight *update* is low-rank too, and learns the subspace.
    QLoRA (Dettmers et al., 2023) puts the frozen W0 in 4 bits (nf4.Linear4bit); LoRALinear wraps either.
INTUITION: full fine-tuning stores a gradient and two Adam moments for every weight (3x the model again);
    LoRA stores them for r * (in + out) numbers per layer, typically < 1% of the model.
IMPLEMENTATION: the same maths, initialisation and names as peft's `lora.Linear` (dropout on the adapter's input,
    `lora_A` / `lora_B`, scale alpha / r, or alpha / sqrt(r) with rsLoRA), so an adapter trained here loads
    in peft and back (peft_io.py, tests against peft's LoraModel to 1e-5).

API (what the DPO project and train_lora.py use):
    LoRALinear(base, r, alpha, dropout)    the layer; merge() / unmerge()
    inject_lora(model, targets, r, alpha, dropout) -> wrapped module names; everything else frozen
    lora_parameters(model), count_trainable(model) -> (trainable, total)
    adapters_disabled(model)               context manager: exactly the base model's outputs inside
    merge_lora / unmerge_lora / merge_and_unload
    save_adapter(model, out_dir) / load_adapter(model, path)   peft's layout (peft_io.py)

TARGETS name modules as transformers does (q_proj, k_proj, v_proj, o_proj, gate_proj, up_proj, down_proj) or as
our Llama does (wq, wk, wv, wo, w1, w3, w2); "all-linear" is every linear layer but the output layer (peft's
rule). An item with regex characters is a regular expression that must match a whole module name; a plain
item matches a name or its last dotted parts (peft's rule for a list).
"""

from __future__ import annotations

import contextlib
import math
import re
from collections.abc import Iterator, Sequence
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from course.errors import CourseError
from phase1_foundation.project3_pretrain.hf_interop import hf_name_map
from phase1_foundation.project3_pretrain.model import Llama
from phase2_finetuning.project5_lora.nf4 import Linear4bit
from phase2_finetuning.project5_lora.peft_io import (
    AdapterSpec,
    peft_key,
    read_adapter,
    split_key,
    write_adapter,
)

ALL_LINEAR = "all-linear"
_REGEX_CHARS = set("*+?[](){}|^$\\")


class LoRALinear(nn.Module):
    """base(x) + scale * B(A(dropout(x))), with the base frozen; base is an nn.Linear or a Linear4bit."""

    def __init__(self, base: nn.Module, r: int = 8, alpha: float = 16, dropout: float = 0.0,
                 use_rslora: bool = False, name: str = "layer"):
        super().__init__()
        if not isinstance(base, (nn.Linear, Linear4bit)):
            raise CourseError(f"{name}: LoRA wraps nn.Linear or Linear4bit layers, not {type(base).__name__}")
        in_f, out_f = base.in_features, base.out_features
        if not isinstance(r, int) or isinstance(r, bool) or r <= 0:
            raise CourseError(f"LoRA rank r ({r!r}) must be an integer > 0")
        if r > min(in_f, out_f):
            raise CourseError(f"LoRA rank r ({r}) must be <= min(in, out) = {min(in_f, out_f)} of layer {name} "
                              f"({in_f} -> {out_f}); a larger rank is no longer low-rank (use a smaller --r)")
        if not isinstance(dropout, (int, float)) or not 0 <= dropout < 1:
            raise CourseError(f"LoRA dropout ({dropout!r}) must be in [0, 1)")
        if not isinstance(alpha, (int, float)) or not math.isfinite(alpha):
            raise CourseError(f"LoRA alpha ({alpha!r}) must be a finite number")
        self.base, self.name = base, name
        for p in base.parameters():
            p.requires_grad_(False)
        self.in_features, self.out_features = in_f, out_f
        self.r, self.alpha, self.use_rslora = r, float(alpha), use_rslora
        self.scale = self.alpha / (math.sqrt(r) if use_rslora else r)
        ref = base.weight if isinstance(base, nn.Linear) else base.packed
        dtype = ref.dtype if ref.is_floating_point() else torch.float32
        self.lora_A = nn.Parameter(torch.empty(r, in_f, device=ref.device, dtype=dtype))
        self.lora_B = nn.Parameter(torch.zeros(out_f, r, device=ref.device, dtype=dtype))
        self.dropout = nn.Dropout(dropout) if dropout > 0 else nn.Identity()
        self.p_dropout = float(dropout)
        self.merged = False    # delta added into base.weight
        self.disabled = False  # adapters_disabled(): the base alone
        self.reset_parameters()

    def reset_parameters(self) -> None:
        """A ~ Kaiming-uniform (a = sqrt(5), nn.Linear's and peft's init), B = 0: the product starts at zero."""
        nn.init.kaiming_uniform_(self.lora_A, a=math.sqrt(5))
        nn.init.zeros_(self.lora_B)

    @property
    def weight(self) -> torch.Tensor:
        """The base's weight (code that reads `layer.weight`, e.g. a shape, keeps working)."""
        return self.base.weight

    def delta_weight(self) -> torch.Tensor:
        """scale * B A: the (out x in) update LoRA adds to the frozen weight."""
        return (self.lora_B @ self.lora_A) * self.scale

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.base(x)
        if self.merged or self.disabled:
            return y
        h = self.dropout(x)
        if not torch.is_autocast_enabled(x.device.type):  # as peft: the adapter computes in its own dtype
            h = h.to(self.lora_A.dtype)
        return y + (F.linear(F.linear(h, self.lora_A), self.lora_B) * self.scale).to(y.dtype)

    def merge(self) -> None:
        """W <- W + scale * B A, so the layer costs what the base costs. Twice is an error, not a double update."""
        if self.merged:
            raise CourseError(f"{self.name}: the adapter is already merged; merging twice would add it twice "
                              "(unmerge first)")
        if not isinstance(self.base, nn.Linear):
            raise CourseError(f"{self.name}: cannot merge into a 4-bit base (re-quantising would round the update "
                              "away); dequantize_model(model) first, then merge")
        with torch.no_grad():
            self.base.weight += self.delta_weight().to(self.base.weight.dtype)
        self.merged = True

    def unmerge(self) -> None:
        """W <- W - scale * B A (exact up to float rounding: about 1e-7 relative in float32)."""
        if not self.merged:
            raise CourseError(f"{self.name}: the adapter is not merged; nothing to unmerge")
        with torch.no_grad():
            self.base.weight -= self.delta_weight().to(self.base.weight.dtype)
        self.merged = False

    def extra_repr(self) -> str:
        return (f"r={self.r}, alpha={self.alpha:g}, scale={self.scale:g}, dropout={self.p_dropout:g}"
                + (", merged" if self.merged else ""))


# ---- names: ours and transformers' --------------------------------------------------------------------------
def hf_module_names(model: nn.Module) -> dict[str, str]:
    """Our module names -> transformers' (e.g. layers.0.attn.wq -> model.layers.0.self_attn.q_proj), for every
    Llama in `model` (the model itself or a submodule). Other modules keep their own names."""
    names: dict[str, str] = {}
    for prefix, m in model.named_modules():
        if isinstance(m, Llama):
            pre = f"{prefix}." if prefix else ""
            for ours, theirs in hf_name_map(m.config).items():
                if ours.endswith(".weight"):
                    names[pre + ours.removesuffix(".weight")] = pre + theirs.removesuffix(".weight")
            names.setdefault(pre + "lm_head", pre + "lm_head")
    return names


def _linear_modules(model: nn.Module) -> dict[str, nn.Module]:
    return {n: m for n, m in model.named_modules() if isinstance(m, (nn.Linear, Linear4bit, LoRALinear))
            and not _inside_lora(n, model)}


def _inside_lora(name: str, model: nn.Module) -> bool:
    parts = name.split(".")
    return any(isinstance(model.get_submodule(".".join(parts[:k])), LoRALinear) for k in range(1, len(parts)))


def _output_layers(model: nn.Module) -> set[str]:
    """The output (classifier) layers "all-linear" leaves out: lm_head, or what get_output_embeddings names."""
    out = {n for n, _ in model.named_modules() if n.rpartition(".")[2] == "lm_head"}
    get = getattr(model, "get_output_embeddings", None)
    if callable(get) and get() is not None:
        out |= {n for n, m in model.named_modules() if m is get()}
    return out


def _matcher(item) -> callable:
    if isinstance(item, re.Pattern):
        return lambda name: item.fullmatch(name) is not None
    if not isinstance(item, str) or not item.strip():
        raise CourseError(f"LoRA target {item!r} must be a module name or a regular expression")
    item = item.strip()
    if _REGEX_CHARS & set(item):
        try:
            rx = re.compile(item)
        except re.error as e:
            raise CourseError(f"LoRA target {item!r} is not a valid regular expression ({e})") from None
        return lambda name: rx.fullmatch(name) is not None
    return lambda name: name == item or name.endswith("." + item)


def resolve_targets(model: nn.Module, targets) -> list[str]:
    """The names of the linear layers `targets` selects (see the module docstring); each target must match one."""
    linears = _linear_modules(model)
    alias = hf_module_names(model)
    if isinstance(targets, str) and targets.strip() == ALL_LINEAR:
        skip = _output_layers(model)
        return [n for n in linears if n not in skip]
    items = [t for t in targets.split(",") if t.strip()] if isinstance(targets, str) else \
        [targets] if isinstance(targets, re.Pattern) else list(targets)
    if not items:
        raise CourseError("no LoRA targets given; name modules (q_proj,v_proj), a regex, or all-linear")
    chosen: list[str] = []
    for item in items:
        if isinstance(item, str) and item.strip() == ALL_LINEAR:
            raise CourseError(f"'{ALL_LINEAR}' cannot be combined with other targets")
        match = _matcher(item)
        hits = [n for n in linears if match(n) or match(alias.get(n, n))]
        if not hits:
            shown = sorted({alias.get(n, n).rpartition(".")[2] for n in linears} | {n.rpartition(".")[2]
                                                                                  for n in linears})
            raise CourseError(f"LoRA target {getattr(item, 'pattern', item)!r} matches no linear layer of the model;"
                              f" layer names end in: {', '.join(shown)} (or use all-linear)")
        chosen += [n for n in hits if n not in chosen]
    return [n for n in linears if n in chosen]  # model order


def _set_module(model: nn.Module, name: str, new: nn.Module) -> None:
    parent, _, child = name.rpartition(".")
    setattr(model.get_submodule(parent) if parent else model, child, new)


def inject_lora(model: nn.Module, targets: str | Sequence[str] | re.Pattern = ("q_proj", "v_proj"), r: int = 8,
                alpha: float = 16, dropout: float = 0.0, use_rslora: bool = False) -> list[str]:
    """Wrap the target layers in LoRALinear (in place), freeze every other parameter; return the wrapped names.

    A target that matches nothing, a rank <= 0 or larger than a layer, or a model that already has adapters
    is one CourseError line (nothing is changed then: every layer is checked before the first is wrapped).
    """
    if lora_layers(model):
        raise CourseError("the model already has LoRA layers; load_adapter into it or start from a fresh base")
    names = resolve_targets(model, targets)
    modules = dict(model.named_modules())
    for n in names:  # validate every layer first: a bad rank must not leave the model half-wrapped
        base = modules[n]
        if isinstance(r, int) and not isinstance(r, bool) and r > min(base.in_features, base.out_features):
            LoRALinear(base, r, alpha, dropout, use_rslora, n)  # raises the one-line error
    for p in model.parameters():
        p.requires_grad_(False)
    for n in names:
        _set_module(model, n, LoRALinear(modules[n], r, alpha, dropout, use_rslora, n))
    return names


def lora_layers(model: nn.Module) -> dict[str, LoRALinear]:
    return {n: m for n, m in model.named_modules() if isinstance(m, LoRALinear)}


def lora_parameters(model: nn.Module) -> list[nn.Parameter]:
    """Every adapter matrix (A and B of every LoRALinear), in model order: what the optimizer gets."""
    return [p for m in lora_layers(model).values() for p in (m.lora_A, m.lora_B)]


def count_trainable(model: nn.Module) -> tuple[int, int]:
    """(trainable, total) parameters; a tied matrix counts once, a 4-bit base counts its in x out weights."""
    params = {id(p): p for p in model.parameters()}.values()
    trainable = sum(p.numel() for p in params if p.requires_grad)
    total = sum(p.numel() for p in params) + sum(m.num_weights for m in model.modules() if isinstance(m, Linear4bit))
    return trainable, total


@contextlib.contextmanager
def adapters_disabled(model: nn.Module) -> Iterator[nn.Module]:
    """Inside, every LoRALinear returns its base's output: exactly the base model (the DPO reference model for free).

    A merged adapter is inside the weights; it cannot be switched off exactly, so that is an error.
    """
    layers = list(lora_layers(model).values())
    merged = [m.name for m in layers if m.merged]
    if merged:
        raise CourseError(f"adapters are merged into {merged[0]}{' and others' if len(merged) > 1 else ''}; "
                          "unmerge_lora(model) before disabling them")
    before = [m.disabled for m in layers]
    for m in layers:
        m.disabled = True
    try:
        yield model
    finally:
        for m, was in zip(layers, before):
            m.disabled = was


def _tied(model: nn.Module) -> set[int]:
    seen: dict[int, int] = {}
    for _, p in model.named_parameters(remove_duplicate=False):
        seen[id(p)] = seen.get(id(p), 0) + 1
    return {k for k, v in seen.items() if v > 1}


def merge_lora(model: nn.Module) -> list[str]:
    """Merge every adapter into its base weight; return the names. Merging twice is one clear error."""
    layers = lora_layers(model)
    if not layers:
        raise CourseError("the model has no LoRA layers to merge")
    tied = _tied(model)
    for n, m in layers.items():
        if m.merged:
            raise CourseError(f"{n}: the adapters are already merged; merging twice would add them twice")
        if isinstance(m.base, nn.Linear) and id(m.base.weight) in tied:
            raise CourseError(f"{n}: its weight is tied to another layer (the embedding); merging would change "
                              "both: leave lm_head out of the targets of a tied model")
    for m in layers.values():
        m.merge()
    return list(layers)


def unmerge_lora(model: nn.Module) -> list[str]:
    layers = lora_layers(model)
    for m in layers.values():
        m.unmerge()
    return list(layers)


def merge_and_unload(model: nn.Module) -> nn.Module:
    """Merge, then put the plain base layers back (peft's merge_and_unload): a model with no trace of LoRA."""
    if not any(m.merged for m in lora_layers(model).values()):
        merge_lora(model)
    for n, m in lora_layers(model).items():
        _set_module(model, n, m.base)
    return model


# ---- adapters on disk (peft's layout) ---------------------------------------------------------------------------
def _uniform(layers: dict[str, LoRALinear]) -> LoRALinear:
    first = next(iter(layers.values()))
    for n, m in layers.items():
        if (m.r, m.alpha, m.p_dropout, m.use_rslora) != (first.r, first.alpha, first.p_dropout, first.use_rslora):
            raise CourseError(f"{n} has r={m.r}, alpha={m.alpha:g} but {first.name} has r={first.r}, "
                              f"alpha={first.alpha:g}; one adapter file holds one rank and alpha")
    return first


def _target_modules(model: nn.Module, wrapped: list[str], alias: dict[str, str]) -> list[str]:
    """Short names (q_proj) when every layer of that name is wrapped, else the full names: peft must wrap the same."""
    hf = [alias.get(n, n) for n in wrapped]
    every = [alias.get(n, n) for n in _linear_modules(model)]
    shorts = sorted({h.rpartition(".")[2] for h in hf})
    same = sorted(h for h in every if h.rpartition(".")[2] in shorts) == sorted(hf)
    return shorts if same else sorted(hf)


def save_adapter(model: nn.Module, out_dir: str | Path, base_model_name_or_path: str | None = None,
                 extra_config: dict | None = None) -> Path:
    """adapter_config.json + adapter_model.safetensors in peft's layout: PeftModel.from_pretrained loads them."""
    layers = lora_layers(model)
    if not layers:
        raise CourseError("the model has no LoRA layers; inject_lora first")
    if any(m.merged for m in layers.values()):
        raise CourseError("the adapters are merged into the weights; unmerge_lora(model) before saving them")
    first = _uniform(layers)
    alias = hf_module_names(model)
    tensors = {}
    for n, m in layers.items():
        tensors[peft_key(alias.get(n, n), "A")] = m.lora_A
        tensors[peft_key(alias.get(n, n), "B")] = m.lora_B
    spec = AdapterSpec(first.r, first.alpha, first.p_dropout, _target_modules(model, list(layers), alias),
                       first.use_rslora, base_model_name_or_path)
    return write_adapter(out_dir, spec, tensors, extra_config)


def load_adapter(model: nn.Module, path: str | Path) -> list[str]:
    """Load a peft-layout LoRA adapter (ours or peft's) into `model`; return the names of the layers it sets.

    A model without adapters gets them injected as the config says; one with adapters must have the same
    layers. Every tensor must fit its layer: an adapter trained for another base is one line naming the tensor.
    """
    spec, tensors = read_adapter(path)
    alias = hf_module_names(model)
    for n, m in lora_layers(model).items():
        if (m.r, m.alpha, m.use_rslora) != (spec.r, spec.alpha, spec.use_rslora):
            raise CourseError(f"{path}: the adapter has r={spec.r}, lora_alpha={spec.alpha:g} but the model's "
                              f"layer {n} has r={m.r}, alpha={m.alpha:g}; load it into a fresh base")
    if not lora_layers(model):
        targets = re.compile(spec.target_modules) if isinstance(spec.target_modules, str) else spec.target_modules
        try:
            inject_lora(model, targets, spec.r, spec.alpha, spec.dropout, spec.use_rslora)
        except CourseError as e:
            raise CourseError(f"{path}: {e} (is the adapter for another base model?)") from None
    layers = lora_layers(model)
    by_hf = {alias.get(n, n): n for n in layers}
    seen: set[str] = set()
    for key, t in tensors.items():
        hf, which = split_key(key)
        if hf not in by_hf:
            raise CourseError(f"{path}: adapter tensor '{key}' has no LoRA layer '{hf}' in this model; the adapter "
                              "is for another base (or other target modules)")
        layer = layers[by_hf[hf]]
        if layer.merged:
            raise CourseError(f"{by_hf[hf]}: the adapters are merged; unmerge_lora(model) before loading others")
        param = layer.lora_A if which == "A" else layer.lora_B
        if tuple(t.shape) != tuple(param.shape):
            raise CourseError(f"{path}: adapter tensor '{key}' has shape {tuple(t.shape)} but layer {by_hf[hf]} "
                              f"({layer.in_features} -> {layer.out_features}, r={layer.r}) takes "
                              f"{tuple(param.shape)}; the adapter is for another base model")
        if not t.is_floating_point():
            raise CourseError(f"{path}: adapter tensor '{key}' is {t.dtype}, not a float tensor")
        with torch.no_grad():
            param.copy_(t)
        seen.add(key)
    missing = [peft_key(h, w) for h in by_hf for w in "AB" if peft_key(h, w) not in seen]
    if missing:
        raise CourseError(f"{path}: no tensor for {missing[0]}{f' and {len(missing) - 1} more' if len(missing) > 1 else ''}"
                          "; the adapter file is incomplete or for other target modules")
    return list(layers)


__all__ = [
    "ALL_LINEAR",
    "LoRALinear",
    "adapters_disabled",
    "count_trainable",
    "hf_module_names",
    "inject_lora",
    "load_adapter",
    "lora_layers",
    "lora_parameters",
    "merge_and_unload",
    "merge_lora",
    "resolve_targets",
    "save_adapter",
    "unmerge_lora",
]
