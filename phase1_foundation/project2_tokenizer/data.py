"""The text corpora of project 2, read from data/ (fill it with download_data.py).

Gutenberg books keep Project Gutenberg's license header and footer; `strip_gutenberg` cuts the
text at the `*** START OF` / `*** END OF` marker lines (so the tokenizer learns prose, not
license boilerplate) and turns the books' CRLF line ends into "\\n".
"""

from __future__ import annotations

import os
from pathlib import Path

import regex

from course.cli import read_text_file
from course.errors import CourseError
from course.paths import REPO_ROOT, repo_path

DATA_DIR = REPO_ROOT / "data"
GUTENBERG_DIR = DATA_DIR / "gutenberg"
WIKITEXT2_DIR = DATA_DIR / "wikitext2"
GPT2_DIR = DATA_DIR / "gpt2_bpe"
HELP = "uv run python phase1_foundation/project2_tokenizer/download_data.py --dataset {}"

_START = regex.compile(r"^\*\*\* ?START OF[^\n]*?(?:\*\*\*|\n[^\n]*?\*\*\*)[^\n]*\n", regex.MULTILINE)
_END = regex.compile(r"^\*\*\* ?END OF", regex.MULTILINE)


def strip_gutenberg(text: str) -> str:
    """Normalize line ends and keep only the book between the START and END markers (if present)."""
    text = text.replace("\r\n", "\n")
    end = _END.search(text)
    stop = end.start() if end else len(text)
    starts = [m for m in _START.finditer(text, 0, stop)]
    begin = starts[-1].end() if starts else 0
    return text[begin:stop].strip("\n") + "\n"


def gutenberg_files(data_dir: str | os.PathLike = GUTENBERG_DIR) -> list[Path]:
    files = sorted(repo_path(data_dir).glob("*.txt.gz"))
    if not files:
        raise CourseError(f"no Gutenberg books (*.txt.gz) in {data_dir}; get them with: " + HELP.format("gutenberg"))
    return files


def read_gutenberg(data_dir: str | os.PathLike = GUTENBERG_DIR, split: str = "all",
                   heldout_every: int = 25, strip: bool = True) -> list[str]:
    """The books as a list of strings, in file-name order.

    split: "all", "train" or "heldout"; book k (0-based, sorted by name) is held out when
    k % heldout_every == 0 (with 154 books and 25: 7 books, ~5% of the text).
    """
    if split not in ("all", "train", "heldout"):
        raise CourseError(f"split must be all, train or heldout, got {split!r}")
    books = []
    for k, path in enumerate(gutenberg_files(data_dir)):
        held = heldout_every > 0 and k % heldout_every == 0
        if split == "all" or (split == "heldout") == held:
            try:  # every way a book can be unreadable (corrupt .gz, not UTF-8, ...) is one line
                text = read_text_file(path, "Gutenberg book", min_chars=0)
            except CourseError as e:
                raise CourseError(f"{e}; or re-import it with: " + HELP.format("gutenberg")) from None
            books.append(strip_gutenberg(text) if strip else text)
    return books


def read_wikitext2(split: str = "test", data_dir: str | os.PathLike = WIKITEXT2_DIR) -> str:
    path = repo_path(data_dir) / f"wiki.{split}.raw"
    if not path.is_file():
        raise CourseError(f"{path} not found; get it with: " + HELP.format("wikitext2"))
    return read_text_file(path, "WikiText-2 file")


def gpt2_files(data_dir: str | os.PathLike = GPT2_DIR) -> tuple[Path, Path]:
    """Paths of GPT-2's encoder.json and vocab.bpe (raises with the download command if absent)."""
    enc, bpe = repo_path(data_dir) / "encoder.json", repo_path(data_dir) / "vocab.bpe"
    if not (enc.is_file() and bpe.is_file()):
        raise CourseError(f"GPT-2 tokenizer files not found in {data_dir}; get them with: " + HELP.format("gpt2_bpe"))
    return enc, bpe
