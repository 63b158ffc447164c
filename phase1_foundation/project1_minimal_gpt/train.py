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

import time
from pathlib import Path

import torch
from tqdm import tqdm

from course.checkpoint import atomic_write_json, remove_stale_temps, restore_rng_state, save_checkpoint
from course.cli import ArgumentParser, out_dir as out_dir_type, warn_if_gpu_preset_without_gpu
from course.config import parse_configs
from course.device import device_summary, get_device, set_seed
from course.errors import ConfigError, CourseError, check_finite_loss, run_cli
from course.plots import plot_curves
from phase1_foundation.project1_minimal_gpt.config import GPTConfig
from phase1_foundation.project1_minimal_gpt.data import (DATA_PATH, DEFAULT_OUT_DIR, TRAIN_CMD, build_vocab,
                                                         encode, load_text, make_get_batch, split_data)
from phase1_foundation.project1_minimal_gpt.model import GPT
from phase1_foundation.project1_minimal_gpt.schedule import cosine_lr, estimate_loss
from phase1_foundation.project1_minimal_gpt.training import ARCH_FIELDS, checkpoint_state, load_state, load_weights


# ---- training -----------------------------------------------------------------------------
def train(cfg: GPTConfig, *, data_path: str | Path = DATA_PATH, out_dir: str | Path = DEFAULT_OUT_DIR,
          device: str = "auto", seed: int = 1337, resume: bool = False, progress: bool = True,
          overrides: dict | None = None, preset_given: bool = False) -> dict:
    """Train (or resume) and return the summary dict (val_loss, train_loss, wall_s, tokens_per_s, ...).

    Exact resume: the training batches and dropout draw from the global RNGs, whose state is saved
    in every checkpoint; evaluation batches come from their own generator re-seeded at every
    evaluation (the same eval batches each time, and no effect on the training stream). So a run
    of 2N steps and a run of N steps + --resume + N steps end with identical weights.

    Stops with one line (non-zero exit through run_cli) when the loss becomes nan/inf, before that
    state is saved; Ctrl-C or SIGTERM (also during a save, which completes first) ends with the
    --resume hint.
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
        if preset_given:
            raise ConfigError("--preset cannot be combined with --resume (the run continues with its checkpoint's "
                              "config); drop --preset, or start a new run in another --out_dir")
        if not (out_dir / "last.pt").is_file():
            raise CourseError(f"checkpoint not found: {out_dir / 'last.pt'}; nothing to resume; start a run "
                              f"without --resume: {TRAIN_CMD}")
        state, saved = load_state(out_dir / "last.pt")
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

    remove_stale_temps(out_dir)  # a save killed outright in an earlier run; nothing of this run is in flight yet
    set_seed(seed)
    ids = torch.tensor(encode(text, chars), dtype=torch.long)
    train_data, val_data = split_data(ids)
    get_batch = make_get_batch(train_data, val_data, cfg.block_size, cfg.batch_size, dev)

    model = GPT(cfg).to(dev)
    optimizer = model.configure_optimizer(cfg.weight_decay, cfg.learning_rate, (cfg.beta1, cfg.beta2), dev.type)
    it, best_val = 0, float("inf")
    history: dict[str, list] = {"iter": [], "train": [], "val": [], "lr": []}
    if state is not None:
        load_weights(model, state, out_dir / "last.pt")
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
                for value in losses.values():  # before saving: a diverged model never overwrites a good one
                    check_finite_loss(value, it, _last_good(out_dir))
                if losses["val"] < best_val:
                    best_val = losses["val"]
                    save_checkpoint(out_dir / "ckpt.pt", checkpoint_state(model, optimizer, cfg, chars, it, losses,
                                                                          best_val, history, seed))
                save_checkpoint(out_dir / "last.pt", checkpoint_state(model, optimizer, cfg, chars, it, losses,
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
                loss_value = check_finite_loss(loss.item(), it, _last_good(out_dir))
                step_time += time.perf_counter() - t0  # this step included, after the device finished it
                bar.set_postfix(loss=f"{loss_value:.4f}", lr=f"{lr:.2e}",
                                tok_s=f"{tokens_per_iter * steps_done / max(step_time, 1e-9):,.0f}", refresh=False)
            else:
                step_time += time.perf_counter() - t0
            bar.update(1)
    except CourseError:  # e.g. the loss became nan: the bar must not share the error's line
        bar.close()
        raise
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


def _last_good(out_dir: Path) -> str:
    last = out_dir / "last.pt"
    return (f"the last good checkpoint is {last} (continue it with --resume and a lower --learning_rate)"
            if last.is_file() else "nothing was saved")


def build_parser() -> ArgumentParser:
    """The script's own flags; main() adds GPTConfig's (--preset and one flag per field)."""
    parser = ArgumentParser(description=__doc__)
    parser.add_argument("--data_path", default=str(DATA_PATH), help="training text, UTF-8 (default: %(default)s)")
    parser.add_argument("--out_dir", type=out_dir_type, default=DEFAULT_OUT_DIR,
                        help="where checkpoints, metrics.json and loss.png go (default: %(default)s)")
    parser.add_argument("--device", default="auto", help="auto (cuda > mps > cpu), cpu, cuda or mps")
    parser.add_argument("--seed", type=int, default=1337, help="random seed (default: %(default)s)")
    parser.add_argument("--resume", action="store_true",
                        help="continue from OUT_DIR/last.pt with its config; flags given here override training "
                             "fields such as --max_iters (shape flags and --preset are refused)")
    parser.add_argument("--no_progress", action="store_true", help="no tqdm bar (for logs)")
    return parser


def main(argv: list[str] | None = None) -> dict:
    args, cfg = parse_configs(build_parser(), GPTConfig, argv=argv, default_preset="cpu")
    if not args.resume:
        warn_if_gpu_preset_without_gpu(args.preset, args.device)
        cfg.print_config(f"GPTConfig (preset {args.preset})")
    return train(cfg, data_path=args.data_path, out_dir=args.out_dir, device=args.device, seed=args.seed,
                 resume=args.resume, progress=not args.no_progress, overrides=args.overrides,
                 preset_given=args.preset_given)


if __name__ == "__main__":
    run_cli(main)
