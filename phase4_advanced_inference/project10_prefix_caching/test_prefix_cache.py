"""The prefix caches against independent references.

- The stores (radix tree, block hashes) under randomized operation sequences (hypothesis): K/V of a prefix as a
  model would make them (position p's values a function of tokens 0..p), so whatever a lookup returns is checked
  against a recomputation; the bytes held always equal the sum over the entries; nothing a live request locked is
  evicted or altered; eviction takes exactly what a naive LRU (an obvious O(n^2) loop over the snapshot, or the
  test's own clock for blocks) would take.
- The engine: the logits of requests served from a prefix cache equal a full recompute without any cache (1e-5)
  at every step, for zero-length, partial (mid-node / partial-block), whole-prompt matches and after evictions;
  a chat's turn N prefills only its new tokens, also when another conversation ran in between.
- Project 4's scorer through the cache: the same logits and picks as with the plain model.
- Bad input: a budget <= 0, another model's cache (shape, dtype or weights), a prompt shorter than a block.

Run: uv run pytest -q phase4_advanced_inference/project10_prefix_caching/test_prefix_cache.py
"""

from __future__ import annotations

import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from course.errors import CourseError
from phase1_foundation.project3_pretrain.testing import tiny_llama
from phase2_finetuning.project4_sft.harness.multiple_choice import evaluate_multiple_choice
from phase2_finetuning.project4_sft.harness.tasks import MCItem
from phase3_core_inference.project8_kv_cache.engine import Engine, decode_step
from phase3_core_inference.project8_kv_cache.kv_cache import KVCache
from phase4_advanced_inference.project10_prefix_caching.block_hash import BlockHashCache, block_hashes
from phase4_advanced_inference.project10_prefix_caching.few_shot import (PrefixCachedLM,
                                                                         evaluate_multiple_choice_cached)
from phase4_advanced_inference.project10_prefix_caching.kv_store import KVSpec
from phase4_advanced_inference.project10_prefix_caching.prefix_engine import PrefixCachingEngine
from phase4_advanced_inference.project10_prefix_caching.radix_cache import RadixCache

ATOL = 1e-5
SPEC = KVSpec(n_layers=2, n_kv_heads=1, head_dim=2, dtype=torch.float32, device="cpu")
PER_TOKEN = SPEC.bytes_per_token()  # 2 (K, V) x 2 layers x 1 head x 2 x 4 bytes = 32


# ---- the stores, on K/V made like a model's ------------------------------------------------------------------
def fake_kv(tokens: list[int]) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
    """k[layer], v[layer] (1 head, len, 2): position p holds a hash of tokens 0..p (small exact integers)."""
    h, hs = 0, []
    for t in tokens:
        h = (h * 1_000_003 + t + 1) % (2**31 - 1)
        hs.append(h)
    x = torch.tensor(hs, dtype=torch.float64).reshape(1, -1, 1)
    k = [((x * (layer + 1) + torch.tensor([0.0, 7.0])) % 1009).float() for layer in range(SPEC.n_layers)]
    return k, [-t - 1 for t in k]


def loaded_kv(store, match) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
    """The K/V a request gets from `match`, read back from a fresh contiguous cache."""
    cache = KVCache(SPEC.n_layers, 1, SPEC.n_kv_heads, 32, SPEC.head_dim)
    store.load(match, cache)
    n = match.length
    return [t[0, :, :n] for t in cache.k], [t[0, :, :n] for t in cache.v]


def assert_holds(store, seq, match) -> None:
    """What the store hands out for seq's first match.length tokens is what a model would compute for them."""
    got_k, got_v = loaded_kv(store, match)
    want_k, want_v = fake_kv(seq[:match.length])
    for a, b in zip(got_k + got_v, want_k + want_v):
        assert torch.equal(a, b)


def entries(store) -> list:
    return store.nodes() if isinstance(store, RadixCache) else list(store.blocks.values())


def evictable(store) -> list:
    if isinstance(store, RadixCache):
        return [n for n in store.nodes() if not n.children and n.ref == 0]
    return [b for b in store.blocks.values() if b.ref == 0]


def naive_radix_eviction(store) -> list[int]:
    """ids of the nodes an obvious LRU takes: again and again the oldest unreferenced leaf, until the bytes fit."""
    nodes = {id(n): n for n in store.nodes()}
    kids = {i: len(n.children) for i, n in nodes.items()}
    alive, held, out = set(nodes), store.nbytes, []
    while held > store.budget_bytes:
        leaves = [i for i in alive if kids[i] == 0 and nodes[i].ref == 0]
        if not leaves:
            break
        i = min(leaves, key=lambda j: nodes[j].last_access)
        alive.discard(i)
        out.append(i)
        held -= nodes[i].nbytes
        if nodes[i].parent is not store.root:
            kids[id(nodes[i].parent)] -= 1
    return out


def check_invariants(store, locks) -> None:
    assert store.nbytes == sum(e.k.nbytes + e.v.nbytes for e in entries(store))
    assert store.nbytes <= store.budget_bytes or not evictable(store)
    for seq, match in locks:  # nothing a live request holds was evicted or changed
        assert_holds(store, seq, match)
    if isinstance(store, RadixCache):
        for n in store.nodes():
            assert len(n) > 0 and n.k.shape[2] == len(n) and n.parent.children[n.tokens[0]] is n
            assert all(c.ref <= n.ref and c.last_access <= n.last_access for c in n.children.values())


OPS = st.lists(st.tuples(st.sampled_from(["insert", "insert", "lock", "lock", "unlock", "match"]),
                         st.lists(st.integers(0, 2), max_size=7)), max_size=30)


@settings(max_examples=400, deadline=None)
@given(ops=OPS, budget_tokens=st.integers(1, 24), kind=st.sampled_from(["radix", "block"]))
def test_store_invariants_under_random_operations(ops, budget_tokens, kind):
    budget = budget_tokens * PER_TOKEN
    store = RadixCache(SPEC, budget) if kind == "radix" else BlockHashCache(SPEC, budget, block_size=2)
    locks, clock, last_use = [], 0, {}  # last_use: the test's own LRU clock for blocks (tail first within an op)

    def touch(names):
        for i, h in enumerate(names):
            last_use[h] = (clock, -i)

    for op, seq in ops:
        clock += 1
        if op == "insert":
            store.budget_bytes = 2**62  # insert without evicting, then evict with the budget: checked step by step
            k, v = fake_kv(seq)
            store.insert(seq, k, v)
            store.budget_bytes = budget
            if kind == "block":
                touch(block_hashes(seq, 2))
                unlocked = sorted((h for h, b in store.blocks.items() if b.ref == 0), key=lambda h: last_use[h])
                need, expect = store.nbytes - budget, []
                for h in unlocked:
                    if need <= 0:
                        break
                    expect.append(id(store.blocks[h]))
                    need -= 2 * PER_TOKEN
            else:
                expect = naive_radix_eviction(store)
            assert [id(e) for e in store.evict_to_budget()] == expect  # LRU order, independently computed
        elif op in ("lock", "match"):
            match = store.match(seq)
            assert_holds(store, seq, match)
            if kind == "radix":
                assert match.length == store.cached_length(seq)
                assert all(n.last_access == store.clock for n in store.chunks(match))
            else:
                assert match.length % 2 == 0
                touch(block_hashes(seq[:match.length], 2))
            if op == "lock":
                store.lock(match)
                locks.append((seq, match))
        elif locks:
            store.unlock(locks.pop(0)[1])
        check_invariants(store, locks)


def test_radix_tree_splits_inside_an_edge_and_keeps_its_bytes():
    store = RadixCache(SPEC, 10**6)
    a, b = [1, 2, 3, 4, 5, 6], [1, 2, 3, 9, 9]
    assert store.insert(a, *fake_kv(a)) == 6 and len(store.nodes()) == 1
    before = store.nbytes
    m = store.match(b)
    assert m.length == 3 and len(store.nodes()) == 2 and store.nbytes == before  # split at 3, no bytes lost
    assert_holds(store, b, m)
    assert store.insert(b, *fake_kv(b)) == 2 and len(store.nodes()) == 3
    assert store.nbytes == 8 * PER_TOKEN
    assert store.insert(a[:4], *fake_kv(a[:4])) == 0  # already held: nothing new, no split needed
    assert (store.hit_tokens, store.miss_tokens) == (3, 2)


def test_a_split_under_a_lock_keeps_the_whole_path_locked():
    store = RadixCache(SPEC, 10**6)
    a, b = [1, 2, 3, 4, 5, 6], [1, 2, 9]
    store.insert(a, *fake_kv(a))
    m = store.match(a)
    store.lock(m)
    store.insert(b, *fake_kv(b))  # splits a's locked node after [1, 2]
    top = store.root.children[1]
    assert len(top) == 2 and top.ref == 1 and top.children[3].ref == 1 and top.children[9].ref == 0
    store.budget_bytes = PER_TOKEN
    store.evict_to_budget()  # only b's unlocked tail may go
    assert store.cached_length(a) == 6 and store.cached_length(b) == 2
    store.unlock(m)
    assert top.ref == 0 and top.children[3].ref == 0
    store.evict_to_budget()  # now the tail goes, then its parent, which became an unreferenced leaf
    assert store.nodes() == [] and store.nbytes == 0 and store.evictions == 3


def test_a_locked_block_is_never_evicted():
    store = BlockHashCache(SPEC, 4 * PER_TOKEN, block_size=2)
    a = [1, 2, 3, 4]
    store.insert(a, *fake_kv(a))
    m = store.match(a)
    store.lock(m)
    c = [5, 6, 7, 8]
    store.insert(c, *fake_kv(c))  # over budget: only c's blocks are unlocked
    assert store.match(a).length == 4 and store.match(c).length == 0 and store.evictions == 2
    assert_holds(store, a, m)


def test_a_locked_prefix_survives_a_budget_it_does_not_fit():
    store = RadixCache(SPEC, 4 * PER_TOKEN)
    a = [1, 2, 3, 4]
    store.insert(a, *fake_kv(a))
    m = store.match(a)
    store.lock(m)
    c = [7, 7, 7, 7, 7]
    store.insert(c, *fake_kv(c))  # over budget: only the unlocked newcomer can go
    assert store.cached_length(a) == 4 and store.cached_length(c) == 0 and store.evictions == 1
    store.unlock(m)
    with pytest.raises(CourseError, match="released twice"):
        store.unlock(m)


# ---- the engine: logits equal a recompute without any cache --------------------------------------------------
def recording_engine(model, store, max_len=64):
    """A PrefixCachingEngine that keeps the logits of every step: the prefill's and each decode step's."""
    seen = []

    def step(token, cache):
        out = decode_step(model, token, cache)
        seen.append(out[0].clone())
        return out

    class Recording(PrefixCachingEngine):
        def prefill(self, ids):
            out = super().prefill(ids)
            seen.append(out[0].clone())
            return out

    engine = Recording(model, store, max_len=max_len, step=step)
    engine.seen = seen
    return engine


def serve(engine, model, prompt, n=6, fresh=True):
    """One request; every step's logits checked against the model without a cache on the whole sequence."""
    if fresh:
        engine.reset()
    engine.seen.clear()
    out = list(engine.generate(prompt, n))
    seq = list(prompt)
    assert len(engine.seen) == n
    for logits, tok in zip(engine.seen, out):
        torch.testing.assert_close(logits, model(torch.tensor([seq]))[0][0, -1], rtol=0, atol=ATOL)
        seq.append(tok)
    assert out == list(Engine(model, max_len=64).generate(prompt, n))  # and the same tokens as project 8's engine
    return out


STORES = {"radix": lambda model, mb: RadixCache.for_model(model, mb),
          "block": lambda model, mb: BlockHashCache.for_model(model, mb, block_size=4)}


@pytest.mark.parametrize("kind", STORES)
@torch.no_grad()
def test_cached_prefix_gives_the_logits_of_a_full_recompute(kind):
    model = tiny_llama(seed=0)
    g = torch.Generator().manual_seed(0)
    a = torch.randint(0, 97, (14,), generator=g).tolist()
    b = a[:10] + torch.randint(0, 97, (5,), generator=g).tolist()
    store = STORES[kind](model, 1.0)
    engine = recording_engine(model, store)
    serve(engine, model, a)  # zero-length match: nothing cached yet
    assert engine.from_store == 0
    serve(engine, model, b)  # partial: 10 shared tokens (inside the tree's node; 2 blocks and a partial one)
    assert engine.from_store == (10 if kind == "radix" else 8)
    serve(engine, model, a)  # the whole prompt (all but its last token, whose logits are needed)
    assert engine.from_store == (13 if kind == "radix" else 12)
    serve(engine, model, b + [1, 2, 3], fresh=False)  # the engine's own cache and the store together
    assert store.hit_tokens > 0 and store.evictions == 0


@pytest.mark.parametrize("kind", STORES)
@torch.no_grad()
def test_logits_stay_exact_after_evictions(kind):
    model = tiny_llama(seed=4)
    g = torch.Generator().manual_seed(4)
    prompts = [torch.randint(0, 97, (12,), generator=g).tolist() for _ in range(3)]
    per_token = KVSpec.of_model(model).bytes_per_token()
    store = STORES[kind](model, 1.0)
    store.budget_bytes = 20 * per_token  # one request's 17 tokens fit, not two
    engine = recording_engine(model, store)
    for p in prompts + prompts[:1] + [prompts[0][:8] + [5, 6]]:
        serve(engine, model, p)
        assert store.nbytes <= store.budget_bytes
    assert store.evictions > 0
    assert store.hit_tokens > 0  # the last prompt found prompts[0] again, after it was evicted and re-inserted


@torch.no_grad()
def test_chat_turn_n_prefills_only_its_new_tokens():
    """A new request per turn (the engine's own cache reset), and two conversations interleaved on one engine
    (project 8's last-sequence reuse would recompute each): every turn prefills only what was never computed."""
    model = tiny_llama(seed=2)
    engine = recording_engine(model, RadixCache.for_model(model, 1.0), max_len=64)
    g = torch.Generator().manual_seed(2)
    chats = {c: [] for c in "AB"}
    for turn in range(3):
        for c in "AB":
            computed = len(chats[c]) - 1 if chats[c] else 0  # all but the last generated token went through the model
            prompt = chats[c] + torch.randint(0, 97, (3,), generator=g).tolist()
            out = serve(engine, model, prompt, n=4, fresh=turn % 2 == 0)
            assert engine.stats.reused_tokens == computed
            assert engine.stats.prompt_tokens - engine.stats.reused_tokens == len(prompt) - computed
            chats[c] = prompt + out


@torch.no_grad()
def test_a_request_stopped_early_or_refused_leaves_the_store_consistent():
    model = tiny_llama()
    store = RadixCache.for_model(model, 1.0)
    engine = PrefixCachingEngine(model, store, max_len=32)
    prompt = list(range(1, 11))
    gen = engine.generate(prompt, 10)
    first, second = next(gen), next(gen)
    gen.close()  # the consumer stops (Ctrl-C, a break): what was computed goes into the store, the lock is released
    assert store.cached_length(prompt + [first, second]) == 11 and all(n.ref == 0 for n in store.nodes())
    with pytest.raises(CourseError, match="context window"):
        list(engine.generate(list(range(40)), 1))
    assert all(n.ref == 0 for n in store.nodes()) and store.nbytes == sum(n.nbytes for n in store.nodes())
    engine.reset()
    assert list(engine.generate(prompt, 3)) == list(Engine(model, max_len=32).generate(prompt, 3))
    assert engine.from_store == 9


# ---- project 4's scorer through the cache ----------------------------------------------------------------------
class ByteTok:
    """Bytes mod the tiny vocabulary; no BOS."""

    def encode(self, text: str, bos: bool = False) -> list[int]:
        return [b % 97 for b in text.encode()]


@torch.no_grad()
def test_project4_scorer_through_the_prefix_cache_scores_the_same():
    model = tiny_llama(seed=5, block_size=128)
    head = "Shots: 1+1=2. 2+2=4. 3+3=6.\n\n"
    items = [MCItem(f"q{i}", head + f"Q{i}: {i}+{i}=", [" A", " B", " C", " D"], i % 4, "math") for i in range(8)]
    items += [MCItem(f"r{i}", head + f"R{i}?", [" yes", " no", " maybe so"], 0, "words") for i in range(4)]
    plain = evaluate_multiple_choice(model, ByteTok(), items, "t", progress=False, batch_size=16)
    store = RadixCache.for_model(model, 1.0)
    cached = evaluate_multiple_choice_cached(model, ByteTok(), items, "t", store, progress=False)
    assert cached.extra["picks"] == plain.extra["picks"] and cached.accuracy == plain.accuracy
    assert store.hit_rate > 0.5
    lm = PrefixCachedLM(PrefixCachingEngine(model, store, max_len=128))
    idx = torch.tensor([ByteTok().encode(head + "Q3: 3+3="), ByteTok().encode(head + "Q9: 9+9?")])
    torch.testing.assert_close(lm(idx, logits_to_keep=4)[0], model(idx, logits_to_keep=4)[0], rtol=0, atol=ATOL)


# ---- bad input ---------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("budget", [0, -5, 1.5, True])
def test_a_budget_that_is_not_a_positive_byte_count_is_refused(budget):
    with pytest.raises(CourseError, match="must be > 0"):
        RadixCache(SPEC, budget)


@pytest.mark.parametrize("mb", [0, -1.0, math.nan])
def test_for_model_refuses_a_budget_of_no_mib(mb):
    with pytest.raises(CourseError, match=r"prefix_cache_mb \(.*\) must be > 0"):
        BlockHashCache.for_model(tiny_llama(), mb)


def test_block_size_must_be_positive():
    with pytest.raises(CourseError, match="block_size"):
        BlockHashCache(SPEC, 1000, block_size=0)


@pytest.mark.parametrize("other", [dict(seed=1), dict(n_kv_head=4), dict(n_layer=3)])
def test_another_models_cache_is_refused_never_reused(other):
    """Other weights with the same shapes (the fingerprint), other K/V heads, other depth: one line each."""
    store = RadixCache.for_model(tiny_llama(seed=0), 1.0)
    with pytest.raises(CourseError, match="another model.*never reused"):
        PrefixCachingEngine(tiny_llama(**other), store)


def test_kv_of_another_shape_or_dtype_is_refused():
    store = RadixCache(SPEC, 10**6)
    k, v = fake_kv([1, 2, 3])
    with pytest.raises(CourseError, match="do not fit this prefix cache"):
        store.insert([1, 2, 3], [t.double() for t in k], [t.double() for t in v])
    with pytest.raises(CourseError, match="do not fit this prefix cache"):
        store.insert([1, 2, 3], k[:1], v[:1])
    store.insert([1, 2, 3], k, v)
    wrong = KVCache(SPEC.n_layers, 1, SPEC.n_kv_heads, 8, SPEC.head_dim, dtype=torch.float64)
    with pytest.raises(CourseError, match="refused, never reused"):
        store.load(store.match([1, 2, 3]), wrong)
    model = tiny_llama()
    with pytest.raises(CourseError, match="another model"):
        PrefixCachingEngine(model.double(), RadixCache.for_model(tiny_llama(), 1.0))


@torch.no_grad()
def test_a_prompt_shorter_than_a_block_is_served_and_never_hits():
    model = tiny_llama(seed=3)
    store = BlockHashCache.for_model(model, 1.0, block_size=16)
    engine = recording_engine(model, store)
    short = [3, 1, 4, 1, 5]
    for _ in range(2):
        serve(engine, model, short, n=3)  # 5 + 2 tokens: no full block, nothing stored, nothing found
        assert engine.from_store == 0
    assert store.hit_tokens == 0 and store.nbytes == 0 and store.miss_tokens == 10
    radix = recording_engine(model, RadixCache.for_model(model, 1.0))
    for _ in range(2):  # a one-token prompt: its token is always computed (its logits give the first new token)
        serve(radix, model, [7], n=3)
        assert radix.from_store == 0


def test_forward_refuses_what_it_cannot_compute():
    model = tiny_llama()
    engine = PrefixCachingEngine(model, RadixCache.for_model(model, 1.0), max_len=8)
    with pytest.raises(CourseError, match="logits_to_keep"):
        engine.forward([1, 2, 3], logits_to_keep=4)
    with pytest.raises(CourseError, match="do not fit the engine's cache of 8"):
        engine.forward(list(range(9)))


if __name__ == "__main__":
    from course.cli import run_demo

    def _demo():
        model = tiny_llama()
        store = RadixCache.for_model(model, 1.0)
        engine = PrefixCachingEngine(model, store, max_len=64)
        system = list(range(1, 30))
        for q in ([40, 41], [50, 51, 52], [40, 41]):
            engine.reset()
            list(engine.generate(system + q, 4))
            print(f"prompt of {len(system + q)} tokens: {engine.from_store} from the prefix cache; {store!r}")

    run_demo(_demo, __doc__)
