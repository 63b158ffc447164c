"""Settings of project 10's MMLU run (evaluate_mmlu.py): the model, the prefix cache and project 4's MMLU fields.

Presets:
    cpu  fp32 on the CPU, 3 subjects x 20 questions (the README's numbers)
    gpu  bf16 on CUDA, every test question of the subjects (not run yet in this course's sessions)

Field names are those of the projects that own the same thing: model, tokenizer, device, dtype, seed, max_len
(project 8); limit, shots, batch_size, data_dir, out (project 4's EvalConfig).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

from course.config import BaseConfig

STORES = ("radix", "block")
DTYPES = ("float32", "bfloat16", "float16")
SUBJECTS = "high_school_statistics,college_computer_science,machine_learning"


@dataclass
class PrefixCacheConfig(BaseConfig):
    model: str = "data/smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"  # anything project 3's loader takes
    tokenizer: str | None = None   # None = the one that comes with the model
    prefix_cache_mb: float = 512.0  # MiB of K/V the prefix cache may hold (LRU eviction beyond); must be > 0
    store: str = "radix"           # radix: SGLang's token tree | block: vLLM's hashed full blocks
    block_size: int = 16           # tokens per block of the block store (vLLM's default)
    subjects: str = SUBJECTS       # comma-separated MMLU subjects (data/mmlu/test/<subject>_test.csv)
    limit: int | None = 60         # questions in all, stratified by subject (None = every test question)
    shots: int = 5                 # solved dev questions in front of each question (MMLU has 5 per subject)
    batch_size: int = 16           # project 4's harness without the cache: rows per forward pass
    data_dir: str = "data"
    out: str = "runs/project10/mmlu"  # writes <out>.json and <out>.md
    device: str = "auto"
    dtype: str = "float32"
    seed: int = 1337

    PRESETS: ClassVar[dict] = {
        "cpu": dict(device="cpu", dtype="float32"),
        "gpu": dict(device="cuda", dtype="bfloat16", limit=None),
    }

    @property
    def subject_list(self) -> list[str]:
        return [s.strip() for s in self.subjects.split(",") if s.strip()]

    def check(self) -> list[str]:
        errors = super().check()
        if isinstance(self.prefix_cache_mb, (int, float)) and not self.prefix_cache_mb > 0:
            errors.append(f"prefix_cache_mb ({self.prefix_cache_mb}) must be > 0 (MiB of K/V the prefix cache "
                          "may hold)")
        self.check_choice(errors, "store", STORES)
        self.check_positive(errors, "block_size", "batch_size")
        if isinstance(self.limit, int) and self.limit <= 0:
            errors.append(f"limit ({self.limit}) must be > 0 (leave it out, or none, for all)")
        self.check_range(errors, "shots", 0, 5)
        self.check_choice(errors, "dtype", DTYPES)
        if isinstance(self.subjects, str) and not self.subject_list:
            errors.append(f"subjects ({self.subjects!r}) must name at least one MMLU subject, e.g. machine_learning")
        return errors
