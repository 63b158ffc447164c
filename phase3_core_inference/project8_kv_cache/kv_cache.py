"""A preallocated key/value cache for autoregressive decoding.

PAPERS
- Pope et al. 2022, "Efficiently Scaling Transformer Inference": decoding one token at a time is
  memory-bound; the KV cache's size (2 x layers x kv_heads x head_dim x tokens x bytes) is, with the
  weights, what every decode step has to read, and what limits batch size and context length.
- Shazeer 2019, "Fast Transformer Decoding: One Write-Head is All You Need" (multi-query attention):
  all query heads share ONE key/value head, so the cache shrinks by n_heads.
- Ainslie et al. 2023, "GQA: Training Generalized Multi-Query Transformer Models from Multi-Head
  Checkpoints": the middle ground, G key/value heads each shared by n_heads / G query heads.

WHY ONLY K AND V ARE CACHED
In causal attention the output at position t is softmax(q_t K_{<=t}^T / sqrt(d)) V_{<=t}. A new token
needs its own query q_t but the keys and values of EVERY earlier token. Those keys and values never
change once computed (causal masking: token s never looks at tokens after it, so its k_s, v_s, and
everything below them, are fixed). The queries of earlier tokens, on the other hand, are never needed
again: their outputs are already computed. So we keep K and V, and throw Q away. The same holds for
every other per-token activation (MLP inputs, residual stream): only K and V are read by later tokens.

WHY GQA SHRINKS THE CACHE
The cache holds one K and one V vector per token, per layer, per *key/value* head. With n_heads = 32
query heads and n_kv_heads = 4 (TinyLlama), the cache is 8x smaller than with full multi-head
attention, at the same model width. Less cache = less memory traffic per decoded token and room for
longer contexts or bigger batches.

THE PROTOCOL (`Cache`)
The model does not track positions; it asks the cache (project 3's `Llama.forward`):
- `plan = cache.begin(T)`: once per forward, before the layers. The cache looks up each row's length, says where
  the T new tokens sit (RoPE positions), which keys each query may see (a mask, or None) and remembers where to
  store them; the rows' lengths then count the new tokens.
- `k, v = cache.update(layer, k_new, v_new)`: in every layer; stores the new keys/values where `begin` said and
  returns every key/value the layer's queries attend to.
An engine or a scheduler manages the rows between forwards: `lengths`, `reset()`, `crop(n, row)`, `free(row)`
(a finished sequence gives its row back) and `rows(indices)` (a forward over some rows only: a new sequence is
prefilled into a free row while the others keep their caches; the running rows decode without the free ones).
A forward that packs the tokens of many rows into one (project 12's RaggedBatch) reaches the storage token by
token: `reserve(row, length)`, `write_tokens` and `read_tokens` at (row, position) pairs.
Later projects put other storage behind the same two calls: a prefix tree (project 10), continuous batching
(12), paged blocks (13), quantized K/V (15); `cache_contract.py` is the test every one of them passes.

IMPLEMENTATION (`KVCache`, the contiguous cache)
One (batch, n_kv_heads, max_len, head_dim) tensor for K and one for V per layer, allocated once; row b's
tokens fill slots 0 .. lengths[b]-1, so a token's slot is its position. When the rows of a forward share one
length (batch 1, equal prompts), the new K/V are written with one slice assignment and the layer attends to
views of slots 0 .. end-1: no copy, no mask for a decode step, nothing allocated. When they differ, each row
writes at its own slots (one indexed write) and a (B, 1, T, keys) mask hides, for every row, the slots past its
own length. Lengths are Python ints (host-side bookkeeping, as in vLLM's scheduler): reading them never waits
for a device. Rewinding is free: `crop(n)` moves the length back; the next write overwrites what was there.
"""

from __future__ import annotations

import copy
from typing import Protocol, runtime_checkable

import torch

from course.errors import CourseError
from phase1_foundation.project3_pretrain.model import CachePlan

__all__ = ["Cache", "CachePlan", "KVCache", "kv_cache_bytes", "model_dims"]


def kv_cache_bytes(n_layers: int, n_kv_heads: int, head_dim: int, tokens: int, dtype: torch.dtype = torch.float32,
                   batch: int = 1) -> int:
    """Exact bytes of K and V for `tokens` positions: 2 x layers x kv_heads x head_dim x tokens x bytes x batch."""
    elem = torch.empty((), dtype=dtype).element_size()
    return 2 * n_layers * n_kv_heads * head_dim * tokens * elem * batch


@runtime_checkable
class Cache(Protocol):
    """What the model and an engine ask of a KV cache (see the module docstring). `lengths[b]`: row b's tokens."""

    lengths: list[int]

    def begin(self, T: int) -> CachePlan:
        """Plan a forward of T new tokens per row: their positions, the attention mask (or None); count them."""

    def update(self, layer: int, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Store layer's new k, v (B, kv_heads, T, head_dim) where `begin` planned; return the keys/values to
        attend to, (B, kv_heads, keys, head_dim)."""

    def reset(self) -> None:
        """Forget every row."""

    def crop(self, n: int, row: int | None = None) -> None:
        """Keep only the first n tokens of a row (or of every row)."""

    def free(self, row: int) -> None:
        """A finished sequence gives its row back; the next one to join reuses it."""

    def rows(self, indices: list[int]) -> "Cache":
        """The same cache seen by a forward over these rows only (their storage, their lengths)."""


class KVCache:
    """Contiguous per-layer K/V buffers of shape (batch, n_kv_heads, max_len, head_dim), per-row lengths.

    The model calls `plan = cache.begin(T)` once per forward and `k, v = cache.update(layer, k_new, v_new)` in
    every attention layer; `cache.rows([b])` is the cache a forward over row b alone uses (a join).
    """

    def __init__(self, n_layers: int, batch: int, n_kv_heads: int, max_len: int, head_dim: int,
                 dtype: torch.dtype = torch.float32, device: torch.device | str = "cpu"):
        for name, value in (("n_layers", n_layers), ("batch", batch), ("n_kv_heads", n_kv_heads),
                            ("max_len", max_len), ("head_dim", head_dim)):
            if not isinstance(value, int) or value <= 0:
                raise CourseError(f"KVCache {name} ({value!r}) must be a positive int")
        self.n_layers, self.batch, self.n_kv_heads = n_layers, batch, n_kv_heads
        self.max_len, self.head_dim, self.dtype = max_len, head_dim, dtype
        shape = (batch, n_kv_heads, max_len, head_dim)
        # zeros, not empty: never hand uninitialised memory to anyone, even slots past a row's length.
        self.k = [torch.zeros(shape, dtype=dtype, device=device) for _ in range(n_layers)]
        self.v = [torch.zeros(shape, dtype=dtype, device=device) for _ in range(n_layers)]
        self.lengths = [0] * batch  # row b holds positions 0 .. lengths[b]-1; shared with every rows() view
        self.selected: list[int] | None = None  # the rows a forward through this object covers (None = all)
        self._start: int | None = None  # set by begin(): the shared first slot, or None (rows differ)
        self._slots: torch.Tensor | None = None  # rows differ: (B, T) slot of each new token
        self._end = 0  # rows differ: the keys the layers attend to (the longest row's, after this forward)

    @classmethod
    def for_model(cls, config, batch: int = 1, max_len: int | None = None, dtype: torch.dtype = torch.float32,
                  device: torch.device | str = "cpu") -> "KVCache":
        """A cache sized for a project 3 LlamaConfig (n_layer, n_kv_head, head_dim, block_size)."""
        n_layers, n_kv_heads, head_dim, block = model_dims(config)
        return cls(n_layers, batch, n_kv_heads, max_len or block, head_dim, dtype, device)

    # ---- what the model asks -------------------------------------------------------------------
    def begin(self, T: int) -> CachePlan:
        """Positions and mask for T new tokens in each selected row, which then count them."""
        rows = self.selected if self.selected is not None else range(self.batch)
        starts = [self.lengths[b] for b in rows]
        end = max(starts) + T
        if end > self.max_len:
            raise CourseError(f"KV cache is full: positions up to {end} requested, max_len is {self.max_len}; "
                              "use a shorter prompt or fewer new tokens")
        for b in rows:
            self.lengths[b] += T
        device = self.k[0].device
        if all(s == starts[0] for s in starts):  # one shared start: slices, and a mask only for a chunk
            start = self._start = starts[0]
            self._slots = None
            mask = None
            if start > 0 and T > 1:  # T queries after `start` cached keys: query t sees keys 0 .. start + t
                mask = torch.ones(T, end, dtype=torch.bool, device=device).tril(diagonal=start)
            return CachePlan(start, None, mask, end)
        # rows differ: row b's token t sits at position (= slot) starts[b] + t and sees slots 0 .. starts[b] + t
        self._start, self._end = None, end
        positions = torch.tensor(starts, device=device)[:, None] + torch.arange(T, device=device)  # (B, T)
        self._slots = positions
        mask = torch.arange(end, device=device)[None, None, :] <= positions[:, :, None]  # (B, T, keys)
        return CachePlan(None, positions, mask.unsqueeze(1), end)

    def update(self, layer: int, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Store k, v (B, n_kv_heads, T, head_dim) where `begin` planned; return K, V up to the plan's end."""
        n = self.batch if self.selected is None else len(self.selected)
        if k.shape[0] != n or k.shape[1] != self.n_kv_heads or k.shape[3] != self.head_dim:
            raise CourseError(f"KV cache expects k of shape ({n}, {self.n_kv_heads}, T, {self.head_dim}), "
                              f"got {tuple(k.shape)}")
        if self._start is not None and self._slots is None:
            if self.selected is None:
                return self.write(layer, k, v, self._start)
            kc, vc = self.k[layer], self.v[layer]
            end = self._start + k.size(2)
            sel = self._row_index()
            kc[sel, :, self._start:end] = k
            vc[sel, :, self._start:end] = v
            return kc[sel, :, :end], vc[sel, :, :end]
        if self._slots is None:
            raise CourseError("KVCache.update before begin(): the model calls begin(T) once per forward")
        kc, vc = self.k[layer], self.v[layer]
        sel = self._row_index()[:, None]  # (B, 1) with slots (B, T): one indexed write per row
        kc[sel, :, self._slots] = k.transpose(1, 2)
        vc[sel, :, self._slots] = v.transpose(1, 2)
        end = self._end
        if self.selected is None:
            return kc[:, :, :end], vc[:, :, :end]
        return kc[sel[:, 0], :, :end], vc[sel[:, 0], :, :end]

    def write(self, layer: int, k: torch.Tensor, v: torch.Tensor, start: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Every row's k, v at slots start .. start+T-1, in place; views of slots 0 .. start+T-1 (no copy).

        The shared-length case of `update`, and what a compiled decode step (fast_decode.py) calls with the
        position as a symbol."""
        end = start + k.size(2)
        kc, vc = self.k[layer], self.v[layer]
        kc[:, :, start:end] = k  # in-place slice assignment: the buffer is written, never reallocated
        vc[:, :, start:end] = v
        return kc[:, :, :end], vc[:, :, :end]

    # ---- token-wise access: a packed forward over many rows (project 12's RaggedBatch) ------------
    def reserve(self, row: int, length: int) -> None:
        """Make room for `length` tokens in `row` before they are written (here they always are, up to max_len;
        a paged cache allocates blocks)."""
        if length > self.max_len:
            raise CourseError(f"KV cache is full: row {row} needs {length} positions, max_len is {self.max_len}")

    def write_tokens(self, layer: int, rows: torch.Tensor, positions: torch.Tensor, k: torch.Tensor,
                     v: torch.Tensor) -> None:
        """Token i's k[i], v[i] (N, n_kv_heads, head_dim) at (rows[i], positions[i]): one indexed write."""
        self.k[layer][rows, :, positions] = k
        self.v[layer][rows, :, positions] = v

    def read_tokens(self, layer: int, rows: torch.Tensor, positions: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """The keys/values stored at (rows[i], positions[i]): two (N, n_kv_heads, head_dim) gathers."""
        return self.k[layer][rows, :, positions], self.v[layer][rows, :, positions]

    def _row_index(self) -> torch.Tensor:
        rows = self.selected if self.selected is not None else range(self.batch)
        return torch.tensor(list(rows), device=self.k[0].device)

    # ---- what an engine asks: the rows ------------------------------------------------------------
    def rows(self, indices: list[int]) -> "KVCache":
        """This cache seen by a forward over `indices` only: same buffers, same lengths (a view, not a copy)."""
        indices = list(indices)
        if not indices or any(not 0 <= b < self.batch for b in indices) or len(set(indices)) != len(indices):
            raise CourseError(f"rows {indices} must be distinct rows of this cache (0 .. {self.batch - 1})")
        view = copy.copy(self)  # shares k, v and the lengths list; begin/update state is its own
        view.selected = None if indices == list(range(self.batch)) else indices
        view._start = view._slots = None
        return view

    def reset(self) -> None:
        """Forget everything (a new conversation). O(1): stale values are overwritten before being read."""
        self.lengths[:] = [0] * self.batch

    def crop(self, n: int, row: int | None = None) -> None:
        """Keep only the first n positions of `row` (of every row if None): rewind, e.g. to a shared prefix."""
        if n < 0:
            raise CourseError(f"crop length ({n}) must be >= 0")
        for b in range(self.batch) if row is None else [row]:
            self.lengths[b] = min(self.lengths[b], n)

    def free(self, row: int) -> None:
        """Row `row`'s sequence is done: its slots are reused by the next sequence that joins (`rows([row])`)."""
        self.lengths[row] = 0

    @property
    def device(self) -> torch.device:
        return self.k[0].device

    @property
    def length(self) -> int:
        """The longest row's length (batch 1: the number of cached tokens)."""
        return max(self.lengths)

    @property
    def remaining(self) -> int:
        return self.max_len - self.length

    # ---- memory ----------------------------------------------------------------------------------
    def bytes_for(self, tokens: int) -> int:
        """Bytes that `tokens` cached positions occupy in every row (all layers, K and V, whole batch)."""
        return kv_cache_bytes(self.n_layers, self.n_kv_heads, self.head_dim, tokens, self.dtype, self.batch)

    @property
    def nbytes(self) -> int:
        """Bytes allocated (the whole max_len), equal to the sum of the buffers' sizes."""
        return self.bytes_for(self.max_len)

    @property
    def used_bytes(self) -> int:
        """Bytes holding valid positions right now (each row's own length)."""
        return kv_cache_bytes(self.n_layers, self.n_kv_heads, self.head_dim, sum(self.lengths), self.dtype)

    def __repr__(self) -> str:
        return (f"KVCache(layers={self.n_layers}, batch={self.batch}, kv_heads={self.n_kv_heads}, "
                f"max_len={self.max_len}, head_dim={self.head_dim}, dtype={self.dtype}, "
                f"lengths={self.lengths}, allocated={self.nbytes / 2**20:.2f} MiB)")


def model_dims(config) -> tuple[int, int, int, int]:
    """(n_layers, n_kv_heads, head_dim, block_size) from a project 3 LlamaConfig."""
    return config.n_layer, config.n_kv_head, config.hd, config.block_size
