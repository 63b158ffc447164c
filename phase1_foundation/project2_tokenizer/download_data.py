"""Download (or import a local copy of) project 2's data into data/.

    --dataset gutenberg   154 public-domain books as data/gutenberg/*.txt.gz (76 MB of text),
                          from rcdm-uga/Gutenberg_Text @ a0b16d35 (raw GitHub), sha256-checked
    --dataset wikitext2   data/wikitext2/wiki.{valid,test}.raw (WikiText-2 raw, Merity et al. 2016)
    --dataset wikitext103 data/wikitext103/wiki.{train,valid,test}.raw from the original zip
    --dataset gpt2_bpe    data/gpt2_bpe/{encoder.json,vocab.bpe}, GPT-2's tokenizer files (OpenAI)

With --source DIR the files are imported from a local folder holding them (same names, same
checks); with --source URL they are fetched from that base URL instead of the default one.
Offline without --source, the download fails in one line that says to pass --source.

Examples:
    uv run python phase1_foundation/project2_tokenizer/download_data.py --dataset gutenberg
    uv run python phase1_foundation/project2_tokenizer/download_data.py --dataset gpt2_bpe --source ~/gpt2_files
"""

from __future__ import annotations

import argparse
from pathlib import Path

from course.cli import ArgumentParser, out_dir, utf8_text
from course.errors import run_cli
from course.paths import repo_path
from phase1_foundation.project2_tokenizer.data_sources import DATASETS, fetch, is_url


def folder_or_url(text: str) -> str:
    """--source: an existing folder or an http(s) URL, checked before anything is fetched."""
    text = utf8_text(text)
    if is_url(text):
        return text
    path = Path(text).expanduser()
    if not path.is_dir():
        raise argparse.ArgumentTypeError(f"not a folder (or an http(s) URL): {path}")
    return str(path)


def build_parser() -> ArgumentParser:
    p = ArgumentParser(description=__doc__)
    p.add_argument("--dataset", required=True, choices=DATASETS)
    p.add_argument("--source", type=folder_or_url, default=None,
                   help="local folder holding the files, or a base URL (default: the public URL)")
    p.add_argument("--data_dir", type=out_dir, default=Path("data"), help="where data/ is (default: data)")
    p.add_argument("--force", action="store_true", help="fetch again even if a verified copy is present")
    return p


def main(argv: list[str] | None = None) -> None:
    args = build_parser().parse_args(argv)
    fetch(args.dataset, repo_path(args.data_dir), args.source, args.force)


if __name__ == "__main__":
    run_cli(main)
