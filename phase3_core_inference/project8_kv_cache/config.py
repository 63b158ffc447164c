"""Settings of project 8's generate.py (every field is a --flag; presets pick device and precision).

Presets:
    cpu  fp32 on the CPU (the numbers in the README)
    gpu  bf16 on CUDA (not run yet in this course's sessions)
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

from course.config import BaseConfig
from course.interactive import is_utf8
from phase3_core_inference.project8_kv_cache.sampling import SamplingParams

DTYPES = ("float32", "bfloat16", "float16")


@dataclass
class SamplingFields:
    """The sampling pipeline's settings as config fields, under one set of names for every project that samples
    (project 8's generate.py, 11's speculative decoding, 12's batching engine inherit them); checked with the rest."""

    temperature: float = 0.0      # 0 = greedy (argmax)
    top_k: int | None = None      # None = off (keep the k most likely tokens)
    top_p: float | None = None    # None = off (keep the smallest set of tokens with this much probability)
    min_p: float | None = None    # None = off (drop tokens below min_p x the top probability)
    repetition_penalty: float = 1.0  # 1.0 = off

    def sampling(self) -> SamplingParams:
        """The sampling pipeline's settings."""
        return SamplingParams(self.temperature, self.top_k, self.top_p, self.min_p, self.repetition_penalty)

    def check(self) -> list[str]:
        return super().check() + self.sampling().problems()


@dataclass
class GenerateConfig(SamplingFields, BaseConfig):
    model: str = "data/stories260k/stories260K.bin"  # .pt of ours | HF folder | hub id | llama2.c .bin
    tokenizer: str | None = None  # separate tokenizer file (llama2.c .bin, tokenizer.json, .pkl); None = the model's own
    prompt: str = ""              # "" = start from BOS
    interactive: bool = False     # read prompts from stdin, one per line
    chat: bool = False            # apply the chat template; keep the KV cache across turns
    system: str | None = None     # a system message for --chat (None = none; the template may add its own)
    max_new_tokens: int | None = None  # None = as many as fit in the context, up to 256; an explicit N >= 1 must fit
    seed: int = 1337
    device: str = "auto"
    dtype: str = "float32"
    max_len: int | None = None    # KV cache length; None = the model's context window
    compile: bool | None = None   # the compiled decode step (fast_decode.py, CPU fp32): None = auto (>= 16 MiB of weights)

    PRESETS: ClassVar[dict] = {
        "cpu": dict(device="cpu", dtype="float32"),
        "gpu": dict(device="cuda", dtype="bfloat16"),
    }

    def check(self) -> list[str]:
        errors = super().check()  # BaseConfig's and the sampling settings'
        if self.max_new_tokens is not None and self.max_new_tokens < 1:
            errors.append(f"max_new_tokens ({self.max_new_tokens}) must be >= 1; leave the flag out for as many "
                          "as fit in the context, up to 256")
        self.check_choice(errors, "dtype", DTYPES)
        if self.max_len is not None and self.max_len < 1:
            errors.append(f"max_len ({self.max_len}) must be >= 1; leave the flag out for the model's context window")
        for name in ("prompt", "system"):  # bytes that are not UTF-8 arrive as lone surrogates and cannot be encoded
            if getattr(self, name) is not None and not is_utf8(getattr(self, name)):
                errors.append(f"--{name} is not valid UTF-8 text; pass plain UTF-8 characters")
        if self.chat and self.prompt:
            errors.append("--chat is interactive; drop --prompt")
        return errors
