"""Download Tiny Shakespeare (Karpathy's char-rnn data set, ~1.1 MB of plays) to data/shakespeare.txt.

    uv run python phase1_foundation/project1_minimal_gpt/download_data.py                 # from the web
    uv run python phase1_foundation/project1_minimal_gpt/download_data.py --source input.txt   # a local copy

The file's size and sha256 are checked before it lands in data/, whichever way it arrives.
train.py calls `data.ensure_data()` itself when the file is missing.
"""

from __future__ import annotations

from pathlib import Path

from course.cli import ArgumentParser
from course.errors import CourseError, run_cli
from phase1_foundation.project1_minimal_gpt.data import DATA_PATH, ensure_data


def main(argv: list[str] | None = None) -> None:
    parser = ArgumentParser(description=__doc__)
    parser.add_argument("--source", default=None,
                        help="local path or URL of a copy of input.txt to import instead of the default URL")
    parser.add_argument("--dest", default=str(DATA_PATH), help="where to write the text (default: %(default)s)")
    parser.add_argument("--force", action="store_true", help="download again even if a verified copy exists")
    args = parser.parse_args(argv)
    if Path(args.dest).is_dir():
        raise CourseError(f"--dest {args.dest} is a folder; give the file to write, e.g. {DATA_PATH}")
    path = ensure_data(args.dest, source=args.source, force=args.force)
    print(f"ok: {path} ({path.stat().st_size:,} bytes, sha256 verified)")


if __name__ == "__main__":
    run_cli(main)
