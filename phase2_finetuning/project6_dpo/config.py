"""Hyperparameters of project 6: one preference-tuning run (`DPOConfig`).

Presets:
    cpu  SmolLM2-135M-Instruct with LoRA (r 8 on every linear layer but the output; the reference is the base
         with the adapters off) on the rasbt pairs (1,094 after the drops, 100 held out), rows of 256 tokens,
         sigmoid DPO, beta 0.1, 100 steps of 8 pairs: the 2-core run of the README
    gpu  full fine-tuning of the same model (a frozen copy as the reference) on rasbt + HH-RLHF helpful +
         harmless, rows of 512 tokens, 400 steps of 32 pairs, bf16 autocast

The names are project 4's SFTConfig names wherever the thing is the same (base, tokenizer, data, heldout,
block_size, batch_size, grad_accum, max_iters, learning_rate, min_lr, warmup_iters, weight_decay, beta1, beta2,
grad_clip, eval_interval, log_interval, gen_samples, gen_budget, out_dir, device, dtype, threads), and trl's
DPOConfig / CPOConfig names for the preference loss (loss_type, beta, label_smoothing, simpo_gamma).
None means off / automatic, as everywhere in the course.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

from course.config import BaseConfig
from phase2_finetuning.project4_sft.config import check_training_fields

LOSS_TYPES = ("sigmoid", "ipo", "hinge", "simpo")
REFERENCE_FREE = ("simpo",)                 # no reference model at all
SMOOTHABLE = ("sigmoid", "simpo")           # label_smoothing: conservative DPO (Mitchell 2023), as trl's CPO
DEFAULT_BETA = {"sigmoid": 0.1, "ipo": 0.1, "hinge": 0.1, "simpo": 2.0}  # DPO / IPO papers; SimPO's 2.0
DATASETS = ("rasbt", "hh_helpful", "hh_harmless", "oasst1")
SMOLLM2 = "data/smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"


@dataclass
class DPOConfig(BaseConfig):
    """One preference-tuning run: the policy and its reference, the pairs, the loss, the optimiser."""

    base: str = SMOLLM2            # the SFT model to start from (anything project 3's loader takes, or a project 4 out_dir)
    ref: str | None = None         # the frozen reference (None = the base itself); unused by simpo
    tokenizer: str | None = None   # None = the one that comes with the base model
    data: str = "rasbt"            # comma-separated: rasbt, hh_helpful, hh_harmless, oasst1 (NAME:PATH: a file)
    max_pairs: int | None = None   # per dataset, after the held-out split (None = all)
    heldout: int = 100             # pairs held out of each dataset (fixed by seed; never trained on)
    block_size: int | None = 256   # longest prompt + reply in tokens; longer pairs are skipped, counted (None = context)
    loss_type: str = "sigmoid"     # sigmoid (DPO), ipo, hinge, simpo (reference-free)
    beta: float | None = None      # None = per loss type: 0.1, or 2.0 for simpo
    label_smoothing: float = 0.0   # > 0 with sigmoid: conservative DPO (the share of labels assumed flipped)
    simpo_gamma: float = 0.5       # SimPO's target reward margin
    lora: bool = True              # train LoRA adapters (project 5) instead of every weight; the reference is
                                   # then the base with its adapters switched off (no second copy)
    r: int = 8                     # LoRA: project 5's names from here on
    lora_alpha: float = 16.0       # scale = lora_alpha / r
    lora_dropout: float = 0.0
    target_modules: str = "all-linear"  # comma-separated names (HF's or ours, e.g. q_proj,v_proj), regexes, all-linear
    use_rslora: bool = False
    batch_size: int = 8            # pairs per step (each pair is two rows: chosen and rejected)
    grad_accum: int = 1
    max_iters: int = 100
    learning_rate: float = 1e-4    # peak of the cosine schedule (LoRA; the full fine-tune of the gpu preset: 5e-6)
    min_lr: float = 1e-5
    warmup_iters: int = 10
    weight_decay: float = 0.0
    beta1: float = 0.9
    beta2: float = 0.999
    grad_clip: float = 1.0
    eval_interval: int = 50        # held-out reward accuracy every this many steps
    log_interval: int = 5
    gen_samples: int = 10          # held-out prompts answered greedily before/after (length drift); 0 = none
    gen_budget: int = 96           # new tokens an answer may use
    out_dir: str = "checkpoints/project6/cpu"
    device: str = "auto"
    dtype: str = "float32"         # autocast dtype on CUDA (bfloat16 / float16); float32 everywhere else
    threads: int | None = None     # torch.set_num_threads (None = torch's default)

    PRESETS: ClassVar[dict] = {
        "cpu": {},
        "gpu": {"lora": False, "learning_rate": 5e-6, "min_lr": 5e-7, "data": "rasbt,hh_helpful,hh_harmless",
                "block_size": 512, "batch_size": 32, "max_iters": 400,
                "eval_interval": 100, "gen_samples": 100, "gen_budget": 256, "out_dir": "checkpoints/project6/gpu",
                "dtype": "bfloat16"},
    }

    @property
    def datasets(self) -> list[str]:
        """The dataset names of `data`; an item may be NAME:PATH to read NAME's format from another file."""
        return [d.strip().partition(":")[0] for d in self.data.split(",") if d.strip()]

    @property
    def dataset_paths(self) -> list[tuple[str, str | None]]:
        items = [d.strip().partition(":") for d in self.data.split(",") if d.strip()]
        return [(name, path or None) for name, _, path in items]

    @property
    def beta_value(self) -> float:
        """beta, or the loss type's usual value when it is left out (None)."""
        return DEFAULT_BETA.get(self.loss_type, 0.1) if self.beta is None else self.beta

    @property
    def reference_free(self) -> bool:
        return self.loss_type in REFERENCE_FREE

    def check(self) -> list[str]:
        errors = super().check()
        unknown = [d for d in self.datasets if d not in DATASETS]
        if unknown or not self.datasets:
            errors.append(f"data ({self.data!r}) must be a comma-separated list of: {', '.join(DATASETS)}")
        self.check_choice(errors, "loss_type", LOSS_TYPES)
        if isinstance(self.beta, (int, float)) and self.beta == self.beta and self.beta <= 0:
            errors.append(f"beta ({self.beta}) must be > 0 (it scales the implicit reward; leave it out for "
                          "the loss type's usual value)")
        self.check_range(errors, "label_smoothing", 0.0, 0.5, hi_open=True)
        if isinstance(self.label_smoothing, float) and self.label_smoothing > 0 and self.loss_type in LOSS_TYPES \
                and self.loss_type not in SMOOTHABLE:
            errors.append(f"label_smoothing ({self.label_smoothing}) applies to loss_type sigmoid (conservative "
                          f"DPO) or simpo, not {self.loss_type}")
        self.check_range(errors, "simpo_gamma", 0.0, float("inf"))
        self.check_positive(errors, "r", "lora_alpha")
        self.check_range(errors, "lora_dropout", 0.0, 1.0, hi_open=True)
        if isinstance(self.target_modules, str) and not self.target_modules.strip(" ,"):
            errors.append("target_modules ('') must name modules (q_proj,v_proj), a regex, or all-linear")
        if self.ref is not None and self.loss_type in REFERENCE_FREE:
            errors.append(f"ref ({self.ref!r}) is unused by loss_type {self.loss_type} (reference-free); leave it out")
        for name in ("heldout", "warmup_iters", "gen_samples"):
            if getattr(self, name) < 0:
                errors.append(f"{name} ({getattr(self, name)}) must be >= 0")
        check_training_fields(self, errors, auto=(("max_pairs", "all"),))
        return errors


EVAL_TASKS = ("arc_easy", "mmlu")


@dataclass
class DPOBenchConfig(BaseConfig):
    """benchmark.py: which loss types train on the DPOConfig's pairs and steps, and what is evaluated after."""

    losses: str = "sigmoid,ipo,simpo"  # comma-separated loss types; "cdpo" = sigmoid with label_smoothing 0.1
    eval_tasks: str = "arc_easy,mmlu"  # before (the base) and after each loss; "" = none
    eval_limit: int | None = 500       # questions per task (MMLU stratified by subject); None = the whole test set
    out: str = "runs/project6/benchmark"  # writes <out>.json and <out>.md
    reuse: bool = False                # a loss whose out_dir holds a finished run of the same config is not retrained

    PRESETS: ClassVar[dict] = {"cpu": {}, "gpu": {"eval_limit": None, "out": "runs/project6/benchmark-gpu"}}

    @property
    def loss_list(self) -> list[str]:
        return [x.strip() for x in self.losses.split(",") if x.strip()]

    @property
    def task_list(self) -> list[str]:
        return [t.strip() for t in self.eval_tasks.split(",") if t.strip()]

    def check(self) -> list[str]:
        errors = super().check()
        known = LOSS_TYPES + ("cdpo",)
        if not self.loss_list or any(x not in known for x in self.loss_list):
            errors.append(f"losses ({self.losses!r}) must be a comma-separated list of: {', '.join(known)}")
        if any(t not in EVAL_TASKS for t in self.task_list):
            errors.append(f"eval_tasks ({self.eval_tasks!r}) must be empty or a comma-separated list of: "
                          f"{', '.join(EVAL_TASKS)}")
        if isinstance(self.eval_limit, int) and self.eval_limit <= 0:
            errors.append(f"eval_limit ({self.eval_limit}) must be > 0 (leave it out for the whole test set)")
        return errors
