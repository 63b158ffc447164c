"""Continuous batching is exact: every request gets what it gets alone, whatever else is in the batch.

Run: uv run pytest -q phase4_advanced_inference/project12_continuous_batching/test_scheduler.py

The reference is project 8's single-sequence Engine (itself tested against a full recompute and transformers),
on tiny random models (project 3's tiny_llama), fresh random prompts each test.
"""

from __future__ import annotations

import random

import pytest
import torch

from course.errors import CourseError
from phase1_foundation.project3_pretrain.testing import tiny_llama
from phase3_core_inference.project8_kv_cache.engine import Engine
from phase3_core_inference.project8_kv_cache.kv_cache import KVCache
from phase3_core_inference.project8_kv_cache.sampling import SamplingParams
from phase4_advanced_inference.project12_continuous_batching import workload
from phase4_advanced_inference.project12_continuous_batching.batch_engine import BatchEngine
from phase4_advanced_inference.project12_continuous_batching.ragged import Segment, ragged_forward
from phase4_advanced_inference.project12_continuous_batching.request import Request
from phase4_advanced_inference.project12_continuous_batching.scheduler import Scheduler

GREEDY = SamplingParams(temperature=0.0)


class LetterTokenizer:
    """A toy tokenizer for the tiny models: token i is the letter 'a' + i % 26 (ids 0 and 1 are '.' and ' ')."""

    def piece_bytes(self, prev_id, token_id: int) -> bytes:
        return {0: b".", 1: b" "}.get(token_id, bytes([97 + token_id % 26]))

    def decode(self, ids) -> str:
        return b"".join(self.piece_bytes(None, i) for i in ids).decode()


def spiky_model(seed: int, **kw):
    """tiny_llama with larger weights, so greedy paths do not settle into one repeated token."""
    model = tiny_llama(seed=seed, **kw)
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            if p.dim() > 1:
                p.normal_(0, 0.4, generator=g)
    return model.eval()


def solo(model, req: Request) -> tuple[list[int], list[torch.Tensor]]:
    """The request alone through project 8's Engine: its tokens and the logits each came from."""
    eng = Engine(model)
    logits = []
    step = eng.step
    eng.step = lambda tok, cache: logits.append(step(tok, cache)) or logits[-1]
    prefill = eng.prefill
    eng.prefill = lambda ids: logits.append(prefill(ids)) or logits[-1]
    g = torch.Generator().manual_seed(req.seed)
    toks = list(eng.generate(req.prompt, req.max_new_tokens, req.params, g, stop_ids=req.stop_ids))
    return toks, [lg[0] for lg in logits]


def random_requests(rng: random.Random, vocab: int, n: int, params=GREEDY, max_prompt: int = 20) -> list[Request]:
    return [Request([rng.randrange(vocab) for _ in range(rng.randint(1, max_prompt))], rng.randint(1, 12),
                    params, seed=rng.randrange(10**6), arrival=rng.random() * 0.01) for _ in range(n)]


def copy_requests(reqs: list[Request]) -> list[Request]:
    return [Request(list(r.prompt), r.max_new_tokens, r.params, r.seed, r.stop_ids, r.stop, r.arrival) for r in reqs]


class LoggingEngine(BatchEngine):
    """Keeps the logits every request's tokens were sampled from (for the 1e-4 check)."""

    def sample(self, work, logits):
        for w, lg in zip(work, logits):
            self.seen.setdefault(w.running.request.id, []).append(lg.clone())
        return super().sample(work, logits)

    seen: dict


# ---- the ragged forward ---------------------------------------------------------------------------
@pytest.mark.parametrize("seed", [0, 1, 2])
def test_ragged_forward_equals_each_sequence_recomputed(seed):
    """Random segments (prefill chunks, whole prompts, decode tokens) of random rows in one packed forward:
    every wanted logit equals the sequence recomputed without a cache; the rows' lengths count their tokens."""
    model = tiny_llama(seed=seed, n_kv_head=1)
    rng = random.Random(seed)
    V = model.config.vocab_size
    cache = KVCache.for_model(model.config, batch=5, max_len=48)
    seqs = {b: [] for b in range(5)}
    with torch.no_grad():
        for _ in range(6):
            rows = rng.sample(range(5), rng.randint(1, 5))
            segs, toks = [], []
            for b in rows:
                new = [rng.randrange(V) for _ in range(rng.choice([1, 1, 3, 7]))]
                if len(seqs[b]) + len(new) > 40:
                    continue
                seqs[b] += new
                segs.append(Segment(b, len(new), keep_last=rng.random() < 0.8))
                toks.append(new)
            if not segs:
                continue
            out = ragged_forward(model, cache, segs, toks)
            kept = [s for s in segs if s.keep_last]
            assert out.shape == (len(kept), V)
            for lg, s in zip(out, kept):
                ref = model(torch.tensor([seqs[s.row]]))[0][0, -1]
                torch.testing.assert_close(lg, ref, rtol=0, atol=1e-5)
            assert [cache.lengths[b] for b in range(5)] == [len(seqs[b]) for b in range(5)]


def test_ragged_forward_keeps_sequences_apart():
    """The check can fail: the same tokens in another row with a different history give different logits."""
    model = tiny_llama(seed=4)
    cache = KVCache.for_model(model.config, batch=2, max_len=16)
    with torch.no_grad():
        ragged_forward(model, cache, [Segment(0, 3, False), Segment(1, 2, False)], [[5, 6, 7], [8, 9]])
        a, b = ragged_forward(model, cache, [Segment(0, 1), Segment(1, 1)], [[10], [10]])
    assert (a - b).abs().max() > 1e-3


# ---- continuous batching equals solo ------------------------------------------------------------------
CASES = [  # (max_rows, max_batch_tokens, chunked_prefill, policy, packed)
    (4, 8, True, "continuous", True),
    (3, 5, True, "continuous", False),
    (2, None, False, "continuous", True),
    (5, 16, False, "continuous", True),
    (4, None, False, "static", True),
    (1, None, False, "static", False),  # sequential
]


@pytest.mark.parametrize("seed,case", list(enumerate(CASES)),
                         ids=[f"rows{c[0]}-budget{c[1]}-chunk{c[2]}-{c[3]}-packed{c[4]}" for c in CASES])
def test_every_request_gets_its_solo_output(seed, case):
    """Random arrival orders, prompt lengths, budgets (chunk sizes) and row limits: each request's greedy tokens
    equal its solo run's, and every logit it was sampled from is within 1e-4 of the solo one."""
    rows, budget, chunked, policy, packed = case
    model = spiky_model(seed)
    rng = random.Random(seed)
    reqs = random_requests(rng, model.config.vocab_size, 12)
    eng = LoggingEngine(model, max_rows=rows, max_batch_tokens=budget, chunked_prefill=chunked, policy=policy,
                        packed=packed)
    eng.seen = {}
    done = eng.run(reqs)
    assert sorted(r.id for r in done) == sorted(r.id for r in reqs)  # every request finished exactly once
    for r in reqs:
        toks, logits = solo(model, r)
        assert r.tokens == toks, r.id
        assert len(eng.seen[r.id]) == len(logits)
        for ours, theirs in zip(eng.seen[r.id], logits):
            torch.testing.assert_close(ours, theirs, rtol=0, atol=1e-4)
        assert r.finish_reason == "length"


def test_outputs_do_not_depend_on_arrival_order_or_batch():
    """The same requests, shuffled arrival times, different row limits: the same tokens (greedy and sampled)."""
    model = spiky_model(7)
    rng = random.Random(7)
    params = SamplingParams(temperature=0.9, top_k=20)
    reqs = random_requests(rng, model.config.vocab_size, 8, params=params)
    outs = []
    for rows, budget in ((1, None), (3, 6), (8, 64)):
        trial = copy_requests(reqs)
        times = [r.arrival for r in trial]
        rng.shuffle(times)
        for r, t in zip(trial, times):
            r.arrival = t
        BatchEngine(model, max_rows=rows, max_batch_tokens=budget).run(trial)
        outs.append([r.tokens for r in trial])
    assert outs[0] == outs[1] == outs[2]
    assert outs[0] == [solo(model, r)[0] for r in reqs]  # and equal to project 8's engine with the same seed
    assert len({tuple(t) for t in outs[0]}) > 4  # sampled, not a constant


def test_per_request_seeds_change_the_sample():
    """The check can fail: another seed gives another sampled continuation."""
    model = spiky_model(8)
    params = SamplingParams(temperature=1.0)
    a = Request([3, 4, 5], 12, params, seed=1)
    b = Request([3, 4, 5], 12, params, seed=2)
    BatchEngine(model, max_rows=2).run([a, b])
    assert a.tokens != b.tokens


# ---- the scheduler's rules ---------------------------------------------------------------------------
def test_budget_and_chunks():
    """Decodes first, then chunks that fill what is left of the budget; a whole prompt waits when unchunked."""
    s = Scheduler(max_rows=3, max_batch_tokens=8, chunked_prefill=True)
    long, short = Request(list(range(20)), 4), Request([1, 2, 3], 4)
    for r in (long, short):
        s.add(r)
    w = s.schedule(0.0)
    assert [len(x.tokens) for x in w] == [8] and not w[0].samples  # the long prompt takes the whole budget
    w = s.schedule(0.0)
    assert [len(x.tokens) for x in w] == [8]
    w = s.schedule(0.0)
    assert [len(x.tokens) for x in w] == [4, 3] and all(x.samples for x in w)  # its last chunk + the short one
    s2 = Scheduler(max_rows=3, max_batch_tokens=8, chunked_prefill=False)
    s2.add(Request(list(range(6)), 2))
    s2.add(Request(list(range(5)), 2))
    w = s2.schedule(0.0)
    assert [len(x.tokens) for x in w] == [6]  # the second (5) does not fit the 2 left
    w[0].running.next_token = 42  # what the engine does with the sampled token
    w = s2.schedule(0.0)
    assert [(x.decode, x.tokens[:1], len(x.tokens)) for x in w] == [(True, [42], 1), (False, [0], 5)]
    s3 = Scheduler(max_rows=2, max_batch_tokens=4, chunked_prefill=False)
    s3.add(Request(list(range(30)), 2))
    assert [len(x.tokens) for x in s3.schedule(0.0)] == [30]  # alone: a long prompt is never starved


def test_static_batching_waits_for_the_whole_group():
    model = spiky_model(9)
    reqs = [Request([5, 6], n) for n in (2, 9, 3)]
    eng = BatchEngine(model, max_rows=2, max_batch_tokens=None, policy="static")
    eng.run(reqs)
    # the third request starts only after the longer of the first two finished
    assert reqs[2].first_token_time >= reqs[1].finish_time
    cont = [Request([5, 6], n) for n in (2, 9, 3)]
    BatchEngine(model, max_rows=2).run(cont)
    assert cont[2].first_token_time < cont[1].finish_time  # continuous: it takes the first one's row at once


def test_requests_arrive_in_time_not_before():
    model = spiky_model(10)
    reqs = [Request([1, 2, 3], 3, arrival=a) for a in (0.0, 0.05)]
    BatchEngine(model, max_rows=4).run(reqs)
    assert reqs[1].first_token_time >= 0.05


def test_cancellation_frees_the_row_at_the_next_iteration():
    model = spiky_model(11)
    eng = BatchEngine(model, max_rows=2)
    a, b, c = (eng.submit(Request([4, 5, 6], 30)) for _ in range(3))
    eng.step()
    eng.step()
    assert set(eng.scheduler.running) == {0, 1}
    a.cancelled = True
    finished = eng.step()
    assert finished == [a] and a.finish_reason == "cancelled" and 0 not in eng.scheduler.running or \
        eng.scheduler.running[0].request is c  # its row went to the waiting request in the same iteration
    assert eng.scheduler.running[0].request is c
    c.cancelled = True  # cancelled while running; b goes on
    rest = []
    while eng.scheduler.has_work:
        rest += eng.step()
    assert rest[0] is c and b.finish_reason == "length" and len(b.tokens) == 30
    assert len(a.tokens) == 2  # nothing after the cancel


def test_a_cancelled_waiting_request_never_runs():
    eng = BatchEngine(spiky_model(12), max_rows=1)
    a, b = eng.submit(Request([1, 2], 3)), eng.submit(Request([1, 2], 3))
    b.cancelled = True
    done = eng.run([])
    assert set(done) == {a, b} and b.tokens == [] and b.finish_reason == "cancelled"


# ---- stop strings and streaming -----------------------------------------------------------------------
def test_stop_string_ends_the_text_and_the_stream_is_the_final_text():
    model = spiky_model(13)
    tok = LetterTokenizer()
    probe = Request([7, 8, 9], 40)
    BatchEngine(model, tokenizer=tok, max_rows=1).run([probe])
    full = probe.text
    stop = full[10:13]  # spelled over three tokens
    streamed = []
    req = Request([7, 8, 9], 40, stop=(stop, "never-there"), on_text=lambda r, piece: streamed.append(piece))
    other = Request([2, 3], 20)
    BatchEngine(model, tokenizer=tok, max_rows=2).run([req, other])
    assert req.finish_reason == "stop" and req.text == full[:full.find(stop)]
    assert "".join(streamed) == req.text
    assert stop not in "".join(streamed)
    assert len(req.tokens) < 40


def test_stop_id_ends_the_request():
    model = spiky_model(14)
    probe = Request([3, 1, 4], 20)
    BatchEngine(model, max_rows=1).run([probe])
    stop_tok = probe.tokens[5]
    req = Request([3, 1, 4], 20, stop_ids={stop_tok})
    BatchEngine(model, max_rows=1).run([req])
    assert req.finish_reason == "stop" and req.tokens == probe.tokens[:probe.tokens.index(stop_tok) + 1]


# ---- bad input -------------------------------------------------------------------------------------------
@pytest.mark.parametrize("bad,msg", [
    (dict(prompt=list(range(64)), max_new_tokens=1), "context window"),
    (dict(prompt=[1, 2], max_new_tokens=0), "max_new_tokens"),
    (dict(prompt=[1, 2], max_new_tokens=70), "at most 62"),
    (dict(prompt=[1, 2], max_new_tokens=3, params=SamplingParams(temperature=-1)), "temperature"),
    (dict(prompt=[1, 2], max_new_tokens=3, params={"temperature": 0.5}), "SamplingParams"),
    (dict(prompt=[1, 2], max_new_tokens=3, stop=("",)), "stop string"),
    (dict(prompt=[], max_new_tokens=3), "empty"),
])
def test_a_bad_request_is_rejected_alone(bad, msg):
    eng = BatchEngine(spiky_model(15), tokenizer=LetterTokenizer(), max_rows=2)
    good = eng.submit(Request([1, 2, 3], 4))
    with pytest.raises(CourseError, match=msg) as e:
        eng.submit(Request(**bad))
    assert "\n" not in str(e.value)
    assert eng.run([]) == [good] and len(good.tokens) == 4


def test_bad_engine_settings():
    model = spiky_model(16)
    with pytest.raises(CourseError, match="max_batch_tokens"):
        BatchEngine(model, max_rows=4, max_batch_tokens=2)
    with pytest.raises(CourseError, match="policy"):
        BatchEngine(model, policy="fastest")
    with pytest.raises(CourseError, match="context window"):
        BatchEngine(model, max_len=65)


# ---- the workload ---------------------------------------------------------------------------------------
def test_poisson_workload_is_seeded_and_has_the_rate(tmp_path):
    prompts = [[1, 2, 3], [4, 5], [6]]
    a = workload.synthetic(prompts, n=2000, rate=4.0, seed=3, mean_output=20, max_output=60)
    b = workload.synthetic(prompts, n=2000, rate=4.0, seed=3, mean_output=20, max_output=60)
    assert [(x.arrival, x.prompt, x.max_new_tokens) for x in a] == [(x.arrival, x.prompt, x.max_new_tokens) for x in b]
    gaps = torch.tensor([y.arrival - x.arrival for x, y in zip(a, a[1:])])
    assert abs(gaps.mean().item() - 0.25) < 0.02  # exponential gaps with mean 1 / rate
    assert abs(sum(x.max_new_tokens for x in a) / 2000 - 20) < 2
    path = tmp_path / "trace.jsonl"
    workload.save_trace(a[:50], path)
    back = workload.load_trace(path)
    assert [(x.arrival, x.prompt, x.max_new_tokens, x.seed) for x in back] == \
        [(x.arrival, x.prompt, x.max_new_tokens, x.seed) for x in a[:50]]


def test_a_bad_trace_line_is_one_clear_error(tmp_path):
    path = tmp_path / "trace.jsonl"
    path.write_text('{"arrival": 0.0, "prompt": [1, 2], "max_new_tokens": 4}\n{"arrival": "soon"}\n')
    with pytest.raises(CourseError, match="line 2"):
        workload.load_trace(path)
    with pytest.raises(CourseError, match="not found"):
        workload.load_trace(tmp_path / "missing.jsonl")
