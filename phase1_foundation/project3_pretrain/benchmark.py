"""Measure the numbers in the README: the machine's matmul peak, training throughput/MFU, the LLaMA-vs-GPT plot.

    uv run python phase1_foundation/project3_pretrain/benchmark.py --what peak         # fp32 matmul peak (CPU)
    uv run python phase1_foundation/project3_pretrain/benchmark.py --what throughput   # tokens/s and MFU, cpu preset
    uv run python phase1_foundation/project3_pretrain/benchmark.py --what compare      # plot from the two runs' logs
    uv run python phase1_foundation/project3_pretrain/benchmark.py --what throughput --preset gpu --device cuda

MFU = flops_per_token (6N + 12 L H d T, flops.py) * tokens/s / peak. On CPU the peak is the best fp32 matmul
this script times on this machine (no vendor number exists for a shared VM); on a GPU it is the datasheet's
dense bf16 peak. Run it alone on the machine (`flock -x /tmp/cpu.lock ...` here): a busy core halves both.
"""

from __future__ import annotations

import json
import time
from pathlib import Path

import torch

from course.checkpoint import load_checkpoint
from course.cli import ArgumentParser, positive_int, warn_if_gpu_preset_without_gpu
from course.device import device_summary, get_device, set_seed
from course.errors import CourseError, run_cli
from course.paths import repo_path
from course.plots import plot_curves
from phase1_foundation.project3_pretrain.config import LlamaConfig
from phase1_foundation.project3_pretrain.flops import count_params, gpu_peak, measure_matmul_peak, model_flops_per_token
from phase1_foundation.project3_pretrain.loading import build_model
from phase1_foundation.project3_pretrain.run_log import read_log

RUNS = {"LLaMA-style (cpu preset)": "checkpoints/project3/cpu", "GPT (project 1 arch)": "checkpoints/project3/gpt"}


def bench_peak(device: torch.device, dtype: torch.dtype = torch.float32) -> float:
    best = 0.0
    for n in (512, 1024, 2048):
        flops = measure_matmul_peak(device, dtype, n=n, seconds=2.0)
        print(f"  {n}x{n} @ {n}x{n} {str(dtype).removeprefix('torch.')}: {flops / 1e9:,.1f} GFLOP/s")
        best = max(best, flops)
    return best


def bench_train(arch: str, cfg: LlamaConfig, device: torch.device, batch_size: int, steps: int, peak: float,
                dtype: torch.dtype, compile_: bool) -> dict:
    """Time full optimizer steps (forward, backward, clip, AdamW) on random tokens."""
    set_seed(0)
    model = build_model(arch, cfg).to(device)
    opt = model.configure_optimizer(0.1, 1e-4, (0.9, 0.95), device.type)
    fwd = torch.compile(model) if compile_ else model
    x = torch.randint(0, cfg.vocab_size, (batch_size, cfg.block_size + 1), device=device)
    ctx = torch.autocast(device.type, dtype=dtype) if dtype != torch.float32 else torch.autocast(device.type, enabled=False)
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)

    def step():
        with ctx:
            loss = fwd(x[:, :-1], x[:, 1:])[1]
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)

    for _ in range(3 if not compile_ else 5):  # warm-up (and compilation)
        step()
    sync()
    t0 = time.perf_counter()
    for _ in range(steps):
        step()
    sync()
    dt = time.perf_counter() - t0
    fpt = model_flops_per_token(arch, model, cfg)
    tok_s = batch_size * cfg.block_size * steps / dt
    out = {"arch": arch, "params": count_params(model), "tokens_per_s": tok_s, "mfu": fpt * tok_s / peak,
           "flops_per_token": fpt, "step_s": dt / steps}
    if device.type == "cuda":
        out["max_memory_gb"] = torch.cuda.max_memory_allocated(device) / 2**30
    return out


def compare(out_png: Path, peak: float | None) -> list[dict]:
    """The LLaMA-vs-GPT plot (val bits per byte against wall-clock minutes) and table, from the runs' logs."""
    curves, rows = {}, []
    for name, folder in RUNS.items():
        recs = read_log(repo_path(folder) / "log.jsonl")
        ev = [r for r in recs if r["kind"] == "eval"]
        tr = [r for r in recs if r["kind"] == "train"]
        curves[name] = ([r["elapsed_s"] / 60 for r in ev], [r["val_bpb"] for r in ev])
        ckpt = load_checkpoint(repo_path(folder) / "ckpt.pt", hint="train it first (see README, step 3)")
        cfg = LlamaConfig.from_dict(ckpt["model_config"])
        with torch.device("meta"):
            model = build_model(ckpt["arch"], cfg)
        fpt = model_flops_per_token(ckpt["arch"], model, cfg)
        tok_s = tr[-1]["tokens_per_s"] if tr else float("nan")
        last = ev[-1]
        rows.append({"name": name, "params": count_params(model), "iters": last["iter"], "tokens": last["tokens"],
                     "minutes": last["elapsed_s"] / 60, "val_loss": last["val_loss"], "val_bpb": last["val_bpb"],
                     "tokens_per_s": tok_s, "mfu": fpt * tok_s / peak if peak else float("nan")})
    plot_curves(out_png, curves, title="Same data, tokenizer, budget and 2 CPU threads",
                xlabel="wall-clock minutes", ylabel="validation bits per byte (held-out books)")
    print("| model | params | iters | tokens | minutes | val loss | val bpb | train tokens/s | MFU |")
    print("|---|---:|---:|---:|---:|---:|---:|---:|---:|")
    for r in rows:
        print(f"| {r['name']} | {r['params']:,} | {r['iters']:,} | {r['tokens']:,} | {r['minutes']:.1f} | "
              f"{r['val_loss']:.4f} | {r['val_bpb']:.4f} | {r['tokens_per_s']:,.0f} | {100 * r['mfu']:.1f}% |")
    print(f"plot: {out_png}")
    return rows


def main(argv: list[str] | None = None) -> None:
    p = ArgumentParser(description=__doc__)
    p.add_argument("--what", choices=["peak", "throughput", "compare", "all"], default="all")
    p.add_argument("--preset", choices=["cpu", "gpu"], default="cpu")
    p.add_argument("--batch_size", type=positive_int, default=None, help="default 16 (cpu) / 16 (gpu)")
    p.add_argument("--steps", type=positive_int, default=10, help="timed optimizer steps (default: %(default)s)")
    p.add_argument("--threads", type=positive_int, default=2, help="CPU threads (torch.set_num_threads)")
    p.add_argument("--compile", action="store_true", help="torch.compile (default on for cuda)")
    p.add_argument("--device", default="auto")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", default="checkpoints/project3/benchmark.json", help="results JSON")
    args = p.parse_args(argv)
    out = repo_path(args.out)
    if out.is_dir():
        raise CourseError(f"--out {out} is a folder; pass a .json file path")
    warn_if_gpu_preset_without_gpu(args.preset, args.device)
    torch.set_num_threads(args.threads)
    dev = get_device(args.device)
    results: dict = {"device": device_summary(dev), "torch": torch.__version__}
    dtype = torch.bfloat16 if dev.type == "cuda" else torch.float32
    if args.what in ("peak", "throughput", "all"):
        print(f"matmul peak on {device_summary(dev)}:")
        measured = bench_peak(dev, dtype)
        results["measured_matmul_flops"] = measured
        peak = (gpu_peak(dev, dtype) or measured) if dev.type == "cuda" else measured
        results["peak_flops_used"] = peak
        print(f"peak used for MFU: {peak / 1e12:.3f} TFLOP/s")
    if args.what in ("throughput", "all"):
        cfg = LlamaConfig.from_preset(args.preset)
        bs = args.batch_size or 16
        compile_ = args.compile or dev.type == "cuda"
        archs = ("llama", "gpt") if args.preset == "cpu" else ("llama",)
        results["throughput"] = []
        print("| preset | arch | params | batch x T | tokens/s | MFU | step s |")
        print("|---|---|---:|---:|---:|---:|---:|")
        for arch in archs:
            r = bench_train(arch, cfg, dev, bs, args.steps, peak, dtype, compile_)
            results["throughput"].append({"preset": args.preset, **r})
            print(f"| {args.preset} | {arch} | {r['params']:,} | {bs}x{cfg.block_size} | {r['tokens_per_s']:,.0f} | "
                  f"{100 * r['mfu']:.1f}% | {r['step_s']:.3f} |" +
                  (f" mem {r['max_memory_gb']:.1f} GB" if "max_memory_gb" in r else ""))
    if args.what in ("compare", "all"):
        try:
            results["compare"] = compare(repo_path("checkpoints/project3/compare_bpb.png"),
                                         results.get("measured_matmul_flops"))
        except CourseError as e:
            if args.what == "compare":
                raise
            print(f"compare skipped: {e}")
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(results, indent=2) + "\n")
    tp = results.get("throughput", [{}])[0]
    print(f"done: peak_gflops={results.get('measured_matmul_flops', 0) / 1e9:.1f} "
          f"tokens_per_s={tp.get('tokens_per_s', 0):.0f} mfu={100 * tp.get('mfu', 0):.1f}%")


if __name__ == "__main__":
    run_cli(main)
