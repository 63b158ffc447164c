"""Speculative decoding is exact: greedy token for token, sampling in distribution, the cache rolled back exactly.

- Greedy: every drafter (prompt lookup, self-speculation, another model, the target itself) and every k in 1..8,
  fixed and adaptive, over many prompts, equals project 8's plain engine token for token (tiny models and
  stories260K).
- Sampling, the rule alone: hundreds of thousands of rows at once through `verify_sampled`, target and draft
  being small table LMs whose exact distribution over 3-token continuations is a product of table entries: a
  chi-square test of the empirical distribution against it passes; the same test FAILS for two deliberately wrong
  rules (so it can fail).
- Sampling, the whole engine (draft model, its cache, the target's cache, the pipeline): on a tiny model with an
  8-token vocabulary, seeded samples of the first 3 new tokens against the distribution enumerated from the plain
  model without a cache; the engine with a wrong rule fails the same test at the same sample size.
- After every iteration (rejections included) the target's cache holds exactly the kept tokens: the next step's
  logits equal a full recompute (1e-5).
- Bad input: one line each.

Run: uv run pytest -q phase4_advanced_inference/project11_speculative      (slow ones: -m slow)
"""

from __future__ import annotations

import itertools

import pytest
import torch

from course.errors import CourseError
from course.paths import REPO_ROOT
from phase1_foundation.project3_pretrain.testing import tiny_llama
from phase3_core_inference.project8_kv_cache.engine import Engine
from phase3_core_inference.project8_kv_cache.sampling import SamplingParams, process_logits
from phase4_advanced_inference.project11_speculative import speculative
from phase4_advanced_inference.project11_speculative.acceptance import (accepted_prefix, one_hot_q, residual,
                                                                         verify_greedy, verify_sampled)
from phase4_advanced_inference.project11_speculative.drafters import (Draft, Drafter, EarlyExit, ModelDrafter,
                                                                       PromptLookup, build_drafter, check_same_vocab,
                                                                       parse_layers)
from phase4_advanced_inference.project11_speculative.speculative import SpeculativeEngine

STORIES = REPO_ROOT / "data" / "stories260k" / "stories260K.bin"
needs_stories = pytest.mark.skipif(not STORIES.is_file(), reason=f"{STORIES} absent: run uv run python "
                                   "phase3_core_inference/project8_kv_cache/download_data.py")


def spiky(seed: int, std: float = 0.5, **shape) -> torch.nn.Module:
    """A tiny random Llama with large weights: greedy paths that do not settle into repeating one token (at the
    init's std, tied embeddings make a tiny model echo its input), distributions far from uniform."""
    model = tiny_llama(seed=seed, **shape)
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            if p.dim() > 1:
                p.normal_(0, std, generator=g)
    return model


def chi_square_p(counts: torch.Tensor, probs: torch.Tensor, min_expected: float = 5.0) -> float:
    """Pearson's chi-square goodness of fit; cells expecting fewer than `min_expected` are pooled into one.
    p-value = the regularised upper incomplete gamma Q(df / 2, stat / 2) (the chi-square survival function)."""
    if (counts[probs == 0] > 0).any():
        return 0.0  # a continuation the target can never produce (top-k, top-p cut it) was produced
    n = counts.sum().double()
    expected = probs.double() * n
    small = expected < min_expected
    obs = torch.cat([counts[~small].double(), counts[small].double().sum()[None]])
    exp = torch.cat([expected[~small], expected[small].sum()[None]])
    keep = exp > 0
    obs, exp = obs[keep], exp[keep]
    stat = ((obs - exp) ** 2 / exp).sum()
    return float(torch.special.gammaincc(torch.tensor((len(exp) - 1) / 2), stat / 2))


# ---- wrong rules: the tests below must catch them ---------------------------------------------------------------
def resample_from_p(draft, q, p, generator=None):
    """A common bug: on rejection, draw from p instead of norm(max(0, p - q)) (biased towards the draft's tokens)."""
    return _rule(draft, q, p, generator, "p")


def accept_always(draft, q, p, generator=None):
    """Trust the draft (no rejection at all): the output follows q, not p."""
    return _rule(draft, q, p, generator, "always")


def _rule(draft, q, p, generator, wrong):
    B, k = draft.shape
    px = p[:, :k].gather(-1, draft[..., None])[..., 0]
    qx = q.gather(-1, draft[..., None])[..., 0]
    u = torch.rand(B, k, generator=generator, dtype=p.dtype)
    n = torch.full((B,), k) if wrong == "always" else accepted_prefix(u * qx < px)
    rows = torch.arange(B)
    return n, torch.multinomial(p[rows, n], 1, generator=generator)[:, 0]  # p, not the residual


# ---- the rule on its own ----------------------------------------------------------------------------------------
def test_greedy_rule_keeps_the_agreeing_prefix_then_the_target_argmax():
    logits = torch.full((1, 4, 6), -1.0)
    for pos, tok in enumerate([2, 5, 1, 3]):
        logits[0, pos, tok] = 1.0  # the target's argmax at each position
    n, nxt = verify_greedy(torch.tensor([[2, 5, 1]]), logits)
    assert (int(n), int(nxt)) == (3, 3)  # all kept, then the bonus token
    n, nxt = verify_greedy(torch.tensor([[2, 4, 1]]), logits)
    assert (int(n), int(nxt)) == (1, 5)  # kept up to the first disagreement, then the target's correction
    n, nxt = verify_greedy(torch.zeros(1, 0, dtype=torch.long), logits[:, :1])
    assert (int(n), int(nxt)) == (0, 2)  # no draft: a plain greedy step


def test_sampled_rule_extremes_and_residual():
    p = torch.tensor([[[0.5, 0.5, 0.0], [0.2, 0.3, 0.5]]])
    q = torch.tensor([[[0.0, 0.0, 1.0]]])
    for seed in range(20):  # p(x) = 0: always rejected, and the residual never gives x
        n, nxt = verify_sampled(torch.tensor([[2]]), q, p, torch.Generator().manual_seed(seed))
        assert int(n) == 0 and int(nxt) in (0, 1)
    n, _ = verify_sampled(torch.tensor([[1]]), p[:, :1], p, torch.Generator().manual_seed(0))
    assert int(n) == 1  # q == p: always kept
    torch.testing.assert_close(residual(p[0, :1], q[0]), torch.tensor([[0.5, 0.5, 0.0]]))
    assert torch.equal(residual(p[0, :1], p[0, :1]), p[0, :1])  # all-zero residual: p itself
    assert torch.equal(one_hot_q(torch.tensor([[2]]), 3), q)


V, M = 5, 3  # the table LMs' vocabulary; tokens of each continuation checked


def table_lm(seed: int, scale: float = 1.5) -> torch.Tensor:
    """Next-token distributions depending on the position and the two tokens before (V = none): (pos, a, b, V)."""
    g = torch.Generator().manual_seed(seed)
    return torch.softmax(scale * torch.randn(M + 9, V + 1, V + 1, V, generator=g), -1)


def lookup(table, seq, at):
    rows = torch.arange(seq.size(0))
    prev = lambda j: torch.where(at - j >= 0, seq[rows, (at - j).clamp(min=0)], V)  # noqa: E731
    return table[at, prev(1), prev(2)]


def rule_samples(rule, P, Q, B, k, deterministic, seed) -> torch.Tensor:
    """B sequences of >= M tokens, each made by draft-and-verify iterations with `rule`: (B, M) tokens."""
    gen = torch.Generator().manual_seed(seed)
    seq, length = torch.full((B, M + k + 2), -1), torch.zeros(B, dtype=torch.long)
    while (length < M).any():
        idx = (length < M).nonzero()[:, 0]
        work, L = seq[idx].clone(), length[idx]
        rows = torch.arange(len(idx))
        drafts, qs = [], []
        for i in range(k):
            q = lookup(Q, work, L + i)
            d = q.argmax(-1) if deterministic else torch.multinomial(q, 1, generator=gen)[:, 0]
            qs.append(one_hot_q(d[:, None], V)[:, 0] if deterministic else q)
            work[rows, L + i] = d
            drafts.append(d)
        d, q = torch.stack(drafts, 1), torch.stack(qs, 1)
        p = torch.stack([lookup(P, work, L + i) for i in range(k + 1)], 1)
        n, nxt = rule(d, q, p, gen)
        block = torch.cat([d, torch.zeros(len(idx), 1, dtype=torch.long)], 1)
        block[rows, n] = nxt
        for j in range(k + 1):
            ok = j <= n
            seq[idx[ok], L[ok] + j] = block[ok, j]
        length[idx] = L + n + 1
    return seq[:, :M]


def exact_table_probs(P) -> torch.Tensor:
    seqs = torch.tensor(list(itertools.product(range(V), repeat=M)))
    prob = torch.ones(len(seqs))
    for j in range(M):
        prob = prob * lookup(P, seqs, torch.full((len(seqs),), j)).gather(1, seqs[:, j:j + 1])[:, 0]
    return prob


def cell_counts(samples: torch.Tensor, vocab: int) -> torch.Tensor:
    code = sum(samples[:, j] * vocab ** (samples.size(1) - 1 - j) for j in range(samples.size(1)))
    return torch.bincount(code, minlength=vocab ** samples.size(1))


@pytest.mark.parametrize("deterministic", [False, True], ids=["draft model q", "deterministic draft (one-hot q)"])
def test_rule_is_exact_chi_square(deterministic):
    P, Q = table_lm(0), table_lm(1)
    probs = exact_table_probs(P)
    samples = rule_samples(verify_sampled, P, Q, 200_000, 3, deterministic, seed=0)
    assert chi_square_p(cell_counts(samples, V), probs) > 1e-3


@pytest.mark.parametrize("wrong", [resample_from_p, accept_always], ids=["resample from p", "accept always"])
@pytest.mark.parametrize("deterministic", [False, True], ids=["draft model q", "deterministic draft"])
def test_chi_square_catches_a_wrong_rule(wrong, deterministic):
    P, Q = table_lm(0), table_lm(1)
    samples = rule_samples(wrong, P, Q, 200_000, 3, deterministic, seed=0)
    assert chi_square_p(cell_counts(samples, V), exact_table_probs(P)) < 1e-9


# ---- the engine, greedy -----------------------------------------------------------------------------------------
def drafters_for(model, max_len):
    return {"lookup": PromptLookup(), "self": ModelDrafter(EarlyExit(model, [0]), max_len),
            "model": ModelDrafter(spiky(11), max_len), "target itself": ModelDrafter(model, max_len)}


@pytest.mark.parametrize("adaptive", [False, True], ids=["fixed k", "adaptive k"])
def test_greedy_equals_plain_decoding_tiny(adaptive):
    model = spiky(0)
    plain = Engine(model, 64)
    g = torch.Generator().manual_seed(0)
    prompts = [torch.randint(0, 97, (n,), generator=g).tolist() for n in (1, 4, 9, 17)]
    want = [list(plain.generate(p, 24)) for p in prompts]
    for name, drafter in drafters_for(model, 64).items():
        for k in range(1, 9) if not adaptive else (1, 3, 8):
            engine = SpeculativeEngine(model, drafter, k, 64, adaptive=adaptive)
            for p, w in zip(prompts, want):
                assert list(engine.generate(p, 24)) == w, (name, k, p)
            if name == "target itself":
                assert engine.stats.acceptance_rate == 1.0  # its own greedy drafts are always kept
    assert engine.stats.tokens_per_forward > 5


@needs_stories
def test_greedy_equals_plain_decoding_stories260k():
    from phase1_foundation.project3_pretrain.loading import load_model, load_tokenizer_for
    loaded = load_model(str(STORIES))
    model, tok = loaded.model, load_tokenizer_for(loaded)
    prompts = [tok.encode(t, bos=True) for t in ("Once upon a time", "Lily and Tom went to the park. Lily said")]
    plain = Engine(model, 512)
    want = [list(plain.generate(p, 40)) for p in prompts]
    rates = {}
    for kind in ("lookup", "self"):
        drafter = build_drafter(kind, model, 512, layers="0-1")
        for k in range(1, 9):
            engine = SpeculativeEngine(model, drafter, k, 512, adaptive=k == 4)
            for p, w in zip(prompts, want):
                assert list(engine.generate(p, 40)) == w, (kind, k)
            rates[kind, k] = engine.stats.acceptance_rate
    assert max(rates.values()) > 0.1  # drafts were kept (the equality is not that of plain steps only)


# ---- the engine's caches after rejections ------------------------------------------------------------------------
@pytest.mark.parametrize("temperature", [0.0, 1.0])
def test_cache_holds_exactly_the_kept_tokens_after_every_iteration(temperature):
    model = spiky(0, 0.25)  # logits of a few units: 1e-5 is then the float32 noise of a reordered sum
    engine = SpeculativeEngine(model, ModelDrafter(spiky(5), 64), 4, 64)
    params = SamplingParams(temperature=temperature)
    gen = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for _ in engine.generate([3, 1, 4, 1, 5], 40, params, gen):
            ids = engine.context
            assert engine.tokens == ids[:-1] and engine.cache.length == len(ids) - 1
            step = model(torch.tensor([ids[-1:]]), kv_cache=engine.cache)[0][0, -1]
            torch.testing.assert_close(step, model(torch.tensor([ids]))[0][0, -1], rtol=0, atol=1e-5)
            engine.cache.crop(len(ids) - 1)  # undo the check's own step
    s = engine.stats
    assert s.drafted - s.accepted > 5  # rejections happened (and the cache was cropped after each)


def test_draft_model_cache_catches_up_after_full_acceptance():
    model = spiky(0)
    drafter = ModelDrafter(model, 64)
    engine = SpeculativeEngine(model, drafter, 3, 64)
    out = list(engine.generate([7, 8, 9], 20))
    assert engine.stats.acceptance_rate == 1.0 and out == list(Engine(model, 64).generate([7, 8, 9], 20))
    ids = drafter.tokens
    assert ids == engine.context[:len(ids)] and drafter.cache.length == len(ids)  # a prefix of the text
    with torch.no_grad():  # and its K/V are those of that prefix: one more step equals a recompute
        nxt = engine.context[len(ids)]
        step = model(torch.tensor([[nxt]]), kv_cache=drafter.cache)[0][0, -1]
        torch.testing.assert_close(step, model(torch.tensor([ids + [nxt]]))[0][0, -1], rtol=0, atol=1e-5)


# ---- the engine, sampling: exact in distribution -----------------------------------------------------------------
SMALL = dict(vocab_size=8, n_layer=1, n_embd=16, n_head=2, n_kv_head=1, intermediate_size=32, block_size=16)
PROMPT = [1, 5, 2, 7]


def exact_engine_probs(model, params: SamplingParams) -> torch.Tensor:
    """P(x1, x2, x3 | PROMPT) for all 8^3 continuations, from the plain model without a cache."""
    seqs = torch.tensor(list(itertools.product(range(8), repeat=3)))
    full = torch.cat([torch.tensor(PROMPT).expand(len(seqs), -1), seqs], 1)
    with torch.no_grad():
        logits = model(full)[0]
    prob = torch.ones(len(seqs))
    for j in range(3):
        at = len(PROMPT) - 1 + j
        scores = process_logits(logits[:, at], params, full[:, :at + 1] if params.repetition_penalty != 1 else None)
        prob = prob * torch.softmax(scores, -1).gather(1, seqs[:, j:j + 1])[:, 0]
    return prob


def engine_samples(drafter_kind: str, params: SamplingParams, n: int, k: int = 2, seed: int = 0) -> torch.Tensor:
    model = spiky(0, 0.3, **SMALL)
    drafter = {"model": lambda: ModelDrafter(spiky(1, 0.3, **SMALL), 16), "lookup": PromptLookup,
               "self": lambda: ModelDrafter(EarlyExit(spiky(0, 0.3, **{**SMALL, "n_layer": 2}), [0]), 16)}[drafter_kind]()
    if drafter_kind == "self":
        model = drafter.model._target[0]
    engine = SpeculativeEngine(model, drafter, k, 16)
    gen = torch.Generator().manual_seed(seed)
    out, drafted, accepted = [], 0, 0
    for _ in range(n):
        out.append(list(engine.generate(PROMPT, 3, params, gen, reuse_cache=True)))
        drafted, accepted = drafted + engine.stats.drafted, accepted + engine.stats.accepted
    return torch.tensor(out), exact_engine_probs(model, params), accepted / drafted


def test_engine_sampling_is_exact_chi_square():
    samples, probs, rate = engine_samples("model", SamplingParams(temperature=1.0), 2500)
    assert 0.2 < rate < 0.95  # the rule had both kinds of decision to make
    assert chi_square_p(cell_counts(samples, 8), probs) > 1e-3


def test_engine_chi_square_catches_a_wrong_rule(monkeypatch):
    monkeypatch.setattr(speculative, "verify_sampled", resample_from_p)
    samples, probs, _ = engine_samples("model", SamplingParams(temperature=1.0), 2500)
    assert chi_square_p(cell_counts(samples, 8), probs) < 1e-4


@pytest.mark.slow
@pytest.mark.parametrize("kind,params", [
    ("model", SamplingParams(temperature=1.0)),
    ("model", SamplingParams(temperature=0.7, top_k=5, top_p=0.9)),
    ("model", SamplingParams(temperature=1.0, min_p=0.05, repetition_penalty=1.3)),
    ("lookup", SamplingParams(temperature=1.0)),
    ("self", SamplingParams(temperature=0.8, top_p=0.95)),
], ids=["T=1", "T=0.7 top-k top-p", "min-p penalty", "lookup", "self top-p"])
def test_engine_sampling_is_exact_many_samples(kind, params):
    samples, probs, rate = engine_samples(kind, params, 20_000, k=3)
    assert rate > 0.05
    assert chi_square_p(cell_counts(samples, 8), probs) > 1e-3


# ---- clipping, stats, bad input -----------------------------------------------------------------------------------
class Fixed(Drafter):
    """Proposes the same long draft whatever the text: the engine must clip it."""
    name = "fixed"

    def __init__(self, tokens):
        self.tokens, self.asked = tokens, []

    def propose(self, tokens, k, params, generator=None):
        self.asked.append(k)
        return Draft(list(self.tokens))


def test_draft_clipped_to_max_new_tokens_and_context():
    model = spiky(0)
    drafter = Fixed([1] * 20)
    engine = SpeculativeEngine(model, drafter, 8, 16)
    out = list(engine.generate([2, 3, 4, 5, 6, 7], 10))  # 6 + 10 = the whole window of 16
    assert out == list(Engine(model, 16).generate([2, 3, 4, 5, 6, 7], 10))
    assert len(out) == 10 and max(engine.k_trace) <= 8 and engine.cache.length <= 16
    assert all(k <= 10 - 1 for k in drafter.asked)
    short = ModelDrafter(spiky(3, block_size=8), 64)  # a draft whose own context is shorter than the text
    engine = SpeculativeEngine(model, short, 4, 64)
    assert list(engine.generate(list(range(1, 7)), 12)) == list(Engine(model, 64).generate(list(range(1, 7)), 12))
    assert engine.stats.drafted < 4 * engine.stats.target_forwards  # clipped, then nothing once the text outgrew 8


def test_stats_and_adaptive_k():
    model = spiky(0)
    engine = SpeculativeEngine(model, ModelDrafter(model, 64), 2, 64, adaptive=True, k_max=6)
    list(engine.generate([5, 6], 40))
    s = engine.stats
    assert s.acceptance_rate == 1.0 and engine.k_trace[:5] == [2, 3, 4, 5, 6] and max(engine.k_trace) == 6
    assert s.tokens_per_forward == (s.new_tokens - 1) / s.target_forwards and s.mean_accepted > 4
    engine = SpeculativeEngine(model, ModelDrafter(spiky(9), 64), 5, 64, adaptive=True)
    list(engine.generate([5, 6], 40))
    assert engine.k_trace[0] == 5 and 1 in engine.k_trace  # rejections shrank it


def test_prompt_lookup_finds_the_latest_longest_match():
    lookup = PromptLookup(max_ngram=3)
    text = [1, 2, 3, 9, 9, 5, 1, 2, 3, 7, 8, 4, 1, 2, 3]
    assert lookup.propose(text, 2, SamplingParams()).tokens == [7, 8]  # the latest [1, 2, 3]
    assert lookup.propose([4, 5, 6, 5], 3, SamplingParams()).tokens == [6, 5]  # only a 1-gram matches
    assert lookup.propose([1, 2, 3], 3, SamplingParams()).tokens == []


def test_early_exit_is_the_targets_first_layers():
    model = spiky(0, n_layer=3)
    assert parse_layers("0-1", 3) == [0, 1] and parse_layers("0,2", 3) == [0, 2]
    draft = EarlyExit(model, [0, 2])
    assert all(any(p is q for q in model.parameters()) for p in draft.parameters())  # no weights of its own
    ref = spiky(0, n_layer=3)
    ref.layers = torch.nn.ModuleList([ref.layers[0], ref.layers[2]])
    x = torch.tensor([[3, 1, 4, 1, 5]])
    with torch.no_grad():
        torch.testing.assert_close(draft(x)[0], ref(x)[0], rtol=0, atol=1e-6)


BAD = [
    (lambda: SpeculativeEngine(spiky(0), PromptLookup(), 0), "k (0) must be an integer >= 1"),
    (lambda: SpeculativeEngine(spiky(0), PromptLookup(), -2), "k (-2) must be an integer >= 1"),
    (lambda: SpeculativeEngine(spiky(0), PromptLookup(), 4, k_max=2), "k_max (2) must be >= k (4)"),
    (lambda: PromptLookup(max_ngram=2, min_ngram=3), "1 <= min_ngram (3) <= max_ngram (2)"),
    (lambda: parse_layers("0-40", 30), "must name layers in 0..29"),
    (lambda: parse_layers("a-b", 30), "must be layer indices and ranges"),
    (lambda: parse_layers("0-29", 30), "the draft would be the target itself"),
    (lambda: check_same_vocab(spiky(0), spiky(1, vocab_size=50)), "the draft model has a vocabulary of 50 tokens, "
                                                                  "the target 97"),
    (lambda: build_drafter("model", spiky(0), 64), "needs a draft model"),
    (lambda: list(SpeculativeEngine(spiky(0), PromptLookup(), 2, 16).generate([1] * 10, 7)),
     "lower --max_new_tokens to at most 6"),
]


@pytest.mark.parametrize("make,fragment", BAD, ids=[f for _, f in BAD])
def test_bad_input_is_one_line(make, fragment):
    with pytest.raises(CourseError) as e:
        make()
    assert fragment in str(e.value) and "\n" not in str(e.value)


def test_draft_tokenizer_mismatch_detected():
    class Tok:
        def __init__(self, shift):
            self.vocab_size, self.shift = 97, shift

        def piece_bytes(self, prev, i):
            return bytes([(i + self.shift) % 256])

    check_same_vocab(spiky(0), spiky(1), Tok(0), Tok(0))
    with pytest.raises(CourseError, match="the draft's tokenizer differs from the target's"):
        check_same_vocab(spiky(0), spiky(1), Tok(0), Tok(1))


if __name__ == "__main__":
    from course.cli import run_demo

    def demo():
        model = spiky(0)
        prompt = [3, 1, 4, 1, 5, 9, 2, 6]
        want = list(Engine(model, 64).generate(prompt, 40))
        for name, drafter in drafters_for(model, 64).items():
            engine = SpeculativeEngine(model, drafter, 4, 64)
            out = list(engine.generate(prompt, 40))
            s = engine.stats
            print(f"{name:14s} same as plain greedy: {out == want}; acceptance {100 * s.acceptance_rate:5.1f}%, "
                  f"{s.tokens_per_forward:.2f} tokens per target forward")
    run_demo(demo, __doc__)
