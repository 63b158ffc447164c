"""Settings of project 11's generate.py (every field is a --flag; presets pick device and precision).

Presets:
    cpu  fp32 on the CPU (the numbers in the README)
    gpu  bf16 on CUDA (not run yet in this course's sessions)

Field names are project 8's where they mean the same thing (model, tokenizer, prompt, sampling, max_len, ...).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

from course.config import BaseConfig
from course.interactive import is_utf8
from phase3_core_inference.project8_kv_cache.config import SamplingFields

DRAFTERS = ("lookup", "self", "model", "none")
DTYPES = ("float32", "bfloat16", "float16")


@dataclass
class SpeculativeConfig(SamplingFields, BaseConfig):  # temperature, top_k, top_p, min_p, repetition_penalty
    model: str = "data/smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"  # the target: anything project 3's loader takes
    tokenizer: str | None = None  # None = the model's own
    prompt: str = ""              # "" = start from BOS
    chat: bool = False            # the prompt as one user message in the model's chat template
    speculative: str = "lookup"   # lookup: n-grams of the text so far | self: the target's first layers | model: --draft | none
    draft: str | None = None      # --speculative model: the draft model (same tokenizer as the target)
    draft_layers: str | None = None  # --speculative self: layers kept, e.g. 0-9 or 0-5,27-29; None = the first third
    k: int = 4                    # tokens drafted per target forward
    adaptive: bool = False        # grow k after a fully accepted draft, shrink it after a rejection
    k_max: int | None = None      # adaptive: the largest k (None = 2 x k)
    max_ngram: int = 3            # lookup: the longest suffix matched
    min_ngram: int = 1            # lookup: the shortest
    max_new_tokens: int | None = None  # None = as many as fit in the context, up to 256
    compare: bool = False         # also decode plainly (project 8's engine) and compare (greedy: token for token)
    seed: int = 1337
    device: str = "auto"
    dtype: str = "float32"
    max_len: int | None = None    # KV cache length; None = the model's context window

    PRESETS: ClassVar[dict] = {
        "cpu": dict(device="cpu", dtype="float32"),
        "gpu": dict(device="cuda", dtype="bfloat16"),
    }

    def check(self) -> list[str]:
        errors = super().check()
        self.check_choice(errors, "speculative", DRAFTERS)
        self.check_choice(errors, "dtype", DTYPES)
        if isinstance(self.k, int) and self.k <= 0:
            errors.append(f"k ({self.k}) must be >= 1 (tokens drafted per target forward; --speculative none "
                          "decodes plainly)")
        if isinstance(self.k_max, int) and isinstance(self.k, int) and self.k_max < self.k:
            errors.append(f"k_max ({self.k_max}) must be >= k ({self.k})")
        if isinstance(self.min_ngram, int) and isinstance(self.max_ngram, int) and not 1 <= self.min_ngram <= self.max_ngram:
            errors.append(f"min_ngram ({self.min_ngram}) and max_ngram ({self.max_ngram}) must satisfy "
                          "1 <= min_ngram <= max_ngram")
        if self.speculative == "model" and not self.draft:
            errors.append("--speculative model needs --draft PATH (a model with the target's tokenizer)")
        if self.draft and self.speculative != "model":
            errors.append(f"--draft is only used by --speculative model (not {self.speculative})")
        if self.max_new_tokens is not None and self.max_new_tokens < 1:
            errors.append(f"max_new_tokens ({self.max_new_tokens}) must be >= 1; leave the flag out for as many "
                          "as fit in the context, up to 256")
        if self.max_len is not None and self.max_len < 1:
            errors.append(f"max_len ({self.max_len}) must be >= 1; leave the flag out for the model's context window")
        if not is_utf8(self.prompt):
            errors.append("--prompt is not valid UTF-8 text; pass plain UTF-8 characters")
        return errors
