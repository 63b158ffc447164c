"""The contract every KV cache behind project 8's protocol (`kv_cache.Cache`) must keep, as reusable checks.

Each `check_*` function takes `make_cache(config, batch, max_len) -> cache` and raises AssertionError when the
cache breaks the contract. Project 8's `test_cache_contract.py` runs them on the contiguous `KVCache`; a later
project adds its cache class (prefix tree, paged blocks, quantized K/V) by running the same checks on its own
factory, with a tolerance of its own where its storage is lossy (quantized K/V), never a weaker check:

    from phase3_core_inference.project8_kv_cache import cache_contract
    @pytest.mark.parametrize("check", cache_contract.CHECKS)
    def test_paged_cache_keeps_the_contract(check):
        check(lambda config, batch, max_len: PagedCache(config, batch, max_len, block=4))

The reference everywhere is the model without a cache (a full recompute of each sequence), and, for greedy
decoding, transformers' generate() on the same weights.
"""

from __future__ import annotations

from collections.abc import Callable

import torch

from phase1_foundation.project3_pretrain.testing import tiny_llama

MakeCache = Callable[..., object]  # (config, batch, max_len) -> a cache of the protocol
ATOL = 1e-5


def _last_logits(model, ids: list[int]) -> torch.Tensor:
    """The reference: the model without a cache on the whole sequence, last position."""
    return model(torch.tensor([ids]))[0][0, -1]


def _step(model, cache, tokens: list[int]) -> torch.Tensor:
    """One forward of one new token per row through `cache` (all its selected rows); (B, vocab) logits."""
    return model(torch.tensor(tokens)[:, None], kv_cache=cache)[0][:, -1]


@torch.no_grad()
def check_decode_equals_recompute(make_cache: MakeCache, seed: int = 0) -> None:
    """Rows of one length: prefill (in two chunks), then at every decode step the logits equal a recompute."""
    model = tiny_llama(seed=seed)
    gen = torch.Generator().manual_seed(seed)
    seqs = torch.randint(0, model.config.vocab_size, (3, 20), generator=gen)
    cache = make_cache(model.config, 3, 24)
    chunk = torch.cat([model(seqs[:, :5], kv_cache=cache)[0], model(seqs[:, 5:9], kv_cache=cache)[0]], 1)
    torch.testing.assert_close(chunk, model(seqs[:, :9])[0], rtol=0, atol=ATOL)  # a chunk after cached keys
    for t in range(9, 20):
        logits = _step(model, cache, seqs[:, t].tolist())
        torch.testing.assert_close(logits, model(seqs[:, :t + 1])[0][:, -1], rtol=0, atol=ATOL)
    assert list(cache.lengths) == [20, 20, 20]


@torch.no_grad()
def check_ragged_rows_equal_each_alone(make_cache: MakeCache, seed: int = 1) -> None:
    """Prompts of different lengths, each prefilled into its own row; then decoded together, each at its own
    position: every row's logits equal that prompt run alone (its own batch-1 cache) and a full recompute."""
    model = tiny_llama(seed=seed, n_kv_head=1)
    gen = torch.Generator().manual_seed(seed)
    prompts = [torch.randint(0, model.config.vocab_size, (n,), generator=gen).tolist() for n in (3, 9, 1, 6)]
    cache = make_cache(model.config, len(prompts), 24)
    logits = torch.cat([model(torch.tensor([p]), kv_cache=cache.rows([b]))[0][:, -1] for b, p in enumerate(prompts)])
    alone = [make_cache(model.config, 1, 24) for _ in prompts]
    solo = [model(torch.tensor([p]), kv_cache=c)[0][:, -1] for p, c in zip(prompts, alone)]
    seqs = [list(p) for p in prompts]
    for _ in range(8):
        for b, seq in enumerate(seqs):
            torch.testing.assert_close(logits[b], solo[b][0], rtol=0, atol=ATOL)
            torch.testing.assert_close(logits[b], _last_logits(model, seq), rtol=0, atol=ATOL)
        nxt = logits.argmax(-1).tolist()
        for seq, tok in zip(seqs, nxt):
            seq.append(tok)
        logits = _step(model, cache, nxt)
        solo = [_step(model, c, [tok]) for c, tok in zip(alone, nxt)]
    assert list(cache.lengths) == [len(s) for s in seqs]


@torch.no_grad()
def check_rows_finish_and_join(make_cache: MakeCache, seed: int = 2) -> None:
    """Continuous batching on one cache: rows of different lengths decode together; one finishes and frees its
    row; the running rows keep decoding without it; a new prompt joins into the free row (prefilled alone while
    the others keep their caches) and decodes with them. Every row, every step: equal to a full recompute."""
    model = tiny_llama(seed=seed)
    V = model.config.vocab_size
    gen = torch.Generator().manual_seed(seed)
    cache = make_cache(model.config, 3, 40)
    seqs: dict[int, list[int]] = {}

    def join(row: int, n: int) -> torch.Tensor:
        seqs[row] = torch.randint(0, V, (n,), generator=gen).tolist()
        return model(torch.tensor([seqs[row]]), kv_cache=cache.rows([row]))[0][0, -1]

    logits = {b: join(b, n) for b, n in enumerate((4, 7, 2))}

    def decode(rows: list[int], steps: int) -> None:
        nonlocal logits
        for _ in range(steps):
            for b in rows:
                torch.testing.assert_close(logits[b], _last_logits(model, seqs[b]), rtol=0, atol=ATOL)
                seqs[b].append(int(logits[b].argmax()))
            out = _step(model, cache.rows(rows), [seqs[b][-1] for b in rows])
            logits = {b: out[i] for i, b in enumerate(rows)}

    decode([0, 1, 2], 3)
    cache.free(1)  # row 1's sequence is done
    assert cache.lengths[1] == 0
    decode([0, 2], 2)  # the others go on without it
    logits[1] = join(1, 5)  # a new sequence takes the free row, shorter than the running ones
    decode([0, 1, 2], 4)
    cache.free(0)
    logits[0] = join(0, 12)  # and one longer than them
    decode([0, 1, 2], 3)
    for b in range(3):
        torch.testing.assert_close(logits[b], _last_logits(model, seqs[b]), rtol=0, atol=ATOL)


@torch.no_grad()
def check_greedy_equals_transformers(make_cache: MakeCache, seed: int = 3, tmp_dir=None) -> None:
    """Greedy decoding through the cache equals transformers' LlamaForCausalLM.generate() on the same weights."""
    import tempfile

    import transformers

    from phase1_foundation.project3_pretrain.hf_interop import export_hf

    model = tiny_llama(seed=seed, n_kv_head=2)
    g = torch.Generator().manual_seed(seed)
    for p in model.parameters():  # spikier matrices than the init's, so greedy paths do not settle into a loop
        if p.dim() > 1:
            p.normal_(0, 0.5, generator=g)
    with tempfile.TemporaryDirectory(dir=tmp_dir) as folder:
        hf = transformers.LlamaForCausalLM.from_pretrained(export_hf(model, folder)).eval()
    gen = torch.Generator().manual_seed(seed)
    prompt = torch.randint(0, model.config.vocab_size, (2, 6), generator=gen)
    n = 20
    theirs = hf.generate(prompt, attention_mask=torch.ones_like(prompt), max_new_tokens=n, min_new_tokens=n,
                         do_sample=False, pad_token_id=0)
    cache = make_cache(model.config, 2, 6 + n)
    logits = model(prompt, kv_cache=cache)[0][:, -1]
    ours = [prompt]
    for i in range(n):
        nxt = logits.argmax(-1, keepdim=True)
        ours.append(nxt)
        if i + 1 < n:
            logits = model(nxt, kv_cache=cache)[0][:, -1]
    mine = torch.cat(ours, 1)
    assert torch.equal(mine, theirs), (mine, theirs)
    assert len(set(mine[0, 6:].tolist())) > 3  # not a degenerate repeat of one token


CHECKS = [check_decode_equals_recompute, check_ragged_rows_equal_each_alone, check_rows_finish_and_join,
          check_greedy_equals_transformers]
