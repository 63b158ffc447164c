"""One training run of project 3's model in one precision mode: the loop train.py and benchmark.py share.

Every mode sees the same thing: the same fp32 initial weights (the seed), the same batches in the same order
(one seeded generator for the random windows of project 3's TokenData), the same learning-rate schedule
(project 1's cosine_lr) and the same evaluation windows. Evaluation always runs in fp32 on the mode's trained
weights (bf16 -> fp32 is exact), so the val loss compares what each mode *learned*, not how precisely it
evaluates. Tokens/s count the training steps only (forward, backward, update), not the evaluations.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import math
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch
from tqdm import tqdm

from course.device import set_seed
from course.errors import check_finite_loss
from course.paths import repo_path
from phase1_foundation.project1_minimal_gpt.schedule import cosine_lr, estimate_loss
from phase1_foundation.project3_pretrain.config import LlamaConfig
from phase1_foundation.project3_pretrain.data import TokenData
from phase1_foundation.project3_pretrain.model import Llama
from phase3_core_inference.project7_mixed_precision.config import MixedPrecisionConfig
from phase3_core_inference.project7_mixed_precision.loss_scaler import LossScaler
from phase3_core_inference.project7_mixed_precision.mixed_precision import (
    MODES,
    Trainer,
    check_device_supports,
)

TRAIN_CMD = "uv run python phase3_core_inference/project7_mixed_precision/train.py"


@dataclass
class RunResult:
    mode: str
    history: list[dict] = field(default_factory=list)   # one record per log step / evaluation / stats step
    summary: dict = field(default_factory=dict)
    trainer: Trainer | None = None


def load_data(cfg: MixedPrecisionConfig, mcfg: LlamaConfig) -> TokenData:
    """Project 3's token shards (one missing says which command makes it)."""
    return TokenData(repo_path(cfg.data_dir), mcfg.block_size)


def make_trainer(mcfg: LlamaConfig, cfg: MixedPrecisionConfig, mode: str, device: torch.device, seed: int) -> Trainer:
    """A fresh fp32 model from `seed` (the same for every mode) wrapped in the mode's Trainer."""
    m = MODES[mode]
    check_device_supports(m.compute, device)
    set_seed(seed)
    model = Llama(mcfg).to(device)
    scaler = LossScaler(cfg.init_scale, cfg.growth_factor, cfg.backoff_factor, cfg.growth_interval)
    return Trainer(model, m, weight_decay=cfg.weight_decay, betas=(cfg.beta1, cfg.beta2), grad_clip=cfg.grad_clip,
                   scaler=scaler, generator=torch.Generator(device=device).manual_seed(seed + 7),
                   micro_batch_of=cfg.micro_batch_of)


def evaluate(trainer: Trainer, eval_model: Llama, get_batch, eval_iters: int) -> dict[str, float]:
    """Mean train/val loss of the trainer's weights, in fp32, on the same windows every time."""
    eval_model.load_state_dict(trainer.fp32_state_dict())
    return estimate_loss(eval_model, get_batch, eval_iters)


def run(mcfg: LlamaConfig, cfg: MixedPrecisionConfig, mode: str, device: torch.device, *, seed: int = 1337,
        data: TokenData | None = None, progress: bool = True, stop_on_nonfinite: bool = True,
        log_path: Path | None = None) -> RunResult:
    """Train `mode` for cfg.max_iters steps; return its history and summary.

    A loss that becomes nan/inf ends the run: with stop_on_nonfinite (train.py) as one NonFiniteLossError line,
    otherwise (benchmark.py) the summary records `diverged_at` and the remaining modes still run.
    """
    if cfg.threads is not None:
        torch.set_num_threads(cfg.threads)
    data = data or load_data(cfg, mcfg)
    if data.vocab_size != mcfg.vocab_size:  # the model's vocabulary is the tokenizer's
        mcfg = dataclasses.replace(mcfg, vocab_size=data.vocab_size).validate_config()
    trainer = make_trainer(mcfg, cfg, mode, device, seed)
    eval_model = Llama(mcfg).to(device)
    batch_gen = torch.Generator().manual_seed(seed)
    horizon = cfg.lr_decay_iters or cfg.max_iters
    tokens_per_iter = cfg.batch_size * mcfg.block_size
    result = RunResult(mode, trainer=trainer)
    log = None

    def record(rec: dict) -> None:
        result.history.append(rec)
        if log:
            log.write(json.dumps(rec) + "\n")
            log.flush()

    def do_eval(it: int) -> dict:
        eval_gen = torch.Generator().manual_seed(seed + 1)
        losses = evaluate(trainer, eval_model, lambda split: data.get_batch(split, cfg.batch_size, device, eval_gen),
                          cfg.eval_iters)
        rec = {"kind": "eval", "iter": it, "train_loss": losses["train"], "val_loss": losses["val"]}
        record(rec)
        return rec

    with contextlib.ExitStack() as stack:
        log = stack.enter_context(open(log_path, "w")) if log_path else None
        bar = stack.enter_context(tqdm(total=cfg.max_iters, desc=f"train {mode}", unit="it", disable=not progress,
                                       dynamic_ncols=True, mininterval=1.0, leave=False))
        step_time, skipped, diverged_at, last_eval = 0.0, 0, None, do_eval(0)
        for it in range(cfg.max_iters):
            lr = cosine_lr(it, cfg.warmup_iters, horizon, cfg.learning_rate, cfg.min_lr)
            x, y = data.get_batch("train", cfg.batch_size, device, batch_gen)
            track = cfg.stats_interval is not None and it % cfg.stats_interval == 0
            t0 = time.perf_counter()
            out = trainer.step(x, y, lr, track_updates=track)
            loss = out["loss"].item()  # waits for the device: the step is done
            step_time += time.perf_counter() - t0
            skipped += out["skipped"]
            if not math.isfinite(loss):
                diverged_at = it
                if stop_on_nonfinite:
                    check_finite_loss(loss, it, "this mode diverged; fp16 without loss scaling can, see the README")
                break
            if track and "below_half_ulp" in out:
                record({"kind": "updates", "iter": it, "below_half_ulp": out["below_half_ulp"],
                        "lost_share": out["lost_share"]})
            if (it + 1) % cfg.log_interval == 0:
                record({"kind": "train", "iter": it + 1, "loss": loss, "lr": lr, "scale": out["scale"],
                        "skipped": skipped, "tokens_per_s": tokens_per_iter * (it + 1) / step_time})
                bar.set_postfix(loss=f"{loss:.3f}", scale=f"{out['scale']:g}", refresh=False)
            if (it + 1) % cfg.eval_interval == 0 or it + 1 == cfg.max_iters:
                last_eval = do_eval(it + 1)
                bar.write(f"{mode} iter {it + 1}: train loss {last_eval['train_loss']:.4f}, "
                          f"val loss {last_eval['val_loss']:.4f}")
            bar.update(1)
    steps = cfg.max_iters if diverged_at is None else diverged_at + 1
    if diverged_at is not None:  # the weights are garbage now: no val loss to report
        last_eval = {"iter": diverged_at, "train_loss": float("nan"), "val_loss": float("nan")}
    result.summary = {"mode": mode, "iters": steps, "val_loss": last_eval["val_loss"],
                      "train_loss": last_eval["train_loss"], "eval_iter": last_eval["iter"],
                      "tokens_per_s": tokens_per_iter * steps / step_time if step_time else 0.0,
                      "step_s": step_time / steps, "skipped": skipped, "diverged_at": diverged_at,
                      "final_scale": trainer.scaler.get_scale() if trainer.scaler else None,
                      **{f"{k}_bytes": v for k, v in trainer.peak_state_bytes.items()}}
    return result
