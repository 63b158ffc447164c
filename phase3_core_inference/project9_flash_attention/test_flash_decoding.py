"""Flash-decoding against the full softmax over the cache: any chunking, threads or not, GQA, ragged-row masks.

Run: uv run pytest -q phase3_core_inference/project9_flash_attention/test_flash_decoding.py
"""

from __future__ import annotations

import threading

import pytest
import torch

from course.errors import CourseError
from phase3_core_inference.project9_flash_attention.flash_decoding import (SplitKDecoder, chunk_bounds,
                                                                           decode_attention, flash_decode)


def cache(B, H, Hkv, L, D, seed=0, dtype=torch.float32):
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(B, H, 1, D, generator=g, dtype=dtype), torch.randn(B, Hkv, L, D, generator=g, dtype=dtype),
            torch.randn(B, Hkv, L, D, generator=g, dtype=dtype))


def full_softmax(q, k, v, mask=None):
    """The reference, in float64: softmax over every key of the cache at once, each query head with its KV head."""
    G = q.shape[1] // k.shape[1]
    kk, vv = k.double().repeat_interleave(G, 1), v.double().repeat_interleave(G, 1)
    s = q.double() @ kk.transpose(-1, -2) / q.shape[-1] ** 0.5
    if mask is not None:
        s = s.masked_fill(~mask, float("-inf"))
    return (torch.softmax(s, -1).nan_to_num(0.0) @ vv).to(q.dtype)


@pytest.mark.parametrize("B,H,Hkv,L,D,chunk", [(1, 8, 2, 1000, 16, 97), (2, 4, 4, 513, 32, 64), (1, 6, 1, 1, 8, 5),
                                               (3, 4, 2, 300, 8, 300), (1, 2, 1, 4099, 64, None)])
def test_equals_the_full_softmax_over_the_cache(B, H, Hkv, L, D, chunk):
    q, k, v = cache(B, H, Hkv, L, D, seed=L)
    ref = full_softmax(q, k, v)
    torch.testing.assert_close(flash_decode(q, k, v, chunk=chunk), ref, rtol=0, atol=1e-5)
    torch.testing.assert_close(decode_attention(q, k, v), ref, rtol=0, atol=1e-5)
    with SplitKDecoder(workers=3, chunk=chunk) as dec:
        torch.testing.assert_close(dec(q, k, v), ref, rtol=0, atol=1e-5)


def test_ragged_rows_mask_and_an_empty_row():
    """Rows of a batch with caches of different lengths (project 8's mask shape, (B, 1, 1, L)); a row whose
    visible keys all sit in one chunk; a row with none (output 0, as SDPA)."""
    q, k, v = cache(3, 4, 2, 700, 16, seed=1)
    lengths = torch.tensor([700, 130, 0])
    mask = (torch.arange(700)[None, :] < lengths[:, None]).view(3, 1, 1, 700)
    ref = full_softmax(q, k, v, mask)
    for chunk in (64, 256, 1000):
        torch.testing.assert_close(flash_decode(q, k, v, mask, chunk=chunk), ref, rtol=0, atol=1e-5)
    with SplitKDecoder(workers=2) as dec:
        out = dec(q, k, v, mask)
    torch.testing.assert_close(out, ref, rtol=0, atol=1e-5)
    assert torch.all(out[2] == 0)


def test_threads_compute_the_same_numbers_as_the_loop():
    q, k, v = cache(1, 8, 2, 2048, 32, seed=2)
    loop = flash_decode(q, k, v, chunk=512)
    seen = set()

    def run(fn):
        seen.add(threading.current_thread().name)
        return fn()

    with SplitKDecoder(workers=2, chunk=512) as dec:
        real_map = dec.pool.map
        dec.pool.map = lambda fn, it: real_map(lambda b: run(lambda: fn(b)), it)  # records the worker threads
        assert torch.equal(dec(q, k, v), loop)  # same chunks, same order of the reduction: bit for bit
    assert len(seen) >= 1 and all(name.startswith("flash-decode") for name in seen)


def test_chunk_bounds_cover_the_cache_once():
    assert chunk_bounds(10, 4) == [(0, 4), (4, 8), (8, 10)]
    assert chunk_bounds(8, 8) == [(0, 8)] and chunk_bounds(3, 100) == [(0, 3)]


@pytest.mark.parametrize("make,fragment", [
    (lambda q, k, v: flash_decode(torch.cat([q, q], 2), k, v), "attends ONE new token per row; q has 2 tokens"),
    (lambda q, k, v: flash_decode(q, k, v, chunk=0), "chunk (0) must be a positive int"),
    (lambda q, k, v: flash_decode(q, k[..., :8], v), "head dims differ"),
    (lambda q, k, v: flash_decode(q, k, v, torch.ones(1, 1, 1, 5, dtype=torch.bool)), "does not broadcast"),
    (lambda q, k, v: SplitKDecoder(workers=0), "workers (0) must be a positive int"),
])
def test_bad_input_is_one_clear_line(make, fragment):
    q, k, v = cache(1, 4, 2, 64, 16)
    with pytest.raises(CourseError) as e:
        make(q, k, v)
    assert fragment in str(e.value) and "\n" not in str(e.value)
