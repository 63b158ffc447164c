"""Errors a learner can act on, and the one place that turns them into a single line.

Every script's `main()` runs through `run_cli`. Deep code raises `CourseError("what went wrong;
what to do")`; the user sees exactly that line (and exit code 2), never a traceback.
"""

from __future__ import annotations

import math
import os
import signal
import sys
import threading
import warnings
from typing import Callable


class CourseError(Exception):
    """A problem with the user's input or environment, with a message that says what to do."""


class ConfigError(CourseError, ValueError):
    """An invalid configuration value."""


class NonFiniteLossError(CourseError):
    """The training loss became nan or inf: the run stops instead of training (and saving) garbage."""


class Terminated(KeyboardInterrupt):
    """SIGTERM, delivered like Ctrl-C so a training loop's interruption path (save hint) runs for both."""


def check_finite_loss(value: float, it: int, hint: str = "") -> float:
    """Return `value`, or raise NonFiniteLossError when it is nan/inf (one line; `hint` says what to do)."""
    if math.isfinite(value):
        return value
    msg = (f"the loss became {value} at iter {it}; the run is stopped (diverged: try a lower --learning_rate, "
           "or check the data)")
    raise NonFiniteLossError(f"{msg}; {hint}" if hint else msg)


# Warnings torch prints on machines without a GPU although nothing is wrong (a CUDA build on a CPU box).
_CPU_MACHINE_WARNINGS = (r"CUDA initialization: .*", r".*CUDA is not available.*", r".*no accelerator is found.*")


def _raise_terminated(signum, frame):
    raise Terminated()


def run_cli(main: Callable[[], object]) -> None:
    """Run `main()`; print CourseError as one line on stderr and exit 2, Ctrl-C as exit 130 (SIGTERM 143).

    Also, for the duration of `main` only: SIGTERM raises `Terminated` (a KeyboardInterrupt), so a
    `kill` takes the same clean path as Ctrl-C; torch's CUDA-not-available warnings are silenced;
    a closed pipe (`... | head`) ends quietly.
    """
    in_main_thread = threading.current_thread() is threading.main_thread()
    old_term = signal.signal(signal.SIGTERM, _raise_terminated) if in_main_thread else None
    try:
        with warnings.catch_warnings():
            for pattern in _CPU_MACHINE_WARNINGS:
                warnings.filterwarnings("ignore", message=pattern)
            main()
    except CourseError as e:
        sys.stdout.flush()
        print(f"error: {' '.join(str(e).split())}", file=sys.stderr)
        sys.exit(2)
    except Terminated:
        print("\nterminated", file=sys.stderr)
        sys.exit(143)
    except KeyboardInterrupt:
        print("\ninterrupted", file=sys.stderr)
        sys.exit(130)
    except BrokenPipeError:
        # The reader went away (e.g. `| head`): nothing more to say; point stdout at /dev/null so
        # Python's own flush at exit does not print a second BrokenPipeError.
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        sys.exit(1)
    finally:
        if old_term is not None:
            signal.signal(signal.SIGTERM, old_term)
