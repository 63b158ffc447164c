"""One result per task, written as a JSON report and a markdown table (both atomically)."""

from __future__ import annotations

import dataclasses
import json
import platform
from dataclasses import dataclass, field
from pathlib import Path

from course.checkpoint import atomic_write_text


@dataclass
class TaskResult:
    task: str
    n: int
    accuracy: float       # the task's headline metric: accuracy, exact match, or pass@1
    stderr: float
    seconds: float
    extra: dict = field(default_factory=dict)

    @property
    def per_second(self) -> float:
        return self.n / self.seconds if self.seconds > 0 else float("nan")


def markdown_table(results: list[TaskResult], title: str = "") -> str:
    lines = [f"### {title}", ""] if title else []
    lines += ["| task | n | score | ± stderr | questions/s |", "|---|---:|---:|---:|---:|"]
    for r in results:
        lines.append(f"| {r.task} | {r.n:,} | {100 * r.accuracy:.2f}% | {100 * r.stderr:.2f} | {r.per_second:.1f} |")
    return "\n".join(lines) + "\n"


def write_report(results: list[TaskResult], out: str | Path, meta: dict | None = None) -> tuple[Path, Path]:
    """`out`.json (every number, plus `meta`: model, shots, limit, machine) and `out`.md (the table)."""
    out = Path(out)
    meta = {"machine": f"{platform.machine()} {platform.processor() or ''}".strip(), **(meta or {})}
    report = {"meta": meta, "results": [{**dataclasses.asdict(r), "per_second": r.per_second} for r in results]}
    js = atomic_write_text(out.with_suffix(".json"), json.dumps(report, indent=2, default=str) + "\n")
    md = atomic_write_text(out.with_suffix(".md"), markdown_table(results, title=str(meta.get("model", ""))))
    return js, md
