"""Fetch project 3's corpora into data/ (progress bars and checksums come from project 2's downloader).

    uv run python phase1_foundation/project3_pretrain/download_data.py                     # gutenberg + wikitext2
    uv run python phase1_foundation/project3_pretrain/download_data.py --dataset wikitext103  # full-scale corpus
    uv run python phase1_foundation/project3_pretrain/download_data.py --dataset gutenberg --source DIR

Datasets:
    gutenberg    154 public-domain books, data/gutenberg/*.txt.gz (76 MB of text), every file sha256-checked
                 against project 2's manifest: the corpus the course's 2-core runs pre-train on
    wikitext2    data/wikitext2/wiki.{valid,test}.raw (Merity et al., 2016): out-of-domain evaluation text
    wikitext103  data/wikitext103/wiki.{train,valid,test}.raw, 540 MB (Merity et al., 2016): the full-scale
                 pre-training corpus for the `gpu` preset (prepare it with prepare_data.py --input_dir after
                 converting to one document per article, or train on it as one document)

`--source` imports a local copy (a folder holding the files) or fetches from another base URL; the same
checks apply. This is a thin wrapper: the download code lives once, in project 2's data_sources.py.
"""

from __future__ import annotations

from pathlib import Path

from course.cli import ArgumentParser, out_dir as out_dir_type
from course.errors import CourseError, run_cli
from phase1_foundation.project2_tokenizer.data_sources import DATASETS, fetch


def main(argv: list[str] | None = None) -> None:
    p = ArgumentParser(description=__doc__)
    p.add_argument("--dataset", choices=DATASETS + ("all",), default="all",
                   help="what to fetch (default all = gutenberg + wikitext2, what the cpu runs need)")
    p.add_argument("--source", default=None,
                   help="a local folder holding the dataset's files, or a base URL (default: the public URL)")
    p.add_argument("--data_dir", type=out_dir_type, default=Path("data"), help="where data/ is (default: data)")
    p.add_argument("--force", action="store_true", help="fetch again even if a verified copy is present")
    p.add_argument("--seed", type=int, default=0, help="unused (downloads are deterministic)")
    p.add_argument("--device", default="cpu", help="unused")
    args = p.parse_args(argv)
    if args.source and args.dataset == "all":
        raise CourseError("--source points at one dataset's files: add --dataset gutenberg|wikitext2|wikitext103|gpt2_bpe")
    names = ("gutenberg", "wikitext2") if args.dataset == "all" else (args.dataset,)
    for name in names:
        fetch(name, Path(args.data_dir), args.source, args.force)
    print(f"done: {', '.join(names)} in {args.data_dir}/")


if __name__ == "__main__":
    run_cli(main)
