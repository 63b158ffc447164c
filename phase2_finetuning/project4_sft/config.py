"""Hyperparameters of project 4: the fine-tuning run (`SFTConfig`) and the evaluation run (`EvalConfig`).

SFTConfig presets:
    cpu  our project 3 `cpu` model learns to chat: the rasbt set (short answers, so most chats fit its
         128-token context with their end token; the run prints how many were truncated), 300 steps (fp32)
    gpu  our project 3 `gpu` model: rasbt + Alpaca + oasst1 + GSM8K, bf16 autocast
    (SmolLM2's identity run is the `cpu` preset with --base pointing at its GGUF: see README.md)
EvalConfig presets:
    cpu  a quick look on 2 cores: 100 questions of each multiple-choice task, 20 GSM8K / HumanEval problems
    gpu  the full test sets (ARC-Easy 2,376, ARC-Challenge 1,172, MMLU 14,042, GSM8K 1,319, HumanEval 164), bf16
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

from course.config import BaseConfig

TASKS = ("arc_easy", "arc_challenge", "mmlu", "gsm8k", "humaneval", "identity")
DATASETS = ("alpaca", "rasbt", "oasst1", "gsm8k", "identity")
DTYPES = ("float32", "bfloat16", "float16")


def check_training_fields(cfg, errors: list[str], auto: tuple[tuple[str, str], ...] = ()) -> None:
    """The checks every fine-tuning config shares (SFTConfig here, project 5's LoRAConfig, project 6's DPOConfig):
    the optimiser, the schedule, the loop's counts and the dtype. `auto` names more fields where None means auto."""
    for name, meaning in auto + (("block_size", "the model's context"), ("threads", "torch's default")):
        if isinstance(getattr(cfg, name), int) and getattr(cfg, name) <= 0:
            errors.append(f"{name} ({getattr(cfg, name)}) must be > 0 (leave it out for {meaning})")
    cfg.check_positive(errors, "batch_size", "grad_accum", "max_iters", "learning_rate", "eval_interval",
                       "log_interval", "gen_budget")
    cfg.check_range(errors, "min_lr", 0.0, float("inf"))
    cfg.check_range(errors, "weight_decay", 0.0, float("inf"))
    cfg.check_range(errors, "beta1", 0.0, 1.0, hi_open=True)
    cfg.check_range(errors, "beta2", 0.0, 1.0, hi_open=True)
    cfg.check_range(errors, "grad_clip", 0.0, float("inf"))
    cfg.check_choice(errors, "dtype", DTYPES)
    if isinstance(cfg.min_lr, float) and isinstance(cfg.learning_rate, float) and cfg.min_lr > cfg.learning_rate:
        errors.append(f"min_lr ({cfg.min_lr}) must be <= learning_rate ({cfg.learning_rate})")


@dataclass
class SFTConfig(BaseConfig):
    """One fine-tuning run: the base model, the chat data, the optimiser and the checks before/after."""

    base: str = "checkpoints/project3/cpu/ckpt.pt"  # our checkpoint .pt, an HF folder, or SmolLM2's .gguf
    tokenizer: str | None = None   # None = the one that comes with the base model
    data: str = "rasbt"            # comma-separated: alpaca, rasbt, oasst1, gsm8k, identity (NAME:PATH: a file)
    max_chats: int | None = None   # per general dataset, after the held-out split (None = all)
    identity_chats: int = 300      # generated identity conversations (when "identity" is in data)
    heldout: int = 50              # chats held out of each dataset (fixed by seed; never trained on)
    block_size: int | None = None  # training row length in tokens (None = the model's context)
    packing: bool = False          # several chats per row, block-diagonal mask (packing.py)
    batch_size: int = 16
    grad_accum: int = 1
    max_iters: int = 300
    learning_rate: float = 5e-4    # peak of the cosine schedule (project 1's name)
    min_lr: float = 5e-5
    warmup_iters: int = 20
    weight_decay: float = 0.0      # short fine-tunes: no decay pulling pretrained weights to 0
    beta1: float = 0.9
    beta2: float = 0.95
    grad_clip: float = 1.0
    eval_interval: int = 100       # held-out assistant-token loss every this many steps
    log_interval: int = 10
    gen_samples: int = 50          # held-out prompts (and identity questions) answered before/after; 0 = none
    gen_budget: int = 96           # new tokens an answer may use to end its turn
    out_dir: str = "checkpoints/project4/cpu"
    device: str = "auto"
    dtype: str = "float32"         # autocast dtype on CUDA (bfloat16 / float16); float32 everywhere else
    threads: int | None = None     # torch.set_num_threads (None = torch's default)

    PRESETS: ClassVar[dict] = {
        "cpu": dict(),
        "gpu": dict(base="checkpoints/project3/gpu/ckpt.pt", data="rasbt,alpaca,oasst1,gsm8k", batch_size=32,
                    max_iters=2000, learning_rate=3e-4, min_lr=3e-5, warmup_iters=100, eval_interval=250, gen_samples=200,
                    gen_budget=256, out_dir="checkpoints/project4/gpu", dtype="bfloat16"),
    }

    def __post_init__(self) -> None:
        # 0 / "" meant all / automatic before None did: checkpoints saved then still load.
        for name in ("max_chats", "block_size", "threads"):
            if getattr(self, name) == 0 and type(getattr(self, name)) is int:
                setattr(self, name, None)
        if self.tokenizer == "":
            self.tokenizer = None

    @classmethod
    def from_dict(cls, data: dict) -> "SFTConfig":
        """Also reads checkpoints saved before the rename `lr` -> learning_rate (project 1's name)."""
        data = dict(data)
        if "lr" in data and "learning_rate" not in data:
            data["learning_rate"] = data.pop("lr")
        return super().from_dict(data)

    @property
    def datasets(self) -> list[str]:
        """The dataset names of `data`; an item may be NAME:PATH to read NAME's format from another file."""
        return [d.strip().partition(":")[0] for d in self.data.split(",") if d.strip()]

    @property
    def dataset_paths(self) -> list[tuple[str, str | None]]:
        items = [d.strip().partition(":") for d in self.data.split(",") if d.strip()]
        return [(name, path or None) for name, _, path in items]

    def check(self) -> list[str]:
        errors = super().check()
        unknown = [d for d in self.datasets if d not in DATASETS]
        if unknown or not self.datasets:
            errors.append(f"data ({self.data!r}) must be a comma-separated list of: {', '.join(DATASETS)}")
        for name in ("identity_chats", "heldout", "warmup_iters", "gen_samples"):
            if getattr(self, name) < 0:
                errors.append(f"{name} ({getattr(self, name)}) must be >= 0")
        check_training_fields(self, errors, auto=(("max_chats", "all"),))
        if "identity" in self.datasets and self.identity_chats == 0:
            errors.append("identity_chats (0) must be > 0 when data includes identity")
        return errors


@dataclass
class EvalConfig(BaseConfig):
    model: str = "checkpoints/project3/cpu/ckpt.pt"  # a project 3 checkpoint, HF folder, llama2.c .bin, .gguf
    tokenizer: str | None = None   # None = the one that comes with the model
    tasks: str = "arc_easy,arc_challenge,mmlu"
    limit: int | None = None       # questions per task (None = all); MMLU's subset is stratified by subject
    shots: int = 0                 # few-shot examples (ARC, MMLU: from dev; GSM8K: from train)
    gen_limit: int | None = None   # problems for the generative tasks (GSM8K, HumanEval); None = same as limit
    batch_size: int = 16           # multiple choice: rows (context + choice) per forward pass
    max_new_tokens: int = 256
    timeout: float = 10.0          # seconds per HumanEval program
    data_dir: str = "data"
    out: str = "runs/project4/eval"  # writes <out>.json and <out>.md
    device: str = "auto"
    dtype: str = "float32"
    seed: int = 1337

    PRESETS: ClassVar[dict] = {
        "cpu": dict(limit=100, gen_limit=20, tasks="arc_easy,arc_challenge,mmlu,gsm8k,humaneval"),
        "gpu": dict(limit=None, dtype="bfloat16", tasks="arc_easy,arc_challenge,mmlu,gsm8k,humaneval"),
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
            if isinstance(getattr(self, name), int) and getattr(self, name) <= 0:
                errors.append(f"{name} ({getattr(self, name)}) must be > 0 (leave it out, or none, for all)")
        self.check_range(errors, "shots", 0, 5)
        self.check_positive(errors, "batch_size", "max_new_tokens", "timeout")
        self.check_choice(errors, "dtype", DTYPES)
        return errors
