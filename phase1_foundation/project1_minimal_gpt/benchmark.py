"""Reproduce the README's results table with one command: three training runs, measured the same way.

    uv run python phase1_foundation/project1_minimal_gpt/benchmark.py              # all three, ~15 min on 2 cores
    uv run python phase1_foundation/project1_minimal_gpt/benchmark.py --only nanogpt

Rows (each is a real `train.py` run in a subprocess, its `done:` line parsed):
    nanogpt  nanoGPT's README CPU command, exactly (block 64, batch 12, 4 layers, 4 heads, 128 dims,
             2000 iters, lr 1e-3 -> 1e-4, warmup 100, dropout 0): the throughput bar is >= 16k tokens/s.
             nanoGPT reports val loss 1.886 for it after about 2 minutes.
    budget   the cpu preset with --time_budget_s=120: target val loss < 1.80.
    cpu      the cpu preset as shipped (9-minute budget): target val loss <= 1.60 within 10 minutes of wall time.
tokens/s counts training steps only (forward, backward, clip, AdamW), not evaluations or checkpoint saves.
After each run the final model is also scored on the *whole* validation split (non-overlapping
windows), a number free of the sampling noise of train.py's estimate.
Results go to stdout and to checkpoints/project1/bench/results.md.
"""

from __future__ import annotations

import json
import re
import subprocess
import sys
import time
from pathlib import Path

import torch

from course.checkpoint import atomic_write_text
from course.cli import ArgumentParser
from course.config import add_config_args, configs_from_args
from course.device import set_seed
from course.errors import CourseError, run_cli
from course.paths import REPO_ROOT
from phase1_foundation.project1_minimal_gpt.config import GPTConfig
from phase1_foundation.project1_minimal_gpt.data import DEFAULT_OUT_DIR, encode, load_text, split_data
from phase1_foundation.project1_minimal_gpt.sampling import generate_text
from phase1_foundation.project1_minimal_gpt.training import load_model

HERE = Path(__file__).resolve().parent
NANOGPT_CPU = ["--block_size=64", "--batch_size=12", "--n_layer=4", "--n_head=4", "--n_embd=128",
               "--max_iters=2000", "--lr_decay_iters=2000", "--dropout=0.0",
               # the rest of nanoGPT's config/train_shakespeare_char.py + its README's CPU flags
               "--learning_rate=1e-3", "--min_lr=1e-4", "--warmup_iters=100", "--beta2=0.99", "--bias=false",
               "--weight_decay=0.1", "--grad_clip=1.0", "--eval_interval=250", "--eval_iters=20",
               "--time_budget_s=0"]
RUNS = {
    "nanogpt": ("nanoGPT README CPU config", NANOGPT_CPU, "tokens/s >= 16,000"),
    "budget": ("cpu preset, 2-minute budget", ["--preset=cpu", "--time_budget_s=120"], "val < 1.80"),
    "cpu": ("cpu preset", ["--preset=cpu"], "val <= 1.60, wall <= 600 s"),
}


@torch.no_grad()
def full_val_loss(checkpoint: Path) -> float:
    """Mean cross-entropy over the whole validation split, in non-overlapping block_size windows."""
    model, chars = load_model(checkpoint, torch.device("cpu"))
    _, val = split_data(torch.tensor(encode(load_text(), chars)))
    T = model.config.block_size
    n = (len(val) - 1) // T
    x = val[: n * T].view(n, T)
    y = val[1: n * T + 1].view(n, T)
    total = 0.0
    for i in range(0, n, 64):
        _, loss = model(x[i:i + 64], y[i:i + 64])
        total += loss.item() * x[i:i + 64].numel()
    return total / (n * T)


def run_one(name: str, extra: list[str], seed: int) -> dict:
    out_dir = DEFAULT_OUT_DIR / "bench" / name
    cmd = [sys.executable, str(HERE / "train.py"), *extra, f"--out_dir={out_dir}", f"--seed={seed}",
           "--device=cpu", "--no_progress"]
    print(f"\n[{name}] {' '.join(cmd[1:])}", flush=True)
    t0 = time.perf_counter()
    proc = subprocess.run(cmd, cwd=REPO_ROOT, capture_output=True, text=True)
    wall = time.perf_counter() - t0
    if proc.returncode != 0:
        raise CourseError(f"benchmark run '{name}' failed: {proc.stderr.strip().splitlines()[-1:]}")
    for line in proc.stdout.splitlines():
        if line.startswith("iter ") or line.startswith("done:"):
            print("   ", line, flush=True)
    done = re.search(r"^done: val_loss=(\S+) train_loss=(\S+) wall_s=(\d+) tokens_per_s=(\d+)$", proc.stdout, re.M)
    if not done:
        raise CourseError(f"benchmark run '{name}' printed no 'done:' line")
    metrics = json.loads((out_dir / "metrics.json").read_text())
    return {"name": name, "val": float(done[1]), "train": float(done[2]), "wall_s": wall,
            "tokens_per_s": float(done[4]), "iters": metrics["iters"], "params": metrics["params"],
            "stopped_by": metrics["stopped_by"], "full_val": full_val_loss(out_dir / "last.pt"),
            "ckpt": out_dir / "last.pt"}


def check_extra(extra: list[str]) -> None:
    """Parse --extra with train.py's own parser first: a bad flag fails now, not after a 5-minute row."""
    parser = ArgumentParser(prog="benchmark.py --extra")
    for flag in ("--data_path", "--out_dir", "--device", "--seed"):
        parser.add_argument(flag)
    parser.add_argument("--resume", action="store_true")
    parser.add_argument("--no_progress", action="store_true")
    add_config_args(parser, GPTConfig, default_preset="cpu")
    configs_from_args(parser.parse_args(extra), GPTConfig)


def verdict(r: dict) -> str:
    if r["name"] == "nanogpt":
        ok = r["tokens_per_s"] >= 16_000
    elif r["name"] == "budget":
        ok = max(r["val"], r["full_val"]) < 1.80
    else:
        ok = max(r["val"], r["full_val"]) <= 1.60 and r["wall_s"] <= 600
    return "met" if ok else "MISSED"


def main(argv: list[str] | None = None) -> None:
    parser = ArgumentParser(description=__doc__)
    parser.add_argument("--only", default="nanogpt,budget,cpu", help="comma-separated rows (default: %(default)s)")
    parser.add_argument("--seed", type=int, default=1337)
    parser.add_argument("--extra", default="", help="extra train.py flags for every row, e.g. "
                        "--extra='--max_iters=50' for a quick smoke test (numbers then mean nothing)")
    parser.add_argument("--device", default="cpu", help="the quality bar is defined on CPU (default: cpu)")
    args = parser.parse_args(argv)
    names = [n.strip() for n in args.only.split(",") if n.strip()]
    unknown = [n for n in names if n not in RUNS]
    if unknown or not names:
        raise CourseError(f"unknown benchmark row(s) {', '.join(unknown) or '(none given)'}; "
                          f"choose from: {', '.join(RUNS)}")
    if args.device != "cpu":
        raise CourseError("benchmark.py measures the CPU quality bar; run train.py --preset gpu for the GPU run")
    check_extra(args.extra.split())
    load_text()  # fetch the data first (or fail with the one-line download message)

    results = [run_one(n, RUNS[n][1] + args.extra.split(), args.seed) for n in names]
    lines = ["| run | params | iters | wall s | train tokens/s | train loss | val loss | val loss (full split) "
             "| target | |", "|---|---|---|---|---|---|---|---|---|---|"]
    for r in results:
        lines.append(f"| {RUNS[r['name']][0]} | {r['params'] / 1e6:.2f}M | {r['iters']:,} | {r['wall_s']:.0f} "
                     f"| {r['tokens_per_s']:,.0f} | {r['train']:.4f} | {r['val']:.4f} | {r['full_val']:.4f} "
                     f"| {RUNS[r['name']][2]} | {verdict(r)} |")
    table = "\n".join(lines)
    machine = f"{torch.get_num_threads()} threads, PyTorch {torch.__version__}, fp32"
    sample = ""
    last = results[-1]
    if last["name"] in ("cpu", "budget"):
        set_seed(args.seed)
        model, chars = load_model(last["ckpt"], torch.device("cpu"))
        sample = "ROMEO:" + generate_text(model, chars, "ROMEO:", 300, temperature=0.8, seed=args.seed)
    report = f"{table}\n\nmachine: {machine}\n" + (f"\nsample ({RUNS[last['name']][0]}, temperature 0.8, "
                                                   f"seed {args.seed}):\n\n{sample}\n" if sample else "")
    print("\n" + report)
    atomic_write_text(DEFAULT_OUT_DIR / "bench" / "results.md", report)


if __name__ == "__main__":
    run_cli(main)
