"""The SFT training loop and its before/after measurements, shared by every fine-tuning script of the course.

train_sft.py (full fine-tuning) and project 5's train_lora.py / benchmark.py (LoRA, QLoRA) run the same steps on
the same rows: what differs is which parameters the optimizer holds and how a checkpoint is written, so those
two come in as arguments (`optimizer`, `params`, `save`).

    measure / describe   held-out assistant-token loss, end-of-turn share, identity share (before and after)
    precision            the autocast context and loss scaler of a run (bf16/fp16 autocast on CUDA, else fp32)
    parse_finetune_args  the command line every fine-tuning script shares (--preset, --seed, --resume, fields)
    sft_loop             warmup + cosine learning rate (project 1's cosine_lr), gradient accumulation, gradient
                         clipping, a non-finite loss stops the run, held-out loss and a checkpoint every
                         eval_interval steps, `stop_at` pauses (the resume tests), Ctrl-C saves the state from
                         before the interrupted step and ends with the --resume command
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import Callable
from dataclasses import dataclass

import torch
from tqdm import tqdm

from course.checkpoint import capture_rng_state
from course.cli import ArgumentParser, warn_if_gpu_preset_without_gpu
from course.config import parse_configs
from course.errors import ConfigError, check_finite_loss
from phase1_foundation.project1_minimal_gpt.schedule import cosine_lr
from phase2_finetuning.project4_sft.harness.identity import identity_share
from phase2_finetuning.project4_sft.sft import RowSampler, batch_loss, end_of_turn_share, heldout_loss, make_batch


def precision(device, dtype: str):
    """(autocast context, GradScaler) for a run: `dtype` autocast on CUDA (fp16 with a dynamic loss scaler,
    project 7); on a CPU or MPS everything stays fp32, and both are no-ops."""
    use = device.type == "cuda" and dtype != "float32"
    autocast = torch.autocast("cuda", dtype=getattr(torch, dtype)) if use else contextlib.nullcontext()
    return autocast, torch.amp.GradScaler(device.type, enabled=use and dtype == "float16")


def parse_finetune_args(description: str, config_cls, argv=None, state_file: str = "ckpt.pt", add_args=None):
    """The command line of train_sft.py, train_lora.py and train_dpo.py: --preset, --seed, --resume (the saved
    run's config; single fields may be overridden, a preset may not), --no_progress, and every config field.
    Returns (args, cfg); the config is printed unless the run resumes (the checkpoint's config wins then)."""
    parser = ArgumentParser(description=description)
    parser.add_argument("--seed", type=int, default=1337, help="random seed (default: %(default)s)")
    parser.add_argument("--resume", action="store_true",
                        help=f"continue from OUT_DIR/{state_file} (its config; flags given here override)")
    parser.add_argument("--no_progress", action="store_true", help="no tqdm bar (for logs)")
    if add_args is not None:
        add_args(parser)
    args, cfg = parse_configs(parser, config_cls, argv=argv, default_preset="cpu")
    if args.resume and args.preset_given:
        raise ConfigError("--resume continues the saved run's config; drop --preset (override single fields)")
    warn_if_gpu_preset_without_gpu(args.preset, cfg.device)
    if not args.resume:
        cfg.print_config(f"{config_cls.__name__} (preset {args.preset})")
    return args, cfg


def measure(cm, cfg, data, held_rows, pad: int, device) -> dict:
    """The before/after numbers: held-out loss, end-of-turn share (+ an example answer), identity share."""
    out = {"heldout_loss": heldout_loss(cm.model, held_rows, pad, cfg.batch_size, device)}
    if cfg.gen_samples:
        share, texts = end_of_turn_share(cm, data.heldout_chats, cfg.gen_budget, cfg.gen_samples)
        out.update(end_of_turn=share, example=texts[0][:200] if texts else "")
    if data.identity_questions and cfg.gen_samples:
        out["identity"] = identity_share(cm.model, cm.tok, cm.fmt, data.identity_questions, cfg.gen_budget).accuracy
    return out


def describe(m: dict) -> str:
    parts = [f"held-out loss {m['heldout_loss']:.4f}"]
    if "end_of_turn" in m:
        parts.append(f"end-of-turn {100 * m['end_of_turn']:.1f}%")
    if "identity" in m:
        parts.append(f"identity {100 * m['identity']:.1f}%")
    return ", ".join(parts)


@dataclass
class LoopResult:
    iters: int            # the step the loop stopped at
    last_train: float     # the last step's training loss (nan when no step ran)
    paused: bool          # stopped by stop_at (a checkpoint was saved)
    tokens: int           # trained (assistant) tokens this call
    train_seconds: float  # time in forward/backward/step only (no evals, no saves)


def sft_loop(model, optimizer, params: list, rows, sampler: RowSampler, cfg, *, pad: int, block: int, device,
             autocast, scaler, start_it: int, held_rows, record: Callable[[dict], None],
             save: Callable[[int, dict, tuple | None], None], saved_to: str, resume_hint: str, progress: bool = True,
             stop_at: int | None = None, desc: str = "sft") -> LoopResult:
    """Train from step `start_it` to cfg.max_iters; `save(it, losses, snapshot)` writes a checkpoint.

    `params` are the parameters the gradient is clipped over (the optimizer's). `snapshot` is (sampler, RNG)
    state taken when the interrupted step began (None: take it now). A Ctrl-C prints `saved_to` (where `save`
    writes) and `resume_hint` (the command that continues).
    """
    it = start_it
    bar = tqdm(total=cfg.max_iters, initial=it, desc=desc, unit="it", disable=not progress, dynamic_ncols=True,
               mininterval=1.0)
    model.train()
    last_train, t0, tokens, train_s, snapshot = float("nan"), time.perf_counter(), 0, 0.0, None
    try:
        while it < cfg.max_iters:
            # Ctrl-C inside a step saves the state from before it: the resumed run redoes the whole step
            snapshot = (sampler.state_dict(), capture_rng_state())
            t_step = time.perf_counter()
            lr = cosine_lr(it, cfg.warmup_iters, cfg.max_iters, cfg.learning_rate, cfg.min_lr)
            for group in optimizer.param_groups:
                group["lr"] = lr
            acc = 0.0
            for _ in range(cfg.grad_accum):
                batch = make_batch([rows[i] for i in sampler.take(cfg.batch_size)], pad, block, cfg.packing, device)
                with autocast:
                    loss = batch_loss(model, batch)
                scaler.scale(loss / cfg.grad_accum).backward()
                acc += loss.detach().float().item() / cfg.grad_accum
                tokens += int((batch[1] != -1).sum())
            check_finite_loss(acc, it, hint=f"lower --learning_rate (now {cfg.learning_rate:g})")
            if cfg.grad_clip > 0:
                scaler.unscale_(optimizer)
                torch.nn.utils.clip_grad_norm_(params, cfg.grad_clip)
            scaler.step(optimizer)
            scaler.update()
            optimizer.zero_grad(set_to_none=True)
            train_s += time.perf_counter() - t_step
            it += 1
            last_train = acc
            if it % cfg.log_interval == 0:
                record({"kind": "train", "iter": it, "loss": acc, "lr": lr,
                        "trained_tokens_per_s": tokens / (time.perf_counter() - t0)})
                bar.set_postfix(loss=f"{acc:.3f}", lr=f"{lr:.1e}", refresh=False)
            if it % cfg.eval_interval == 0 or it == cfg.max_iters:
                with autocast:
                    hl = heldout_loss(model, held_rows, pad, cfg.batch_size, device)
                record({"kind": "eval", "iter": it, "heldout_loss": hl})
                bar.write(f"iter {it}: train loss {acc:.4f}, held-out loss {hl:.4f}")
                save(it, {"train": acc, "heldout": hl}, None)
            bar.update(1)
            if stop_at is not None and it >= stop_at and it < cfg.max_iters:
                bar.close()
                save(it, {"train": acc}, None)
                return LoopResult(it, last_train, True, tokens, train_s)
    except KeyboardInterrupt:
        bar.close()
        optimizer.zero_grad(set_to_none=True)
        save(it, {"train": last_train}, snapshot)
        print(f"\nsaved iter {it} to {saved_to}; continue with: {resume_hint}")
        raise
    bar.close()
    return LoopResult(it, last_train, False, tokens, train_s)
