"""Every precision mode on the same data, weights and steps: the README's table and its three plots.

    uv run python phase3_core_inference/project7_mixed_precision/benchmark.py --threads 1   # cpu preset, ~10 min
    uv run python phase3_core_inference/project7_mixed_precision/benchmark.py --quick       # 20 steps: a smoke test
    uv run python phase3_core_inference/project7_mixed_precision/benchmark.py --modes fp32,bf16_pure,bf16_pure_kahan
    uv run python phase3_core_inference/project7_mixed_precision/benchmark.py --preset gpu --device cuda

WHAT IT MEASURES (written to OUT_DIR/benchmark/: results.json, table.md, and the PNGs)
    per mode     final val loss at equal steps (fp32 evaluation of the trained weights, the same windows for every
                 mode), its distance from fp32, tokens/s, bytes of weights + gradients + optimizer state at their
                 peak (counted from the tensors themselves), skipped steps (loss scaling), the step it diverged at
    the fix      how much of pure bf16's gap to fp32 each fix closes: (pure - fix) / (pure - fp32)
    val_loss.png         the val-loss curves of every mode
    grad_underflow.png   histogram of the fp32 weight gradients (log2 |g|) against fp16's subnormal and zero
                         thresholds, for this batch and for the per-token gradients of a 512x larger batch (gradient
                         accumulation divides each micro-batch's loss by the number of micro-batches), without and
                         with the loss scale; the shares are measured from real fp16 backward passes
    lost_updates.png     per step of the pure bf16 runs: the share of weights whose update is below half an ulp, and
                         the share of the update that did not reach the weights
TOKENS/S: after training, the modes' trainers take turns (course.bench.interleaved, best of `--timing_rounds`
steps each), so a slow phase of a shared machine hits every mode alike; the training loop's own tokens/s are in
results.json. The CPU's bf16/fp16 instructions and its matmul speed per dtype are printed and stored with them.
"""

from __future__ import annotations

import dataclasses
import math

import matplotlib.pyplot as plt
import torch

from course.bench import interleaved, markdown_table
from course.checkpoint import atomic_write, atomic_write_json, atomic_write_text
from course.cli import ArgumentParser, positive_int, warn_if_gpu_preset_without_gpu
from course.config import parse_configs
from course.device import get_device, machine_summary, set_seed
from course.errors import ConfigError, run_cli
from course.paths import repo_path
from course.plots import plot_curves
from phase1_foundation.project3_pretrain.config import LlamaConfig
from phase1_foundation.project3_pretrain.flops import measure_matmul_peak
from phase1_foundation.project3_pretrain.model import Llama
from phase3_core_inference.project7_mixed_precision.config import MixedPrecisionConfig
from phase3_core_inference.project7_mixed_precision.formats import FP16
from phase3_core_inference.project7_mixed_precision.mixed_precision import (
    MODES,
    gradient_underflow,
)
from phase3_core_inference.project7_mixed_precision.training import load_data, run

DEFAULT_MODES = ("fp32", "fp16_scaled", "fp16_unscaled", "bf16_autocast", "bf16_pure", "bf16_pure_sr",
                 "bf16_pure_kahan")
PURE = ("bf16_pure", "bf16_pure_sr", "bf16_pure_kahan")
CPU_FLAGS = ("avx2", "f16c", "avx512f", "avx512_bf16", "avx512_fp16", "amx_bf16", "amx_fp16")
ACCUMULATION = (1, 8, 64, 512)  # gradients as one micro-batch of a batch this many times larger


def parse_modes(text: str) -> list[str]:
    modes = [m.strip() for m in text.split(",") if m.strip()]
    unknown = [m for m in modes if m not in MODES]
    if unknown or not modes:
        raise ConfigError(f"unknown mode(s) in --modes: {', '.join(unknown) or '(none given)'}; "
                          f"choose from {', '.join(MODES)}")
    return list(dict.fromkeys(modes))


def cpu_features() -> list[str]:
    """The bf16/fp16-relevant instruction sets /proc/cpuinfo lists (empty where there is no /proc)."""
    try:
        with open("/proc/cpuinfo") as f:
            flags = next((line.split(":", 1)[1].split() for line in f if line.startswith("flags")), [])
    except OSError:
        return []
    return [name for name in CPU_FLAGS if name in flags]


def matmul_speeds(device: torch.device, seconds: float) -> dict[str, float]:
    """GFLOP/s of a 1024^3 matmul in each dtype: what native bf16 (AMX, tensor cores) is worth here."""
    return {name: measure_matmul_peak(device, dtype, n=1024, seconds=seconds) / 1e9
            for name, dtype in (("fp32", torch.float32), ("bf16", torch.bfloat16), ("fp16", torch.float16))}


# ---- the plots ---------------------------------------------------------------------------------------------
def plot_underflow(path, grads: torch.Tensor, rows: list[dict], scale: float):
    """Histogram of log2 |g| of the fp32 gradients, shifted as fp16 sees them: this batch, a 512x larger batch's
    micro-batch, and that one times the loss scale; fp16's zero and subnormal regions shaded."""
    logs = grads[grads != 0].abs().log2().float()
    big = rows[-1]
    shift_big, shift_scale = math.log2(big["loss_weight"]), math.log2(scale)
    fig, ax = plt.subplots(figsize=(8, 4.8), dpi=110)
    bins = torch.linspace(-60, 10, 141).tolist()
    series = [
        (logs, f"this batch: {100 * rows[0]['underflow_unscaled']:.2f}% of gradients become 0 in fp16"),
        (logs + shift_big, f"1 of {big['accumulate']} micro-batches: {100 * big['underflow_unscaled']:.1f}% become 0"),
        (logs + shift_big + shift_scale,
         f"... x loss scale 2^{shift_scale:g}: {100 * big['underflow_scaled']:.3f}% become 0"),
    ]
    for values, label in series:
        ax.hist(values.clamp(-60, 10).tolist(), bins=bins, histtype="step", linewidth=1.6, label=label)
    zero, normal = math.log2(FP16.smallest_subnormal / 2), math.log2(FP16.smallest_normal)
    ax.axvspan(-60, zero, color="red", alpha=0.12, label="fp16: rounds to 0 (< 2^-25)")
    ax.axvspan(zero, normal, color="orange", alpha=0.12, label="fp16: subnormal, fewer bits (< 2^-14)")
    ax.set_xlabel("log2 |weight gradient|  (fp32 values, shifted as fp16 receives them)")
    ax.set_ylabel("count")
    ax.set_title("fp16 gradient underflow: project 3's cpu model, one batch")
    ax.legend(fontsize=7.5, loc="upper left")
    ax.grid(alpha=0.3)
    fig.tight_layout()
    try:
        atomic_write(path, lambda f: fig.savefig(f, format="png"))
    finally:
        plt.close(fig)


def plot_lost_updates(path, histories: dict[str, list[dict]]):
    fig, (a, b) = plt.subplots(1, 2, figsize=(11, 4.2), dpi=110)
    for mode, hist in histories.items():
        rows = [r for r in hist if r["kind"] == "updates"]
        if rows:
            its = [r["iter"] for r in rows]
            a.plot(its, [100 * r["below_half_ulp"] for r in rows], label=mode)
            b.plot(its, [100 * r["lost_share"] for r in rows], label=mode)
    a.set_title("weights whose update is below half an ulp (%)")
    b.set_title("share of the update that did not reach the weights (%)")
    for ax in (a, b):
        ax.set_xlabel("step")
        ax.grid(alpha=0.3)
        ax.legend()
    fig.suptitle("pure bf16: lost updates, with round-to-nearest and with each fix")
    fig.tight_layout()
    try:
        atomic_write(path, lambda f: fig.savefig(f, format="png"))
    finally:
        plt.close(fig)


# ---- the run -----------------------------------------------------------------------------------------------
def build_parser() -> ArgumentParser:
    parser = ArgumentParser(description=__doc__)
    parser.add_argument("--modes", type=str, default=",".join(DEFAULT_MODES),
                        help="comma-separated modes (default: the README's table)")
    parser.add_argument("--quick", action="store_true", help="20 steps, short evaluations: a smoke test")
    parser.add_argument("--fp16_large_batch", type=positive_int, default=64,
                        help="also run the fp16 modes as 1 of N micro-batches (per-token gradients N times smaller, "
                             "as in an N times larger batch); 1 = off (default: %(default)s)")
    parser.add_argument("--timing_rounds", type=positive_int, default=5, help="interleaved timing steps per mode")
    parser.add_argument("--device", default="auto", help="auto (cuda > mps > cpu), cpu, cuda or mps")
    parser.add_argument("--seed", type=int, default=1337, help="initial weights and batches (default: %(default)s)")
    parser.add_argument("--no_progress", action="store_true", help="no tqdm bars")
    return parser


def main(argv: list[str] | None = None) -> dict:
    args, mcfg, cfg = parse_configs(build_parser(), LlamaConfig, MixedPrecisionConfig, argv=argv,
                                    default_preset="cpu")
    modes = parse_modes(args.modes)
    if "mode" in args.overrides:
        raise ConfigError("--mode is train.py's flag; the benchmark runs --modes (a comma-separated list)")
    if args.quick:
        cfg.max_iters, cfg.eval_interval, cfg.eval_iters, cfg.warmup_iters = 20, 10, 2, 5
        cfg.stats_interval = min(cfg.stats_interval or 5, 5)
        args.timing_rounds = min(args.timing_rounds, 2)
    warn_if_gpu_preset_without_gpu(args.preset, args.device)
    out = repo_path(cfg.out_dir)
    if out.exists() and not out.is_dir():
        raise ConfigError(f"out_dir {out} is an existing file, not a folder; pick another --out_dir")
    out = out / "benchmark"
    device = get_device(args.device)
    data = load_data(cfg, mcfg)
    if cfg.threads is not None:
        torch.set_num_threads(cfg.threads)
    out.mkdir(parents=True, exist_ok=True)
    machine = machine_summary()
    features = cpu_features() if device.type == "cpu" else []
    speeds = matmul_speeds(device, 0.3 if args.quick else 1.0)
    print(f"machine: {machine}; torch threads {torch.get_num_threads()}")
    print(f"CPU instructions: {', '.join(features) or '(none listed)'}; 1024^3 matmul GFLOP/s: "
          + ", ".join(f"{k} {v:,.0f}" for k, v in speeds.items()))
    print(f"{len(modes)} modes x {cfg.max_iters} steps of {cfg.batch_size} x {mcfg.block_size} tokens, "
          f"learning rate {cfg.learning_rate:g}")

    # the runs: every mode, then the fp16 modes again as one micro-batch of a --fp16_large_batch times larger batch
    k_big = args.fp16_large_batch
    runs = [(m, m, cfg) for m in modes] + [
        (f"{m} @1/{k_big}", m, dataclasses.replace(cfg, micro_batch_of=cfg.micro_batch_of * k_big))
        for m in modes if k_big > 1 and MODES[m].compute == torch.float16]
    results, trainers = {}, {}
    for label, mode, run_cfg in runs:
        r = run(mcfg, run_cfg, mode, device, seed=args.seed, data=data, progress=not args.no_progress,
                stop_on_nonfinite=False, log_path=out / f"{label.replace(' @1/', '_micro')}.jsonl")
        results[label], trainers[label] = r, r.trainer
        s = r.summary
        print(f"  {label:<22} val loss {s['val_loss']:.4f}  {s['tokens_per_s']:>7,.0f} tokens/s (training loop)  "
              f"{s['total_bytes'] / 2 ** 20:6.1f} MiB  skipped {s['skipped']}"
              + (f"  DIVERGED at step {s['diverged_at']}" if s["diverged_at"] is not None else ""), flush=True)

    gen = torch.Generator().manual_seed(args.seed + 2)
    x, y = data.get_batch("train", cfg.batch_size, device, gen)  # one batch for the underflow and timing steps
    tokens = x.numel()
    # gradient underflow: the fp32 run's trained weights (or a fresh model), one batch, as fp16 sees it
    if "fp32" in trainers:
        model = trainers["fp32"].model
    else:
        set_seed(args.seed)
        model = Llama(trainers[modes[0]].model.config).to(device)
    scale = results["fp16_scaled"].summary["final_scale"] if "fp16_scaled" in results else cfg.init_scale
    underflow, grads = [], None
    for k in (ACCUMULATION[:2] if args.quick else ACCUMULATION):
        u = gradient_underflow(model, x, y, scale, loss_weight=1.0 / k)
        underflow.append({"accumulate": k, "tokens": k * tokens, **{key: v for key, v in u.items() if key != "grads"}})
        grads = u["grads"] if grads is None else grads
    plot_underflow(out / "grad_underflow.png", grads, underflow, scale)
    plot_lost_updates(out / "lost_updates.png", {m: results[m].history for m in modes if m in PURE})
    # tokens/s, interleaved: one step of each mode in turn, `timing_rounds` times (the same batch for all)
    timing = interleaved({m: (lambda t=trainers[m]: t.step(x, y, cfg.min_lr)["loss"].item()) for m in modes
                          if results[m].summary["diverged_at"] is None}, rounds=args.timing_rounds)
    labels = [label for label, _, _ in runs]

    plot_curves(out / "val_loss.png", {m: ([h["iter"] for h in results[m].history if h["kind"] == "eval"],
                                           [h["val_loss"] for h in results[m].history if h["kind"] == "eval"])
                                       for m in labels}, title="val loss, same data and steps", ylabel="val loss")

    # the table
    ref = results["fp32"].summary if "fp32" in results else None
    n_params = trainers[modes[0]].model.num_params()
    rows = []
    for m in labels:
        s = results[m].summary
        tok_s = tokens / timing[m]["best"] if m in timing else float("nan")  # a @1/k run: its mode's speed
        ref_tok_s = tokens / timing["fp32"]["best"] if "fp32" in timing else float("nan")
        note = f"diverged at step {s['diverged_at']}" if s["diverged_at"] is not None else (
            f"{s['skipped']} skipped, final scale {s['final_scale']:g}" if s["final_scale"] is not None else "")
        s.update(tokens_per_s_interleaved=tok_s, bytes_per_param=s["total_bytes"] / n_params)
        rows.append([m, f"{s['val_loss']:.4f}",
                     f"{s['val_loss'] - ref['val_loss']:+.4f}" if ref else "", f"{tok_s:,.0f}" if m in timing else "",
                     f"{tok_s / ref_tok_s:.2f}x" if ref and m in timing else "", f"{s['total_bytes'] / 2 ** 20:.1f}",
                     f"{s['bytes_per_param']:.1f}", note])
    headers = ["mode", f"val loss @ {cfg.max_iters}", "vs fp32", "tokens/s", "vs fp32", "weights+grads+opt MiB",
               "bytes/param", "loss scaling"]
    table = markdown_table(headers, rows, align="lrrrrrrl")
    closure = {}
    if ref and "bf16_pure" in results:
        gap = results["bf16_pure"].summary["val_loss"] - ref["val_loss"]
        for fix in ("bf16_pure_sr", "bf16_pure_kahan"):
            if fix in results and gap > 0:
                closure[fix] = (results["bf16_pure"].summary["val_loss"] - results[fix].summary["val_loss"]) / gap
    uf_rows = [[f"{u['tokens']:,}", f"{100 * u['underflow_unscaled']:.3f}%", f"{100 * u['underflow_scaled']:.4f}%"]
               for u in underflow]
    uf_table = markdown_table(["tokens per batch (as fp16 sees one micro-batch)", "gradients -> 0, no scaling",
                               f"with loss scale {scale:g}"], uf_rows, align="lrr")
    print("\n" + table + "\n")
    if closure:
        print("pure bf16's gap to fp32 closed by: " + ", ".join(f"{k} {100 * v:.0f}%" for k, v in closure.items()))
    print("\n" + uf_table + "\n")
    header = (f"Machine: {machine}; torch threads {torch.get_num_threads()}; CPU instructions: "
              f"{', '.join(features) or '-'}; 1024^3 matmul GFLOP/s "
              + ", ".join(f"{k} {v:,.0f}" for k, v in speeds.items()) + f". {cfg.max_iters} steps x "
              f"{cfg.batch_size} x {mcfg.block_size} tokens, lr {cfg.learning_rate:g}, seed {args.seed}.")
    atomic_write_text(out / "table.md", header + "\n\n" + table + "\n\n" + uf_table + "\n")
    report = {"machine": machine, "threads": torch.get_num_threads(), "cpu_features": features,
              "matmul_gflops": speeds, "config": cfg.to_dict(), "model_config": trainers[modes[0]].model.config.to_dict(),
              "summaries": {m: results[m].summary for m in labels}, "timing": timing, "gap_closed": closure,
              "underflow": underflow}
    atomic_write_json(out / "results.json", report)
    print(f"saved: {out}/table.md, results.json, val_loss.png, grad_underflow.png, lost_updates.png")
    best_fix = max(closure.items(), key=lambda kv: kv[1]) if closure else None
    print("done: " + " ".join(f"{m.replace(' ', '')}={results[m].summary['val_loss']:.4f}" for m in labels)
          + (f" gap_closed_by_{best_fix[0]}={100 * best_fix[1]:.0f}%" if best_fix else ""))
    return report


if __name__ == "__main__":
    run_cli(main)
