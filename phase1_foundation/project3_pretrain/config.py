"""Hyperparameters of project 3: the LLaMA-style model (`LlamaConfig`) and its training run (`TrainConfig`).

Presets:
    cpu  a ~3.7M-parameter model that trains for 30 minutes on 2 CPU cores (fp32)
    gpu  the ~125M model of the course plan (exact count: `uv run python -m
         phase1_foundation.project3_pretrain.model --preset gpu`), bf16 + torch.compile
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

from course.config import BaseConfig
from course.errors import ConfigError


@dataclass
class LlamaConfig(BaseConfig):
    """Shape of the decoder. Field names follow nanoGPT; hf_interop.py maps them to HF's names."""

    block_size: int = 256          # context length = number of precomputed RoPE positions
    vocab_size: int = 10_000       # project 2's trained tokenizer
    n_layer: int = 4
    n_head: int = 4                # query heads
    n_kv_head: int = 4             # key/value heads (GQA); n_head must be a multiple of it
    n_embd: int = 256
    head_dim: int | None = None    # None = n_embd // n_head (HF's `head_dim` may differ)
    intermediate_size: int | None = None  # SwiGLU hidden width; None = LLaMA's rule, ~8/3 * n_embd rounded up
    multiple_of: int = 64          # rounding for the automatic intermediate_size
    rope_theta: float = 10_000.0
    norm_eps: float = 1e-5
    tie_embeddings: bool = True
    dropout: float = 0.0
    init_std: float = 0.02

    PRESETS: ClassVar[dict] = {
        # 2 CPU cores, 30 minutes: small and shallow so it sees a few million tokens; GQA with 2 KV heads.
        # intermediate_size=608 makes the parameter count exactly that of project 1's GPT with the same
        # n_layer/n_head/n_embd (GQA's smaller K/V and the absent position table buy a wider SwiGLU).
        "cpu": dict(block_size=128, n_layer=4, n_head=6, n_kv_head=2, n_embd=192, intermediate_size=608),
        # The course's ~125M model: GPT-2-small width/depth, GQA 12:4, a wider SwiGLU (4.67x) so the
        # parameter count lands at ~125M with a 10K vocabulary and tied embeddings.
        "gpu": dict(block_size=1024, n_layer=12, n_head=12, n_kv_head=4, n_embd=768, intermediate_size=3584),
    }

    # Checkpoints and readers from before the None-for-auto convention wrote 0 for "automatic".
    _LEGACY_ZERO_IS_AUTO: ClassVar[tuple[str, ...]] = ("head_dim", "intermediate_size")

    def __post_init__(self) -> None:
        for name in self._LEGACY_ZERO_IS_AUTO:
            if getattr(self, name) == 0 and type(getattr(self, name)) in (int, float):
                setattr(self, name, None)

    # ---- derived sizes ---------------------------------------------------------------------
    @property
    def hd(self) -> int:
        return self.head_dim or self.n_embd // max(self.n_head, 1)

    @property
    def ffn_dim(self) -> int:
        if self.intermediate_size:
            return self.intermediate_size
        hidden = int(2 * (4 * self.n_embd) / 3)  # LLaMA: 2/3 of the usual 4d, since SwiGLU has 3 matrices
        return self.multiple_of * ((hidden + self.multiple_of - 1) // self.multiple_of)

    def check(self) -> list[str]:
        errors = super().check()
        self.check_positive(errors, "block_size", "vocab_size", "n_layer", "n_head", "n_kv_head", "n_embd",
                            "multiple_of", "rope_theta", "norm_eps", "init_std")
        self.check_range(errors, "dropout", 0.0, 1.0, hi_open=True)
        if errors:  # wrong types: the checks below would only repeat them (or fail on them)
            return errors
        for name, auto in (("head_dim", "n_embd // n_head"), ("intermediate_size", "LLaMA's rule")):
            if getattr(self, name) is not None and getattr(self, name) < 0:
                errors.append(f"{name} ({getattr(self, name)}) must be > 0 (leave it out for {auto})")
        if self.n_head > 0 and self.n_kv_head > 0 and self.n_head % self.n_kv_head:
            errors.append(f"n_head ({self.n_head}) must be divisible by n_kv_head ({self.n_kv_head})")
        if self.head_dim is None and self.n_head > 0 and self.n_embd % self.n_head:
            errors.append(f"n_embd ({self.n_embd}) must be divisible by n_head ({self.n_head})")
        if self.hd % 2:
            errors.append(f"head_dim ({self.hd}) must be even for rotary embeddings")
        if self.vocab_size > 65_535:
            # prepare_data.py stores token ids as uint16
            errors.append(f"vocab_size ({self.vocab_size}) must be <= 65535 (data shards are uint16)")
        return errors


@dataclass
class TrainConfig(BaseConfig):
    """One training run. `--arch gpt` trains project 1's GPT on the same data for comparison."""

    arch: str = "llama"            # llama | gpt
    data_dir: str = "data/project3"
    out_dir: str = "checkpoints/project3/cpu"
    batch_size: int = 16
    grad_accum: int = 1
    max_iters: int = 100_000       # usually cut by time_budget_s
    time_budget_s: float | None = None  # wall-clock budget in seconds for the optimisation loop (None or 0 = none)
    learning_rate: float = 2e-3    # peak of the cosine schedule (project 1's name)
    min_lr: float = 2e-4
    warmup_iters: int = 100
    lr_decay_iters: int | None = None  # cosine horizon; None = max_iters, or the iterations the time budget allows
    weight_decay: float = 0.1
    beta1: float = 0.9
    beta2: float = 0.95
    grad_clip: float = 1.0
    eval_interval: int = 100
    eval_iters: int = 20
    log_interval: int = 10
    dtype: str = "auto"            # auto | float32 | bfloat16 | float16 (auto: bf16 on capable GPUs, fp32 on CPU)
    compile: bool = False
    grad_checkpointing: bool = False
    threads: int | None = None     # torch.set_num_threads; None = leave torch's default
    peak_flops: float | None = None  # device peak FLOP/s for MFU; None = look up (GPU) or measure (CPU)

    PRESETS: ClassVar[dict] = {
        "cpu": dict(batch_size=16, learning_rate=2e-3, min_lr=2e-4, warmup_iters=100, eval_interval=100, eval_iters=10,
                    time_budget_s=1800.0, out_dir="checkpoints/project3/cpu"),
        "gpu": dict(batch_size=32, grad_accum=4, learning_rate=6e-4, min_lr=6e-5, warmup_iters=500, eval_interval=500,
                    eval_iters=50, max_iters=20_000, dtype="auto", compile=True, out_dir="checkpoints/project3/gpu"),
    }

    @classmethod
    def from_dict(cls, data: dict) -> "TrainConfig":
        """Also reads checkpoints saved before the rename `lr` -> learning_rate (project 1's name)."""
        data = dict(data)
        if "lr" in data:
            if "learning_rate" in data:
                raise ConfigError("the saved TrainConfig has both lr and learning_rate; remove lr")
            data["learning_rate"] = data.pop("lr")
        return super().from_dict(data)

    # 0 meant off/automatic before None did (old checkpoints); `--time_budget_s 0` turns off a preset's budget.
    _LEGACY_ZERO_IS_AUTO: ClassVar[tuple[str, ...]] = ("time_budget_s", "lr_decay_iters", "threads", "peak_flops")
    __post_init__ = LlamaConfig.__post_init__

    def check(self) -> list[str]:
        errors = super().check()
        self.check_choice(errors, "arch", ("llama", "gpt"))
        self.check_choice(errors, "dtype", ("auto", "float32", "bfloat16", "float16"))
        if errors:  # wrong types: the range checks below would only repeat them
            return errors
        self.check_positive(errors, "batch_size", "grad_accum", "max_iters", "learning_rate", "eval_interval",
                            "eval_iters", "log_interval")
        for name in ("min_lr", "warmup_iters", "weight_decay", "grad_clip"):
            if getattr(self, name) < 0:
                errors.append(f"{name} ({getattr(self, name)}) must be >= 0")
        for name in ("time_budget_s", "lr_decay_iters", "threads", "peak_flops"):  # None = off / automatic
            if getattr(self, name) is not None and getattr(self, name) < 0:
                errors.append(f"{name} ({getattr(self, name)}) must be > 0 (leave it out for "
                              f"{'no limit' if name == 'time_budget_s' else 'automatic'})")
        if self.min_lr > self.learning_rate:
            errors.append(f"min_lr ({self.min_lr}) must be <= learning_rate ({self.learning_rate})")
        self.check_range(errors, "beta1", 0.0, 1.0, hi_open=True)
        self.check_range(errors, "beta2", 0.0, 1.0, hi_open=True)
        return errors
