"""Atomic, signal-safe checkpoint save/load and RNG-state capture for exact resume.

WHY atomic: a run killed while `torch.save` is writing would leave a truncated file that
crashes the next `--resume`. We write to a temporary file in the same directory, fsync it,
then `os.replace` it over the target: readers see either the old file or the new one.

WHY signal-safe: Ctrl-C in the middle of `torch.save` raises inside torch's zip writer, which then
fails again on its way out (`RuntimeError: ... unexpected pos`), a 30-line traceback instead of the
training loop's "interrupted, continue with --resume" line. So while a save runs, SIGINT and SIGTERM
are held back: the write and the rename complete, then the signal is delivered as if it had just
arrived. A second Ctrl-C during the same save abandons it cleanly (the temp file is removed, the old
checkpoint stays) and interrupts at once. A save killed outright (SIGKILL, power loss) can still leave
a `.NAME.*.tmp` file behind: `remove_stale_temps` clears those when the next run starts.
"""

from __future__ import annotations

import json
import os
import pickle
import random
import signal
import sys
import tempfile
import threading
import zipfile
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch

from course.errors import CourseError

_HELD_SIGNALS = (signal.SIGINT, signal.SIGTERM)


class _HoldSignals:
    """Context manager: SIGINT/SIGTERM that arrive inside it are recorded, then re-raised on exit.

    A second SIGINT inside it raises KeyboardInterrupt at once (the user insists: abandon the save).
    Only the main thread can install signal handlers; elsewhere this does nothing.
    """

    def __init__(self) -> None:
        self.pending: list[int] = []
        self.abandoned = False
        self._old: dict[int, Any] = {}

    def _handler(self, signum, frame) -> None:
        if signum == signal.SIGINT and signal.SIGINT in self.pending:
            self.abandoned = True
            raise KeyboardInterrupt
        if signum not in self.pending:
            self.pending.append(signum)
            print("\n(finishing the checkpoint save; press Ctrl-C again to abandon it)", file=sys.stderr,
                  flush=True)

    def __enter__(self) -> "_HoldSignals":
        if threading.current_thread() is threading.main_thread():
            for sig in _HELD_SIGNALS:
                self._old[sig] = signal.signal(sig, self._handler)
        return self

    def __exit__(self, *exc) -> None:
        for sig, old in self._old.items():
            signal.signal(sig, old if old is not None else signal.SIG_DFL)
        if exc[0] is None or not self.abandoned:
            for sig in self.pending:  # delivered now, to the handlers the caller had
                signal.raise_signal(sig)


def atomic_write(path: str | os.PathLike, write: Callable[[Any], None], mode: str = "wb") -> Path:
    """Call `write(fileobj)` on a temp file next to `path`, then rename it over `path`.

    SIGINT/SIGTERM during the write wait until the rename is done (see the module docstring).
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with _HoldSignals() as held:
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
            if held.abandoned:  # torch's writer may have turned the KeyboardInterrupt into a RuntimeError
                raise KeyboardInterrupt from None
            raise
    return path


def stale_temps(directory: str | os.PathLike) -> list[Path]:
    """The `.NAME.*.tmp` files atomic_write leaves only when its process was killed outright."""
    directory = Path(directory)
    if not directory.is_dir():
        return []
    return sorted(p for p in directory.glob(".*.tmp") if p.is_file())


def remove_stale_temps(directory: str | os.PathLike, report: bool = True) -> list[Path]:
    """Delete the temp files of saves that an earlier, killed run never finished; say so in one line.

    Call it when a run starts, before its first save (nothing of this run can be in flight yet).
    """
    removed = []
    for p in stale_temps(directory):
        try:
            p.unlink()
            removed.append(p)
        except OSError:
            pass
    if removed and report:
        print(f"note: removed {len(removed)} unfinished temp file(s) of an earlier, killed save in {directory}: "
              + ", ".join(p.name for p in removed))
    return removed


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
