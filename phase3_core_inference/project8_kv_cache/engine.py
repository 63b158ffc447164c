"""The inference engine: prefill the prompt once, then decode one token at a time from the KV cache.

PAPERS
- Pope et al. 2022, "Efficiently Scaling Transformer Inference": the two phases. Prefill processes the
  whole prompt in parallel (compute-bound, like training's forward pass); decode produces one token per
  step and must read every weight and the whole KV cache for it (memory-bound). Hence the floor:
  tokens/s <= memory bandwidth / bytes read per token.
- Kwon et al. 2023, "Efficient Memory Management for Large Language Model Serving with PagedAttention"
  (vLLM), for what comes after a single preallocated cache (paged blocks, sharing prefixes between requests).

INTUITION
Without a cache, token n costs a forward pass over all n tokens: generating N tokens is O(N^2) token-passes.
With the cache, each step runs the model on ONE token, reads the stored keys/values of the others, and
writes its own: O(N) token-passes in total.

IMPLEMENTATION
- One KVCache preallocated for the whole context (no growing, no reallocation per token).
- `self.tokens` records exactly which tokens have their keys/values in the cache, so a chat turn only
  prefills what is new: the longest common prefix with the new prompt is kept (`crop`), the rest prefilled.
- A decode step is `step(token (1, 1), cache) -> logits (1, vocab)`: by default `decode_step`, the model's own
  forward. A script may hand the engine another one with the same results (fast_decode.FastDecoder: the step
  compiled whole); the engine knows nothing about kernels.
- Decode runs under torch.inference_mode(), greedy is a plain argmax, and the history needed by the
  repetition penalty is a preallocated id buffer, so a decode step allocates only activations.

Batches (`generate_cached`): prompts of one length are prefilled together; prompts of different lengths join
the batch one by one (each prefilled into its own row of the cache, `cache.rows([b])`), then every step decodes
all rows at once, each at its own position (the cache gives the model per-row positions and a mask).
"""

from __future__ import annotations

import codecs
import functools
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass

import torch

from course.errors import CourseError
from phase3_core_inference.project8_kv_cache.kv_cache import KVCache
from phase3_core_inference.project8_kv_cache.sampling import SamplingParams, sample_token


GREEDY = SamplingParams(temperature=0.0)  # what every generate function does when given no params


@dataclass
class GenStats:
    prompt_tokens: int = 0
    reused_tokens: int = 0  # prompt tokens whose K/V were already in the cache (not prefilled again)
    new_tokens: int = 0
    prefill_s: float = 0.0
    decode_s: float = 0.0

    @property
    def decode_tok_s(self) -> float:
        # the first new token comes from the prefill's logits; the others each cost one decode step
        return (self.new_tokens - 1) / self.decode_s if self.new_tokens > 1 and self.decode_s > 0 else 0.0

    @property
    def total_tok_s(self) -> float:
        t = self.prefill_s + self.decode_s
        return self.new_tokens / t if t > 0 else 0.0


def decode_step(model: torch.nn.Module, token: torch.Tensor, cache) -> torch.Tensor:
    """One decode step, the plain way: the model's forward on the new token(s) (B, 1) -> logits (B, vocab)."""
    return model(token, kv_cache=cache, logits_to_keep=1)[0][:, -1]


Step = Callable[[torch.Tensor, KVCache], torch.Tensor]


class Engine:
    """Single-sequence (batch 1) generation with a persistent KV cache, for the CLI and chat."""

    def __init__(self, model: torch.nn.Module, max_len: int | None = None, step: Step | None = None):
        """step(token (1, 1), cache) -> logits (1, vocab) runs each decode step; None = the model's forward."""
        self.model = model.eval()
        p = next(model.parameters())
        self.device, self.dtype = p.device, p.dtype
        self.step = step or functools.partial(decode_step, model)
        self.max_len = max_len or model.config.block_size
        self.cache = KVCache.for_model(model.config, batch=1, max_len=self.max_len, dtype=self.dtype,
                                       device=self.device)
        self.tokens: list[int] = []  # tokens whose K/V are in the cache, in order
        self.history = torch.zeros(1, self.max_len, dtype=torch.long, device=self.device)
        self.stats = GenStats()

    def reset(self) -> None:
        """A new conversation: forget the cache."""
        self.cache.reset()
        self.tokens = []

    def prefill(self, ids: list[int]) -> torch.Tensor:
        """The prompt's new tokens in one forward (their K/V go to the cache); the last position's logits."""
        x = torch.tensor([ids], dtype=torch.long, device=self.device)
        logits, _ = self.model(x, kv_cache=self.cache, logits_to_keep=1)
        return logits[:, -1]

    def reuse(self, prompt: list[int]) -> int:
        """How many of the prompt's first tokens already have their K/V in the cache: its longest common prefix
        with `self.tokens`, at most len(prompt) - 1 (the last token is always recomputed, for fresh logits).

        The one hook for what a request starts from: a subclass may first place more of the prompt's K/V in the
        cache and return that length (project 10 copies them from a prefix cache shared by every request)."""
        keep, n = 0, min(len(prompt) - 1, len(self.tokens))
        while keep < n and self.tokens[keep] == prompt[keep]:
            keep += 1
        return keep

    def check_request(self, prompt: list[int], max_new_tokens: int) -> None:
        """One line for a request that cannot run: an empty prompt, or one that with its new tokens outgrows the
        context window (also what project 11's speculative engine checks before its own loop)."""
        if not prompt:
            raise CourseError("the prompt is empty: give at least one token (e.g. BOS)")
        if len(prompt) > self.max_len:
            raise CourseError(f"the prompt has {len(prompt)} tokens but the context window is {self.max_len}; "
                              "shorten it")
        if len(prompt) + max_new_tokens > self.max_len:
            raise CourseError(f"prompt ({len(prompt)} tokens) + max_new_tokens ({max_new_tokens}) exceeds the "
                              f"context window ({self.max_len}); lower --max_new_tokens to at most "
                              f"{self.max_len - len(prompt)}")

    @torch.inference_mode()
    def generate(self, prompt: list[int], max_new_tokens: int, params: SamplingParams | None = None,
                 generator: torch.Generator | None = None, stop_ids: set[int] | frozenset = frozenset(),
                 reuse_cache: bool = False) -> Iterator[int]:
        """Yield new token ids one by one. Stops after max_new_tokens or after yielding a stop id.

        With reuse_cache, the cached tokens shared with `prompt` (`reuse`: its longest common prefix with
        `self.tokens`) are not recomputed: only the rest of the prompt is prefilled.
        """
        params = (params or GREEDY).check()
        self.check_request(prompt, max_new_tokens)
        t0 = time.perf_counter()  # the prefill's time includes placing the reused K/V (a copy, in a subclass)
        keep = self.reuse(prompt) if reuse_cache else 0
        self.cache.crop(keep)
        self.tokens = self.tokens[:keep]
        self.history[0, :len(prompt)] = torch.tensor(prompt, device=self.device)
        stats = self.stats = GenStats(prompt_tokens=len(prompt), reused_tokens=keep)
        logits = self.prefill(prompt[keep:])
        self.tokens = list(prompt)
        pos = len(prompt)
        stats.prefill_s = time.perf_counter() - t0
        t0 = time.perf_counter()
        penalty = params.repetition_penalty != 1.0
        for i in range(max_new_tokens):
            prev = self.history[:, :pos] if penalty else None
            nxt = sample_token(logits, params, prev, generator)
            tok = int(nxt)
            stats.new_tokens += 1
            if i == 0:
                stats.decode_s = 0.0
                t0 = time.perf_counter()  # decode speed is measured over the steps after the first token
            yield tok
            if tok in stop_ids or i == max_new_tokens - 1:
                break
            if penalty:
                self.history[0, pos] = tok
            logits = self.step(nxt.view(1, 1), self.cache)  # its K/V go to the cache at `pos`
            self.tokens.append(tok)
            pos += 1
            stats.decode_s = time.perf_counter() - t0


class TextStream:
    """Turn token ids into text as they arrive, never splitting a UTF-8 character."""

    def __init__(self, tokenizer, prev_id: int | None = None):
        self.tok, self.prev = tokenizer, prev_id
        self.decoder = codecs.getincrementaldecoder("utf-8")(errors="replace")

    def push(self, token_id: int) -> str:
        piece = self.tok.piece_bytes(self.prev, token_id)
        self.prev = token_id
        return self.decoder.decode(piece)

    def flush(self) -> str:
        return self.decoder.decode(b"", final=True)


@torch.inference_mode()
def generate_cached(model: torch.nn.Module, prompts: torch.Tensor | list[list[int]], max_new_tokens: int,
                    params: SamplingParams | None = None, generator: torch.Generator | None = None,
                    return_logits: bool = False, step: Step | None = None):
    """Batched generation with a KV cache.

    prompts: a (B, T) tensor (rows of one length, prefilled together) -> (B, T + max_new_tokens) tensor; or a
    list of prompts of any lengths -> a list of prompt + new tokens per row. Those join the batch one at a time,
    each prefilled alone into its own row (`cache.rows([b])`); every decode step then runs all rows together,
    each at its own position. With return_logits, also returns the (B, vocab) logits of every new token.
    """
    params = (params or GREEDY).check()
    step = step or functools.partial(decode_step, model)
    p = next(model.parameters())
    if isinstance(prompts, torch.Tensor):
        rows, device = prompts.tolist(), prompts.device
    else:
        rows, device = [list(r) for r in prompts], p.device
    if not rows or any(len(r) == 0 for r in rows):
        raise CourseError("every prompt needs at least one token")
    B, T = len(rows), max(len(r) for r in rows)
    cache = KVCache.for_model(model.config, batch=B, max_len=T + max_new_tokens, dtype=p.dtype, device=device)
    if isinstance(prompts, torch.Tensor):
        logits = model(prompts, kv_cache=cache, logits_to_keep=1)[0][:, -1]
    else:  # each row joins on its own: its prompt is prefilled into its row while the others keep theirs
        logits = torch.cat([model(torch.tensor([r], device=device), kv_cache=cache.rows([b]), logits_to_keep=1)[0][:, -1]
                            for b, r in enumerate(rows)])
    # the repetition penalty looks at the set of ids so far: a short row's history is padded with its first id
    history = torch.tensor([[r[0]] * (T - len(r)) + r for r in rows], device=device)
    penalty = params.repetition_penalty != 1.0
    seen, new = [], []
    for i in range(max_new_tokens):
        seen.append(logits.clone())
        nxt = sample_token(logits, params, history if penalty else None, generator)
        new.append(nxt[:, 0])
        if penalty:
            history = torch.cat([history, nxt], 1)
        if i + 1 < max_new_tokens:
            logits = step(nxt, cache)
    out = [r + [int(t[b]) for t in new] for b, r in enumerate(rows)]
    if isinstance(prompts, torch.Tensor):
        out = torch.tensor(out, dtype=torch.long, device=device)
    return (out, seen) if return_logits else out


@torch.inference_mode()
def generate_nocache(model: torch.nn.Module, idx: torch.Tensor, max_new_tokens: int,
                     params: SamplingParams | None = None, generator: torch.Generator | None = None):
    """The baseline: recompute the whole sequence for every new token (no cache).

    `model` is anything called like project 3's Llama: the model itself, or (benchmark.py) its compiled forward
    with the model bound as the first argument."""
    params = (params or GREEDY).check()
    out = idx
    for _ in range(max_new_tokens):
        logits = model(out, logits_to_keep=1)[0][:, -1]  # as any engine would: the last position's only
        nxt = sample_token(logits, params, out if params.repetition_penalty != 1.0 else None, generator)
        out = torch.cat([out, nxt], dim=1)
    return out
