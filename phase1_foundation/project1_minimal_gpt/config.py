"""Hyperparameters of the minimal GPT and of its training run, with the `cpu` and `gpu` presets.

One dataclass holds both the model shape (n_layer, n_head, ...) and the training recipe
(learning rate, schedule, batch size, ...), as nanoGPT's train.py does: a run is fully described
by one GPTConfig, which is stored inside every checkpoint so `--resume` and `generate.py` rebuild
exactly the same model.

Presets:
    cpu  the tuned laptop run: ~0.8M parameters, 12,000 steps of 8 x 128 characters, at most 9 minutes
         of training on 2 CPU cores (the time budget stops it earlier on a slower machine)
    gpu  nanoGPT's shakespeare_char scale: 6 layers, 6 heads, 384 dims, block 256, dropout 0.2
Every field can be overridden on the command line: `--n_layer=6 --learning_rate=3e-4`.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

from course.config import BaseConfig

ATTN_IMPLS = ("sdpa", "manual")


@dataclass
class GPTConfig(BaseConfig):
    # ---- model ------------------------------------------------------------------------
    vocab_size: int = 65          # set from the data (Tiny Shakespeare has 65 distinct characters)
    block_size: int = 128         # context length: the model sees at most this many previous characters
    n_layer: int = 4
    n_head: int = 4
    n_embd: int = 128
    dropout: float = 0.0          # 0 for short CPU runs (underfitting regime); 0.2 at GPU scale
    bias: bool = False            # biases in Linear and LayerNorm (GPT-2: True; a bit faster/better without)
    attn_impl: str = "sdpa"       # "sdpa": F.scaled_dot_product_attention; "manual": explicit softmax(QK^T/sqrt(d))V
    # ---- optimisation -----------------------------------------------------------------
    batch_size: int = 8
    max_iters: int = 12000
    lr_decay_iters: int | None = None   # cosine horizon; None = max_iters (or the time-budget horizon)
    learning_rate: float = 2e-3
    min_lr: float = 1e-4
    warmup_iters: int = 50
    weight_decay: float = 0.1
    beta1: float = 0.9
    beta2: float = 0.99
    grad_clip: float = 1.0        # clip the global gradient norm to this value; 0 disables clipping
    time_budget_s: float | None = None  # stop gracefully (final eval + checkpoint) after this many
                                        # seconds of training; None or 0 = no limit
    # ---- evaluation and logging -------------------------------------------------------
    eval_interval: int = 1000
    eval_iters: int = 40          # batches per split averaged by each evaluation
    log_interval: int = 10        # read the loss back from the device only this often (a sync point)

    PRESETS: ClassVar[dict] = {
        # Tuned on 2 CPU cores: small batches (many steps) beat large ones at this budget
        # (2-minute runs: batch 32 -> val 1.97, 16 -> 1.82, 8 -> 1.70), and lr 3e-3 beats 2e-3; see README.
        "cpu": dict(block_size=128, n_layer=4, n_head=4, n_embd=128, dropout=0.0, bias=False,
                    batch_size=8, max_iters=12000, learning_rate=3e-3, min_lr=1e-4, warmup_iters=50,
                    eval_interval=1000, eval_iters=40, time_budget_s=540.0),
        "gpu": dict(block_size=256, n_layer=6, n_head=6, n_embd=384, dropout=0.2, bias=False,
                    batch_size=64, max_iters=5000, learning_rate=1e-3, min_lr=1e-4, warmup_iters=100,
                    beta2=0.99, eval_interval=250, eval_iters=200, time_budget_s=None),
    }

    def check(self) -> list[str]:
        errors = super().check()
        if errors:  # wrong types: the range checks below would only repeat them
            return errors
        self.check_positive(errors, "vocab_size", "block_size", "n_layer", "n_head", "n_embd", "batch_size",
                            "max_iters", "learning_rate", "eval_interval", "eval_iters", "log_interval")
        if self.n_embd > 0 and self.n_head > 0 and self.n_embd % self.n_head != 0:
            errors.append(f"n_embd ({self.n_embd}) must be divisible by n_head ({self.n_head})")
        self.check_range(errors, "dropout", 0.0, 1.0, hi_open=True)
        self.check_choice(errors, "attn_impl", ATTN_IMPLS)
        if self.lr_decay_iters is not None:
            self.check_positive(errors, "lr_decay_iters")
        if self.learning_rate > 0 and not 0 <= self.min_lr <= self.learning_rate:
            errors.append(f"min_lr ({self.min_lr}) must be in [0, learning_rate ({self.learning_rate})]")
        if self.warmup_iters < 0:
            errors.append(f"warmup_iters ({self.warmup_iters}) must be >= 0")
        if self.weight_decay < 0:
            errors.append(f"weight_decay ({self.weight_decay}) must be >= 0")
        self.check_range(errors, "beta1", 0.0, 1.0, hi_open=True)
        self.check_range(errors, "beta2", 0.0, 1.0, hi_open=True)
        if self.grad_clip < 0:
            errors.append(f"grad_clip ({self.grad_clip}) must be >= 0 (0 disables clipping)")
        if self.time_budget_s is not None and self.time_budget_s < 0:
            errors.append(f"time_budget_s ({self.time_budget_s}) must be >= 0 (0 = no limit)")
        return errors
