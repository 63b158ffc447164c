"""Speculative decoding: a drafter proposes k tokens, the target checks all of them in ONE forward pass.

PAPERS
- Leviathan, Kalman, Matias 2023, "Fast Inference from Transformers via Speculative Decoding".
- Chen, Borgeaud, Irving, Lespiau, Sifre, Jumper 2023, "Accelerating Large Language Model Decoding with
  Speculative Sampling".
- Saxena 2023, "Prompt Lookup Decoding"; Zhang et al. 2023, "Draft & Verify"; Elhoushi et al. 2024, "LayerSkip"
  (the drafters, drafters.py). Further reading: Cai et al. 2024, "Medusa" (extra heads draft a tree of tokens).

INTUITION
A batch-1 decode step is memory-bound (project 8): it reads every weight to produce one token, and the arithmetic
units mostly wait. A forward over k + 1 tokens reads the same weights once, so it costs little more than one step,
and it yields the target's distribution at k + 1 positions. If a cheap drafter guesses the next k tokens, one
such forward checks the guesses: the accepted ones plus one token from the target come out of a single pass. The
acceptance rule (acceptance.py) makes the output exactly what the target alone would produce: token for token
for greedy, in distribution for sampling. A bad drafter costs speed, never quality.

IMPLEMENTATION (batch 1, project 8's Engine with its decode loop replaced)
- The invariant: `self.context` is the whole sequence (prompt + new tokens), and the target's KV cache holds the
  K/V of all of it but the last token (`self.tokens == context[:-1]`). The prompt is prefilled as in project 8;
  its logits give the first new token.
- An iteration: draft d_1..d_k from the context; one target forward over [context[-1], d_1, ..., d_k] (k + 1
  tokens, logits of all of them; the cache writes their K/V after the cached ones); the rule keeps n of the k and
  draws one more token t; the cache is cropped to the context + d_1..d_n (project 8's `KVCache.crop`: rewinding is
  moving a length back, the next forward overwrites the rejected slots); the context grows by d_1..d_n, t.
- The sampling pipeline (project 8's `process_logits`: repetition penalty, temperature, top-k, top-p, min-p) is
  applied to the target's row i and to the draft's row i with the SAME history (the context + d_1..d_{i-1}), so
  p and q are the distributions the target and the draft would sample from at that position; the rule is exact
  for the filtered target distribution, which is what plain sampling draws from.
- k is clipped so the context never outgrows the window and no more than max_new_tokens come out; with
  `adaptive`, k grows by one after a fully accepted draft and shrinks by one after a rejection (1 .. k_max).
WHY crop and not copy: a rejected draft's K/V sit past the accepted length; nothing reads past a row's length, and
the next forward writes over them. Rollback costs nothing.
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from dataclasses import dataclass

import torch

from course.errors import CourseError
from phase3_core_inference.project8_kv_cache.engine import GREEDY, Engine, GenStats
from phase3_core_inference.project8_kv_cache.sampling import SamplingParams, process_logits
from phase4_advanced_inference.project11_speculative.acceptance import one_hot_q, verify_greedy, verify_sampled
from phase4_advanced_inference.project11_speculative.drafters import Drafter

__all__ = ["SpecStats", "SpeculativeEngine", "pipeline_rows"]


@dataclass
class SpecStats(GenStats):
    target_forwards: int = 0  # verification forwards (the prefill not counted)
    drafted: int = 0          # tokens proposed
    accepted: int = 0         # of them, kept
    draft_s: float = 0.0      # time spent in the drafter (inside decode_s)

    @property
    def acceptance_rate(self) -> float:
        return self.accepted / self.drafted if self.drafted else 0.0

    @property
    def mean_accepted(self) -> float:
        """Drafted tokens kept per verification (Leviathan et al.'s expected accepted length, minus the bonus)."""
        return self.accepted / self.target_forwards if self.target_forwards else 0.0

    @property
    def tokens_per_forward(self) -> float:
        """New tokens after the first (which comes from the prefill) per target forward: 1.0 for plain decoding."""
        return (self.new_tokens - 1) / self.target_forwards if self.target_forwards else 0.0


def pipeline_rows(logits: torch.Tensor, params: SamplingParams, context: list[int], draft: list[int]) -> torch.Tensor:
    """logits (n, V) of the positions after context + draft[:i], i = 0..n-1, through the sampling pipeline, each
    row with its own history (the repetition penalty looks at the tokens before its position)."""
    if params.repetition_penalty == 1.0:
        return process_logits(logits, params)
    hist = context + draft
    return torch.cat([process_logits(logits[i:i + 1], params,
                                     torch.tensor([hist[:len(context) + i]], device=logits.device))
                      for i in range(logits.size(0))])


class SpeculativeEngine(Engine):
    """Project 8's Engine (its cache, prefill and reuse hook) decoding by draft-and-verify."""

    def __init__(self, model: torch.nn.Module, drafter: Drafter, k: int = 4, max_len: int | None = None,
                 adaptive: bool = False, k_max: int | None = None):
        if not isinstance(k, int) or isinstance(k, bool) or k <= 0:
            raise CourseError(f"k ({k!r}) must be an integer >= 1 (tokens drafted per target forward)")
        if k_max is not None and k_max < k:
            raise CourseError(f"k_max ({k_max}) must be >= k ({k})")
        super().__init__(model, max_len=max_len)
        self.drafter, self.k, self.adaptive = drafter, k, adaptive
        self.k_max = k_max or (2 * k if adaptive else k)
        self.context: list[int] = []
        self.stats = SpecStats()
        self.k_trace: list[int] = []  # the k of every verification of the last request (adaptive k moves it)

    def reset(self) -> None:
        super().reset()
        self.drafter.reset()
        self.context = []

    def verify(self, draft: list[int], q: torch.Tensor | None, params: SamplingParams,
               generator: torch.Generator | None) -> tuple[int, int]:
        """One target forward over [context[-1]] + draft; the rule; the cache cropped. Returns (kept, next)."""
        ctx = self.context
        x = torch.tensor([ctx[-1:] + draft], dtype=torch.long, device=self.device)
        logits = self.model(x, kv_cache=self.cache, logits_to_keep=len(draft) + 1)[0][0]  # (k + 1, V)
        scores = pipeline_rows(logits, params, ctx, draft)
        d = torch.tensor([draft], dtype=torch.long, device=self.device)
        if params.greedy:
            n, nxt = verify_greedy(d, scores[None])
        else:
            p = torch.softmax(scores.float(), dim=-1)[None]
            q = one_hot_q(d, p.size(-1)) if q is None else q.float()[None].to(p.device)  # (1, k, V)
            n, nxt = verify_sampled(d, q, p, generator)
        n, nxt = int(n), int(nxt)
        self.cache.crop(len(ctx) + n)  # K/V of context + the kept draft; the rejected slots are overwritten later
        return n, nxt

    @torch.inference_mode()
    def generate(self, prompt: list[int], max_new_tokens: int, params: SamplingParams | None = None,
                 generator: torch.Generator | None = None, stop_ids: set[int] | frozenset = frozenset(),
                 reuse_cache: bool = False) -> Iterator[int]:
        """Yield new token ids one by one, like Engine.generate (same checks, same first token, same stops)."""
        params = (params or GREEDY).check()
        self.check_request(prompt, max_new_tokens)
        t0 = time.perf_counter()
        keep = self.reuse(prompt) if reuse_cache else 0
        self.cache.crop(keep)
        self.tokens = self.tokens[:keep]
        if not reuse_cache:
            self.drafter.reset()
        stats = self.stats = SpecStats(prompt_tokens=len(prompt), reused_tokens=keep)
        logits = self.prefill(prompt[keep:])
        self.tokens = list(prompt)
        stats.prefill_s = time.perf_counter() - t0
        first = process_logits(logits, params, torch.tensor([prompt], device=self.device)
                               if params.repetition_penalty != 1.0 else None)
        if params.greedy:
            tok = int(first.argmax(-1))
        else:
            tok = int(torch.multinomial(torch.softmax(first.float(), -1), 1, generator=generator))
        self.context = list(prompt) + [tok]
        stats.new_tokens = 1
        self.k_trace = []
        yield tok
        if tok in stop_ids:
            return
        k = self.k
        t0 = time.perf_counter()
        while stats.new_tokens < max_new_tokens:
            # clipped: at most max_new_tokens in all (an iteration adds kept + 1) and never past the window
            room = min(max_new_tokens - stats.new_tokens - 1, self.max_len - len(self.context))
            td = time.perf_counter()
            draft = self.drafter.propose(self.context, min(k, room), params, generator) if room > 0 else None
            tokens = draft.tokens[:max(room, 0)] if draft is not None else []
            q = draft.q[:len(tokens)] if draft is not None and draft.q is not None and tokens else None
            stats.draft_s += time.perf_counter() - td
            n, nxt = self.verify(tokens, q, params, generator)
            stats.target_forwards += 1
            stats.drafted += len(tokens)
            stats.accepted += n
            self.k_trace.append(len(tokens))
            new = tokens[:n] + [nxt]
            self.context += new
            self.tokens = self.context[:-1]
            if self.adaptive and tokens:
                k = min(k + 1, self.k_max) if n == len(tokens) else max(1, k - 1)
            for t in new:
                stats.new_tokens += 1
                stats.decode_s = time.perf_counter() - t0
                yield t
                if t in stop_ids:
                    return
