"""The paged cache keeps project 8's contract, equals the contiguous cache, shares blocks safely, and never leaks.

Run: uv run pytest -q phase4_advanced_inference/project13_paged_attention/test_paged_attention.py
"""

from __future__ import annotations

import random

import pytest
import torch
from hypothesis import given, settings, strategies as st

from course.errors import CourseError
from phase1_foundation.project3_pretrain.testing import tiny_config, tiny_llama
from phase3_core_inference.project8_kv_cache import cache_contract
from phase3_core_inference.project8_kv_cache.kv_cache import Cache, KVCache
from phase3_core_inference.project8_kv_cache.sampling import SamplingParams
from phase4_advanced_inference.project12_continuous_batching.batch_engine import BatchEngine
from phase4_advanced_inference.project12_continuous_batching.ragged import Segment, ragged_forward
from phase4_advanced_inference.project12_continuous_batching.request import Request
from phase4_advanced_inference.project13_paged_attention.block_allocator import BlockPool, OutOfBlocks
from phase4_advanced_inference.project13_paged_attention.paged_cache import PagedCache


def paged(block_size):
    return lambda config, batch, max_len: PagedCache.for_model(config, batch=batch, max_len=max_len,
                                                               block_size=block_size)


# ---- the shared contract, at block sizes 1, 4, 16 and larger than every prompt ---------------------------
@pytest.mark.parametrize("check", cache_contract.CHECKS, ids=lambda c: c.__name__)
@pytest.mark.parametrize("block_size", [1, 4, 16, 64])
def test_paged_cache_keeps_the_contract(block_size, check, tmp_path):
    if check is cache_contract.check_greedy_equals_transformers:
        pytest.importorskip("transformers", reason="transformers (dev group) is needed")
        check(paged(block_size), tmp_dir=tmp_path)
    else:
        check(paged(block_size))


def test_it_implements_the_protocol():
    assert isinstance(paged(4)(tiny_config(), 2, 8), Cache)


@pytest.mark.parametrize("block_size", [1, 3, 16])
def test_every_step_equals_the_contiguous_cache(block_size):
    """Ragged rows crossing block boundaries: logits equal to the contiguous cache's at 1e-5, every step."""
    model = tiny_llama(seed=block_size, n_kv_head=1)
    g = torch.Generator().manual_seed(block_size)
    prompts = [torch.randint(0, 97, (n,), generator=g).tolist() for n in (2, 17, 5)]
    a, b = KVCache.for_model(model.config, batch=3, max_len=48), paged(block_size)(model.config, 3, 48)
    with torch.no_grad():
        la = torch.cat([model(torch.tensor([p]), kv_cache=a.rows([i]))[0][:, -1] for i, p in enumerate(prompts)])
        lb = torch.cat([model(torch.tensor([p]), kv_cache=b.rows([i]))[0][:, -1] for i, p in enumerate(prompts)])
        for _ in range(20):
            torch.testing.assert_close(lb, la, rtol=0, atol=1e-5)
            nxt = la.argmax(-1, keepdim=True)
            la, lb = model(nxt, kv_cache=a)[0][:, -1], model(nxt, kv_cache=b)[0][:, -1]
    assert b.lengths == a.lengths
    assert b.usage()["blocks"] == sum(-(-n // block_size) for n in b.lengths)  # blocks follow the tokens


def test_a_packed_forward_through_the_paged_cache():
    """Project 12's packed ragged forward works on the paged cache as on the contiguous one."""
    model = tiny_llama(seed=5)
    rng = random.Random(5)
    cache = paged(4)(model.config, 3, 40)
    seqs = {b: [] for b in range(3)}
    with torch.no_grad():
        for _ in range(5):
            segs, toks = [], []
            for b in range(3):
                new = [rng.randrange(97) for _ in range(rng.choice([1, 2, 6]))]
                seqs[b] += new
                segs.append(Segment(b, len(new)))
                toks.append(new)
            out = ragged_forward(model, cache, segs, toks)
            for lg, b in zip(out, range(3)):
                torch.testing.assert_close(lg, model(torch.tensor([seqs[b]]))[0][0, -1], rtol=0, atol=1e-5)


# ---- sharing: fork and copy-on-write -----------------------------------------------------------------------
@pytest.mark.parametrize("prompt_len", [8, 10])  # a full last block, and a partly filled one (copied on write)
def test_forked_rows_never_see_each_others_writes(prompt_len):
    model = tiny_llama(seed=6)
    cache = paged(4)(model.config, 3, 40)
    prompt = list(range(3, 3 + prompt_len))
    with torch.no_grad():
        model(torch.tensor([prompt]), kv_cache=cache.rows([0]))
        cache.fork(0, 1)
        cache.fork(0, 2)
        shared = cache.usage()["blocks"]
        assert shared == -(-prompt_len // 4)  # three rows, the prompt stored once
        seqs = [list(prompt) for _ in range(3)]
        for step in range(6):
            toks = [[10 + step], [40 + step], [70 + step]]  # each row writes different tokens
            out = model(torch.tensor(toks), kv_cache=cache)[0][:, -1]
            for b in range(3):
                seqs[b] += toks[b]
                torch.testing.assert_close(out[b], model(torch.tensor([seqs[b]]))[0][0, -1], rtol=0, atol=1e-5)
    for b in range(3):
        cache.free(b)
    assert cache.pool.num_free == cache.pool.num_blocks
    cache.pool.check_consistent()


def test_parallel_sampling_shares_the_prompt():
    """n = 4 continuations of one 40-token prompt (10 full blocks of 4): the prompt is stored once; each row adds
    only its own new block: 14 blocks, against 4 x 11 = 44 for four separate copies."""
    model = tiny_llama(seed=7)
    cache = paged(4)(model.config, 4, 64)
    with torch.no_grad():
        model(torch.tensor([list(range(40))]), kv_cache=cache.rows([0]))
        for b in (1, 2, 3):
            cache.fork(0, b)
        model(torch.randint(0, 97, (4, 1)), kv_cache=cache)
    assert cache.usage()["blocks"] == 10 + 4
    assert cache.usage()["filled_tokens"] == 40 + 4


# ---- no leaks, whatever happens ------------------------------------------------------------------------------
@settings(max_examples=30, deadline=None)
@given(st.lists(st.tuples(st.sampled_from(["grow", "fork", "free", "crop"]), st.integers(0, 3), st.integers(0, 3),
                          st.integers(1, 9)), min_size=1, max_size=40))
def test_refcounts_return_to_zero(ops):
    cache = PagedCache(n_layers=1, batch=4, n_kv_heads=1, head_dim=2, max_len=40, block_size=4, num_blocks=64)
    for op, a, b, n in ops:
        if op == "grow" and cache.lengths[a] + n <= 40:
            cache.reserve(a, cache.lengths[a] + n)
            cache.lengths[a] += n
        elif op == "fork" and a != b:
            cache.free(b)
            cache.fork(a, b)
        elif op == "free":
            cache.free(a)
        elif op == "crop":
            cache.crop(n, a)
        cache.pool.check_consistent()
        holders = [sum(t.count(blk) for t in cache.tables) for blk in range(64)]
        assert holders == cache.pool.refcount  # every reference is a table entry, and the other way round
    cache.reset()
    assert cache.pool.num_free == 64 and not any(cache.pool.refcount)


# ---- the engine on the paged cache ----------------------------------------------------------------------------
def test_project12_engine_on_the_paged_cache_equals_contiguous():
    """Project 12's engine serves the same requests with the same tokens on either cache; admission waits for
    blocks (a small pool), and every block is back when all are done."""
    model = tiny_llama(seed=8)
    with torch.no_grad():
        for p in model.parameters():
            if p.dim() > 1:
                p.normal_(0, 0.4, generator=torch.Generator().manual_seed(8))
    rng = random.Random(8)
    reqs = [Request([rng.randrange(97) for _ in range(rng.randint(1, 20))], rng.randint(1, 14),
                    SamplingParams(temperature=0.0), arrival=0.001 * i) for i in range(12)]
    copy = [Request(list(r.prompt), r.max_new_tokens, r.params, arrival=r.arrival) for r in reqs]
    BatchEngine(model, max_rows=4, max_batch_tokens=12).run(reqs)
    small = PagedCache.for_model(model.config, batch=4, max_len=64, block_size=4, num_blocks=12)  # < 4 full rows
    BatchEngine(model, max_rows=4, max_batch_tokens=12, cache=small).run(copy)
    assert [r.tokens for r in copy] == [r.tokens for r in reqs]
    assert small.pool.num_free == 12
    small.pool.check_consistent()

    class NoAdmission(PagedCache):
        claim = None  # the engine then admits by free rows only

    again = [Request(list(r.prompt), r.max_new_tokens, r.params, arrival=r.arrival) for r in reqs]
    blind = NoAdmission.for_model(model.config, batch=4, max_len=64, block_size=4, num_blocks=12)
    with pytest.raises(OutOfBlocks):  # the check above can fail: without claim() the pool runs dry
        BatchEngine(model, max_rows=4, max_batch_tokens=12, cache=blind).run(again)


# ---- bad input ----------------------------------------------------------------------------------------------
def test_bad_settings_and_exhaustion_are_one_clear_error():
    with pytest.raises(CourseError, match="block_size"):
        PagedCache(1, 1, 1, 2, 8, block_size=0)
    with pytest.raises(CourseError, match="num_blocks"):
        BlockPool(1, 0, 4, 1, 2)
    cache = PagedCache(1, 2, 1, 2, 64, block_size=4, num_blocks=3)
    cache.reserve(0, 12)
    with pytest.raises(OutOfBlocks, match="exhausted"):
        cache.reserve(1, 1)
    assert not cache.claim(1, 4)  # no block left to promise
    cache.pool.check_consistent()
    with pytest.raises(CourseError, match="in use"):
        cache.fork(1, 0)
