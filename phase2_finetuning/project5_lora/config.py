"""Hyperparameters of project 5: a LoRA or QLoRA fine-tuning run (`LoRAConfig`) and its benchmark (`BenchConfig`).

LoRAConfig is project 4's SFTConfig (same data, masking, schedule and checks, same field names: base, data,
batch_size, block_size, max_iters, learning_rate, out_dir, ...) plus the adapter's fields, named as peft names
them (r, lora_alpha, lora_dropout, target_modules, use_rslora) and the 4-bit base's (method, nf4_blocksize,
double_quant).

Presets (both fine-tune SmolLM2-135M-Instruct on project 4's identity task; see README.md):
    cpu  2 cores: identity + rasbt + alpaca, 256-token rows, 120 steps of 8 rows, r=8 on q_proj,v_proj (fp32)
    gpu  identity + rasbt + alpaca + oasst1, 512-token rows, 600 steps of 16 rows, r=16 on all linear layers, bf16
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

from course.config import BaseConfig
from phase2_finetuning.project4_sft.config import SFTConfig

METHODS = ("lora", "qlora")
BENCH_METHODS = ("full", "lora", "qlora")
EVAL_TASKS = ("arc_easy", "mmlu")
SMOLLM2 = "data/smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"


@dataclass
class LoRAConfig(SFTConfig):
    """One LoRA / QLoRA run: project 4's SFT run with the base frozen and adapters trained beside it."""

    base: str = SMOLLM2
    data: str = "identity,rasbt,alpaca"
    max_chats: int | None = 300
    block_size: int | None = 256
    batch_size: int = 8
    max_iters: int = 120
    learning_rate: float = 1e-3    # adapters start at zero and are small: ~10-30x full fine-tuning's rate
    min_lr: float = 1e-4
    warmup_iters: int = 10
    eval_interval: int = 40
    gen_budget: int = 48
    out_dir: str = "checkpoints/project5/cpu"
    method: str = "lora"           # lora: float base; qlora: NF4 base (nf4.py) + the same adapters
    r: int = 8                     # adapter rank
    lora_alpha: float = 16.0       # scale = lora_alpha / r
    lora_dropout: float = 0.0      # dropout on the adapter's input
    target_modules: str = "q_proj,v_proj"  # comma-separated names (HF's or ours), regexes, or all-linear
    use_rslora: bool = False       # scale = lora_alpha / sqrt(r) (Kalajdzievski 2023)
    nf4_blocksize: int = 64        # qlora: weights per absmax
    double_quant: bool = True      # qlora: quantise the absmax constants too (8-bit, blocks of 256)

    PRESETS: ClassVar[dict] = {
        "cpu": {},
        "gpu": {"data": "identity,rasbt,alpaca,oasst1", "max_chats": 2000, "block_size": 512, "batch_size": 16,
                "max_iters": 600, "learning_rate": 5e-4, "min_lr": 5e-5, "warmup_iters": 30, "eval_interval": 100,
                "gen_samples": 200, "gen_budget": 96, "r": 16, "lora_alpha": 32.0, "target_modules": "all-linear",
                "out_dir": "checkpoints/project5/gpu", "dtype": "bfloat16"},
    }

    def check(self) -> list[str]:
        errors = super().check()
        self.check_choice(errors, "method", METHODS)
        self.check_positive(errors, "r", "lora_alpha")
        self.check_range(errors, "lora_dropout", 0.0, 1.0, hi_open=True)
        if isinstance(self.nf4_blocksize, int) and (self.nf4_blocksize <= 0 or self.nf4_blocksize % 2):
            errors.append(f"nf4_blocksize ({self.nf4_blocksize}) must be a positive even number")
        if isinstance(self.target_modules, str) and not self.target_modules.strip(" ,"):
            errors.append("target_modules ('') must name modules (q_proj,v_proj), a regex, or all-linear")
        return errors


@dataclass
class BenchConfig(BaseConfig):
    """benchmark.py: which methods run on the LoRAConfig's steps, full fine-tuning's own rate, what is evaluated."""

    methods: str = "full,lora,qlora"
    full_learning_rate: float = 3e-5   # project 4's SmolLM2 recipe: full fine-tuning needs a ~30x lower rate
    full_min_lr: float = 3e-6
    eval_tasks: str = "arc_easy,mmlu"  # before (the base) and after each method; "" = none
    eval_limit: int | None = 500       # questions per task (MMLU stratified by subject); None = the whole test set
    eval_data_dir: str = "data"
    in_process: bool = False           # all methods in this process (fast; peak RSS then only approximate)
    out: str = "runs/project5/benchmark"  # writes <out>.json and <out>.md; each row also in <out>.rows/<method>.json
    reuse: bool = False                # a row already in <out>.rows/ for the same configs and seed is read back

    PRESETS: ClassVar[dict] = {"cpu": {}, "gpu": {"eval_limit": None, "out": "runs/project5/benchmark-gpu"}}

    @property
    def method_list(self) -> list[str]:
        return [m.strip() for m in self.methods.split(",") if m.strip()]

    @property
    def task_list(self) -> list[str]:
        return [t.strip() for t in self.eval_tasks.split(",") if t.strip()]

    def check(self) -> list[str]:
        errors = super().check()
        if not self.method_list or any(m not in BENCH_METHODS for m in self.method_list):
            errors.append(f"methods ({self.methods!r}) must be a comma-separated list of: {', '.join(BENCH_METHODS)}")
        if any(t not in EVAL_TASKS for t in self.task_list):
            errors.append(f"eval_tasks ({self.eval_tasks!r}) must be empty or a comma-separated list of: "
                          f"{', '.join(EVAL_TASKS)}")
        self.check_positive(errors, "full_learning_rate")
        self.check_range(errors, "full_min_lr", 0.0, float("inf"))
        if isinstance(self.eval_limit, int) and self.eval_limit <= 0:
            errors.append(f"eval_limit ({self.eval_limit}) must be > 0 (leave it out for the whole test set)")
        return errors
