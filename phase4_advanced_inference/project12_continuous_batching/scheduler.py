"""The iteration-level scheduler: which tokens of which requests go into the next forward.

PAPERS
- Yu et al. 2022, "Orca" (OSDI): schedule per *iteration* (one forward), not per request: a finished request
  leaves the batch at once and a waiting one takes its place at the next step, instead of the whole batch
  waiting for its longest member (static batching).
- Agrawal et al. 2023, "SARATHI: Efficient LLM Inference by Piggybacking Decodes with Chunked Prefills", and
  2024, "Taming Throughput-Latency Tradeoff in LLM Inference with Sarathi-Serve" (OSDI): a token budget per
  iteration; the decode tokens of the running requests come first, and a long prompt is cut into chunks that
  fill what is left, so it never stalls everyone's decoding for a whole long prefill.
- Kwon et al. 2023, "Efficient Memory Management for Large Language Model Serving with PagedAttention" (vLLM):
  the same knobs under other names: max_num_seqs (our max_rows), max_num_batched_tokens (max_batch_tokens),
  enable_chunked_prefill (chunked_prefill).

INTUITION
Each iteration is one forward of the model. Every running request that is decoding contributes one token;
requests still reading their prompt contribute a chunk of it; the sum must stay within the budget, so each
iteration costs about the same and a decoding request gets a token at a steady pace (its TPOT). New requests
are admitted whenever a cache row and budget are free: the machine never idles while work is waiting.

IMPLEMENTATION
- `waiting`: requests in arrival order; a request becomes eligible once the clock passes its arrival time.
- `running`: row -> `Running` (the request, its cache row, how much of its prompt is prefilled, the token to feed
  next). `schedule(now)` returns the `Work` of one iteration: (running, tokens, samples) per row, where
  `samples` says that the forward's last logits of that row give its next token (a decode, or the last chunk of a
  prompt). Prefill progress is committed when scheduled (the engine always runs what was scheduled).
- policy "continuous": admit at every iteration. "static": admit only when no request is running, up to
  max_rows at once; the group runs until its longest request finishes (rows that finish early stay idle).
  "sequential" is static with max_rows = 1. The baselines are the same code with one rule changed.
- chunked_prefill off: a prompt is prefilled whole in one iteration (if it does not fit the budget left, it
  waits for the next iteration, unless it is alone: a long prompt is never starved).
- Cancellation: a cancelled request leaves at the next `schedule`, waiting or running; its row is freed.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Callable
from dataclasses import dataclass

from course.errors import CourseError
from phase4_advanced_inference.project12_continuous_batching.request import Request

POLICIES = ("continuous", "static")


@dataclass(eq=False)
class Running:
    request: Request
    row: int
    prefilled: int = 0            # prompt tokens whose K/V are in the cache
    next_token: int | None = None  # decoding: the last sampled token, the next forward's input for this row

    @property
    def prefilling(self) -> bool:
        return self.prefilled < len(self.request.prompt)


@dataclass(eq=False)
class Work:
    running: Running
    tokens: list[int]
    samples: bool          # this row's last logits give the request's next token
    decode: bool = False   # one generated token (not a piece of the prompt)


class Scheduler:
    def __init__(self, max_rows: int, max_batch_tokens: int | None = None, chunked_prefill: bool = True,
                 policy: str = "continuous", admits: Callable[[Running], bool] | None = None,
                 release: Callable[[int], None] | None = None):
        """admits(running) -> bool: may this request take its row now? (project 13's paged cache: are there blocks
        for its prompt and max_new_tokens?) None: a free row is enough. release(row): called when a request
        leaves its row (the engine frees the row's cache there)."""
        if not isinstance(max_rows, int) or max_rows <= 0:
            raise CourseError(f"max_rows ({max_rows!r}) must be a positive int")
        if max_batch_tokens is not None and (not isinstance(max_batch_tokens, int) or max_batch_tokens < max_rows):
            raise CourseError(f"max_batch_tokens ({max_batch_tokens!r}) must be >= max_rows ({max_rows}): every "
                              "decoding row needs one token per iteration (None = no budget)")
        if policy not in POLICIES:
            raise CourseError(f"policy {policy!r} is not one of {', '.join(POLICIES)}")
        if max_batch_tokens is None and chunked_prefill:
            chunked_prefill = False  # no budget, nothing to cut prompts against
        self.max_rows, self.budget, self.chunked, self.policy = max_rows, max_batch_tokens, chunked_prefill, policy
        self.waiting: deque[Request] = deque()
        self.running: dict[int, Running] = {}
        self.free_rows = list(range(max_rows))
        self.finished: list[Request] = []
        self.admits, self.release = admits, release

    # ---- the queue ------------------------------------------------------------------------------
    def add(self, request: Request) -> None:
        """Queue a request (in arrival order: a later-arriving one never overtakes an earlier one)."""
        if self.waiting and request.arrival < self.waiting[-1].arrival:
            i = next(i for i, r in enumerate(self.waiting) if r.arrival > request.arrival)
            self.waiting.insert(i, request)
        else:
            self.waiting.append(request)

    @property
    def has_work(self) -> bool:
        return bool(self.waiting or self.running)

    def next_arrival(self) -> float | None:
        return self.waiting[0].arrival if self.waiting else None

    def finish(self, running: Running) -> None:
        """The request is done: its row is free for the next admission (its K/V are overwritten there)."""
        del self.running[running.row]
        if self.release is not None:
            self.release(running.row)
        self.free_rows.append(running.row)
        self.free_rows.sort()
        self.finished.append(running.request)

    def _drop_cancelled(self, now: float) -> None:
        for run in [r for r in self.running.values() if r.request.cancelled and not r.request.done]:
            run.request.cancel(now)
        for run in [r for r in self.running.values() if r.request.done]:
            self.finish(run)
        for req in [r for r in self.waiting if r.cancelled]:
            self.waiting.remove(req)
            if not req.done:
                req.cancel(now)
            self.finished.append(req)

    # ---- one iteration ----------------------------------------------------------------------------
    def schedule(self, now: float) -> list[Work]:
        """The work of the next forward (empty: nothing running and nothing has arrived yet)."""
        self._drop_cancelled(now)
        left = self.budget if self.budget is not None else float("inf")
        work: list[Work] = []
        # decodes first, one token each (Sarathi-Serve's stall-free order), in row order: when every row decodes,
        # the forward sees the cache's buffers as they are (project 8's KVCache: views, no gather)
        for _, run in sorted(self.running.items()):
            if not run.prefilling:
                work.append(Work(run, [run.next_token], True, decode=True))
                left -= 1
        for run in self.running.values():  # then the prompts already being read, oldest first
            if run.prefilling and left > 0:
                piece = self._piece(run, left, alone=not work)
                if piece:
                    work.append(piece)
                    left -= len(piece.tokens)
        may_admit = self.policy == "continuous" or not self.running
        while may_admit and self.free_rows and self.waiting and self.waiting[0].arrival <= now and left > 0:
            req = self.waiting[0]
            run = Running(req, self.free_rows[0])
            piece = self._piece(run, left, alone=not work)
            if piece is None or (self.admits is not None and not self.admits(run)):
                break  # the prompt does not fit the budget left (or the cache): next iteration, in arrival order
            self.waiting.popleft()
            self.free_rows.pop(0)
            self.running[run.row] = run
            work.append(piece)
            left -= len(piece.tokens)
        for w in work:  # commit the prefill progress
            if w.running.prefilling:
                w.running.prefilled += len(w.tokens)
        return work

    def _piece(self, run: Running, left: float, alone: bool) -> Work | None:
        prompt, start = run.request.prompt, run.prefilled
        rest = len(prompt) - start
        if self.chunked:
            n = int(min(rest, left))
        elif rest <= left or alone:
            n = rest
        else:
            return None
        return Work(run, prompt[start:start + n], start + n == len(prompt))
