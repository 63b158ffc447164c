"""Tokenize the corpus with project 2's trained tokenizer into uint16 memmap shards for train.py.

    uv run python phase1_foundation/project3_pretrain/prepare_data.py            # data/gutenberg -> data/project3

Input: data/gutenberg/*.txt.gz (one book per file, fetched by download_data.py), read with project 2's
read_gutenberg. Each book is one document: Project Gutenberg's licence header and footer are cut off (they
repeat in every file and are not prose), line ends are normalised to "\\n", and documents are separated by
the `<|endoftext|>` token so the model learns where a text ends.
Held-out validation set: whole books (project 2's held-out books: every 25th in name order), never windows of
training books, so validation measures generalisation to unseen text, not memorisation of neighbouring pages.

Output in --out_dir: tokenizer.pkl (a copy), train.bin, val.bin (flat uint16 token ids; a 10K vocabulary fits in 2 bytes, half of
int32's disk and page cache) and meta.json (vocab size, tokenizer, the held-out books, and per split the
token count and the UTF-8 byte count of the text, so train.py's bits per byte are exact).
"""

from __future__ import annotations

import hashlib
from pathlib import Path

import numpy as np
from tqdm import tqdm

from course.checkpoint import atomic_write, atomic_write_json
from course.cli import ArgumentParser, out_dir as out_dir_type, positive_int
from course.errors import CourseError, run_cli
from course.paths import REPO_ROOT
from phase1_foundation.project2_tokenizer.data import gutenberg_files, read_gutenberg
from phase1_foundation.project2_tokenizer.formats import load_tokenizer

GUTENBERG_DIR = REPO_ROOT / "data" / "gutenberg"
OUT_DIR = REPO_ROOT / "data" / "project3"
TOKENIZER_PATH = REPO_ROOT / "checkpoints" / "project2" / "tokenizer.pkl"
DOWNLOAD_CMD = "uv run python phase1_foundation/project3_pretrain/download_data.py"


def _rel(path: Path) -> str:
    """Paths inside the repo are stored relative to its root, so a checkout elsewhere still finds them."""
    try:
        return str(path.resolve().relative_to(REPO_ROOT))
    except ValueError:
        return str(path)


def prepare(data_dir: str | Path, out_dir: str | Path, tokenizer_path: str | Path = TOKENIZER_PATH,
            heldout_every: int = 25, progress: bool = True) -> dict:
    """Tokenize the books of data_dir into out_dir/{train,val}.bin + meta.json; return the meta dict.

    The held-out books are project 2's (read_gutenberg: book k in name order when k % heldout_every == 0), so
    neither the tokenizer nor the model has seen the validation text.
    """
    tok_path = Path(tokenizer_path)
    if not tok_path.is_file():
        raise CourseError(f"tokenizer not found: {tok_path}; train it with: "
                          "uv run python phase1_foundation/project2_tokenizer/train_tokenizer.py")
    tok = load_tokenizer(tok_path)
    eot = tok.eot_token
    if eot is None:
        raise CourseError(f"{tok_path} has no '<|endoftext|>' special token; documents need a separator")
    n_vocab = max(tok.vocab_size, eot + 1)
    if n_vocab > 65_536:
        raise CourseError(f"{tok_path} has {n_vocab} token ids; uint16 shards hold at most 65536")
    names = [p.name for p in gutenberg_files(data_dir)]
    if len(names) < 2:
        raise CourseError(f"need at least 2 books in {data_dir} to hold one out for validation, found {len(names)}")
    out_dir = Path(out_dir)
    # A copy of the tokenizer lives with the shards: re-training project 2's tokenizer later cannot silently
    # change what the ids of these shards (and of the models trained on them) mean.
    atomic_write(out_dir / "tokenizer.pkl", lambda f: f.write(tok_path.read_bytes()))
    meta = {"vocab_size": n_vocab, "eot_token": eot, "dtype": "uint16", "tokenizer": _rel(out_dir / "tokenizer.pkl"),
            "tokenizer_source": _rel(tok_path),
            "tokenizer_sha256": hashlib.sha256(tok_path.read_bytes()).hexdigest(), "heldout_every": heldout_every,
            "splits": {}}
    for split, theirs in (("train", "train"), ("val", "heldout")):
        books = read_gutenberg(data_dir, split=theirs, heldout_every=heldout_every)
        docs = [n for k, n in enumerate(names) if (k % heldout_every == 0) == (split == "val")]
        ids: list[np.ndarray] = []
        n_bytes = 0
        for text in tqdm(books, desc=f"tokenize {split}", unit="book", disable=not progress):
            n_bytes += len(text.encode("utf-8"))
            ids.append(np.asarray(tok.encode_ordinary(text) + [eot], dtype=np.uint16))
        arr = np.concatenate(ids)
        atomic_write(out_dir / f"{split}.bin", lambda f: f.write(arr.tobytes()))
        meta["splits"][split] = {"tokens": int(arr.size), "bytes": n_bytes, "documents": docs}
    atomic_write_json(out_dir / "meta.json", meta)
    return meta


def main(argv: list[str] | None = None) -> None:
    parser = ArgumentParser(description=__doc__)
    parser.add_argument("--input_dir", default=str(GUTENBERG_DIR),
                        help="folder of Gutenberg books, one gzipped UTF-8 *.txt.gz per book (plain *.txt is not read)")
    parser.add_argument("--out_dir", type=out_dir_type, default=OUT_DIR, help="where train.bin, val.bin, meta.json go")
    parser.add_argument("--tokenizer", default=str(TOKENIZER_PATH), help="project 2's trained tokenizer .pkl")
    parser.add_argument("--heldout_every", type=positive_int, default=25,
                        help="hold out book k when k %% N == 0 (default 25: project 2's 7 held-out books, ~5%%)")
    parser.add_argument("--seed", type=int, default=0, help="unused: the split is deterministic (kept for uniformity)")
    parser.add_argument("--device", default="cpu", help="unused: tokenization runs on the CPU")
    args = parser.parse_args(argv)
    if not Path(args.input_dir).is_dir():
        raise CourseError(f"--input_dir {args.input_dir} is not a folder; get the books with: {DOWNLOAD_CMD}")
    if args.heldout_every < 2:
        raise CourseError(f"--heldout_every ({args.heldout_every}) must be >= 2")
    meta = prepare(args.input_dir, args.out_dir, args.tokenizer, args.heldout_every)
    tr, va = meta["splits"]["train"], meta["splits"]["val"]
    print(f"wrote {args.out_dir}: train {tr['tokens']:,} tokens / {tr['bytes']:,} bytes ({len(tr['documents'])} docs), "
          f"val {va['tokens']:,} tokens / {va['bytes']:,} bytes ({len(va['documents'])} docs: "
          f"{', '.join(d.split('.')[0] for d in va['documents'])})")
    print(f"done: train_tokens={tr['tokens']} val_tokens={va['tokens']} "
          f"bytes_per_token={(tr['bytes'] + va['bytes']) / (tr['tokens'] + va['tokens']):.3f}")


if __name__ == "__main__":
    run_cli(main)
