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

IMPLEMENTATION
One (batch, n_kv_heads, max_len, head_dim) tensor for K and one for V per layer, allocated once.
`update(layer, k, v, start_pos)` writes the new keys/values in place at positions
start_pos .. start_pos+T-1 and returns views of positions 0 .. start_pos+T-1 (no copy, no allocation
of the cache itself). Rewinding is free: `crop(n)` just moves the length back; positions past it are
overwritten by the next update.
"""

from __future__ import annotations

import torch

from course.errors import CourseError


def kv_cache_bytes(n_layers: int, n_kv_heads: int, head_dim: int, tokens: int, dtype: torch.dtype = torch.float32,
                   batch: int = 1) -> int:
    """Exact bytes of K and V for `tokens` positions: 2 x layers x kv_heads x head_dim x tokens x bytes x batch."""
    elem = torch.empty((), dtype=dtype).element_size()
    return 2 * n_layers * n_kv_heads * head_dim * tokens * elem * batch


class KVCache:
    """Per-layer preallocated K/V buffers of shape (batch, n_kv_heads, max_len, head_dim).

    The model calls `k, v = cache.update(layer, k_new, v_new, start_pos)` in every attention layer and
    attends its queries to the returned (batch, n_kv_heads, start_pos + T, head_dim) tensors.
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
        # zeros, not empty: never hand uninitialised memory to anyone, even positions past `length`.
        self.k = [torch.zeros(shape, dtype=dtype, device=device) for _ in range(n_layers)]
        self.v = [torch.zeros(shape, dtype=dtype, device=device) for _ in range(n_layers)]
        self.length = 0  # number of valid positions (0 .. length-1), as written by the last update

    @classmethod
    def for_model(cls, config, batch: int = 1, max_len: int | None = None, dtype: torch.dtype = torch.float32,
                  device: torch.device | str = "cpu") -> "KVCache":
        """A cache sized for a project 3 LlamaConfig (n_layer, n_kv_head, head_dim, block_size)."""
        n_layers, n_kv_heads, head_dim, block = model_dims(config)
        return cls(n_layers, batch, n_kv_heads, max_len or block, head_dim, dtype, device)

    # ---- the one method the model calls ------------------------------------------------------
    def update(self, layer: int, k: torch.Tensor, v: torch.Tensor, start_pos: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Write k, v (B, n_kv_heads, T, head_dim) at start_pos..start_pos+T-1; return K, V up to there."""
        T = k.size(2)
        end = start_pos + T
        if end > self.max_len:
            raise CourseError(f"KV cache is full: positions up to {end} requested, max_len is {self.max_len}; "
                              "use a shorter prompt or fewer new tokens")
        if start_pos < 0:
            raise CourseError(f"start_pos ({start_pos}) must be >= 0")
        if start_pos > self.length:
            # positions length .. start_pos-1 were never written: attention would read stale or zero K/V
            raise CourseError(f"start_pos ({start_pos}) is past the {self.length} cached tokens; the cache would "
                              "have a gap: write positions in order (or crop first)")
        kc, vc = self.k[layer], self.v[layer]
        if k.shape[0] != self.batch or k.shape[1] != self.n_kv_heads or k.shape[3] != self.head_dim:
            raise CourseError(f"KV cache expects k of shape ({self.batch}, {self.n_kv_heads}, T, {self.head_dim}), "
                              f"got {tuple(k.shape)}")
        # In-place slice assignment: the buffer is written, never reallocated.
        kc[:, :, start_pos:end] = k
        vc[:, :, start_pos:end] = v
        self.length = end
        # Views (no copy). Their stride along positions is max_len*head_dim-friendly: SDPA reads them as is.
        return kc[:, :, :end], vc[:, :, :end]

    # ---- bookkeeping ---------------------------------------------------------------------------
    def reset(self) -> None:
        """Forget everything (a new conversation). O(1): stale values are overwritten before being read."""
        self.length = 0

    def crop(self, n: int) -> None:
        """Keep only the first n positions (rewind, e.g. to a shared prompt prefix)."""
        if n < 0:
            raise CourseError(f"crop length ({n}) must be >= 0")
        self.length = min(self.length, n)

    @property
    def remaining(self) -> int:
        return self.max_len - self.length

    def bytes_for(self, tokens: int) -> int:
        """Bytes that `tokens` cached positions occupy (all layers, K and V, whole batch)."""
        return kv_cache_bytes(self.n_layers, self.n_kv_heads, self.head_dim, tokens, self.dtype, self.batch)

    @property
    def nbytes(self) -> int:
        """Bytes allocated (the whole max_len), equal to the sum of the buffers' sizes."""
        return self.bytes_for(self.max_len)

    @property
    def used_bytes(self) -> int:
        """Bytes holding valid positions right now."""
        return self.bytes_for(self.length)

    def __repr__(self) -> str:
        return (f"KVCache(layers={self.n_layers}, batch={self.batch}, kv_heads={self.n_kv_heads}, "
                f"max_len={self.max_len}, head_dim={self.head_dim}, dtype={self.dtype}, "
                f"length={self.length}, allocated={self.nbytes / 2**20:.2f} MiB)")


def model_dims(config) -> tuple[int, int, int, int]:
    """(n_layers, n_kv_heads, head_dim, block_size) from a project 3 LlamaConfig."""
    return config.n_layer, config.n_kv_head, config.hd, config.block_size
