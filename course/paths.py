"""Where the course's files live: paths in configs and flags are relative to the repo root.

Every script is documented as run from the repo root (`uv run python phase1_.../train.py`), and the
configs say `data/...` and `checkpoints/...`. `repo_path` makes those same defaults work from any
directory: a relative path that exists where you are is yours; otherwise it is under the repo root.
"""

from __future__ import annotations

from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[1]


def repo_path(path: str | Path) -> Path:
    """`path` itself if absolute or present in the current directory, else the same path under REPO_ROOT."""
    p = Path(path).expanduser()
    if p.is_absolute() or p.exists():
        return p
    return REPO_ROOT / p
