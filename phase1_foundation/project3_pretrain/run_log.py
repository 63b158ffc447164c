"""The log of a training run (`log.jsonl`, one JSON object per line) read back, and its curves plotted.

train.py writes it (`kind` "train": loss, lr, tokens/s, MFU; `kind` "eval": train/val loss, perplexity,
bits per byte) and draws the plots at the end of a run; benchmark.py reads two runs' logs to compare them.
"""

from __future__ import annotations

import json
from pathlib import Path

from course.errors import CourseError
from course.plots import plot_curves
from phase1_foundation.project3_pretrain.data import TRAIN_CMD


def read_log(path: str | Path) -> list[dict]:
    path = Path(path)
    if not path.is_file():
        raise CourseError(f"{path} not found; train first: {TRAIN_CMD}")
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def plot_run(out_dir: Path) -> None:
    """curves.png (train/val loss by iteration) and val_bpb.png (by wall-clock minute), once there are 2 evals."""
    recs = read_log(out_dir / "log.jsonl")
    tr = [r for r in recs if r["kind"] == "train"]
    ev = [r for r in recs if r["kind"] == "eval"]
    if len(ev) < 2:
        return
    curves = {"train (batch)": ([r["iter"] for r in tr], [r["loss"] for r in tr]),
              "train (eval)": ([r["iter"] for r in ev], [r["train_loss"] for r in ev]),
              "val": ([r["iter"] for r in ev], [r["val_loss"] for r in ev])}
    plot_curves(out_dir / "curves.png", curves, title=f"{out_dir.name}: loss", xlabel="iteration",
                ylabel="cross-entropy (nats/token)")
    plot_curves(out_dir / "val_bpb.png", {"val": ([r["elapsed_s"] / 60 for r in ev], [r["val_bpb"] for r in ev])},
                title=f"{out_dir.name}: validation bits per byte", xlabel="wall-clock minutes", ylabel="bits/byte")
