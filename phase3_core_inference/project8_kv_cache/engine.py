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
- On CPU in fp32 the decode step runs compiled whole (cpu_kernels.py): one call per token, each
  matrix-vector product one streaming reduction over both cores; prefill uses oneDNN's matmul for the large
  matrices. The same weights, faster per token than PyTorch's default kernels (README).
- Decode runs under torch.inference_mode(), greedy is a plain argmax, and the history needed by the
  repetition penalty is a preallocated id buffer, so a decode step allocates only activations.

Ragged batches (prompts of different lengths in one batch) are left-padded (`left_pad_batch`): the model
gives each row its own RoPE positions and masks the padding slots (project 3's `Llama.ragged_rope_and_mask`).
"""

from __future__ import annotations

import codecs
import time
from collections.abc import Iterator
from dataclasses import dataclass

import torch

from course.errors import CourseError
from phase3_core_inference.project8_kv_cache.cpu_kernels import DecodeStep, prepare_for_decode, restore
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


class Engine:
    """Single-sequence (batch 1) generation with a persistent KV cache, for the CLI and chat."""

    def __init__(self, model: torch.nn.Module, max_len: int | None = None, fast_kernels: bool = True,
                 compile: bool | None = None):
        """fast_kernels: CPU fp32 decode kernels (cpu_kernels.py); compile: True / False / None = for models
        of >= 16 MiB of weights (compiling takes seconds at start-up)."""
        self.model = model.eval()
        p = next(model.parameters())
        self.device, self.dtype = p.device, p.dtype
        # CPU fp32: decode kernels, in place on the same weights (cpu_kernels.py); "default" = PyTorch's own
        self.kernels = "default"
        if fast_kernels and self.device.type == "cpu" and self.dtype == torch.float32:
            self.kernels = prepare_for_decode(model, compile=compile)
        else:
            restore(model)  # a model an earlier Engine prepared gets PyTorch's own kernels back
        self.max_len = max_len or model.config.block_size
        self.cache = KVCache.for_model(model.config, batch=1, max_len=self.max_len, dtype=self.dtype,
                                       device=self.device)
        self.tokens: list[int] = []  # tokens whose K/V are in the cache, in order
        self.history = torch.zeros(1, self.max_len, dtype=torch.long, device=self.device)
        self.stats = GenStats()
        first = DecodeStep.FIRST_POS
        if self.kernels == "compiled" and self.max_len > first:
            # compile the decode step now, not mid-generation (seconds, once per model shape and max_len), at the
            # first position it runs compiled
            with torch.inference_mode():
                self._forward([0] * first, 0)
                self._forward([0], first)
            self.cache.reset()

    def reset(self) -> None:
        """A new conversation: forget the cache."""
        self.cache.reset()
        self.tokens = []

    def _forward(self, ids: list[int], start_pos: int) -> torch.Tensor:
        x = torch.tensor([ids], dtype=torch.long, device=self.device)
        logits, _ = self.model(x, kv_cache=self.cache, start_pos=start_pos, logits_to_keep=1)
        return logits[:, -1]

    @torch.inference_mode()
    def generate(self, prompt: list[int], max_new_tokens: int, params: SamplingParams | None = None,
                 generator: torch.Generator | None = None, stop_ids: set[int] | frozenset = frozenset(),
                 reuse_cache: bool = False) -> Iterator[int]:
        """Yield new token ids one by one. Stops after max_new_tokens or after yielding a stop id.

        With reuse_cache, the cached tokens shared with `prompt` (its longest common prefix with
        `self.tokens`) are not recomputed: only the rest of the prompt is prefilled.
        """
        params = (params or GREEDY).check()
        if not prompt:
            raise CourseError("the prompt is empty: give at least one token (e.g. BOS)")
        if len(prompt) > self.max_len:
            raise CourseError(f"the prompt has {len(prompt)} tokens but the context window is {self.max_len}; "
                              "shorten it")
        if len(prompt) + max_new_tokens > self.max_len:
            raise CourseError(f"prompt ({len(prompt)} tokens) + max_new_tokens ({max_new_tokens}) exceeds the "
                              f"context window ({self.max_len}); lower --max_new_tokens to at most "
                              f"{self.max_len - len(prompt)}")
        keep = 0
        if reuse_cache:
            n = min(len(prompt) - 1, len(self.tokens))  # always recompute >= 1 token to get fresh logits
            while keep < n and self.tokens[keep] == prompt[keep]:
                keep += 1
        self.cache.crop(keep)
        self.tokens = self.tokens[:keep]
        self.history[0, :len(prompt)] = torch.tensor(prompt, device=self.device)
        stats = self.stats = GenStats(prompt_tokens=len(prompt), reused_tokens=keep)

        t0 = time.perf_counter()
        logits = self._forward(prompt[keep:], keep)
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
            # feed the token: its K/V go to the cache at `pos`
            if penalty:
                self.history[0, pos] = tok
            logits, _ = self.model(nxt.view(1, 1), kv_cache=self.cache, start_pos=pos)
            logits = logits[:, -1]
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


def left_pad_batch(prompts: list[list[int]], device: torch.device | str = "cpu") -> tuple[torch.Tensor, torch.Tensor]:
    """Prompts of different lengths -> (idx (B, T_max), left_pad (B,)), each row right-aligned.

    The padding slots are masked out by the model, so their ids do not matter; we repeat each row's first
    token there, so that the repetition penalty (which looks at the set of ids so far) sees nothing new.
    """
    if not prompts or any(len(p) == 0 for p in prompts):
        raise CourseError("every prompt needs at least one token")
    T = max(len(p) for p in prompts)
    idx = torch.tensor([[p[0]] * (T - len(p)) + list(p) for p in prompts], dtype=torch.long, device=device)
    return idx, torch.tensor([T - len(p) for p in prompts], dtype=torch.long, device=device)


@torch.inference_mode()
def generate_cached(model: torch.nn.Module, idx: torch.Tensor, max_new_tokens: int,
                    params: SamplingParams | None = None, generator: torch.Generator | None = None,
                    return_logits: bool = False, left_pad: torch.Tensor | None = None):
    """Batched generation (B, T) -> (B, T + max_new_tokens) with a KV cache.

    Rows of different prompt lengths come left-padded (left_pad_batch): row b's first left_pad[b] slots are
    padding, masked out at every step. With return_logits, also returns the list of (B, vocab) logits each
    new token was chosen from.
    """
    params = (params or GREEDY).check()
    B, T = idx.shape
    p = next(model.parameters())
    cache = KVCache.for_model(model.config, batch=B, max_len=T + max_new_tokens, dtype=p.dtype, device=idx.device)
    out = torch.empty(B, T + max_new_tokens, dtype=torch.long, device=idx.device)
    out[:, :T] = idx
    logits = model(idx, kv_cache=cache, start_pos=0, left_pad=left_pad, logits_to_keep=1)[0][:, -1]
    seen = []
    for i in range(max_new_tokens):
        pos = T + i
        seen.append(logits.clone())
        nxt = sample_token(logits, params, out[:, :pos] if params.repetition_penalty != 1.0 else None, generator)
        out[:, pos] = nxt[:, 0]
        if i + 1 < max_new_tokens:
            logits = model(nxt, kv_cache=cache, start_pos=pos, left_pad=left_pad)[0][:, -1]
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
