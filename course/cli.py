"""Command lines that fail in one line: an argparse parser, flag types and file checks every script shares.

Every runnable file of the course builds its parser with `course.cli.ArgumentParser` and runs its
`main` through `course.errors.run_cli`. A bad flag then ends exactly like a bad config value: one
line on stderr that names the flag and says what to do, exit status 2, never a traceback and never
argparse's multi-line usage dump (`--help` still prints the full usage).

    parser = ArgumentParser(description=__doc__)
    parser.add_argument("--max_new_tokens", type=positive_int, default=500)
    parser.add_argument("--top_p", type=float_in(0.0, 1.0, lo_open=True), default=None)
    parser.add_argument("--data_path", type=existing_file)
    parser.add_argument("--out_dir", type=out_dir)

WHY types and not checks after parsing: argparse names the flag in its message
("argument --top_k: expected an integer > 0, got '0'"), and the check runs before anything slow
(loading a model) happens.
"""

from __future__ import annotations

import argparse
import gzip
import os
import sys
import zlib
from pathlib import Path
from typing import Callable, TextIO

from course.errors import CourseError


class ArgumentParser(argparse.ArgumentParser):
    """argparse.ArgumentParser whose errors are one line: `error: argument --x: ... (see --help)`, exit 2.

    Defaults suited to the course: the module docstring is shown verbatim (RawDescriptionHelpFormatter)
    and flags are never abbreviated (`--lr` must not silently mean `--lr_decay_iters`).
    """

    def __init__(self, *args, **kwargs):
        kwargs.setdefault("formatter_class", argparse.RawDescriptionHelpFormatter)
        kwargs.setdefault("allow_abbrev", False)
        super().__init__(*args, **kwargs)

    def error(self, message: str):  # noqa: D401 - argparse's hook
        message = " ".join(str(message).split())  # argparse messages can hold newlines
        self.exit(2, f"error: {message} (see --help)\n")


# ---- argparse types: each raises ArgumentTypeError, which argparse prefixes with the flag ------------
def _number(text: str, kind: type) -> float | int:
    try:
        return kind(text)
    except (TypeError, ValueError):
        raise argparse.ArgumentTypeError(f"expected {'an integer' if kind is int else 'a number'}, "
                                         f"got '{text}'") from None


def finite_float(text: str) -> float:
    """A float that is not nan or +-inf (argparse's `float` accepts both)."""
    value = float(_number(text, float))
    if value != value or value in (float("inf"), float("-inf")):
        raise argparse.ArgumentTypeError(f"expected a finite number, got '{text}'")
    return value


def positive_int(text: str) -> int:
    value = int(_number(text, int))
    if value <= 0:
        raise argparse.ArgumentTypeError(f"expected an integer > 0, got '{text}'")
    return value


def nonneg_int(text: str) -> int:
    value = int(_number(text, int))
    if value < 0:
        raise argparse.ArgumentTypeError(f"expected an integer >= 0, got '{text}'")
    return value


def float_in(lo: float, hi: float, lo_open: bool = False, hi_open: bool = False) -> Callable[[str], float]:
    """A type for finite floats in an interval, e.g. float_in(0, 1, lo_open=True) for top_p in (0, 1]."""
    interval = f"{'(' if lo_open else '['}{lo:g}, {hi:g}{')' if hi_open else ']'}"

    def parse(text: str) -> float:
        value = finite_float(text)
        if value < lo or value > hi or (lo_open and value == lo) or (hi_open and value == hi):
            raise argparse.ArgumentTypeError(f"expected a number in {interval}, got '{text}'")
        return value

    parse.__name__ = f"number in {interval}"
    return parse


nonneg_float = float_in(0.0, float("inf"))
nonneg_float.__name__ = "number >= 0"
probability = float_in(0.0, 1.0)
probability.__name__ = "probability"


def utf8_text(text: str) -> str:
    """Text that can be printed: on Linux, non-UTF-8 bytes in argv arrive as lone surrogates."""
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        raise argparse.ArgumentTypeError("is not valid UTF-8 text; pass plain UTF-8 characters") from None
    return text


def existing_file(text: str) -> Path:
    """A path to an existing regular file (not a folder)."""
    path = Path(text).expanduser()
    if not path.exists():
        raise argparse.ArgumentTypeError(f"file not found: {path}")
    if not path.is_file():
        raise argparse.ArgumentTypeError(f"{path} is not a file")
    return path


def out_dir(text: str) -> Path:
    """An output folder: may not exist yet (it is created), but must not be an existing file."""
    path = Path(text).expanduser()
    if path.exists() and not path.is_dir():
        raise argparse.ArgumentTypeError(f"{path} is an existing file, not a folder; pick another path")
    return path


# ---- reading text files ---------------------------------------------------------------------------
def read_text_file(path: str | os.PathLike, what: str = "text file", min_chars: int = 1) -> str:
    """Read a UTF-8 text file (`.gz` decompressed); every way it can be unreadable is one CourseError.

    Checked: missing, a folder, unreadable, a corrupt or truncated .gz, bytes that are not UTF-8,
    fewer than `min_chars` characters (an empty file).
    """
    path = Path(path)
    if not path.exists():
        raise CourseError(f"{what} not found: {path}")
    if path.is_dir():
        raise CourseError(f"{what} {path} is a folder; pass a file")
    try:
        if path.suffix == ".gz":
            with gzip.open(path, "rb") as f:
                raw = f.read()
        else:
            raw = path.read_bytes()
    except (gzip.BadGzipFile, EOFError, zlib.error) as e:
        raise CourseError(f"{what} {path} is not a readable .gz file ({e}); the file is corrupt or truncated, "
                          "download or compress it again") from None
    except OSError as e:
        raise CourseError(f"cannot read {what} {path} ({e.strerror or e})") from None
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as e:
        raise CourseError(f"{what} {path} is not UTF-8 text (byte {e.start}: {e.reason}); "
                          "pass a plain UTF-8 text file") from None
    if len(text) < min_chars:
        have = "is empty" if not text else f"has only {len(text)} characters"
        raise CourseError(f"{what} {path} {have}; it needs at least {min_chars}")
    return text


# ---- small things a user notices ---------------------------------------------------------------------
def use_color(stream: TextIO | None = None) -> bool:
    """ANSI colours only on a terminal, and never with NO_COLOR set or TERM=dumb (https://no-color.org)."""
    stream = stream or sys.stdout
    if os.environ.get("NO_COLOR") or os.environ.get("TERM") == "dumb":
        return False
    return hasattr(stream, "isatty") and stream.isatty()


def color(text: str, code: str, stream: TextIO | None = None) -> str:
    """`text` in ANSI colour `code` (e.g. "32" green) when `use_color(stream)`, else `text` unchanged."""
    return f"\033[{code}m{text}\033[0m" if use_color(stream) else text


def warn(message: str) -> None:
    """One `warning: ...` line on stderr; the run goes on."""
    print(f"warning: {message}", file=sys.stderr, flush=True)


def warn_if_gpu_preset_without_gpu(preset: str | None, device: str = "auto") -> bool:
    """`--preset gpu` on a machine without CUDA runs, but for hours: say so once. Returns True if warned."""
    import torch

    if preset != "gpu" or torch.cuda.is_available() or str(device).startswith("mps"):
        return False
    warn("--preset gpu on a machine without a CUDA GPU: this runs on the CPU and will be very slow; "
         "use --preset cpu here")
    return True


def run_demo(demo: Callable[[], object], description: str | None, argv: list[str] | None = None) -> None:
    """The `__main__` of a runnable test_*.py: `--help` prints usage, no flags runs its demo/validation mode."""
    from course.errors import run_cli

    parser = ArgumentParser(description=description,
                            epilog="Run without flags for the validation examples; the tests run with pytest.")
    parser.parse_args(argv)
    run_cli(demo)
