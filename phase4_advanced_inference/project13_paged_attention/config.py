"""Settings of project 13's benchmark.py: project 12's BatchConfig (model, engine, workload: same field names) plus
the paged cache's own.

Presets:
    cpu  fp32 on the CPU (the README's numbers)
    gpu  bf16 on CUDA, a larger workload and budget (not run yet in this course's sessions)
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

from phase4_advanced_inference.project12_continuous_batching.config import BatchConfig


@dataclass
class PagedConfig(BatchConfig):
    block_size: int = 16             # tokens per KV block (vLLM's default)
    kv_budget_tokens: int = 8192     # the fixed KV budget both caches get: contiguous = budget / max_len rows
    paged_rows: int = 64             # the paged engine's row limit (its blocks limit it before this does)
    n_samples: int = 4               # parallel sampling: continuations of one prompt sharing its blocks
    requests: int = 48
    rate: float | None = None        # the throughput part serves everything at once (offline)

    PRESETS: ClassVar[dict] = {
        "cpu": dict(device="cpu", dtype="float32"),
        "gpu": dict(device="cuda", dtype="bfloat16", kv_budget_tokens=65536, paged_rows=256, requests=512),
    }

    def check(self) -> list[str]:
        errors = super().check()
        self.check_positive(errors, "block_size", "kv_budget_tokens", "paged_rows", "n_samples")
        if isinstance(self.kv_budget_tokens, int) and isinstance(self.max_len, int) and \
                self.kv_budget_tokens < self.max_len:
            errors.append(f"kv_budget_tokens ({self.kv_budget_tokens}) must hold at least one row of max_len "
                          f"({self.max_len}) tokens")
        return errors
