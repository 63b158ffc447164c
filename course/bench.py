"""Small benchmark helpers shared by every project's benchmark.py, so each one is about the claim it measures.

- `timed(fn)`: seconds for one call; `best_of(fn, n)`: the shortest of n calls, with the last call's result
  (the minimum is the least disturbed by a shared machine: noise only ever adds time).
- `interleaved(fns, rounds)`: A/B comparison on a drifting machine: the candidates take turns, round after
  round, so a slow phase of the machine hits all of them alike; best and median per candidate.
- `read_bandwidth(gib)` and `Bandwidth`: the machine's memory read bandwidth (the best of three streaming
  reductions over one big tensor), sampled as often as needed: on a shared VM it moves within seconds.
- `markdown_table(headers, rows, align)`: the table a README's results section pastes.
"""

from __future__ import annotations

import functools
import gc
import statistics
import time
from collections.abc import Callable, Sequence
from typing import Any

import torch


def timed(fn: Callable[[], Any]) -> float:
    """Seconds one call of fn takes (perf_counter)."""
    t = time.perf_counter()
    fn()
    return time.perf_counter() - t


def best_of(fn: Callable[[], Any], n: int = 2) -> tuple[float, Any]:
    """(the shortest time of n calls, the last call's result)."""
    if n < 1:
        raise ValueError(f"best_of needs n >= 1, got {n}")
    best, out = float("inf"), None
    for _ in range(n):
        t = time.perf_counter()
        out = fn()
        best = min(best, time.perf_counter() - t)
    return best, out


def interleaved(fns: dict[str, Callable[[], Any]], rounds: int = 5) -> dict[str, dict[str, float]]:
    """Time the candidates in turns, `rounds` times: {name: {"best": s, "median": s, "times": [...]}}."""
    times: dict[str, list[float]] = {name: [] for name in fns}
    for _ in range(rounds):
        for name, fn in fns.items():
            times[name].append(timed(fn))
    return {name: {"best": min(ts), "median": statistics.median(ts), "times": ts} for name, ts in times.items()}


def read_bandwidth(gib: float = 1.0) -> float:
    """Memory read bandwidth in GB/s: the best of three streaming reductions (sum, amax, dot) over `gib` GiB."""
    x = torch.ones(int(gib * 2**30 / 4), dtype=torch.float32)
    reads = (torch.sum, torch.amax, functools.partial(torch.dot, x))
    rate = max(x.numel() * 4 / timed(functools.partial(reduce, x)) / 1e9 for reduce in reads)
    del x, reads
    gc.collect()
    return rate


class Bandwidth:
    """Every read-bandwidth sample of a run; `best` is the highest (the strictest reading of a floor)."""

    def __init__(self, gib: float = 1.0):
        self.gib, self.samples = gib, []

    def sample(self) -> float:
        self.samples.append(read_bandwidth(self.gib))
        return self.samples[-1]

    @property
    def best(self) -> float:
        return max(self.samples)

    def span(self) -> str:
        return f"{min(self.samples):.1f}-{self.best:.1f} GB/s over {len(self.samples)} samples"


def markdown_table(headers: Sequence[str], rows: Sequence[Sequence[Any]], align: str | None = None) -> str:
    """A GitHub markdown table; align is one character per column, "l" or "r" (default: text left, numbers right)."""
    if any(len(r) != len(headers) for r in rows):
        raise ValueError(f"every row needs {len(headers)} cells")
    if align is None:
        align = "".join("r" if rows and isinstance(rows[0][i], (int, float)) else "l" for i in range(len(headers)))
    cell = lambda v: f"{v:.1f}" if isinstance(v, float) else str(v)  # noqa: E731
    lines = ["| " + " | ".join(headers) + " |", "|" + "|".join("---:" if a == "r" else "---" for a in align) + "|"]
    lines += ["| " + " | ".join(cell(v) for v in r) + " |" for r in rows]
    return "\n".join(lines)
