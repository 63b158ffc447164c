"""Settings of project 12's serve_workload.py and benchmark.py (every field is a --flag; presets pick the device).

Presets:
    cpu  fp32 on the CPU, 32 rows, a 256-token budget (the README's numbers)
    gpu  bf16 on CUDA, 64 rows, a 2048-token budget (not run yet in this course's sessions)

Field names are those of the projects that own the same thing: model, tokenizer, device, dtype, seed, max_len,
temperature, top_k, top_p, min_p, repetition_penalty (project 8); the engine's knobs are vLLM's under our names
(max_rows = max_num_seqs, max_batch_tokens = max_num_batched_tokens, chunked_prefill = enable_chunked_prefill).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

from course.config import BaseConfig
from phase3_core_inference.project8_kv_cache.config import SamplingFields
from phase4_advanced_inference.project12_continuous_batching.scheduler import POLICIES

DTYPES = ("float32", "bfloat16", "float16")


@dataclass
class BatchConfig(SamplingFields, BaseConfig):
    """Project 8's sampling fields (temperature, top_k, top_p, min_p, repetition_penalty: every synthetic request
    samples with them and its own seed), the engine's knobs and the workload's."""

    model: str = "data/smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"  # anything project 3's loader takes
    tokenizer: str | None = None     # None = the model's own
    # ---- the engine ----
    policy: str = "continuous"       # continuous (Orca) | static (a group runs until its longest finishes)
    max_rows: int = 32               # requests decoding at once (KV cache rows); 1 with static = sequential
    max_batch_tokens: int | None = 256  # new tokens per forward (decodes + prefill chunks); None = no budget
    chunked_prefill: bool = True     # cut prompts into chunks that fill the budget (Sarathi); off: whole prompts
    packed: bool = True              # a step with prompt chunks: one packed forward (ragged.py), else one per chunk
    max_len: int | None = 1024       # KV cache length per row (prompt + reply); None = the model's context window
    # ---- the workload ----
    trace: str | None = None         # a JSONL trace to replay (workload.py); None = a synthetic workload:
    requests: int = 64               # how many requests
    rate: float | None = 2.0         # Poisson arrivals per second; None = every request at time 0 (offline)
    mean_output: float = 64.0        # output lengths: 1 + geometric of this mean ...
    max_output: int = 192            # ... capped here (max_new_tokens of each request)
    max_prompt: int = 256            # Alpaca prompts longer than this (in tokens) are not drawn
    long_prompts: int = 0            # requests given a long prompt instead (chunked prefill's case)
    long_prompt_tokens: int = 768    # its length in tokens, about
    seed: int = 1337
    device: str = "auto"
    dtype: str = "float32"

    PRESETS: ClassVar[dict] = {
        "cpu": dict(device="cpu", dtype="float32"),
        "gpu": dict(device="cuda", dtype="bfloat16", max_rows=64, max_batch_tokens=2048, requests=512,
                    rate=32.0),
    }

    def check(self) -> list[str]:
        errors = super().check()
        self.check_choice(errors, "policy", POLICIES)
        self.check_choice(errors, "dtype", DTYPES)
        self.check_positive(errors, "max_rows", "requests", "max_output", "max_prompt", "long_prompt_tokens")
        if isinstance(self.max_batch_tokens, int) and isinstance(self.max_rows, int) and \
                self.max_batch_tokens < self.max_rows:
            errors.append(f"max_batch_tokens ({self.max_batch_tokens}) must be >= max_rows ({self.max_rows}): "
                          "every decoding row takes one token per step (or none for no budget)")
        if self.rate is not None and not self.rate > 0:
            errors.append(f"rate ({self.rate}) must be > 0 requests per second (none: all at time 0)")
        if isinstance(self.mean_output, (int, float)) and not self.mean_output >= 1:
            errors.append(f"mean_output ({self.mean_output}) must be >= 1 token")
        if isinstance(self.long_prompts, int) and self.long_prompts < 0:
            errors.append(f"long_prompts ({self.long_prompts}) must be >= 0")
        if self.max_len is not None and self.max_len < 2:
            errors.append(f"max_len ({self.max_len}) must be >= 2 (or none for the model's context window)")
        return errors
