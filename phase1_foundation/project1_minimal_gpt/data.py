"""The data of the minimal GPT: Tiny Shakespeare, its character vocabulary, the split and the batches.

    text = load_text()                          # data/shakespeare.txt, downloaded when missing
    chars = build_vocab(text)                   # the 65 distinct characters: the whole vocabulary
    ids = torch.tensor(encode(text, chars))
    train_data, val_data = split_data(ids)      # first 90% / last 10%
    get_batch = make_get_batch(train_data, val_data, block_size=128, batch_size=8, device=device)

Also the paths and commands the scripts share (DATA_PATH, DEFAULT_OUT_DIR, TRAIN_CMD, DOWNLOAD_CMD),
so no script has to import another one.
"""

from __future__ import annotations

from pathlib import Path
from typing import Callable

import torch

from course.cli import read_text_file
from course.download import fetch_file
from course.errors import CourseError
from course.paths import REPO_ROOT

DATA_PATH = REPO_ROOT / "data" / "shakespeare.txt"
URL = "https://raw.githubusercontent.com/karpathy/char-rnn/master/data/tinyshakespeare/input.txt"
SIZE = 1_115_394
SHA256 = "86c4e6aa9db7c042ec79f339dcb96d42b0075e16b8fc2e86bf0ca57e2dc565ed"
DOWNLOAD_CMD = "uv run python phase1_foundation/project1_minimal_gpt/download_data.py"
TRAIN_CMD = "uv run python phase1_foundation/project1_minimal_gpt/train.py"
DEFAULT_OUT_DIR = REPO_ROOT / "checkpoints" / "project1"
MIN_CHARS = 100


def ensure_data(dest: str | Path = DATA_PATH, source: str | None = None, force: bool = False) -> Path:
    """Make `dest` hold the verified Tiny Shakespeare text (size + sha256); return its path."""
    try:
        return fetch_file(dest, URL, source=source, sha256=SHA256, size=SIZE, force=force)
    except CourseError as e:
        if source is None and "could not download" in str(e):
            raise CourseError(f"could not download Tiny Shakespeare from {URL}; offline? import a local copy "
                              f"of input.txt with: {DOWNLOAD_CMD} --source PATH_TO/input.txt") from None
        raise


def load_text(path: str | Path = DATA_PATH) -> str:
    """Read the training text; the default file is downloaded when missing. Bad files: one CourseError."""
    path = Path(path)
    if not path.exists():
        if path.resolve() == DATA_PATH.resolve():
            ensure_data(path)
        else:
            raise CourseError(f"data file not found: {path}; pass an existing --data_path or download "
                              f"Tiny Shakespeare with: {DOWNLOAD_CMD}")
    return read_text_file(path, what="data file", min_chars=MIN_CHARS)


def build_vocab(text: str) -> list[str]:
    """The sorted distinct characters of the text: the model's whole vocabulary (65 for Shakespeare)."""
    return sorted(set(text))


def encode(text: str, chars: list[str], what: str = "text") -> list[int]:
    """Characters -> ids. Unknown characters raise one CourseError that names them all."""
    stoi = {ch: i for i, ch in enumerate(chars)}
    unknown = sorted({ch for ch in text if ch not in stoi})
    if unknown:
        raise CourseError(f"{what} contains characters not in the model's vocabulary: "
                          f"{', '.join(repr(c) for c in unknown)}; the model knows only the {len(chars)} "
                          "characters of its training text")
    return [stoi[ch] for ch in text]


def decode(ids, chars: list[str]) -> str:
    return "".join(chars[i] for i in ids)


def split_data(ids: torch.Tensor, train_frac: float = 0.9) -> tuple[torch.Tensor, torch.Tensor]:
    """First 90% of the characters for training, the last 10% for validation (contiguous, so the
    validation text is genuinely unseen, not interleaved lines of the same scenes)."""
    n = int(train_frac * len(ids))
    return ids[:n], ids[n:]


def make_get_batch(train_data: torch.Tensor, val_data: torch.Tensor, block_size: int, batch_size: int,
                   device: torch.device) -> Callable[..., tuple[torch.Tensor, torch.Tensor]]:
    """Return get_batch(split, generator=None) -> (x, y), each (batch_size, block_size) on `device`.

    y is x shifted left by one: at every position the model predicts the next character, so one
    window of block_size + 1 characters gives block_size training examples at once.
    """
    for name, data in (("train", train_data), ("val", val_data)):
        if len(data) <= block_size + 1:
            raise CourseError(f"the {name} split has {len(data)} characters, fewer than block_size + 2 "
                              f"({block_size + 2}); use more text or a smaller --block_size")
    offsets = torch.arange(block_size + 1)

    def get_batch(split: str, generator: torch.Generator | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        data = train_data if split == "train" else val_data
        ix = torch.randint(len(data) - block_size - 1, (batch_size, 1), generator=generator)
        window = data[ix + offsets]                     # one gather instead of a Python loop
        x, y = window[:, :-1].contiguous(), window[:, 1:].contiguous()
        if device.type == "cuda":
            return x.pin_memory().to(device, non_blocking=True), y.pin_memory().to(device, non_blocking=True)
        return x.to(device), y.to(device)

    return get_batch
