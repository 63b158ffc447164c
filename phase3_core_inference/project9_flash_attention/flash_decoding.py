"""Flash-decoding: the attention of one new token over a long KV cache, split into chunks of keys (split-K).

PAPERS
- Dao, Haziza, Massa, Sizov 2023, "Flash-Decoding for long-context inference" (PyTorch / Stanford CRFM blog):
  at decode time there is ONE query per sequence and head, so FlashAttention's parallelism over query blocks is
  gone; a GPU with 100+ multiprocessors ran batch x heads blocks and left most of them idle. Flash-decoding
  also splits the KEYS: each chunk of the cache gets its own worker, which computes its partial softmax
  average and log-sum-exp; a last small step combines the chunks by their log-sum-exps.
- Milakov & Gimelshein 2018 (online_softmax.py): why partial results merge exactly.

INTUITION
The output for one query is an average over all keys, weighted by exp(score). Averages of disjoint parts combine
into the average of the whole if each part reports its own average and its total weight; the log-sum-exp is the
log of that weight, kept in log space so nothing overflows. So the chunks need not talk to each other until the
very end, and they can run anywhere, at the same time.

IMPLEMENTATION (shapes: q (B, H, 1, D) the new token's queries; k, v (B, Hkv, L, D) the cache; GQA as in
flash_attention.py: query heads grouped under their key/value head, nothing copied)
- `decode_attention`: the plain decode attention, softmax(q K^T / sqrt(D)) V in three whole-cache operations;
  the reference and the baseline.
- `flash_decode(q, k, v, mask, chunk, pool)`: chunks of `chunk` keys; for each, `partial_attention` gives
  (m, l, o), `finish` turns it into (normalised output, lse); `combine_by_lse` merges them. `pool` (a
  concurrent.futures executor) spreads the chunks over the cores: PyTorch's kernels release Python's GIL,
  so two threads multiply two chunks at once. Without a pool the chunks run one after the other (the loop
  a learner reads; it computes exactly the same numbers).
- `SplitKDecoder(workers, chunk)`: owns a thread pool of `workers` threads and calls flash_decode with it;
  `workers=1` runs the loop in this thread. Close it (or use `with`) to stop its threads.
- mask: bool, True = attend, broadcastable to (B, H, 1, L): the KV cache's mask of a ragged batch.
WHY ON A CPU: on a decode step the per-op parallelism of PyTorch has little to split: one query row per head,
and the softmax runs one row per thread. Two chunks on two cores do the same work in about half the time, at
the price of one more small reduction (benchmark.py measures it at 4k-32k keys).
"""

from __future__ import annotations

import math
import os
from concurrent.futures import Executor, ThreadPoolExecutor

import torch

from course.errors import CourseError
from phase3_core_inference.project9_flash_attention.flash_attention import check_blocks, check_inputs, grouped
from phase3_core_inference.project9_flash_attention.online_softmax import combine_by_lse, finish, partial_attention

MIN_CHUNK = 256  # auto chunks: never fewer keys than this per chunk (below it, a chunk costs more than it saves)


def _check(q, k, v, mask, scale) -> None:
    check_inputs(q, k, v, mask, scale=scale)
    if q.shape[2] != 1:
        raise CourseError(f"flash-decoding attends ONE new token per row; q has {q.shape[2]} tokens "
                          "(prefill with flash_attention)")


def rows_per_kv_head(q, k, v, mask):
    """One token's queries as rows under their key/value head: q (B, H, 1, D) -> (B, Hkv, G, D), so that
    q_rows @ K^T is ONE product per key/value head for its G query heads (the cache read once); mask ->
    (B|1, Hkv|1, G|1, L|1)."""
    qg, k, v, mask = grouped(q, k, v, mask)
    return qg.squeeze(3), k, v, None if mask is None else mask.squeeze(3)


def decode_attention(q, k, v, mask=None, scale: float | None = None) -> torch.Tensor:
    """The plain decode step: softmax(q K^T * scale) V over the whole cache at once. q (B, H, 1, D) -> (B, H, 1, Dv)."""
    _check(q, k, v, mask, scale)
    qr, k, v, mask = rows_per_kv_head(q, k, v, mask)
    s = (qr @ k.transpose(-1, -2)) * (1.0 / math.sqrt(q.shape[-1]) if scale is None else scale)  # (B, Hkv, G, L)
    if mask is not None:
        s = s.masked_fill(~mask, float("-inf"))
    p = torch.softmax(s, dim=-1).nan_to_num(0.0)  # a row with no visible key: 0, as SDPA
    return (p @ v).view(*q.shape[:3], v.shape[-1])


def chunk_bounds(length: int, chunk: int) -> list[tuple[int, int]]:
    """[(start, end), ...] of consecutive chunks of `chunk` keys covering 0 .. length (the last may be shorter)."""
    return [(s, min(s + chunk, length)) for s in range(0, length, chunk)]


def flash_decode(q, k, v, mask=None, scale: float | None = None, chunk: int | None = None,
                 pool: Executor | None = None, splits: int = 1) -> torch.Tensor:
    """Split-K attention of one token over the cache: q (B, H, 1, D), k, v (B, Hkv, L, D) -> (B, H, 1, Dv).

    chunk: keys per chunk (None: the cache split evenly into `splits` chunks of at least MIN_CHUNK keys);
    pool: an executor whose threads compute the chunks in parallel (None: one after the other, in this thread)."""
    _check(q, k, v, mask, scale)
    check_blocks(splits=splits)
    L = k.shape[2]
    chunk = max(MIN_CHUNK, -(-L // splits)) if chunk is None else chunk
    check_blocks(chunk=chunk)
    scale = 1.0 / math.sqrt(q.shape[-1]) if scale is None else scale
    qr, k, v, mask = rows_per_kv_head(q, k, v, mask)

    def one_chunk(bounds: tuple[int, int]) -> tuple[torch.Tensor, torch.Tensor]:
        s, e = bounds
        visible = None if mask is None else (mask[..., s:e] if mask.shape[-1] > 1 else mask)
        out, lse = finish(*partial_attention(qr, k[:, :, s:e], v[:, :, s:e], scale, visible))
        return out, lse  # (B, Hkv, G, Dv) normalised, (B, Hkv, G)

    bounds = chunk_bounds(L, chunk)
    parts = list(pool.map(one_chunk, bounds)) if pool is not None and len(bounds) > 1 else map(one_chunk, bounds)
    outs, lses = zip(*parts)
    out, _ = combine_by_lse(list(outs), list(lses))
    return out.view(*q.shape[:3], v.shape[-1])


class SplitKDecoder:
    """flash_decode with a thread pool of its own: `dec(q, k, v, mask=None, scale=None) -> out`.

    workers: threads (None: the machine's cores); chunk: keys per chunk (None: split evenly over the workers).
    Each chunk runs PyTorch's kernels in its worker thread: with torch's own threads at 1 (OMP_NUM_THREADS=1,
    torch.set_num_threads(1)) each chunk has one core; this class changes no setting itself.
    Use as a context manager, or call close(), to stop the threads."""

    def __init__(self, workers: int | None = None, chunk: int | None = None):
        workers = (os.cpu_count() or 1) if workers is None else workers
        check_blocks(workers=workers)
        if chunk is not None:
            check_blocks(chunk=chunk)
        self.workers, self.chunk = workers, chunk
        self.pool = ThreadPoolExecutor(workers, thread_name_prefix="flash-decode") if workers > 1 else None

    def __call__(self, q, k, v, mask=None, scale: float | None = None) -> torch.Tensor:
        return flash_decode(q, k, v, mask, scale, self.chunk, self.pool, splits=self.workers)

    def close(self) -> None:
        if self.pool is not None:
            self.pool.shutdown()
            self.pool = None

    def __enter__(self) -> "SplitKDecoder":
        return self

    def __exit__(self, *exc) -> None:
        self.close()
