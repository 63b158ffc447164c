"""Train project 3's `cpu` model in one precision mode, on project 3's token shards.

    uv run python phase3_core_inference/project7_mixed_precision/train.py --mode fp32
    uv run python phase3_core_inference/project7_mixed_precision/train.py --mode fp16_scaled
    uv run python phase3_core_inference/project7_mixed_precision/train.py --mode bf16_pure_kahan --max_iters 500
    uv run python phase3_core_inference/project7_mixed_precision/train.py --preset gpu --mode bf16_autocast

MODES (mixed_precision.py): fp32, fp16_scaled, fp16_unscaled, bf16_master, bf16_autocast, fp16_autocast,
bf16_pure, bf16_pure_sr, bf16_pure_kahan. Every mode starts from the same fp32 weights (--seed) and sees the same
batches, so two runs differ only in their arithmetic.

Writes OUT_DIR/<mode>/: log.jsonl (train loss, loss scale, skipped steps, lost-update statistics, evaluations),
curves.png, and ckpt.pt (the trained weights in fp32 with project 3's model config: project 3's generate.py and
evaluate.py load it). The run ends with one line `done: mode=... val_loss=... tokens_per_s=...`. Runs are minutes
long and not resumable: Ctrl-C ends in one line and the next run starts over.
"""

from __future__ import annotations

from course.checkpoint import atomic_write_json, remove_stale_temps, save_checkpoint
from course.cli import ArgumentParser, warn_if_gpu_preset_without_gpu
from course.config import parse_configs
from course.device import device_summary, get_device
from course.errors import ConfigError, CourseError, run_cli
from course.paths import repo_path
from course.plots import plot_curves
from phase1_foundation.project3_pretrain.config import LlamaConfig
from phase3_core_inference.project7_mixed_precision.config import MixedPrecisionConfig
from phase3_core_inference.project7_mixed_precision.mixed_precision import MODES
from phase3_core_inference.project7_mixed_precision.training import (
    TRAIN_CMD,
    load_data,
    run,
)


def build_parser() -> ArgumentParser:
    parser = ArgumentParser(description=__doc__)
    parser.add_argument("--device", default="auto", help="auto (cuda > mps > cpu), cpu, cuda or mps")
    parser.add_argument("--seed", type=int, default=1337, help="initial weights and batches (default: %(default)s)")
    parser.add_argument("--no_progress", action="store_true", help="no tqdm bar (for logs)")
    return parser


def main(argv: list[str] | None = None) -> dict:
    args, mcfg, cfg = parse_configs(build_parser(), LlamaConfig, MixedPrecisionConfig, argv=argv,
                                    default_preset="cpu")
    warn_if_gpu_preset_without_gpu(args.preset, args.device)
    out_dir = repo_path(cfg.out_dir) / cfg.mode
    if out_dir.parent.exists() and not out_dir.parent.is_dir():
        raise ConfigError(f"out_dir {out_dir.parent} is an existing file, not a folder; pick another --out_dir")
    device = get_device(args.device)
    data = load_data(cfg, mcfg)  # before anything is printed: a missing corpus is one line
    mcfg.print_config(f"LlamaConfig (preset {args.preset})")
    cfg.print_config(f"MixedPrecisionConfig (preset {args.preset})")
    print(f"mode {cfg.mode}: {MODES[cfg.mode].summary} | device {device_summary(device)}")
    out_dir.mkdir(parents=True, exist_ok=True)
    remove_stale_temps(out_dir)
    try:
        result = run(mcfg, cfg, cfg.mode, device, seed=args.seed, data=data, progress=not args.no_progress,
                     log_path=out_dir / "log.jsonl")
    except KeyboardInterrupt:
        raise CourseError(f"training interrupted; nothing was saved (runs are short and start over): "
                          f"{TRAIN_CMD} --mode {cfg.mode}") from None
    s, trainer = result.summary, result.trainer
    save_checkpoint(out_dir / "ckpt.pt", {
        "iter": s["iters"], "model_state_dict": trainer.fp32_state_dict(), "train_loss": s["train_loss"],
        "val_loss": s["val_loss"], "arch": "llama", "model_config": trainer.model.config.to_dict(),
        "mixed_precision_config": cfg.to_dict(), "mode": cfg.mode, "seed": args.seed,
        "optimizer_state_dict": trainer.optimizer.state_dict(), "summary": s})
    evals = [r for r in result.history if r["kind"] == "eval"]
    train = [r for r in result.history if r["kind"] == "train"]
    plot_curves(out_dir / "curves.png", {"train (batch)": ([r["iter"] for r in train], [r["loss"] for r in train]),
                                         "val": ([r["iter"] for r in evals], [r["val_loss"] for r in evals])},
                title=f"{cfg.mode}: {MODES[cfg.mode].summary}")
    atomic_write_json(out_dir / "summary.json", s)
    print(f"saved: {out_dir / 'ckpt.pt'}, {out_dir / 'log.jsonl'}, {out_dir / 'curves.png'}")
    scale = f" final_scale={s['final_scale']:g}" if s["final_scale"] is not None else ""
    print(f"done: mode={cfg.mode} iters={s['iters']} val_loss={s['val_loss']:.4f} tokens_per_s={s['tokens_per_s']:,.0f} "
          f"state_bytes={s['total_bytes']:,} skipped={s['skipped']}{scale}")
    return s


if __name__ == "__main__":
    run_cli(main)
