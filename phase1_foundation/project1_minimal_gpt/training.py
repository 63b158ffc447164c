"""The pieces of a training run that other scripts and projects reuse: the schedule, the evaluation and
the checkpoint format.

PAPERS
    Goyal et al., 2017, "Accurate, Large Minibatch SGD": linear learning-rate warmup.
    Loshchilov & Hutter, 2017, "SGDR: Stochastic Gradient Descent with Warm Restarts": cosine decay.

train.py is the loop that uses them; generate.py and benchmark.py read what it writes through
`load_model`; project 3's training loop reuses `cosine_lr` and `estimate_loss`.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any, Callable

import torch

from course.checkpoint import capture_rng_state, load_checkpoint
from course.errors import CourseError
from phase1_foundation.project1_minimal_gpt.config import GPTConfig
from phase1_foundation.project1_minimal_gpt.data import TRAIN_CMD
from phase1_foundation.project1_minimal_gpt.model import GPT

# Fields that fix the network's shape: a resumed run cannot change them.
ARCH_FIELDS = ("vocab_size", "block_size", "n_layer", "n_head", "n_embd", "bias")
CHECKPOINT_KEYS = ("iter", "model_state_dict", "config", "chars")


def cosine_lr(it: int, warmup_iters: int, lr_decay_iters: int, max_lr: float, min_lr: float) -> float:
    """Linear warmup to max_lr, then a half-cosine down to min_lr at lr_decay_iters, then min_lr.

    PAPER: warmup (Goyal et al. 2017) keeps the first steps small while Adam's second-moment
        estimates are still noisy; cosine decay (Loshchilov & Hutter 2017) spends most of the run
        at a high rate and anneals smoothly at the end, which is where the loss drops the most.
    """
    if it < warmup_iters:
        return max_lr * (it + 1) / (warmup_iters + 1)
    if it >= lr_decay_iters:
        return min_lr
    ratio = (it - warmup_iters) / max(1, lr_decay_iters - warmup_iters)
    coeff = 0.5 * (1.0 + math.cos(math.pi * ratio))  # 1 -> 0
    return min_lr + coeff * (max_lr - min_lr)


@torch.no_grad()
def estimate_loss(model: torch.nn.Module, get_batch: Callable[[str], tuple[torch.Tensor, torch.Tensor]],
                  eval_iters: int) -> dict[str, float]:
    """Mean loss over `eval_iters` batches of each split, in eval mode (no dropout).

    WHY a mean over many batches: one batch's loss is noisy (+-0.05 here); comparing checkpoints
    on it would pick winners by luck. Returns {"train": ..., "val": ...}.
    """
    was_training = model.training
    model.eval()
    out = {}
    for split in ("train", "val"):
        losses = torch.zeros(eval_iters)
        for k in range(eval_iters):
            x, y = get_batch(split)
            losses[k] = model(x, y)[1].item()
        out[split] = losses.mean().item()
    model.train(was_training)
    return out


# ---- the checkpoint format ------------------------------------------------------------------------
def checkpoint_state(model: GPT, optimizer: torch.optim.Optimizer, cfg: GPTConfig, chars: list[str], it: int,
                     losses: dict[str, float], best_val: float, history: dict, seed: int) -> dict[str, Any]:
    """Everything a checkpoint holds: enough to sample from it, and to resume bit for bit."""
    return {"iter": it, "model_state_dict": model.state_dict(), "optimizer_state_dict": optimizer.state_dict(),
            "train_loss": losses["train"], "val_loss": losses["val"], "best_val_loss": best_val,
            "config": cfg.to_dict(), "chars": chars, "rng_state": capture_rng_state(),
            "history": history, "seed": seed}


def load_state(path: str | Path) -> tuple[dict[str, Any], GPTConfig]:
    """Read a train.py checkpoint and check its kind first: (state dict, its GPTConfig), or one CourseError."""
    state = load_checkpoint(path, map_location="cpu", hint=f"train one first with: {TRAIN_CMD}")
    missing = [k for k in CHECKPOINT_KEYS if k not in state]
    if missing:
        raise CourseError(f"{path} is not a project 1 checkpoint (it has no {', '.join(missing)}); "
                          f"pass one written by {TRAIN_CMD}")
    try:
        cfg = GPTConfig.from_dict(state["config"]).validate_config()
    except CourseError as e:
        raise CourseError(f"{path} is not a project 1 checkpoint ({e})") from None
    return state, cfg


def load_weights(model: GPT, state: dict[str, Any], path: str | Path) -> None:
    """model.load_state_dict, with a mismatch between the saved config and the saved weights in one line."""
    try:
        model.load_state_dict(state["model_state_dict"])
    except RuntimeError as e:
        first = next((line.strip() for line in str(e).splitlines()[1:] if line.strip()), str(e))
        raise CourseError(f"the weights in {path} do not match its config ({first}); the file was edited or "
                          "written by another program, re-train it") from None


def load_model(checkpoint: str | Path, device: torch.device) -> tuple[GPT, list[str]]:
    """Rebuild the model from a train.py checkpoint; returns (model in eval mode, vocabulary chars)."""
    state, cfg = load_state(checkpoint)
    model = GPT(cfg)
    load_weights(model, state, checkpoint)
    return model.to(device).eval(), state["chars"]
