"""Download stories260K (a real pretrained llama2.c model, 260K parameters, TinyStories) and its tokenizer.

    uv run python phase3_core_inference/project8_kv_cache/download_data.py                  # from Hugging Face
    uv run python phase3_core_inference/project8_kv_cache/download_data.py --source DIR     # import local copies

Source: karpathy/tinyllamas on the Hugging Face hub, folder stories260K/ (MIT), written by llama2.c's export.
Files land in data/stories260k/ and are checked by size and sha256 before they are kept.
"""

from __future__ import annotations

from pathlib import Path

from course.cli import ArgumentParser, out_dir
from course.download import fetch_file
from course.errors import CourseError, run_cli
from course.paths import REPO_ROOT

BASE_URL = "https://huggingface.co/karpathy/tinyllamas/resolve/main/stories260K/"
DEST = REPO_ROOT / "data" / "stories260k"
FILES = {
    "stories260K.bin": (1_056_540, "b0a507e7ad0f626624f17112325e66691f9076d622e1d3274d103d00299f2696"),
    "tok512.bin": (6_227, "037cb335abb25d1fa9e8ecae30ed2a3a8ace9302862ebcdc05d51a6bbb10c312"),
}


def main(argv: list[str] | None = None) -> None:
    parser = ArgumentParser(description=__doc__)
    parser.add_argument("--source", default=None,
                        help="a local folder (or base URL) holding stories260K.bin and tok512.bin")
    parser.add_argument("--dest", type=out_dir, default=DEST, help=f"where to put the files (default {DEST})")
    parser.add_argument("--force", action="store_true", help="fetch again even if the files are there and valid")
    args = parser.parse_args(argv)
    dest = Path(args.dest)
    for name, (size, sha) in FILES.items():
        source = None
        if args.source is not None:
            src = args.source.rstrip("/")
            source = f"{src}/{name}"
            if "://" not in src and not Path(src).is_dir():
                raise CourseError(f"--source folder not found: {src} (it must hold {', '.join(FILES)})")
        path = fetch_file(dest / name, BASE_URL + name, source=source, sha256=sha, size=size, force=args.force)
        print(f"ok  {path}  ({size:,} bytes, sha256 {sha[:12]}...)")
    print(f"stories260K ready in {dest}/")


if __name__ == "__main__":
    run_cli(main)
