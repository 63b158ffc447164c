"""Supervised fine-tuning: a pretrained model learns to answer in turns, trained on the assistant's tokens only.

    uv run python phase2_finetuning/project4_sft/train_sft.py                      # cpu preset: our project 3 model
    uv run python phase2_finetuning/project4_sft/train_sft.py --resume             # exact resume from OUT_DIR
    uv run python phase2_finetuning/project4_sft/train_sft.py --base data/smollm2/SmolLM2-135M-Instruct.Q4_1.gguf \\
        --data identity,alpaca --max_chats 600 --learning_rate 3e-5 --min_lr 3e-6 --batch_size 8 --block_size 256 \\
        --max_iters 150 --out_dir checkpoints/project4/smollm2-identity

PAPERS
    Ouyang et al., 2022 (InstructGPT): SFT on demonstrations.  Zhou et al., 2023 (LIMA): responses-only loss,
    an end-of-turn token on every turn.  Wei et al., 2021 (FLAN): many tasks phrased as instructions.
    Loshchilov & Hutter, 2019 (AdamW), 2017 (cosine schedule); Pascanu et al., 2013 (gradient clipping).

The training machinery is project 3's (AdamW from `configure_optimizer`, project 1's `cosine_lr`, clipping,
atomic checkpoints through `course.checkpoint`), in loop.py's `sft_loop` (project 5's LoRA runs the same loop); what is new is the data: chats rendered with the model's
template, the loss on assistant tokens only (masking.py), optionally packed (packing.py).

Before and after training the run measures, on held-out chats it never trains on:
    held-out loss      mean cross-entropy over the assistant tokens of the held-out chats
    end-of-turn share  the share of held-out prompts whose greedy answer writes the end token within
                       --gen_budget new tokens (a base model has never seen that token: about 0%)
    identity share     with --data including identity: the share of held-out identity questions (phrased
                       with other words than any training chat) whose answer names the identity
OUT_DIR gets ckpt.pt (a project 3 checkpoint: every loader of the course reads it), tokenizer.pkl,
tokenizer_config.json (the chat template, in Hugging Face's layout), log.jsonl, loss.png, results.json.
"""

from __future__ import annotations

import json
import math

import torch

from course.checkpoint import (atomic_write_json, capture_rng_state, load_checkpoint, remove_stale_temps,
                               restore_rng_state, save_checkpoint)
from course.device import get_device, set_seed
from course.errors import ConfigError, run_cli
from course.paths import repo_path
from course.plots import plot_curves
from phase2_finetuning.project4_sft.config import SFTConfig
from phase2_finetuning.project4_sft.loop import describe, measure, parse_finetune_args, precision, sft_loop
from phase2_finetuning.project4_sft.sft import (RowSampler, checkpoint_meta, load_chat_model, prepare_base,
                                                save_chat_format_for, training_rows)

TRAIN_CMD = "uv run python phase2_finetuning/project4_sft/train_sft.py"


def train(cfg: SFTConfig, *, seed: int = 1337, resume: bool = False, overrides: dict | None = None,
          progress: bool = True, stop_at: int | None = None) -> dict:
    """Fine-tune (or resume) and return the summary. `stop_at` pauses after that step with a checkpoint, as a
    Ctrl-C at a step boundary would (the resume test: N steps + --resume equals one uninterrupted run)."""
    out_dir = repo_path(cfg.out_dir)
    state = None
    if resume:
        state = load_checkpoint(out_dir / "ckpt.pt", map_location="cpu",
                                hint=f"nothing to resume in {out_dir}; start without --resume: {TRAIN_CMD}")
        if "sft_config" not in state:
            raise ConfigError(f"{out_dir}/ckpt.pt was not written by train_sft.py; nothing to resume")
        cfg = SFTConfig.from_dict({**state["sft_config"], **(overrides or {})}).validate_config()
        seed = state["seed"]
    if cfg.threads is not None:
        torch.set_num_threads(cfg.threads)
    dev = get_device(cfg.device)
    set_seed(seed)
    remove_stale_temps(out_dir)
    cm = load_chat_model(str(out_dir), dev) if resume else prepare_base(cfg.base, cfg.tokenizer, dev)
    model = cm.model
    print(f"base {cfg.base}: {model.num_params():,} parameters; {cm.note}")
    tr = training_rows(cm, cfg, seed)
    data, rows, stats, held_rows, pad, block = tr.data, tr.rows, tr.stats, tr.held_rows, tr.pad, tr.block
    sampler = RowSampler(len(rows), seed)
    autocast, scaler = precision(dev, cfg.dtype)
    optimizer = model.configure_optimizer(cfg.weight_decay, cfg.learning_rate, (cfg.beta1, cfg.beta2), dev.type)
    it, before = 0, None
    if state is not None:
        optimizer.load_state_dict(state["optimizer_state_dict"])
        scaler.load_state_dict(state["scaler_state_dict"])
        sampler.load_state_dict(state["sampler"])
        restore_rng_state(state["rng_state"])
        it, before = state["iter"], state["before"]
    else:
        out_dir.mkdir(parents=True, exist_ok=True)
        save_chat_format_for(out_dir, cm)
        with autocast:
            before = measure(cm, cfg, data, held_rows, pad, dev)
        print(f"before: {describe(before)}")
        if before.get("example"):
            print(f"  e.g. {before['example']!r}")

    log_path = out_dir / "log.jsonl"
    if not resume and log_path.exists():
        log_path.unlink()
    log = open(log_path, "a")

    def record(rec: dict) -> None:
        log.write(json.dumps(rec) + "\n")
        log.flush()

    def save(it: int, losses: dict, snapshot: tuple | None = None) -> None:
        """A checkpoint at a step boundary; `snapshot` = (sampler, RNG) states taken when the step began."""
        sampler_state, rng_state = snapshot or (sampler.state_dict(), capture_rng_state())
        save_checkpoint(out_dir / "ckpt.pt", {
            "iter": it, "model_state_dict": model.state_dict(), "optimizer_state_dict": optimizer.state_dict(),
            "scaler_state_dict": scaler.state_dict(), "train_loss": losses.get("train"),
            "val_loss": losses.get("heldout"), "arch": "llama", "model_config": model.config.to_dict(),
            "data_meta": checkpoint_meta(out_dir), "sft_config": cfg.to_dict(), "seed": seed,
            "rng_state": rng_state, "sampler": sampler_state, "before": before, "base": cfg.base})

    res = sft_loop(model, optimizer, list(model.parameters()), rows, sampler, cfg, pad=pad, block=block, device=dev,
                   autocast=autocast, scaler=scaler, start_it=it, held_rows=held_rows, record=record, save=save,
                   saved_to=str(out_dir / "ckpt.pt"), resume_hint=f"{TRAIN_CMD} --resume --out_dir {cfg.out_dir}",
                   progress=progress, stop_at=stop_at)
    log.close()
    it = res.iters
    if res.paused:
        return {"iters": it, "paused": True}
    if state is not None and it == state["iter"]:
        save(it, {"train": state.get("train_loss"), "heldout": state.get("val_loss")})

    with autocast:
        after = measure(cm, cfg, data, held_rows, pad, dev)
    plot_losses(out_dir)
    summary = {"base": cfg.base, "iters": it, "train_rows": stats.rows, "truncated": stats.truncated,
               "before": before, "after": after}
    atomic_write_json(out_dir / "results.json", summary)
    print(f"after: {describe(after)}")
    if after.get("example"):
        print(f"  e.g. {after['example']!r}")
    print(f"saved: {out_dir / 'ckpt.pt'}, tokenizer_config.json, loss.png, results.json")
    print(f"done: iters={it} heldout_loss {before['heldout_loss']:.4f} -> {after['heldout_loss']:.4f}"
          + (f" end_of_turn {100 * before['end_of_turn']:.1f}% -> {100 * after['end_of_turn']:.1f}%"
             if "end_of_turn" in after else "")
          + (f" identity {100 * before['identity']:.1f}% -> {100 * after['identity']:.1f}%"
             if "identity" in after else ""))
    return summary


def plot_losses(out_dir) -> None:
    recs = [json.loads(line) for line in open(out_dir / "log.jsonl") if line.strip()]
    train = [(r["iter"], r["loss"]) for r in recs if r["kind"] == "train" and math.isfinite(r["loss"])]
    held = [(r["iter"], r["heldout_loss"]) for r in recs if r["kind"] == "eval"]
    curves = {name: ([x for x, _ in pts], [y for _, y in pts]) for name, pts in
              (("train (assistant tokens)", train), ("held-out (assistant tokens)", held)) if pts}
    if curves:
        plot_curves(out_dir / "loss.png", curves, title="SFT loss", xlabel="step")


def main(argv: list[str] | None = None) -> dict:
    args, cfg = parse_finetune_args(__doc__, SFTConfig, argv)
    return train(cfg, seed=args.seed, resume=args.resume, overrides=args.overrides, progress=not args.no_progress)


if __name__ == "__main__":
    run_cli(main)
