"""Project 8's engine with a prefix cache shared by every request: prefill only what nobody computed before.

PAPERS
- Zheng et al. 2024 (SGLang, RadixAttention): a request looks up its longest cached prefix, locks it while it
  runs, and when it finishes its tokens (prompt and reply) go into the tree for the next request.
- vLLM, "Automatic Prefix Caching": the same through hashed blocks (block_hash.py); the last prompt token is
  always computed again, because its logits (which the cache does not hold) give the first new token.

INTUITION
Project 8's `Engine` already keeps the K/V of the conversation it last served (`self.tokens`): a chat's next turn
prefills only its new tokens. A prefix cache generalises that from "the last sequence" to "every sequence any
request left behind, under a memory budget": another user's identical system prompt, a conversation resumed
after another one ran in between, the same few-shot block in front of every question of a benchmark.

IMPLEMENTATION
- `reuse(prompt)` (the one hook of project 8's `Engine.generate`): of the engine's own cached tokens and the
  store's longest match, take the longer. If the store's is longer, the cache is cut to the tokens it shares
  with the prompt and the store's K/V for the positions after them are copied in (`PrefixStore.load`, through
  the cache protocol's begin/update, so the cache holds them as if the model had just computed them). The match
  stays locked while the request runs.
- When the request ends (all tokens decoded, a stop token, or the consumer stops early), the tokens whose K/V
  are in the cache go into the store, which copies only what it lacks, then evicts down to its budget; the lock
  is released.
- `forward(ids, logits_to_keep)`: the same for scoring (project 4's few-shot evaluation): the logits of the
  last positions of `ids`, everything before them that the store has taken from it.
WHY copy instead of share: project 8's cache is one contiguous buffer per request, so shared K/V have to be
copied in (45 KiB per token for SmolLM2-135M, memory speed: ~100x cheaper than computing them); project 13's
paged cache makes the sharing zero-copy (a request's block table points at the store's blocks).
"""

from __future__ import annotations

from collections.abc import Iterator

import torch

from course.errors import CourseError
from phase3_core_inference.project8_kv_cache.engine import Engine, Step
from phase4_advanced_inference.project10_prefix_caching.kv_store import Match, PrefixStore


class PrefixCachingEngine(Engine):
    """`Engine` (batch 1) whose requests start from the longest prefix any earlier request left in `store`."""

    def __init__(self, model: torch.nn.Module, store: PrefixStore, max_len: int | None = None,
                 step: Step | None = None):
        super().__init__(model, max_len=max_len, step=step)
        store.check_model(model)      # another model's K/V: refused in one line, never reused
        store.check_cache(self.cache)
        self.store = store
        self.from_store = 0           # tokens of the last request copied in from the store
        self._match: Match | None = None  # the locked match of the running request

    # ---- the hook project 8's Engine.generate calls -------------------------------------------------------
    def reuse(self, prompt: list[int]) -> int:
        return self.restore(prompt, len(prompt) - 1)

    def restore(self, ids: list[int], limit: int) -> int:
        """Make the cache hold the longest known prefix of ids[:limit]; return its length."""
        own = super().reuse(ids[:limit + 1]) if limit >= 0 else 0  # what this engine's cache shares with ids
        self._release()
        match = self._match = self.store.match(ids, limit)
        self.store.lock(match)
        self.from_store = max(0, match.length - own)
        if match.length <= own:
            return own
        self.cache.crop(own)
        self.tokens = self.tokens[:own]
        self.store.load(match, self.cache, start=own)  # positions own .. length - 1, from the store
        self.tokens = list(ids[:match.length])
        return match.length

    @torch.inference_mode()
    def remember(self) -> None:
        """The tokens whose K/V are in the cache go into the store (it copies what it lacks); unlock the match."""
        n = self.cache.lengths[0]
        if n != len(self.tokens):
            raise CourseError(f"the engine's cache holds {n} positions for {len(self.tokens)} tokens; "
                              "nothing was inserted")
        if n:
            self.store.insert(self.tokens, [k[0] for k in self.cache.k], [v[0] for v in self.cache.v])
        self._release()

    def _release(self) -> None:
        if self._match is not None:
            self.store.unlock(self._match)
            self._match = None

    # ---- requests --------------------------------------------------------------------------------------
    def generate(self, prompt: list[int], max_new_tokens: int, params=None, generator: torch.Generator | None = None,
                 stop_ids: set[int] | frozenset = frozenset(), reuse_cache: bool = True) -> Iterator[int]:
        """Project 8's generate, starting from the prefix cache; the request's tokens go into it when it ends."""
        try:
            yield from super().generate(prompt, max_new_tokens, params, generator, stop_ids, reuse_cache)
        finally:  # also when the consumer stops early (Ctrl-C, a break): what was computed is kept
            if self.cache.lengths[0] == len(self.tokens):
                self.remember()
            else:  # the request failed mid-forward: the cache no longer matches self.tokens, keep nothing
                self.reset()
                self._release()

    @torch.inference_mode()
    def forward(self, ids: list[int], logits_to_keep: int = 1) -> torch.Tensor:
        """Logits (logits_to_keep, vocab) of the last positions of `ids`, prefilling only what neither this
        engine's cache nor the store holds; the ids then go into the store."""
        if not 1 <= logits_to_keep <= len(ids):
            raise CourseError(f"logits_to_keep ({logits_to_keep}) must be 1 .. {len(ids)} (the ids' length)")
        if len(ids) > self.max_len:
            raise CourseError(f"{len(ids)} tokens do not fit the engine's cache of {self.max_len}; make the engine "
                              "with a larger max_len")
        keep = self.restore(ids, len(ids) - logits_to_keep)  # the positions read must be computed here
        self.cache.crop(keep)
        self.tokens = self.tokens[:keep]
        x = torch.tensor([ids[keep:]], dtype=torch.long, device=self.device)
        logits, _ = self.model(x, kv_cache=self.cache, logits_to_keep=logits_to_keep)
        self.tokens = list(ids)
        self.remember()
        return logits[0]
