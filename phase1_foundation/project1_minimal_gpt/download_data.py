"""Download Tiny Shakespeare (Karpathy's char-rnn data set, ~1.1 MB of plays) to data/shakespeare.txt.

    uv run python phase1_foundation/project1_minimal_gpt/download_data.py                 # from the web
    uv run python phase1_foundation/project1_minimal_gpt/download_data.py --source input.txt   # a local copy

The file's size and sha256 are checked before it lands in data/, whichever way it arrives.
train.py calls `ensure_data()` itself when the file is missing.
"""

from __future__ import annotations

import argparse
from pathlib import Path

from course.download import fetch_file
from course.errors import CourseError, run_cli
from course.paths import REPO_ROOT

DATA_PATH = REPO_ROOT / "data" / "shakespeare.txt"
URL = "https://raw.githubusercontent.com/karpathy/char-rnn/master/data/tinyshakespeare/input.txt"
SIZE = 1_115_394
SHA256 = "86c4e6aa9db7c042ec79f339dcb96d42b0075e16b8fc2e86bf0ca57e2dc565ed"
SCRIPT = "uv run python phase1_foundation/project1_minimal_gpt/download_data.py"


def ensure_data(dest: str | Path = DATA_PATH, source: str | None = None, force: bool = False) -> Path:
    """Make `dest` hold the verified Tiny Shakespeare text; return its path."""
    try:
        return fetch_file(dest, URL, source=source, sha256=SHA256, size=SIZE, force=force)
    except CourseError as e:
        if source is None and "could not download" in str(e):
            raise CourseError(f"could not download Tiny Shakespeare from {URL}; offline? import a local copy "
                              f"of input.txt with: {SCRIPT} --source PATH_TO/input.txt") from None
        raise


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--source", default=None,
                        help="local path or URL of a copy of input.txt to import instead of the default URL")
    parser.add_argument("--dest", default=str(DATA_PATH), help="where to write the text (default: %(default)s)")
    parser.add_argument("--force", action="store_true", help="download again even if a verified copy exists")
    args = parser.parse_args(argv)
    path = ensure_data(args.dest, source=args.source, force=args.force)
    print(f"ok: {path} ({path.stat().st_size:,} bytes, sha256 verified)")


if __name__ == "__main__":
    run_cli(main)
