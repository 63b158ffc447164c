"""Errors a learner can act on, and the one place that turns them into a single line.

Every script's `main()` runs through `run_cli`. Deep code raises `CourseError("what went wrong;
what to do")`; the user sees exactly that line (and exit code 2), never a traceback.
"""

from __future__ import annotations

import sys
from typing import Callable


class CourseError(Exception):
    """A problem with the user's input or environment, with a message that says what to do."""


class ConfigError(CourseError, ValueError):
    """An invalid configuration value."""


def run_cli(main: Callable[[], object]) -> None:
    """Run `main()`; print CourseError as one line on stderr and exit 2, Ctrl-C as exit 130."""
    try:
        main()
    except CourseError as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)
    except KeyboardInterrupt:
        print("\ninterrupted", file=sys.stderr)
        sys.exit(130)
