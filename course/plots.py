"""Line plots (loss curves and the like) saved as PNG, with no display needed."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Sequence

import matplotlib

matplotlib.use("Agg")  # headless: works over ssh, in CI and in containers
import matplotlib.pyplot as plt  # noqa: E402

from course.checkpoint import atomic_write  # noqa: E402


def plot_curves(path: str | os.PathLike, curves: dict[str, tuple[Sequence[float], Sequence[float]]],
                title: str = "", xlabel: str = "step", ylabel: str = "loss", logy: bool = False) -> Path:
    """Plot named (x, y) series on one axis and save a PNG atomically. Returns the path."""
    fig, ax = plt.subplots(figsize=(7, 4.5), dpi=110)
    for name, (xs, ys) in curves.items():
        ax.plot(list(xs), list(ys), label=name, marker="." if len(xs) < 40 else None)
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    if logy:
        ax.set_yscale("log")
    if title:
        ax.set_title(title)
    ax.grid(alpha=0.3)
    if len(curves) > 1:
        ax.legend()
    fig.tight_layout()
    try:
        return atomic_write(path, lambda f: fig.savefig(f, format="png"))
    finally:
        plt.close(fig)
