"""The token shards prepare_data.py writes, read back for training and evaluation (memory-mapped).

PAPER: none; the layout is nanoGPT's (one flat uint16 array per split, random windows of block_size + 1 tokens).
WHY uint16 and memmap: a 10K vocabulary fits in 2 bytes, and the corpus stays on disk; a batch reads only its
windows. WHY byte counts in meta.json: bits per byte = loss (nats/token) / ln 2 * tokens / bytes is then exact
for the split, and comparable across tokenizers.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import torch

from course.errors import CourseError

TRAIN_CMD = "uv run python phase1_foundation/project3_pretrain/train.py"
PREPARE_CMD = "uv run python phase1_foundation/project3_pretrain/prepare_data.py"


class TokenData:
    """The uint16 token shards written by prepare_data.py, memory-mapped (the corpus never sits in RAM).

    meta.json carries vocab_size, the tokenizer path and, per split, the token and UTF-8 byte counts, so
    bits per byte = loss (nats/token) / ln 2 * tokens / bytes is exact for the split.
    """

    def __init__(self, data_dir: str | Path, block_size: int):
        self.dir = Path(data_dir)
        meta_path = self.dir / "meta.json"
        if not meta_path.is_file():
            raise CourseError(f"{meta_path} not found; tokenize the corpus first: {PREPARE_CMD}")
        self.meta = json.loads(meta_path.read_text())
        self.splits: dict[str, np.memmap] = {}
        for split in ("train", "val"):
            path = self.dir / f"{split}.bin"
            if not path.is_file():
                raise CourseError(f"{path} not found; re-run {PREPARE_CMD}")
            arr = np.memmap(path, dtype=np.uint16, mode="r")
            if len(arr) < block_size + 1:
                raise CourseError(f"{path} holds {len(arr):,} tokens, fewer than one block of block_size+1 = "
                                  f"{block_size + 1}; use more text or a smaller --block_size")
            self.splits[split] = arr
        self.block_size = block_size

    @property
    def vocab_size(self) -> int:
        return int(self.meta["vocab_size"])

    def tokens_per_byte(self, split: str) -> float:
        s = self.meta["splits"][split]
        return s["tokens"] / s["bytes"]

    def get_batch(self, split: str, batch_size: int, device: torch.device, generator: torch.Generator):
        """batch_size random windows of block_size+1 tokens: inputs x, next-token targets y."""
        data = self.splits[split]
        T = self.block_size
        ix = torch.randint(len(data) - T - 1, (batch_size,), generator=generator).tolist()
        buf = torch.from_numpy(np.stack([data[i:i + T + 1] for i in ix]).astype(np.int64))
        x, y = buf[:, :-1], buf[:, 1:]
        if device.type == "cuda":  # pinned + non_blocking: the copy overlaps the previous step
            return x.pin_memory().to(device, non_blocking=True), y.pin_memory().to(device, non_blocking=True)
        return x.to(device), y.to(device)
