"""Settings of one mixed-precision training run (train.py) and of the comparison of all modes (benchmark.py).

The model is project 3's LlamaConfig (its `cpu` preset: 3.7M parameters); the field names below are project 3's
TrainConfig's where they mean the same thing (batch_size, max_iters, learning_rate, min_lr, warmup_iters,
lr_decay_iters, weight_decay, beta1, beta2, grad_clip, eval_interval, eval_iters, log_interval, threads).

Presets:
    cpu  200 steps of batch 8 x 128 tokens at learning rate 3e-4: a mode in about a minute on one core, so the
         benchmark's seven runs fit in about 10 minutes. The learning rate is the one large models train at, where
         AdamW's steps of noisy weights fall below half a bf16 ulp: pure bf16's lost updates show.
    gpu  2,000 steps of batch 32 x 256 (block_size from the model preset) at 3e-4, on CUDA
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

from course.config import BaseConfig
from phase3_core_inference.project7_mixed_precision.loss_scaler import check_scaler_args
from phase3_core_inference.project7_mixed_precision.mixed_precision import MODES


@dataclass
class MixedPrecisionConfig(BaseConfig):
    mode: str = "fp32"                 # one of mixed_precision.MODES
    data_dir: str = "data/project3"    # project 3's token shards (prepare_data.py)
    out_dir: str = "checkpoints/project7"  # each run writes OUT_DIR/<mode>/
    batch_size: int = 8
    max_iters: int = 200
    learning_rate: float = 3e-4        # peak of the cosine schedule
    min_lr: float = 3e-5
    warmup_iters: int = 30
    lr_decay_iters: int | None = None  # cosine horizon; None = max_iters
    weight_decay: float = 0.1
    beta1: float = 0.9
    beta2: float = 0.95
    grad_clip: float = 1.0             # 0 = off (project 3's convention)
    eval_interval: int = 50
    eval_iters: int = 10
    log_interval: int = 10
    stats_interval: int | None = 10    # lost-update statistics of the pure bf16 modes every N steps; None = off
    threads: int | None = None         # torch.set_num_threads; None = torch's default
    micro_batch_of: int = 1            # backward as 1 of N micro-batches (loss / N, fp32 grads * N): fp16's view of
                                       # an N times larger batch's per-token gradients (mixed_precision.Trainer)
    # the dynamic loss scaler (torch.amp.GradScaler's defaults)
    init_scale: float = 65536.0
    growth_factor: float = 2.0
    backoff_factor: float = 0.5
    growth_interval: int = 2000

    PRESETS: ClassVar[dict] = {
        "cpu": {"batch_size": 8, "max_iters": 200, "learning_rate": 3e-4, "min_lr": 3e-5, "warmup_iters": 30,
                "eval_interval": 50, "eval_iters": 10, "growth_interval": 100},
        "gpu": {"batch_size": 32, "max_iters": 2000, "learning_rate": 3e-4, "min_lr": 3e-5, "warmup_iters": 100,
                "eval_interval": 200, "eval_iters": 50, "stats_interval": 20, "growth_interval": 500},
    }

    def check(self) -> list[str]:
        errors = super().check()
        self.check_choice(errors, "mode", MODES)
        if errors:
            return errors
        self.check_positive(errors, "batch_size", "max_iters", "learning_rate", "eval_interval", "eval_iters",
                            "log_interval", "micro_batch_of")
        for name in ("min_lr", "warmup_iters", "weight_decay", "grad_clip"):
            if getattr(self, name) < 0:
                errors.append(f"{name} ({getattr(self, name)}) must be >= 0")
        for name in ("lr_decay_iters", "stats_interval", "threads"):
            if getattr(self, name) is not None and getattr(self, name) <= 0:
                errors.append(f"{name} ({getattr(self, name)}) must be > 0 (leave it out for "
                              f"{'off' if name == 'stats_interval' else 'automatic'})")
        if self.min_lr > self.learning_rate:
            errors.append(f"min_lr ({self.min_lr}) must be <= learning_rate ({self.learning_rate})")
        self.check_range(errors, "beta1", 0.0, 1.0, hi_open=True)
        self.check_range(errors, "beta2", 0.0, 1.0, hi_open=True)
        errors += check_scaler_args(self.init_scale, self.growth_factor, self.backoff_factor, self.growth_interval)
        return errors
