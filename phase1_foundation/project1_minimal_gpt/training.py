"""Project 1's checkpoint format: what train.py writes, and what generate.py and benchmark.py read through
`load_model`. (The schedule and the loss estimate every training loop reuses are in schedule.py.)
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from course.checkpoint import capture_rng_state, load_checkpoint
from course.errors import CourseError
from phase1_foundation.project1_minimal_gpt.config import GPTConfig
from phase1_foundation.project1_minimal_gpt.data import TRAIN_CMD
from phase1_foundation.project1_minimal_gpt.model import GPT

# Fields that fix the network's shape: a resumed run cannot change them.
ARCH_FIELDS = ("vocab_size", "block_size", "n_layer", "n_head", "n_embd", "bias")
CHECKPOINT_KEYS = ("iter", "model_state_dict", "config", "chars")


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
