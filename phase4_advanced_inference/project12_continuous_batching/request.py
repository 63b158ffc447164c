"""A request's life in a serving engine: what it asks for, what it has received so far, and when.

PAPERS
- Zhong et al. 2024, "DistServe: Disaggregating Prefill and Decoding for Goodput-optimized Large Language Model
  Serving": the two latencies a user feels, time to first token (TTFT: queueing + prefill) and time per output
  token (TPOT: the gaps between the later tokens, set by the decode steps the request shares with others).

INTUITION
A server cannot hand out a token's text the moment it is sampled: a stop string ("\\nUser:") may be spelled over
several tokens, and text already streamed cannot be taken back. So a request keeps back any tail of its text that
could still grow into a stop string, and streams only what can no longer change; when a stop string appears, the
text ends just before it. What the callback received, joined, is exactly the final text.

IMPLEMENTATION
- `Request`: prompt ids, max_new_tokens, sampling parameters, its own seed (its sampled tokens do not depend on
  what else is in the batch), stop ids and stop strings, arrival time, an `on_text(request, piece)` callback.
- `Request.push(token)`: called by the engine for every sampled token; decodes it incrementally (project 8's
  TextStream, never splitting a UTF-8 character), checks stop ids, stop strings and the length, streams the safe
  text, and returns True when the request is finished (`finish_reason`: "stop", "length" or "cancelled").
- Times (the engine's clock): arrival, first token, finish, and every token's time, for TTFT and TPOT.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

import torch

from course.errors import CourseError
from phase3_core_inference.project8_kv_cache.engine import TextStream
from phase3_core_inference.project8_kv_cache.sampling import SamplingParams


@dataclass(eq=False)
class Request:
    prompt: list[int]
    max_new_tokens: int
    params: SamplingParams = field(default_factory=lambda: SamplingParams(temperature=0.0))
    seed: int = 0
    stop_ids: frozenset[int] = frozenset()
    stop: tuple[str, ...] = ()  # stop strings: the text ends just before the first one that appears
    arrival: float = 0.0        # seconds on the engine's clock (workload.py: Poisson arrivals)
    id: str = ""
    on_text: Callable[["Request", str], None] | None = None  # streamed text, piece by piece
    # ---- filled in by the engine ----
    tokens: list[int] = field(default_factory=list)  # the new tokens (a stop id included, as project 8's engine)
    text: str = ""               # the final text (stop string excluded) once finished; the text so far before
    finish_reason: str | None = None  # "stop" | "length" | "cancelled"
    cancelled: bool = False
    first_token_time: float | None = None
    finish_time: float | None = None
    token_times: list[float] = field(default_factory=list)

    def __post_init__(self):
        self.stop = tuple(self.stop)
        self.stop_ids = frozenset(self.stop_ids)
        self._streamed = 0  # characters of self.text handed to on_text
        self._stream: TextStream | None = None
        self._generator: torch.Generator | None = None

    # ---- checks (the engine calls them at submit: one clear line for this request only) ----------
    def problems(self, max_len: int) -> list[str]:
        errors = []
        if not self.prompt:
            errors.append("the prompt is empty: give at least one token (e.g. BOS)")
        if not isinstance(self.max_new_tokens, int) or self.max_new_tokens <= 0:
            errors.append(f"max_new_tokens ({self.max_new_tokens!r}) must be a positive int")
        elif self.prompt and len(self.prompt) + self.max_new_tokens > max_len:
            if len(self.prompt) >= max_len:
                errors.append(f"the prompt has {len(self.prompt)} tokens; the context window is {max_len}")
            else:
                errors.append(f"prompt ({len(self.prompt)} tokens) + max_new_tokens ({self.max_new_tokens}) "
                              f"exceeds the context window ({max_len}); ask for at most "
                              f"{max_len - len(self.prompt)} new tokens")
        if not isinstance(self.params, SamplingParams):
            errors.append(f"params must be SamplingParams, got {type(self.params).__name__}")
        else:
            errors += self.params.problems()
        if any(not isinstance(s, str) or not s for s in self.stop):
            errors.append("every stop string must be non-empty text")
        return errors

    def check(self, max_len: int) -> "Request":
        errors = self.problems(max_len)
        if errors:
            raise CourseError(f"request {self.id or '?'} rejected: " + "; ".join(errors))
        return self

    # ---- what the engine calls ----------------------------------------------------------------
    def start(self, tokenizer=None) -> None:
        """Joining the batch: a fresh text decoder and this request's own random stream."""
        self._stream = TextStream(tokenizer, self.prompt[-1]) if tokenizer is not None else None
        self._generator = torch.Generator().manual_seed(self.seed)
        if self.stop and tokenizer is None:
            raise CourseError(f"request {self.id}: stop strings need a tokenizer to read the text")

    @property
    def generator(self) -> torch.Generator:
        return self._generator

    def push(self, token: int, now: float) -> bool:
        """One sampled token. Returns True when the request is finished (its reason is set)."""
        if self.first_token_time is None:
            self.first_token_time = now
        self.tokens.append(token)
        self.token_times.append(now)
        if self._stream is not None and token not in self.stop_ids:
            self.text += self._stream.push(token)
        cut = self._stop_at()
        if cut is not None:
            self.text = self.text[:cut]
            return self._finish("stop", now, flush=False)
        if token in self.stop_ids:
            return self._finish("stop", now)
        if len(self.tokens) >= self.max_new_tokens:
            return self._finish("length", now)
        self._emit(len(self.text) - self._held_back())
        return False

    def cancel(self, now: float) -> None:
        self.cancelled = True
        self._finish("cancelled", now)

    @property
    def done(self) -> bool:
        return self.finish_reason is not None

    # ---- stop strings and streaming -------------------------------------------------------------
    def _stop_at(self) -> int | None:
        """Where the text must end: the start of the first stop string in it (None if there is none yet)."""
        hits = [i for i in (self.text.find(s, max(0, self._streamed - len(s))) for s in self.stop) if i >= 0]
        return min(hits) if hits else None

    def _held_back(self) -> int:
        """Characters at the end of the text that could be the start of a stop string: not streamed yet."""
        longest = 0
        for s in self.stop:
            for n in range(min(len(s) - 1, len(self.text)), longest, -1):
                if self.text.endswith(s[:n]):
                    longest = n
                    break
        return longest

    def _emit(self, upto: int) -> None:
        if upto > self._streamed:
            piece, self._streamed = self.text[self._streamed:upto], upto
            if self.on_text is not None:
                self.on_text(self, piece)

    def _finish(self, reason: str, now: float, flush: bool = True) -> bool:
        if self._stream is not None and flush:
            self.text += self._stream.flush()
        self.finish_reason, self.finish_time = reason, now
        if reason != "cancelled":
            self._emit(len(self.text))
        return True

    # ---- latencies ------------------------------------------------------------------------------
    @property
    def ttft(self) -> float | None:
        return None if self.first_token_time is None else self.first_token_time - self.arrival

    @property
    def tpot(self) -> float | None:
        """Mean seconds between this request's output tokens after the first (None with fewer than two)."""
        if len(self.token_times) < 2:
            return None
        return (self.token_times[-1] - self.token_times[0]) / (len(self.token_times) - 1)
