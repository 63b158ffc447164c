"""Perplexity and bits per byte of a model on a token stream (the library behind evaluate.py).

PAPER: bits per byte as in "Language Models are Unsupervised Multitask Learners" (Radford et al., 2019) and
The Pile (Gao et al., 2020): total negative log-likelihood in bits divided by the UTF-8 bytes of the text.
WHY bits per byte: perplexity per token depends on the tokenizer (a 10K-vocab token carries fewer bytes than a
50K one), so two models with different tokenizers - or a character model - can only be compared per byte.
IMPLEMENTATION: the token stream is cut into non-overlapping windows of block_size + 1 tokens; every token after
the first of its window is scored once, given the window's earlier tokens (on average block_size / 2 tokens of
context; a sliding window with overlap would score a little better and cost block_size / stride times more).
"""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from tqdm import tqdm

from course.cli import read_text_file
from course.errors import CourseError
from phase1_foundation.project2_tokenizer.data import strip_gutenberg

LN2 = math.log(2)


@torch.inference_mode()
def evaluate_ids(model: torch.nn.Module, ids: np.ndarray, n_bytes: int, batch_size: int = 16,
                 max_tokens: int | None = None, progress: bool = True) -> dict:
    """Score a token stream; returns loss (nats/token), perplexity, bits per byte and the counts used."""
    T = model.config.block_size
    if max_tokens is not None and max_tokens < 1:
        raise CourseError(f"max_tokens ({max_tokens}) must be >= 1 (None = the whole text)")
    if batch_size < 1:
        raise CourseError(f"batch_size ({batch_size}) must be >= 1")
    if max_tokens and len(ids) > max_tokens + 1:
        n_bytes = round(n_bytes * max_tokens / (len(ids) - 1))  # prorate: the same share of the text
        ids = ids[:max_tokens + 1]
    n_win = (len(ids) - 1) // T
    if n_win == 0:
        raise CourseError(f"the text has {len(ids)} tokens, fewer than one block of block_size+1 = {T + 1}")
    device = next(model.parameters()).device
    windows = torch.from_numpy(np.asarray(ids[:n_win * T + 1], dtype=np.int64))
    total_nll, count = 0.0, 0
    for b in tqdm(range(0, n_win, batch_size), desc="evaluate", unit="batch", disable=not progress):
        starts = range(b, min(b + batch_size, n_win))
        buf = torch.stack([windows[s * T:s * T + T + 1] for s in starts]).to(device)
        logits = model(buf[:, :-1])[0]
        total_nll += F.cross_entropy(logits.float().reshape(-1, logits.size(-1)), buf[:, 1:].reshape(-1),
                                     reduction="sum").item()
        count += buf[:, 1:].numel()
    # the scored tokens cover count/len(ids) of the text: prorate the bytes the same way
    scored_bytes = n_bytes * count / (len(ids) - 1)
    loss = total_nll / count
    return {"loss": loss, "ppl": math.exp(loss), "bpb": total_nll / LN2 / scored_bytes, "tokens": count,
            "bytes": round(scored_bytes)}


def read_text(path: Path) -> str:
    """A UTF-8 text file (.gz too) as evaluate.py scores it: CRLF -> LF, Gutenberg boilerplate cut.

    Every way the file can be unreadable (missing, a folder, empty, not UTF-8, a corrupt .gz) is one CourseError.
    """
    text = read_text_file(path, "text file")
    text = strip_gutenberg(text) if "PROJECT GUTENBERG" in text[:5000].upper() else text.replace("\r\n", "\n")
    if not text.strip():
        raise CourseError(f"text file {path} holds no text to score (only whitespace or Gutenberg boilerplate)")
    return text
