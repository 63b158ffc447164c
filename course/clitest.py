"""Test helpers for the course's scripts: a bad flag or file must end in one line, never a traceback.

Table-driven bad-input tests of every project use these:

    @pytest.mark.parametrize("argv,fragment", [(["--top_k=0"], "expected an integer > 0"), ...])
    def test_generate_rejects(argv, fragment):
        assert fragment in one_line_error(generate.main, argv)

`one_line_error` runs `main(argv)` in this process through `run_cli` (fast: no new interpreter, no
second torch import); `run_script` + `assert_one_line_error` run the real file in a subprocess, for
the few checks that need a real process (signals, stdin bytes, `--help` of a file).
"""

from __future__ import annotations

import contextlib
import io
import os
import re
import subprocess
import sys
from pathlib import Path
from typing import Callable, Mapping, Sequence

from course.errors import run_cli
from course.paths import REPO_ROOT


def error_lines(stderr: str) -> list[str]:
    """The non-blank lines of stderr (\\r splits too: tqdm redraws its bar in place)."""
    return [line for line in re.split(r"[\r\n]", stderr) if line.strip()]


def check_one_line(returncode: int | None, stderr: str) -> str:
    """Assert a non-zero exit, exactly one line on stderr, starting `error:`, no traceback; return it."""
    lines = error_lines(stderr)
    assert returncode not in (0, None), f"exit status {returncode}, expected non-zero; stderr: {stderr!r}"
    assert "Traceback" not in stderr, stderr
    assert len(lines) == 1, f"expected exactly one line on stderr, got {len(lines)}: {stderr!r}"
    assert lines[0].startswith("error: "), lines[0]
    return lines[0]


def one_line_error(main: Callable[[list[str]], object], argv: Sequence[str], fill: Mapping | None = None) -> str:
    """Run `main(argv)` through run_cli in-process; assert it fails in one stderr line; return that line.

    `fill`: the arguments are templates (`"--data_path={empty}"`), filled with `str.format(**fill)`, so a table
    of bad inputs can name the files a fixture wrote.

    Anything other than a clean exit (an uncaught exception) propagates and fails the test with its
    traceback, which is exactly what these tests are there to catch.
    """
    err = io.StringIO()
    code: int | str | None = 0
    with contextlib.redirect_stderr(err), contextlib.redirect_stdout(io.StringIO()):
        try:
            run_cli(lambda: main([a.format(**fill) for a in argv] if fill else list(argv)))
        except SystemExit as e:
            code = e.code
    return check_one_line(code if isinstance(code, int) else 1, err.getvalue())


def run_script(script: str | os.PathLike, *args: str, stdin: bytes | str | None = None,
               timeout: float = 120, env: dict[str, str] | None = None, **kwargs) -> subprocess.CompletedProcess:
    """Run a course file (a path relative to the repo root; or "-m", "pkg.module") with this interpreter."""
    cmd = [sys.executable, str(script), *args]
    full_env = {**os.environ, "PYTHONUNBUFFERED": "1", **(env or {})}
    data = stdin.encode() if isinstance(stdin, str) else stdin
    return subprocess.run(cmd, cwd=REPO_ROOT, input=data, capture_output=True, timeout=timeout, env=full_env,
                          **kwargs)


def assert_one_line_error(result: subprocess.CompletedProcess) -> str:
    """The one-line check on a finished subprocess (stdout/stderr as bytes or text)."""
    stderr = result.stderr.decode(errors="replace") if isinstance(result.stderr, bytes) else result.stderr
    return check_one_line(result.returncode, stderr)


def assert_help_works(script: str | os.PathLike, *must_mention: str) -> str:
    """`python FILE --help` exits 0, prints usage (and the given words) and no traceback; returns stdout."""
    res = run_script(script, "--help")
    out = res.stdout.decode(errors="replace")
    assert res.returncode == 0 and out.startswith("usage:"), (res.returncode, out[:200], res.stderr[-500:])
    for word in must_mention:
        assert word in out, f"{word!r} not in the --help of {Path(script).name}"
    return out
