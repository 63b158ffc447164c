"""Train the character-level GPT on Tiny Shakespeare.

    uv run python phase1_foundation/project1_minimal_gpt/train.py                      # cpu preset, ~9 min
    uv run python phase1_foundation/project1_minimal_gpt/train.py --preset gpu         # nanoGPT scale
    uv run python phase1_foundation/project1_minimal_gpt/train.py --time_budget_s=120  # stop after 2 minutes
    uv run python phase1_foundation/project1_minimal_gpt/train.py --resume --max_iters=8000

PAPERS
    Loshchilov & Hutter, 2019, "Decoupled Weight Decay Regularization" (AdamW).
    Loshchilov & Hutter, 2017, "SGDR: Stochastic Gradient Descent with Warm Restarts": cosine decay.
    Goyal et al., 2017, "Accurate, Large Minibatch SGD": linear learning-rate warmup.
    Pascanu, Mikolov & Bengio, 2013, "On the difficulty of training recurrent neural networks":
        gradient-norm clipping.

Writes to --out_dir (default checkpoints/project1/):
    ckpt.pt        the best model so far (lowest val loss) - what generate.py loads
    last.pt        the latest state, for --resume
    metrics.json   config, loss history, throughput, final numbers
    loss.png       train/val loss curves
and ends with one summary line `done: val_loss=... train_loss=... wall_s=... tokens_per_s=...`.
"""

from __future__ import annotations

import argparse
import math
import time
from pathlib import Path
from typing import Callable

import torch
from tqdm import tqdm

from course.checkpoint import (atomic_write_json, capture_rng_state, load_checkpoint, restore_rng_state,
                               save_checkpoint)
from course.device import device_summary, get_device, set_seed
from course.errors import ConfigError, CourseError, run_cli
from course.paths import REPO_ROOT
from course.plots import plot_curves
from phase1_foundation.project1_minimal_gpt.config import GPTConfig
from phase1_foundation.project1_minimal_gpt.download_data import DATA_PATH, ensure_data
from phase1_foundation.project1_minimal_gpt.model import GPT

DEFAULT_OUT_DIR = REPO_ROOT / "checkpoints" / "project1"
TRAIN_CMD = "uv run python phase1_foundation/project1_minimal_gpt/train.py"
# Fields that fix the network's shape: a resumed run cannot change them.
ARCH_FIELDS = ("vocab_size", "block_size", "n_layer", "n_head", "n_embd", "bias")


# ---- data --------------------------------------------------------------------------------
def load_text(path: str | Path = DATA_PATH) -> str:
    """Read the training text; the default file is downloaded when missing."""
    path = Path(path)
    if not path.is_file():
        if path.resolve() == DATA_PATH.resolve():
            ensure_data(path)
        else:
            raise CourseError(f"data file not found: {path}; pass an existing --data_path or download "
                              "Tiny Shakespeare with: uv run python phase1_foundation/project1_minimal_gpt/"
                              "download_data.py")
    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError as e:
        raise CourseError(f"data file {path} is not UTF-8 text (byte {e.start}: {e.reason}); "
                          "pass a plain text file with --data_path") from None
    if len(text) < 100:
        raise CourseError(f"data file {path} has only {len(text)} characters; it needs at least 100 to train on")
    return text


def build_vocab(text: str) -> list[str]:
    """The sorted distinct characters of the text: the model's whole vocabulary (65 for Shakespeare)."""
    return sorted(set(text))


def encode(text: str, chars: list[str], what: str = "text") -> list[int]:
    """Characters -> ids. Unknown characters raise one CourseError that names them all."""
    stoi = {ch: i for i, ch in enumerate(chars)}
    unknown = sorted({ch for ch in text if ch not in stoi})
    if unknown:
        raise CourseError(f"{what} contains characters not in the model's vocabulary: "
                          f"{', '.join(repr(c) for c in unknown)}; the model knows only the {len(chars)} "
                          "characters of its training text")
    return [stoi[ch] for ch in text]


def decode(ids, chars: list[str]) -> str:
    return "".join(chars[i] for i in ids)


def split_data(ids: torch.Tensor, train_frac: float = 0.9) -> tuple[torch.Tensor, torch.Tensor]:
    """First 90% of the characters for training, the last 10% for validation (contiguous, so the
    validation text is genuinely unseen, not interleaved lines of the same scenes)."""
    n = int(train_frac * len(ids))
    return ids[:n], ids[n:]


def make_get_batch(train_data: torch.Tensor, val_data: torch.Tensor, block_size: int, batch_size: int,
                   device: torch.device) -> Callable[..., tuple[torch.Tensor, torch.Tensor]]:
    """Return get_batch(split, generator=None) -> (x, y), each (batch_size, block_size) on `device`.

    y is x shifted left by one: at every position the model predicts the next character, so one
    window of block_size + 1 characters gives block_size training examples at once.
    """
    for name, data in (("train", train_data), ("val", val_data)):
        if len(data) <= block_size + 1:
            raise CourseError(f"the {name} split has {len(data)} characters, fewer than block_size + 2 "
                              f"({block_size + 2}); use more text or a smaller --block_size")
    offsets = torch.arange(block_size + 1)

    def get_batch(split: str, generator: torch.Generator | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        data = train_data if split == "train" else val_data
        ix = torch.randint(len(data) - block_size - 1, (batch_size, 1), generator=generator)
        window = data[ix + offsets]                     # one gather instead of a Python loop
        x, y = window[:, :-1].contiguous(), window[:, 1:].contiguous()
        if device.type == "cuda":
            return x.pin_memory().to(device, non_blocking=True), y.pin_memory().to(device, non_blocking=True)
        return x.to(device), y.to(device)

    return get_batch


# ---- schedule and evaluation --------------------------------------------------------------
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


# ---- training -----------------------------------------------------------------------------
def _checkpoint(model, optimizer, cfg, chars, it, losses, best_val, history, seed) -> dict:
    return {"iter": it, "model_state_dict": model.state_dict(), "optimizer_state_dict": optimizer.state_dict(),
            "train_loss": losses["train"], "val_loss": losses["val"], "best_val_loss": best_val,
            "config": cfg.to_dict(), "chars": chars, "rng_state": capture_rng_state(),
            "history": history, "seed": seed}


def train(cfg: GPTConfig, *, data_path: str | Path = DATA_PATH, out_dir: str | Path = DEFAULT_OUT_DIR,
          device: str = "auto", seed: int = 1337, resume: bool = False, progress: bool = True,
          overrides: dict | None = None) -> dict:
    """Train (or resume) and return the summary dict (val_loss, train_loss, wall_s, tokens_per_s, ...).

    Exact resume: the training batches and dropout draw from the global RNGs, whose state is saved
    in every checkpoint; evaluation batches come from their own generator re-seeded at every
    evaluation (the same eval batches each time, and no effect on the training stream). So a run
    of 2N steps and a run of N steps + --resume + N steps end with identical weights.
    """
    t_wall = time.perf_counter()
    out_dir = Path(out_dir)
    dev = get_device(device)
    if dev.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = True  # TF32 tensor cores on Ampere+: ~fp32 quality, much faster
        torch.backends.cudnn.allow_tf32 = True
    text = load_text(data_path)

    state = None
    if resume:
        state = load_checkpoint(out_dir / "last.pt", map_location="cpu",
                                hint=f"nothing to resume; start a run without --resume: {TRAIN_CMD}")
        saved = GPTConfig.from_dict(state["config"])
        changed = [f for f in ARCH_FIELDS if f in (overrides or {}) and overrides[f] != getattr(saved, f)]
        if changed:
            raise ConfigError(f"cannot change {', '.join(changed)} when resuming (the checkpoint's network "
                              "has another shape); drop those flags or start a new run in another --out_dir")
        cfg = GPTConfig.from_dict({**saved.to_dict(), **(overrides or {})}).validate_config()
        chars = state["chars"]
        seed = state.get("seed", seed)
    else:
        chars = build_vocab(text)
        cfg.vocab_size = len(chars)
        cfg.validate_config()

    set_seed(seed)
    ids = torch.tensor(encode(text, chars), dtype=torch.long)
    train_data, val_data = split_data(ids)
    get_batch = make_get_batch(train_data, val_data, cfg.block_size, cfg.batch_size, dev)

    model = GPT(cfg).to(dev)
    optimizer = model.configure_optimizer(cfg.weight_decay, cfg.learning_rate, (cfg.beta1, cfg.beta2), dev.type)
    it, best_val = 0, float("inf")
    history: dict[str, list] = {"iter": [], "train": [], "val": [], "lr": []}
    if state is not None:
        model.load_state_dict(state["model_state_dict"])
        optimizer.load_state_dict(state["optimizer_state_dict"])
        it, best_val, history = state["iter"], state["best_val_loss"], state["history"]
        restore_rng_state(state["rng_state"])
    start_iter = it

    def eval_get_batch(split: str):  # fixed eval batches, independent of the training RNG stream
        return get_batch(split, generator=eval_gen)

    tokens_per_iter = cfg.batch_size * cfg.block_size
    print(f"model: {model.num_params():,} parameters | device: {device_summary(dev)} | "
          f"vocab {len(chars)} | train {len(train_data):,} chars, val {len(val_data):,} chars | "
          f"{tokens_per_iter:,} tokens/iter" + (f" | resuming from iter {it}" if resume else ""))

    budget = cfg.time_budget_s or None  # 0 = no limit
    horizon = cfg.lr_decay_iters or cfg.max_iters
    last_losses = {"train": float("nan"), "val": float("nan")}
    step_time, steps_done = 0.0, 0
    t_loop = time.perf_counter()
    bar = tqdm(total=cfg.max_iters, initial=it, desc="train", unit="it", disable=not progress,
               dynamic_ncols=True, mininterval=0.5)
    model.train()
    try:
        while True:
            elapsed = time.perf_counter() - t_loop
            out_of_time = budget is not None and elapsed >= budget
            finished = it >= cfg.max_iters or out_of_time
            if (it % cfg.eval_interval == 0 and it != start_iter) or finished or (it == 0 and start_iter == 0):
                eval_gen = torch.Generator(device="cpu").manual_seed(seed + 1)
                losses = estimate_loss(model, eval_get_batch, cfg.eval_iters)
                last_losses = losses
                history["iter"].append(it)
                history["train"].append(losses["train"])
                history["val"].append(losses["val"])
                history["lr"].append(cosine_lr(it, cfg.warmup_iters, horizon, cfg.learning_rate, cfg.min_lr))
                bar.write(f"iter {it}: train loss {losses['train']:.4f}, val loss {losses['val']:.4f}")
                if losses["val"] < best_val:
                    best_val = losses["val"]
                    save_checkpoint(out_dir / "ckpt.pt", _checkpoint(model, optimizer, cfg, chars, it, losses,
                                                                      best_val, history, seed))
                save_checkpoint(out_dir / "last.pt", _checkpoint(model, optimizer, cfg, chars, it, losses,
                                                                  best_val, history, seed))
            if finished:
                break

            # With a wall-clock budget the cosine must end when time runs out: estimate the horizon
            # from the iterations/second measured so far in this run (evaluations included).
            if budget is not None and steps_done >= 10:
                rate = steps_done / elapsed
                horizon = min(cfg.lr_decay_iters or cfg.max_iters, it + int(rate * (budget - elapsed)))
            lr = cosine_lr(it, cfg.warmup_iters, horizon, cfg.learning_rate, cfg.min_lr)
            for group in optimizer.param_groups:
                group["lr"] = lr

            t0 = time.perf_counter()
            x, y = get_batch("train")
            _, loss = model(x, y)
            loss.backward()
            if cfg.grad_clip > 0:
                torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.grad_clip, foreach=True)
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            it += 1
            steps_done += 1
            if it % cfg.log_interval == 0:  # .item() waits for the device: only this often
                loss_value = loss.item()
                step_time += time.perf_counter() - t0  # this step included, after the device finished it
                bar.set_postfix(loss=f"{loss_value:.4f}", lr=f"{lr:.2e}",
                                tok_s=f"{tokens_per_iter * steps_done / max(step_time, 1e-9):,.0f}", refresh=False)
            else:
                step_time += time.perf_counter() - t0
            bar.update(1)
    except KeyboardInterrupt:
        bar.close()
        saved = out_dir / "last.pt"
        where = (f"the last complete checkpoint is {saved}; continue with: {TRAIN_CMD} --resume --out_dir {out_dir}"
                 if saved.is_file() else f"nothing was saved yet; start again with: {TRAIN_CMD}")
        raise CourseError(f"training interrupted at iter {it}; {where}") from None
    bar.close()

    wall = time.perf_counter() - t_wall
    summary = {"val_loss": last_losses["val"], "train_loss": last_losses["train"], "best_val_loss": best_val,
               "iters": it, "iters_this_run": steps_done, "wall_s": wall, "train_step_s": step_time,
               "tokens_per_s": tokens_per_iter * steps_done / step_time if step_time > 0 else 0.0,
               "tokens_seen_this_run": tokens_per_iter * steps_done, "params": model.num_params(),
               "device": device_summary(dev), "stopped_by": "time_budget" if out_of_time else "max_iters",
               "seed": seed, "config": cfg.to_dict(), "history": history}
    atomic_write_json(out_dir / "metrics.json", summary)
    if len(history["iter"]) > 1:
        plot_curves(out_dir / "loss.png", {"train": (history["iter"], history["train"]),
                                           "val": (history["iter"], history["val"])},
                    title=f"char-level GPT on Tiny Shakespeare ({model.num_params() / 1e6:.2f}M params)",
                    xlabel="iteration", ylabel="cross-entropy loss (nats/char)")
    print(f"saved: {out_dir / 'ckpt.pt'} (best val {best_val:.4f}), {out_dir / 'last.pt'}, "
          f"{out_dir / 'metrics.json'}, {out_dir / 'loss.png'}")
    print(f"done: val_loss={summary['val_loss']:.4f} train_loss={summary['train_loss']:.4f} "
          f"wall_s={wall:.0f} tokens_per_s={summary['tokens_per_s']:.0f}")
    return summary


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data_path", default=str(DATA_PATH), help="training text (default: %(default)s)")
    parser.add_argument("--out_dir", default=str(DEFAULT_OUT_DIR),
                        help="where checkpoints, metrics.json and loss.png go (default: %(default)s)")
    parser.add_argument("--device", default="auto", help="auto (cuda > mps > cpu), cpu, cuda or mps")
    parser.add_argument("--seed", type=int, default=1337, help="random seed (default: %(default)s)")
    parser.add_argument("--resume", action="store_true",
                        help="continue from OUT_DIR/last.pt (its config; flags given here override "
                             "training fields such as --max_iters)")
    parser.add_argument("--no_progress", action="store_true", help="no tqdm bar (for logs)")
    GPTConfig.add_args(parser, default_preset="cpu")
    return parser


def main(argv: list[str] | None = None) -> dict:
    args = build_parser().parse_args(argv)
    overrides = {k[len("cfg__"):]: v for k, v in vars(args).items() if k.startswith("cfg__") and v is not None}
    cfg = GPTConfig.from_args(args)
    if not args.resume:
        cfg.print_config(f"GPTConfig (preset {args.preset})")
    return train(cfg, data_path=args.data_path, out_dir=args.out_dir, device=args.device, seed=args.seed,
                 resume=args.resume, progress=not args.no_progress, overrides=overrides)


if __name__ == "__main__":
    run_cli(main)
