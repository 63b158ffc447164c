"""Download (or import a local copy of) a data file with a progress bar and integrity checks.

Every project's download_data.py is a thin wrapper: it knows the public URL, the expected size
and sha256, and the path under data/. A user without internet passes `--source PATH_OR_URL`
to import a copy they already have; the same checks apply to it.
"""

from __future__ import annotations

import hashlib
import os
import shutil
import socket
import urllib.error
import urllib.request
from pathlib import Path

from tqdm import tqdm

from course.checkpoint import atomic_write
from course.errors import CourseError

CHUNK = 1 << 20


def sha256_file(path: str | os.PathLike) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(CHUNK), b""):
            h.update(block)
    return h.hexdigest()


def is_url(text: str) -> bool:
    return "://" in str(text)


def _copy_stream(src, dst, total: int | None, desc: str) -> tuple[int, str]:
    """Copy with a progress bar; return (bytes copied, sha256) computed on the fly."""
    h, n = hashlib.sha256(), 0
    with tqdm(total=total, unit="B", unit_scale=True, unit_divisor=1024, desc=desc, leave=False) as bar:
        for block in iter(lambda: src.read(CHUNK), b""):
            dst.write(block)
            h.update(block)
            n += len(block)
            bar.update(len(block))
    return n, h.hexdigest()


def _check(what: str, got_size: int, got_sha: str, size: int | None, sha256: str | None) -> None:
    if size is not None and got_size != size:
        raise CourseError(f"{what}: expected {size:,} bytes, got {got_size:,}; "
                          "the file is truncated or a different version")
    if sha256 is not None and got_sha != sha256:
        raise CourseError(f"{what}: sha256 {got_sha[:12]}... does not match the expected {sha256[:12]}...; "
                          "the file is corrupt or a different version")


def verify_file(path: Path, sha256: str | None = None, size: int | None = None) -> None:
    """Raise CourseError if the file's size or sha256 is not the expected one."""
    _check(str(path), path.stat().st_size, sha256_file(path) if sha256 else "", size, sha256)


def fetch_file(dest: str | os.PathLike, url: str, source: str | None = None, sha256: str | None = None,
               size: int | None = None, force: bool = False, timeout: float = 30.0) -> Path:
    """Make `dest` hold the verified file, from `source` (a local path or URL) if given, else `url`.

    A dest that already exists and passes the checks is kept (no network). Writes are atomic
    and checked before the rename, so a failed or corrupt transfer never leaves a file behind.
    """
    dest = Path(dest)
    if dest.is_file() and not force and source is None:
        try:
            verify_file(dest, sha256, size)
            return dest
        except CourseError:
            pass  # present but wrong: fetch again
    origin = source if source is not None else url
    desc = dest.name

    def write(f) -> None:
        if is_url(origin):
            try:
                req = urllib.request.Request(origin, headers={"User-Agent": "llm-from-scratch-course"})
                with urllib.request.urlopen(req, timeout=timeout) as resp:
                    total = resp.headers.get("Content-Length")
                    got = _copy_stream(resp, f, int(total) if total else None, desc)
            except (urllib.error.URLError, socket.timeout, ConnectionError, OSError) as e:
                reason = getattr(e, "reason", e)
                raise CourseError(f"could not download {origin} ({reason}); if you are offline, "
                                  "import a local copy with --source PATH_OR_URL") from None
        else:
            src = Path(origin).expanduser()
            if not src.is_file():
                raise CourseError(f"--source file not found: {src}")
            with open(src, "rb") as s:
                got = _copy_stream(s, f, src.stat().st_size, desc)
        _check(origin, *got, size, sha256)  # before the rename: a bad file never lands

    atomic_write(dest, write)
    return dest


def copy_tree_files(src_dir: str | os.PathLike, dest_dir: str | os.PathLike, pattern: str = "*") -> list[Path]:
    """Import every file matching `pattern` from a local folder (used by --source for multi-file datasets)."""
    src_dir, dest_dir = Path(src_dir).expanduser(), Path(dest_dir)
    if not src_dir.is_dir():
        raise CourseError(f"--source folder not found: {src_dir}")
    files = sorted(p for p in src_dir.glob(pattern) if p.is_file())
    if not files:
        raise CourseError(f"no files matching '{pattern}' in {src_dir}")
    dest_dir.mkdir(parents=True, exist_ok=True)
    out = []
    for p in tqdm(files, desc=f"importing {src_dir.name}", unit="file", leave=False):
        target = dest_dir / p.name
        def copy(f, p=p):
            with open(p, "rb") as src:
                shutil.copyfileobj(src, f, CHUNK)
        atomic_write(target, copy)
        out.append(target)
    return out
