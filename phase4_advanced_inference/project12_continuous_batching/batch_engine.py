"""The batching engine: the scheduler's plan, one batched step, per-request sampling, streaming, retiring.

PAPERS
- Yu et al. 2022, "Orca": the loop below is its iteration-level scheduling: schedule, run one iteration of the
  model over every scheduled request, hand each its token, retire the finished, repeat.
- Agrawal et al. 2024, "Sarathi-Serve": a prefill chunk and the decode tokens in the same forward.
- Zhong et al. 2024, "DistServe": TTFT and TPOT, the two latencies every request records (request.py).

INTUITION
The engine owns one KV cache with `max_rows` rows (project 8's contiguous `KVCache`): a request gets a row when
it is admitted, keeps it while it prefills and decodes, and gives it back when it finishes (`cache.free(row)`);
the next request overwrites that row. Nothing is copied between iterations: each row's keys stay where they were written.

IMPLEMENTATION (`BatchEngine.step`, one iteration)
1. `Scheduler.schedule(now)`: the work of this iteration, [(row, tokens, samples)].
2. The batched step, one of three forwards, all through project 8's cache protocol:
   - every row decodes one token: a (B, 1) forward over `cache.rows(rows)`, each row at its own position;
   - prompt chunks among them, `packed` (the default): ONE (1, N) forward over all of it (ragged.py);
   - prompt chunks, `packed=False`: one forward per chunk (`cache.rows([row])`) plus one (B, 1) for the decodes.
   The three give the same logits (test_scheduler.py); which is fastest depends on the machine (benchmark.py).
3. Sampling per row with the request's own parameters and random stream (`torch.Generator(seed)`), so what a
   request samples never depends on what else is in the batch; greedy rows are one argmax.
4. `Request.push` streams the text and says when a request is done (stop id, stop string, length); done
   requests leave the scheduler at once and their rows are free for the next iteration.
`run(requests)` drives it in real time: requests are submitted with their arrival times (seconds from the
start), the loop sleeps only when nothing is running and the next request has not arrived yet.
"""

from __future__ import annotations

import time
from dataclasses import dataclass

import torch

from course.errors import CourseError
from phase3_core_inference.project8_kv_cache.kv_cache import KVCache
from phase3_core_inference.project8_kv_cache.sampling import sample_token
from phase4_advanced_inference.project12_continuous_batching.ragged import Segment, ragged_forward
from phase4_advanced_inference.project12_continuous_batching.request import Request
from phase4_advanced_inference.project12_continuous_batching.scheduler import Scheduler, Work


@dataclass
class StepStats:
    """One iteration: when, how long, and what it carried."""
    start: float
    seconds: float
    decode_tokens: int
    prefill_tokens: int
    rows: int


class BatchEngine:
    def __init__(self, model: torch.nn.Module, tokenizer=None, max_rows: int = 8, max_batch_tokens: int | None = 256,
                 chunked_prefill: bool = True, policy: str = "continuous", max_len: int | None = None,
                 packed: bool = True, cache=None):
        """cache: another cache of project 8's protocol with token-wise access and `batch` = max_rows rows (project
        13's paged cache); None = a contiguous KVCache of max_rows x max_len. A cache with `claim(row, tokens)`
        is asked before each admission whether the request's prompt + max_new_tokens fit."""
        self.model = model.eval()
        p = next(model.parameters())
        self.device, self.tokenizer, self.packed = p.device, tokenizer, packed
        self.max_len = max_len or model.config.block_size
        if self.max_len > model.config.block_size:
            raise CourseError(f"max_len ({self.max_len}) exceeds the model's context window "
                              f"({model.config.block_size})")
        if cache is None:
            cache = KVCache.for_model(model.config, batch=max_rows, max_len=self.max_len, dtype=p.dtype,
                                      device=self.device)
        elif cache.batch != max_rows:
            raise CourseError(f"the cache has {cache.batch} rows, the engine max_rows {max_rows}: make them equal")
        self.cache = cache
        claim = getattr(cache, "claim", None)
        admits = None if claim is None else (
            lambda run: claim(run.row, len(run.request.prompt) + run.request.max_new_tokens))
        self.scheduler = Scheduler(max_rows, max_batch_tokens, chunked_prefill, policy, admits, release=cache.free)
        self.steps: list[StepStats] = []
        self.submitted = 0
        self.t0 = time.perf_counter()

    def clock(self) -> float:
        """Seconds since the engine started (or since `run` started): the time arrivals are given in."""
        return time.perf_counter() - self.t0

    def submit(self, request: Request) -> Request:
        """Queue a request; a bad one raises one CourseError line naming it and changes nothing else."""
        if not request.id:
            request.id = f"req-{self.submitted}"
        request.check(self.max_len)
        request.start(self.tokenizer)
        self.submitted += 1
        self.scheduler.add(request)
        return request

    # ---- one iteration ----------------------------------------------------------------------------
    @torch.inference_mode()
    def step(self) -> list[Request]:
        """Schedule, run one forward (or, split, a few), sample, stream; returns the requests finished now."""
        now = self.clock()
        before = len(self.scheduler.finished)
        work = self.scheduler.schedule(now)
        if work:
            t0 = time.perf_counter()
            logits = self.forward(work)
            done_at = self.clock()
            sampling = [w for w in work if w.samples]
            for w, token in zip(sampling, self.sample(sampling, logits)):
                if w.running.request.push(token, done_at):
                    self.scheduler.finish(w.running)
                else:
                    w.running.next_token = token
            n_dec = sum(w.decode for w in work)
            self.steps.append(StepStats(now, time.perf_counter() - t0, n_dec,
                                        sum(len(w.tokens) for w in work) - n_dec, len(work)))
        return self.scheduler.finished[before:]

    def forward(self, work: list[Work]) -> torch.Tensor:
        """Logits (S, vocab) for the works with `samples`, in work order."""
        if all(w.decode for w in work):
            return self._decode(work)
        if self.packed:
            segments = [Segment(w.running.row, len(w.tokens), w.samples) for w in work]
            return ragged_forward(self.model, self.cache, segments, [w.tokens for w in work])
        out, decodes = {}, [w for w in work if w.decode]
        if decodes:
            for w, lg in zip(decodes, self._decode(decodes)):
                out[id(w)] = lg
        for w in work:
            if not w.decode:
                x = torch.tensor([w.tokens], device=self.device)
                lg = self.model(x, kv_cache=self.cache.rows([w.running.row]), logits_to_keep=1)[0][0, -1]
                if w.samples:
                    out[id(w)] = lg
        kept = [out[id(w)] for w in work if w.samples]
        return torch.stack(kept) if kept else torch.empty(0, self.model.config.vocab_size, device=self.device)

    def _decode(self, work: list[Work]) -> torch.Tensor:
        x = torch.tensor([[w.tokens[0]] for w in work], device=self.device)
        view = self.cache.rows([w.running.row for w in work])
        return self.model(x, kv_cache=view, logits_to_keep=1)[0][:, -1]

    def sample(self, work: list[Work], logits: torch.Tensor) -> list[int]:
        """Each row's next token with its own request's parameters and random stream."""
        tokens = [0] * len(work)
        greedy = [i for i, w in enumerate(work) if w.running.request.params.greedy
                  and w.running.request.params.repetition_penalty == 1.0]
        if greedy:
            for i, t in zip(greedy, logits[greedy].argmax(-1).tolist()):
                tokens[i] = t
        for i, w in enumerate(work):
            if i in greedy:
                continue
            req = w.running.request
            prev = None
            if req.params.repetition_penalty != 1.0:
                prev = torch.tensor([req.prompt + req.tokens])
            # on the CPU, with the request's own generator: the same draws whatever device the model is on
            tokens[i] = int(sample_token(logits[i:i + 1].float().cpu(), req.params, prev, req.generator))
        return tokens

    # ---- a whole workload -------------------------------------------------------------------------
    def run(self, requests: list[Request], realtime: bool = True, progress=None) -> list[Request]:
        """Serve `requests` (arrival = seconds after the start) to the end; returns them in finishing order.

        realtime=False ignores the arrival times (every request is there at the start: an offline batch)."""
        self.t0 = time.perf_counter()
        for r in requests:
            if not realtime:
                r.arrival = 0.0
            self.submit(r)
        done: list[Request] = []
        while self.scheduler.has_work:
            finished = self.step()
            done += finished
            if progress is not None and finished:
                progress(len(finished))
            if not self.scheduler.running and self.scheduler.waiting:
                wait = self.scheduler.next_arrival() - self.clock()
                if wait > 0:
                    time.sleep(wait)
        return done
