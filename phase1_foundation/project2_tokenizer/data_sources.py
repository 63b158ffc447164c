"""Where project 2's data come from (pinned URLs, sizes and sha256) and the functions that fetch them.

    gutenberg   154 public-domain books as data/gutenberg/*.txt.gz (76 MB of text),
                from rcdm-uga/Gutenberg_Text @ a0b16d35 (raw GitHub), sha256-checked per book
    wikitext2   data/wikitext2/wiki.{valid,test}.raw (WikiText-2 raw, Merity et al. 2016)
    wikitext103 data/wikitext103/wiki.{train,valid,test}.raw from the original zip
    gpt2_bpe    data/gpt2_bpe/{encoder.json,vocab.bpe}, GPT-2's tokenizer files (OpenAI)

`fetch(dataset, data_dir, source, force)` gets one of them; `source` is a local folder holding the same
file names (imported, same checks) or a base URL (fetched from there instead of the default).
The scripts download_data.py of projects 2 and 3 are thin command lines over this module.
"""

from __future__ import annotations

import csv
import gzip
import shutil
import tempfile
import urllib.parse
import zipfile
from pathlib import Path

from course.errors import CourseError

DATASETS = ("gutenberg", "wikitext2", "wikitext103", "gpt2_bpe")
# course.download and course.checkpoint import torch: they are imported inside the functions that fetch,
# so that `download_data.py --help` and a bad flag answer at once.
HERE = Path(__file__).resolve().parent
MANIFEST = HERE / "gutenberg_manifest.tsv"
GUTENBERG_REPO = "https://raw.githubusercontent.com/rcdm-uga/Gutenberg_Text/a0b16d35a9851168ce9ac649851c17b7ab08d48e/"
# The original WikiText-2 raw files (LF line ends), as kept in a public repository at a fixed commit.
WIKITEXT2_BASE = "https://raw.githubusercontent.com/DRAGNLabs/LLMHumanModeling/67cb89ec83ca316877b9101d6b8b1227aa7cf8e4/data/"
WIKITEXT2_FILES = {
    "wiki.valid.raw": (1_146_846, "4cd0f6876d07a413aa911261ff6d363c72d757d47f0fdd6015702014c89cb9c7"),
    "wiki.test.raw": (1_290_590, "173c87a53759e0201f33e0ccf978e510c2042d7f2cb78229d9a50d79b9e7dd08"),
}
# Salesforce's original release (Merity et al. 2016). Salesforce published no checksum; this size and
# sha256 are the ones every widely used loader pins for this zip (e.g. Hugging Face's old `wikitext`
# script), so a mirror or a local copy is accepted only if it is byte-identical.
WIKITEXT103_URL = "https://s3.amazonaws.com/research.metamind.io/wikitext/wikitext-103-raw-v1.zip"
WIKITEXT103_ZIP = (191_984_949, "91c00ae287f0d699e18605c84afc9e45c192bc6b7797ff8837e5474655a33794")
GPT2_BASE = "https://openaipublic.blob.core.windows.net/gpt-2/encodings/main/"
GPT2_FILES = {  # the same hashes tiktoken pins in tiktoken_ext/openai_public.py
    "encoder.json": (1_042_301, "196139668be63f3b5d6574427317ae82f612a97c5d1cdaf36ed2256dbf636783"),
    "vocab.bpe": (456_318, "1ce1664773c50f3e0cc8842619a93edc4624525b728b188a9e0be33b7726adc5"),
}


def is_url(text: str) -> bool:
    return "://" in str(text)  # as course.download.is_url


def _origin(source: str | None, name: str, default_url: str) -> tuple[str, str | None]:
    """(url, local source) for one file: --source DIR/name, --source URL/name, or the default URL."""
    if source is None:
        return default_url, None
    if is_url(source):
        return source.rstrip("/") + "/" + urllib.parse.quote(name), None
    src = Path(source).expanduser()
    if not src.is_dir():
        raise CourseError(f"--source must be a folder holding the files (or a base URL); not a folder: {src}")
    return default_url, str(src / name)


def read_manifest() -> list[dict[str, str]]:
    with open(MANIFEST, newline="", encoding="utf-8") as f:
        return list(csv.DictReader(f, delimiter="\t"))


def get_gutenberg(data_dir: Path, source: str | None, force: bool) -> None:
    """154 books. Local copies are the .txt.gz files (gz sha256 checked); downloads are the plain
    .txt blobs of the source repository (txt sha256 checked), gzipped here."""
    from course.checkpoint import atomic_write
    from course.download import fetch_file, verify_file

    from tqdm import tqdm

    rows = read_manifest()
    dest_dir = data_dir / "gutenberg"
    for row in tqdm(rows, desc="gutenberg", unit="book"):
        dest = dest_dir / row["file"]
        if dest.is_file() and not force:
            try:
                verify_file(dest, row["gz_sha256"], int(row["gz_bytes"]))
                continue
            except CourseError:
                pass
        if source is not None and not is_url(source):
            fetch_file(dest, "", source=_origin(source, row["file"], "")[1], sha256=row["gz_sha256"],
                       size=int(row["gz_bytes"]), force=True)
            continue
        base = source.rstrip("/") + "/" if source else GUTENBERG_REPO
        url = base + urllib.parse.quote(row["source_path"])
        with tempfile.TemporaryDirectory() as tmp:
            txt = fetch_file(Path(tmp) / "book.txt", url, sha256=row["txt_sha256"], size=int(row["txt_bytes"]))
            # mtime=0: the same text always gives the same .gz bytes
            atomic_write(dest, lambda f: f.write(gzip.compress(txt.read_bytes(), compresslevel=9, mtime=0)))
    print(f"gutenberg: {len(rows)} books in {dest_dir}")


def get_files(files: dict[str, tuple[int, str]], base_url: str, dest_dir: Path, source: str | None, force: bool) -> None:
    from course.download import fetch_file

    for name, (size, sha) in files.items():
        url, local = _origin(source, name, base_url + name)
        path = fetch_file(dest_dir / name, url, source=local, sha256=sha, size=size, force=force)
        print(f"{path} ({size:,} bytes, sha256 ok)")


def get_wikitext103(data_dir: Path, source: str | None, force: bool) -> None:
    from course.checkpoint import atomic_write
    from course.download import fetch_file

    dest_dir = data_dir / "wikitext103"
    names = ["wiki.train.raw", "wiki.valid.raw", "wiki.test.raw"]
    if all((dest_dir / n).is_file() for n in names) and not force:
        print(f"wikitext103: already in {dest_dir}")
        return
    url, local = _origin(source, "wikitext-103-raw-v1.zip", WIKITEXT103_URL)
    with tempfile.TemporaryDirectory() as tmp:
        size, sha = WIKITEXT103_ZIP
        z = fetch_file(Path(tmp) / "wt103.zip", url, source=local, sha256=sha, size=size)
        print(f"wikitext-103-raw-v1.zip ({size:,} bytes, sha256 ok)")
        try:
            with zipfile.ZipFile(z) as zf:
                for n in names:
                    with zf.open(f"wikitext-103-raw/{n}") as src:
                        atomic_write(dest_dir / n, lambda f, src=src: shutil.copyfileobj(src, f, 1 << 20))
        except (zipfile.BadZipFile, KeyError) as e:
            raise CourseError(f"{url}: not the WikiText-103 raw zip ({e})") from None
    print(f"wikitext103: {', '.join(names)} in {dest_dir}")


def fetch(dataset: str, data_dir: Path, source: str | None = None, force: bool = False) -> None:
    """Get one of DATASETS into data_dir (verified copies are kept unless force)."""
    if dataset == "gutenberg":
        get_gutenberg(data_dir, source, force)
    elif dataset == "wikitext2":
        get_files(WIKITEXT2_FILES, WIKITEXT2_BASE, data_dir / "wikitext2", source, force)
    elif dataset == "wikitext103":
        get_wikitext103(data_dir, source, force)
    elif dataset == "gpt2_bpe":
        get_files(GPT2_FILES, GPT2_BASE, data_dir / "gpt2_bpe", source, force)
    else:
        raise CourseError(f"unknown dataset {dataset!r}; choose from: {', '.join(DATASETS)}")
