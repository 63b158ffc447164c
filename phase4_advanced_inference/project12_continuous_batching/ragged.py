"""One forward over a ragged batch: prefill chunks and decode tokens of many sequences, packed into one row.

PAPERS
- Yu et al. 2022, "Orca: A Distributed Serving System for Transformer-Based Generative Models" (OSDI):
  iteration-level scheduling, and *selective batching*: the token-wise operations (every Linear, the norms, the
  MLP) do not care which sequence a token belongs to, so the tokens of all requests can be flattened into one
  batch; only attention has to keep the sequences apart.
- Agrawal et al. 2023/2024, "SARATHI" / "Sarathi-Serve": a prefill chunk and the decode tokens of the running
  requests in the same forward ("piggybacking"): the decodes ride along with a chunk that reads the weights
  anyway.

INTUITION
Rows of a (B, T) batch must all have T tokens: a 64-token prefill chunk next to 15 one-token decodes would pad
those to 64 (15 x 63 wasted token-passes). Instead, every new token goes into ONE row of N = sum of the
segments' lengths, and each carries its own sequence (a row of the KV cache) and position. The Linear layers
see a (1, N, dim) tensor and do exactly N token-passes.

IMPLEMENTATION (`RaggedBatch`, a view that keeps project 8's cache protocol)
The storage is any project 8 cache that offers token-wise access (`reserve`, `write_tokens`, `read_tokens`): the
contiguous `KVCache` (one row per sequence) or project 13's paged one. For a forward over segments
[(row, n_new), ...]:
- `begin(N)`: token i of segment s sits at position lengths[row_s] + i; the rows' lengths count the new tokens.
- `update(layer, k, v)`: writes the N new keys/values at (row_s, position) with one indexed write, then gathers,
  for every segment, its row's keys 0 .. end_s - 1 into one (1, kv_heads, K, head_dim) sequence, K = sum end_s.
- the mask (1, 1, N, K) lets token (s, p) see key (s', q) only when s' = s and q <= p: block-diagonal and causal,
  so no sequence ever sees another's keys. The model is untouched: it asks `begin` and `update` as always.
The order of the tokens inside the packed row is free (each carries its own position): `order` puts the tokens
whose logits are wanted (a decode token, the last token of a prompt) at the end, so `logits_to_keep` skips the
classifier for every other prompt token.

WHY NOT ALWAYS: attention over the gathered keys computes every query against every segment's keys (masked
afterwards), N x K scores instead of sum n_s x end_s; and the gather copies each row's keys once per layer. A
decode-only step does not need any of it: project 8's (B, 1) path with per-row positions is cheaper, and
`BatchEngine` takes it. `benchmark.py` measures the packed step against the split one (one forward per chunk
plus one for the decode rows) on this machine.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from course.errors import CourseError
from phase1_foundation.project3_pretrain.model import CachePlan


@dataclass(frozen=True)
class Segment:
    """`n` new tokens of the sequence in cache row `row`; `keep_last`: its last token's logits are wanted."""

    row: int
    n: int
    keep_last: bool = True


class RaggedBatch:
    """Project 8's cache protocol for ONE forward over `segments`, packed into a (1, N) row (module docstring)."""

    def __init__(self, cache, segments: list[Segment]):
        rows = [s.row for s in segments]
        if not segments or len(set(rows)) != len(rows) or any(not 0 <= r < cache.batch for r in rows):
            raise CourseError(f"segments must name distinct rows of the cache (0 .. {cache.batch - 1}), got {rows}")
        if any(s.n <= 0 for s in segments):
            raise CourseError("every segment needs at least one new token")
        self.cache, self.segments = cache, list(segments)
        self.lengths = cache.lengths  # the protocol's per-row lengths (shared with the cache)
        self.n_tokens = sum(s.n for s in segments)
        self._plan: tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor] | None = None

    def order(self) -> tuple[list[tuple[int, int]], int]:
        """The packed order: (segment index, token index) for each of the N slots, and how many trailing slots
        hold a wanted logit. Every other token first, then the wanted ones (one per segment with keep_last)."""
        body = [(i, t) for i, s in enumerate(self.segments) for t in range(s.n - (1 if s.keep_last else 0))]
        tail = [(i, s.n - 1) for i, s in enumerate(self.segments) if s.keep_last]
        return body + tail, len(tail)

    def pack(self, tokens: list[list[int]]) -> tuple[torch.Tensor, int]:
        """The (1, N) input for segments' tokens (one list per segment, in segment order) and logits_to_keep."""
        if len(tokens) != len(self.segments) or any(len(t) != s.n for t, s in zip(tokens, self.segments)):
            raise CourseError("pack() needs one token list per segment, of the segment's length")
        slots, keep = self.order()
        self._slots = slots
        ids = [tokens[i][t] for i, t in slots]
        return torch.tensor([ids], dtype=torch.long, device=self.cache.device), keep

    # ---- the protocol ---------------------------------------------------------------------------
    def begin(self, T: int) -> CachePlan:
        if T != self.n_tokens:
            raise CourseError(f"RaggedBatch was built for {self.n_tokens} tokens, the forward has {T}")
        device = self.cache.device
        slots = getattr(self, "_slots", None) or self.order()[0]
        starts = [self.lengths[s.row] for s in self.segments]
        ends = [st + s.n for st, s in zip(starts, self.segments)]
        for s, end in zip(self.segments, ends):
            self.cache.reserve(s.row, end)  # a paged cache (project 13) allocates its blocks here
        seg = torch.tensor([i for i, _ in slots], device=device)                       # (N,) segment of each token
        pos = torch.tensor([starts[i] + t for i, t in slots], device=device)           # (N,) its position
        row = torch.tensor([s.row for s in self.segments], device=device)[seg]        # (N,) its cache row
        # the keys to attend to: segment s's row, slots 0 .. ends[s]-1, segment after segment
        key_seg = torch.repeat_interleave(torch.arange(len(ends), device=device), torch.tensor(ends, device=device))
        key_slot = torch.cat([torch.arange(e, device=device) for e in ends])
        key_row = torch.tensor([s.row for s in self.segments], device=device)[key_seg]
        mask = (seg[:, None] == key_seg[None, :]) & (key_slot[None, :] <= pos[:, None])  # (N, K)
        self._plan = (row, pos, key_row, key_slot)
        for s in self.segments:
            self.lengths[s.row] += s.n
        return CachePlan(None, pos[None, :], mask[None, None], max(ends))

    def update(self, layer: int, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        if self._plan is None:
            raise CourseError("RaggedBatch.update before begin(): the model calls begin(T) once per forward")
        row, pos, key_row, key_slot = self._plan
        # the N new (kv_heads, head_dim) vectors into (row, position), then every segment's keys in order
        self.cache.write_tokens(layer, row, pos, k[0].transpose(0, 1), v[0].transpose(0, 1))
        keys, values = self.cache.read_tokens(layer, key_row, key_slot)  # (K, kv_heads, head_dim) each
        return keys.transpose(0, 1).unsqueeze(0), values.transpose(0, 1).unsqueeze(0)

    def reset(self) -> None:
        self.cache.reset()

    def crop(self, n: int, row: int | None = None) -> None:
        self.cache.crop(n, row)

    def free(self, row: int) -> None:
        self.cache.free(row)

    def rows(self, indices: list[int]):
        return self.cache.rows(indices)


def ragged_forward(model, cache, segments: list[Segment], tokens: list[list[int]]) -> torch.Tensor:
    """One forward of `segments` (their `tokens`) through `cache`; logits (S_kept, vocab) of the segments with
    keep_last, in segment order."""
    view = RaggedBatch(cache, segments)
    x, keep = view.pack(tokens)
    logits = model(x, kv_cache=view, logits_to_keep=max(keep, 1))[0][0]  # 0 would mean "every position"
    return logits[logits.size(0) - keep:]
