"""LoRA and QLoRA fine-tuning: the base stays frozen (QLoRA: in 4 bits), small adapters learn the task.

    uv run python phase2_finetuning/project5_lora/train_lora.py                         # cpu preset: LoRA on SmolLM2
    uv run python phase2_finetuning/project5_lora/train_lora.py --method qlora --out_dir checkpoints/project5/qlora
    uv run python phase2_finetuning/project5_lora/train_lora.py --resume                # exact resume from OUT_DIR
    uv run python phase2_finetuning/project5_lora/train_lora.py --resume --merge        # + OUT_DIR/merged (HF folder)

PAPERS
    Hu et al., 2021 (LoRA): frozen W0, trained low-rank B A, scale alpha / r, mergeable.
    Dettmers et al., 2023 (QLoRA): the frozen base in NF4 with double quantisation; gradients flow through it.
    Aghajanyan et al., 2020 (intrinsic dimensionality): why so few trainable numbers are enough.

Everything but the trainable parameters is project 4's run: the same data mix and held-out splits
(load_sft_data), the same masking (assistant tokens only), the same loop (loop.sft_loop: warmup + cosine,
accumulation, clipping, non-finite loss stops, Ctrl-C saves and prints the --resume command) and the same
before/after numbers (held-out loss, end-of-turn share, identity share). What differs: the optimizer holds only
the adapters (AdamW over r * (in + out) numbers per wrapped layer), and a checkpoint is the adapter, not the model.

OUT_DIR gets adapter_config.json + adapter_model.safetensors (peft's layout: `PeftModel.from_pretrained(model,
OUT_DIR)` loads it), lora_state.pt (optimizer, sampler, RNG: what --resume needs), tokenizer.pkl and
tokenizer_config.json (the chat format), log.jsonl, loss.png, results.json; with --merge also merged/ (the
adapters merged into the base: a Hugging Face folder project 3's loader and project 8's generate.py read).
"""

from __future__ import annotations

import json
import math

import torch

from course.checkpoint import (
    atomic_write_json,
    capture_rng_state,
    load_checkpoint,
    remove_stale_temps,
    restore_rng_state,
    save_checkpoint,
)
from course.device import get_device, set_seed
from course.errors import ConfigError, CourseError, run_cli
from course.paths import repo_path
from course.plots import plot_curves
from phase2_finetuning.project4_sft.loop import describe, measure, parse_finetune_args, precision, sft_loop
from phase2_finetuning.project4_sft.sft import RowSampler, save_chat_format_for, training_rows
from phase2_finetuning.project5_lora.config import LoRAConfig
from phase2_finetuning.project5_lora.finetune import (
    adapter_optimizer,
    export_merged,
    optimizer_state_bytes,
    prepare_adapters,
)
from phase2_finetuning.project5_lora.lora import (
    count_trainable,
    lora_layers,
    save_adapter,
)

TRAIN_CMD = "uv run python phase2_finetuning/project5_lora/train_lora.py"
STATE = "lora_state.pt"


def adapter_state(model) -> dict[str, torch.Tensor]:
    return {f"{n}.{w}": getattr(m, f"lora_{w}").detach().cpu().clone() for n, m in lora_layers(model).items()
            for w in "AB"}


def load_adapter_state(model, tensors: dict[str, torch.Tensor], source: str) -> None:
    layers = lora_layers(model)
    want = {f"{n}.{w}" for n in layers for w in "AB"}
    if set(tensors) != want:
        raise CourseError(f"{source}: its adapters ({len(tensors)} matrices) do not match the layers this config "
                          f"wraps ({len(want)}); resume with the run's own config")
    for key, t in tensors.items():
        name, _, w = key.rpartition(".")
        p = getattr(layers[name], f"lora_{w}")
        if p.shape != t.shape:
            raise CourseError(f"{source}: adapter {key} has shape {tuple(t.shape)}, the model's is {tuple(p.shape)}")
        with torch.no_grad():
            p.copy_(t)


def train(cfg: LoRAConfig, *, seed: int = 1337, resume: bool = False, overrides: dict | None = None,
          progress: bool = True, stop_at: int | None = None, merge: bool = False) -> dict:
    """Fine-tune the adapters (or resume) and return the summary; `stop_at` pauses with a checkpoint after that
    step (the resume test), `merge` writes OUT_DIR/merged at the end."""
    out_dir = repo_path(cfg.out_dir)
    if out_dir.exists() and not out_dir.is_dir():
        raise CourseError(f"--out_dir {out_dir} is a file; pass a folder")
    state = None
    if resume:
        state = load_checkpoint(out_dir / STATE, map_location="cpu",
                                hint=f"nothing to resume in {out_dir}; start without --resume: {TRAIN_CMD}")
        if not isinstance(state, dict) or "lora_config" not in state:
            raise ConfigError(f"{out_dir / STATE} was not written by train_lora.py; nothing to resume")
        cfg = LoRAConfig.from_dict({**state["lora_config"], **(overrides or {})}).validate_config()
        seed = state["seed"]
    if cfg.threads is not None:
        torch.set_num_threads(cfg.threads)
    dev = get_device(cfg.device)
    set_seed(seed)
    remove_stale_temps(out_dir)
    prep = prepare_adapters(cfg, dev)
    cm, model = prep.cm, prep.cm.model
    print(f"base {cfg.base}: {cm.note}")
    for note in prep.notes:
        print(f"note: {note}")
    print(f"{cfg.method}: {prep.summary()}")
    tr = training_rows(cm, cfg, seed)
    data, rows, stats, held_rows, pad, block = tr.data, tr.rows, tr.stats, tr.held_rows, tr.pad, tr.block
    sampler = RowSampler(len(rows), seed)
    autocast, scaler = precision(dev, cfg.dtype)
    optimizer = adapter_optimizer(model, cfg, dev.type)
    it, before = 0, None
    if state is not None:
        load_adapter_state(model, state["adapters"], str(out_dir / STATE))
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

    log_path = out_dir / "log.jsonl"
    if not resume and log_path.exists():
        log_path.unlink()
    with open(log_path, "a") as log:
        def record(rec: dict) -> None:
            log.write(json.dumps(rec) + "\n")
            log.flush()

        def save(it: int, losses: dict, snapshot: tuple | None = None) -> None:
            """The adapter in peft's layout, then the resume state (the source of truth for --resume)."""
            sampler_state, rng_state = snapshot or (sampler.state_dict(), capture_rng_state())
            save_adapter(model, out_dir, base_model_name_or_path=cfg.base)
            save_checkpoint(out_dir / STATE, {
                "iter": it, "adapters": adapter_state(model), "optimizer_state_dict": optimizer.state_dict(),
                "scaler_state_dict": scaler.state_dict(), "train_loss": losses.get("train"),
                "val_loss": losses.get("heldout"), "lora_config": cfg.to_dict(), "seed": seed, "rng_state": rng_state,
                "sampler": sampler_state, "before": before, "base": cfg.base, "wrapped": prep.wrapped})

        res = sft_loop(model, optimizer, [p for g in optimizer.param_groups for p in g["params"]], rows, sampler, cfg,
                       pad=pad, block=block, device=dev, autocast=autocast, scaler=scaler, start_it=it,
                       held_rows=held_rows, record=record, save=save, saved_to=str(out_dir / STATE),
                       resume_hint=f"{TRAIN_CMD} --resume --out_dir {cfg.out_dir}", progress=progress, stop_at=stop_at,
                       desc=cfg.method)
    it = res.iters
    if res.paused:
        return {"iters": it, "paused": True}
    if state is not None and it == state["iter"]:
        save(it, {"train": state.get("train_loss"), "heldout": state.get("val_loss")})

    with autocast:
        after = measure(cm, cfg, data, held_rows, pad, dev)
    plot_losses(out_dir)
    trainable, total = count_trainable(model)
    summary = {"base": cfg.base, "method": cfg.method, "iters": it, "train_rows": stats.rows,
               "truncated": stats.truncated, "trainable_params": trainable, "total_params": total,
               "optimizer_state_bytes": optimizer_state_bytes(optimizer), "before": before, "after": after,
               "trained_tokens_per_s": res.tokens / res.train_seconds if res.train_seconds else None}
    if prep.memory is not None:
        summary.update(nf4_base_bytes=prep.memory.measured_bytes, nf4_bytes_per_param=prep.memory.bytes_per_param)
    print(f"after: {describe(after)}")
    if after.get("example"):
        print(f"  e.g. {after['example']!r}")
    if merge:
        merged = export_merged(model, out_dir / "merged", tokenizer_dir=out_dir)
        summary["merged"] = str(merged)
        print(f"merged model (Hugging Face folder): {merged}")
    atomic_write_json(out_dir / "results.json", summary)
    print(f"saved: {out_dir} (adapter_config.json, adapter_model.safetensors, {STATE}, loss.png, results.json)")
    print(f"done: method={cfg.method} iters={it} trainable {trainable:,} of {total:,} ({100 * trainable / total:.2f}%) "
          f"heldout_loss {before['heldout_loss']:.4f} -> {after['heldout_loss']:.4f}"
          + (f" end_of_turn {100 * before['end_of_turn']:.1f}% -> {100 * after['end_of_turn']:.1f}%"
             if "end_of_turn" in after else "")
          + (f" identity {100 * before['identity']:.1f}% -> {100 * after['identity']:.1f}%"
             if "identity" in after else ""))
    return summary


def plot_losses(out_dir) -> None:
    with open(out_dir / "log.jsonl") as f:
        recs = [json.loads(line) for line in f if line.strip()]
    train = [(r["iter"], r["loss"]) for r in recs if r["kind"] == "train" and math.isfinite(r["loss"])]
    held = [(r["iter"], r["heldout_loss"]) for r in recs if r["kind"] == "eval"]
    curves = {name: ([x for x, _ in pts], [y for _, y in pts]) for name, pts in
              (("train (assistant tokens)", train), ("held-out (assistant tokens)", held)) if pts}
    if curves:
        plot_curves(out_dir / "loss.png", curves, title="LoRA loss", xlabel="step")


def main(argv: list[str] | None = None) -> dict:
    def merge_flag(parser):
        parser.add_argument("--merge", action="store_true",
                            help="at the end, write OUT_DIR/merged: the adapters merged into the base, as an HF folder")
    args, cfg = parse_finetune_args(__doc__, LoRAConfig, argv, state_file=STATE, add_args=merge_flag)
    if args.resume:
        shape = sorted(set(args.overrides) & {"method", "r", "lora_alpha", "target_modules", "use_rslora", "base",
                                              "nf4_blocksize", "double_quant", "tokenizer"})
        if shape:
            raise ConfigError(f"--resume keeps the saved run's adapters and base; drop --{', --'.join(shape)}")
    return train(cfg, seed=args.seed, resume=args.resume, overrides=args.overrides, progress=not args.no_progress,
                 merge=args.merge)


if __name__ == "__main__":
    run_cli(main)
