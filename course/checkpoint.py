"""Atomic checkpoint save/load and RNG-state capture for exact resume.

WHY atomic: a run killed while `torch.save` is writing would leave a truncated file that
crashes the next `--resume`. We write to a temporary file in the same directory, fsync it,
then `os.replace` it over the target: readers see either the old file or the new one.
"""

from __future__ import annotations

import json
import os
import pickle
import random
import tempfile
import zipfile
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch

from course.errors import CourseError


def atomic_write(path: str | os.PathLike, write: Callable[[Any], None], mode: str = "wb") -> Path:
    """Call `write(fileobj)` on a temp file next to `path`, then rename it over `path`."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, mode) as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        # mkstemp creates the file owner-only (0600); give it the mode a plain open() would
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(tmp, 0o666 & ~umask)
        os.replace(tmp, path)
    except BaseException:
        # Interrupted or failed: remove the partial temp file, leave any old `path` untouched.
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise
    return path


def atomic_write_text(path: str | os.PathLike, text: str) -> Path:
    return atomic_write(path, lambda f: f.write(text), mode="w")


def atomic_write_json(path: str | os.PathLike, obj: Any) -> Path:
    return atomic_write_text(path, json.dumps(obj, indent=2) + "\n")


def save_checkpoint(path: str | os.PathLike, state: dict[str, Any]) -> Path:
    """Save a checkpoint dict with torch.save, atomically."""
    return atomic_write(path, lambda f: torch.save(state, f))


def load_checkpoint(path: str | os.PathLike, map_location: Any = "cpu", hint: str = "") -> dict[str, Any]:
    """Load a checkpoint dict; a missing or unreadable file raises one clear CourseError.

    `hint` is appended to the "not found" message, e.g. "train one first with: uv run python ...".
    """
    path = Path(path)
    if not path.is_file():
        msg = f"checkpoint not found: {path}"
        raise CourseError(f"{msg}; {hint}" if hint else msg)
    try:
        # weights_only=False: our checkpoints hold config dicts and RNG states, not just tensors.
        state = torch.load(path, map_location=map_location, weights_only=False)
    except (RuntimeError, EOFError, pickle.UnpicklingError, zipfile.BadZipFile, OSError, ValueError) as e:
        raise CourseError(f"could not read checkpoint {path} ({type(e).__name__}: {e}); "
                          "the file is corrupt or not a checkpoint, re-train or pick another file") from None
    if not isinstance(state, dict):
        raise CourseError(f"{path} is not a course checkpoint (expected a dict, got {type(state).__name__})")
    return state


def capture_rng_state() -> dict[str, Any]:
    """Every RNG a training loop touches, so resume continues the same random stream."""
    state = {
        "python": random.getstate(),
        "numpy": np.random.get_state(),
        "torch": torch.get_rng_state(),
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def restore_rng_state(state: dict[str, Any]) -> None:
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"].cpu() if hasattr(state["torch"], "cpu") else state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])
