"""Hyperparameters of project 4's evaluation run (`EvalConfig`).

Presets:
    cpu  a quick look on 2 cores: 100 questions of each multiple-choice task, 20 GSM8K / HumanEval problems
    gpu  the full test sets (ARC-Easy 2,376, ARC-Challenge 1,172, MMLU 14,042, GSM8K 1,319, HumanEval 164), bf16
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

from course.config import BaseConfig

TASKS = ("arc_easy", "arc_challenge", "mmlu", "gsm8k", "humaneval")


@dataclass
class EvalConfig(BaseConfig):
    model: str = "checkpoints/project3/cpu/ckpt.pt"  # a project 3 checkpoint, HF folder, llama2.c .bin, .gguf
    tokenizer: str = ""            # "" = the one that comes with the model
    tasks: str = "arc_easy,arc_challenge,mmlu"
    limit: int = 0                 # questions per task (0 = all); MMLU's subset is stratified by subject
    shots: int = 0                 # few-shot examples (ARC, MMLU: from dev; GSM8K: from train)
    gen_limit: int = 0             # problems for the generative tasks (GSM8K, HumanEval); 0 = same as limit
    max_new_tokens: int = 256
    timeout: float = 10.0          # seconds per HumanEval program
    data_dir: str = "data"
    out: str = "runs/project4/eval"  # writes <out>.json and <out>.md
    device: str = "auto"
    dtype: str = "float32"
    seed: int = 1337

    PRESETS: ClassVar[dict] = {
        "cpu": dict(limit=100, gen_limit=20, tasks="arc_easy,arc_challenge,mmlu,gsm8k,humaneval"),
        "gpu": dict(limit=0, dtype="bfloat16", tasks="arc_easy,arc_challenge,mmlu,gsm8k,humaneval"),
    }

    @property
    def task_list(self) -> list[str]:
        return [t.strip() for t in self.tasks.split(",") if t.strip()]

    def check(self) -> list[str]:
        errors = super().check()
        unknown = [t for t in self.task_list if t not in TASKS]
        if unknown or not self.task_list:
            errors.append(f"tasks ({self.tasks!r}) must be a comma-separated list of: {', '.join(TASKS)}")
        for name in ("limit", "gen_limit"):
            if getattr(self, name) < 0:
                errors.append(f"{name} ({getattr(self, name)}) must be >= 0 (0 = all)")
        self.check_range(errors, "shots", 0, 5)
        self.check_positive(errors, "max_new_tokens", "timeout")
        self.check_choice(errors, "dtype", ("float32", "bfloat16", "float16"))
        return errors
