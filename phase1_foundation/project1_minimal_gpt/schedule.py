"""The schedule and the loss estimate of a training run: the two pieces every later training loop reuses
(projects 3, 4, 6 and 7), apart from project 1's own checkpoint format in training.py.

PAPERS
    Goyal et al., 2017, "Accurate, Large Minibatch SGD": linear learning-rate warmup.
    Loshchilov & Hutter, 2017, "SGDR: Stochastic Gradient Descent with Warm Restarts": cosine decay.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch


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
