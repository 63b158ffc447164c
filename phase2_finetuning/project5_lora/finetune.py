"""What train_lora.py and benchmark.py share: a base model made ready for LoRA or QLoRA, its optimizer, the memory
it takes, and the merged export.

    prepare_adapters    project 4's prepare_base (any base + its chat format), then for qlora the block linears
                        in NF4 (nf4.quantize_model), then LoRA on the target layers (lora.inject_lora)
    adapter_optimizer   project 3's configure_optimizer: AdamW over the parameters that require grad (the adapters)
    optimizer_state_bytes, peak_rss_bytes, current_rss_bytes, reset_peak_rss, release_memory: what the
                        benchmark measures
    export_merged       the adapters merged into a float copy of the base, written as a Hugging Face folder that
                        project 3's loader (and so project 8) and transformers load
"""

from __future__ import annotations

import ctypes
import gc
import resource
from dataclasses import dataclass, field
from pathlib import Path

import torch

from course.checkpoint import atomic_write
from course.errors import CourseError
from phase1_foundation.project3_pretrain.hf_interop import export_hf
from phase2_finetuning.project4_sft.sft import ChatModel, prepare_base
from phase2_finetuning.project5_lora.lora import (
    count_trainable,
    inject_lora,
    lora_layers,
    merge_and_unload,
)
from phase2_finetuning.project5_lora.nf4 import (
    BaseMemory,
    base_memory,
    dequantize_model,
    quantize_model,
)


@dataclass
class Prepared:
    cm: ChatModel
    wrapped: list[str]                                # the layers LoRA wraps
    quantized: list[str] = field(default_factory=list)  # qlora: the layers stored in NF4
    memory: BaseMemory | None = None                  # qlora: the 4-bit base's bytes
    notes: list[str] = field(default_factory=list)

    def summary(self) -> str:
        trainable, total = count_trainable(self.cm.model)
        s = (f"LoRA on {len(self.wrapped)} layers: {trainable:,} trainable of {total:,} parameters "
             f"({100 * trainable / total:.3f}%)")
        if self.memory is not None:
            m = self.memory
            s += (f"; NF4 base: {len(self.quantized)} layers, {m.weights:,} weights in {m.measured_bytes:,} bytes "
                  f"= {m.bytes_per_param:.4f} bytes/param (computed {m.computed_bytes:,})")
        return s


def prepare_adapters(cfg, device: str | torch.device = "cpu", cm: ChatModel | None = None) -> Prepared:
    """The base of `cfg` (or the given ChatModel) with the method's base layers and LoRA adapters, on `device`."""
    cm = cm or prepare_base(cfg.base, cfg.tokenizer, "cpu")
    notes = []
    if "added" in cm.note:
        notes.append("the base had no chat tokens: they were added with mean-row embeddings, which LoRA leaves "
                     "frozen (a base with its own chat format, like SmolLM2, needs no new rows)")
    quantized, memory = [], None
    if cfg.method == "qlora":
        quantized = quantize_model(cm.model, blocksize=cfg.nf4_blocksize, double_quant=cfg.double_quant)
        memory = base_memory(cm.model)
    wrapped = inject_lora(cm.model, cfg.target_modules, cfg.r, cfg.lora_alpha, cfg.lora_dropout, cfg.use_rslora)
    cm.model.to(device)
    return Prepared(cm, wrapped, quantized, memory, notes)


def adapter_optimizer(model, cfg, device_type: str) -> torch.optim.Optimizer:
    """AdamW over exactly the parameters that require grad: project 3's configure_optimizer already filters them."""
    return model.configure_optimizer(cfg.weight_decay, cfg.learning_rate, (cfg.beta1, cfg.beta2), device_type)


def optimizer_state_bytes(optimizer: torch.optim.Optimizer) -> int:
    """Bytes of every tensor in the optimizer's state (AdamW: exp_avg, exp_avg_sq and a step per parameter)."""
    return sum(t.numel() * t.element_size() for s in optimizer.state.values() for t in s.values()
               if torch.is_tensor(t))


# ---- process memory -----------------------------------------------------------------------------------------
def peak_rss_bytes() -> int:
    """This process's peak resident set size: VmHWM (Linux), else ru_maxrss."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024
    except OSError:
        pass
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return rss if rss > 1 << 32 else rss * 1024  # macOS reports bytes, Linux kilobytes


def current_rss_bytes() -> int | None:
    """This process's resident set size now (Linux VmRSS), None where /proc is missing."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
    except OSError:
        pass
    return None


def reset_peak_rss() -> bool:
    """Start the peak over from the current RSS (Linux: `5` into /proc/self/clear_refs); False where unsupported."""
    try:
        Path("/proc/self/clear_refs").write_text("5")
        return True
    except OSError:
        return False


def release_memory() -> None:
    """Give freed memory back to the OS before a peak is measured (gc, then glibc's malloc_trim where present)."""
    gc.collect()
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):
        pass


# ---- the merged model ------------------------------------------------------------------------------------------
def export_merged(model, out_dir: str | Path, tokenizer_dir: str | Path | None = None) -> Path:
    """Merge the adapters into the weights and write a Hugging Face folder (config.json + model.safetensors).

    A 4-bit base is de-quantised first (the merged model is then NF4-base + update, in float32: what the QLoRA
    model computed, not the original base). This consumes `model`: its LoRA layers are gone afterwards.
    With `tokenizer_dir`, its tokenizer.pkl and tokenizer_config.json (the chat template) go into the folder.
    """
    if not lora_layers(model):
        raise CourseError("the model has no LoRA layers to merge")
    dequantize_model(model)
    merge_and_unload(model)
    src = Path(tokenizer_dir) if tokenizer_dir else None
    tok = src / "tokenizer.pkl" if src and (src / "tokenizer.pkl").is_file() else None
    out = export_hf(model, out_dir, tokenizer_path=tok)
    if src and (src / "tokenizer_config.json").is_file():
        data = (src / "tokenizer_config.json").read_bytes()
        atomic_write(out / "tokenizer_config.json", lambda f: f.write(data))
    return out
