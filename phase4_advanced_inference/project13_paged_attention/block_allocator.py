"""A pool of fixed-size KV blocks: one preallocated tensor per layer, a free list and reference counts.

PAPERS
- Kwon et al. 2023, "Efficient Memory Management for Large Language Model Serving with PagedAttention" (vLLM,
  SOSP): the KV cache as an operating system's virtual memory. A sequence's tokens live in fixed-size *blocks*
  (pages) that need not be adjacent; a per-sequence block table maps logical block i to a physical block. Memory
  is taken one block at a time as a sequence grows, so the waste is at most one partly filled block per sequence,
  and a block can belong to several sequences at once (reference counts) until one of them writes into it.

INTUITION
A contiguous cache must reserve max_len slots per row before it knows how long the reply will be: a 50-token
request in a 1,024-slot row leaves 95% of its memory unused, and that memory cannot go to another request. A
pool of small blocks hands out memory as it is filled, and takes it back the moment a sequence ends.

IMPLEMENTATION
- `BlockPool`: K and V of shape (num_blocks, block_size, n_kv_heads, head_dim) per layer, allocated once (zeros).
  Slot-major (block, offset) so the pool viewed as (num_blocks * block_size, n_kv_heads, head_dim) is addressed by
  one flat slot number, block * block_size + offset: a gather or a write through the block tables is one index.
- The free list is a deque (the most recently freed block is reused last: stale data lives longest, which the
  tests use to catch a read through a wrong table); `refcount[b]` counts the sequences holding block b.
- `allocate()` takes a free block (refcount 1); `retain(b)` shares it (+1); `release(b)` drops one reference and
  returns the block to the free list at 0. Running out is one clear error (`OutOfBlocks`), never a silent reuse.
"""

from __future__ import annotations

from collections import deque

import torch

from course.errors import CourseError


class OutOfBlocks(CourseError):
    """Every block is in use: the caller admits fewer requests, or preempts one."""


class BlockPool:
    def __init__(self, n_layers: int, num_blocks: int, block_size: int, n_kv_heads: int, head_dim: int,
                 dtype: torch.dtype = torch.float32, device: torch.device | str = "cpu"):
        for name, value in (("num_blocks", num_blocks), ("block_size", block_size), ("n_layers", n_layers)):
            if not isinstance(value, int) or value <= 0:
                raise CourseError(f"{name} ({value!r}) must be a positive int")
        self.num_blocks, self.block_size = num_blocks, block_size
        self.n_kv_heads, self.head_dim, self.dtype = n_kv_heads, head_dim, dtype
        shape = (num_blocks, block_size, n_kv_heads, head_dim)
        self.k = [torch.zeros(shape, dtype=dtype, device=device) for _ in range(n_layers)]
        self.v = [torch.zeros(shape, dtype=dtype, device=device) for _ in range(n_layers)]
        self.refcount = [0] * num_blocks
        self.free = deque(range(num_blocks))

    # ---- the allocator ----------------------------------------------------------------------------
    def allocate(self) -> int:
        if not self.free:
            raise OutOfBlocks(f"KV block pool exhausted: all {self.num_blocks} blocks of {self.block_size} tokens "
                              "are in use; admit fewer requests or give the pool more blocks")
        b = self.free.popleft()
        self.refcount[b] = 1
        return b

    def retain(self, b: int) -> None:
        if self.refcount[b] <= 0:
            raise CourseError(f"block {b} is free: it cannot be shared")
        self.refcount[b] += 1

    def release(self, b: int) -> None:
        if self.refcount[b] <= 0:
            raise CourseError(f"block {b} released more often than it was taken")
        self.refcount[b] -= 1
        if self.refcount[b] == 0:
            self.free.append(b)

    def copy_block(self, src: int, dst: int) -> None:
        """Copy-on-write: block src's keys and values into block dst, every layer."""
        for k, v in zip(self.k, self.v):
            k[dst].copy_(k[src])
            v[dst].copy_(v[src])

    # ---- accounting -------------------------------------------------------------------------------
    @property
    def num_free(self) -> int:
        return len(self.free)

    @property
    def num_used(self) -> int:
        return self.num_blocks - len(self.free)

    def flat(self, layer: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Layer's K and V as (num_blocks * block_size, n_kv_heads, head_dim) views: one row per slot."""
        n = self.num_blocks * self.block_size
        return (self.k[layer].view(n, self.n_kv_heads, self.head_dim),
                self.v[layer].view(n, self.n_kv_heads, self.head_dim))

    @property
    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in self.k + self.v)

    def bytes_per_block(self) -> int:
        return self.nbytes // self.num_blocks

    def check_consistent(self) -> None:
        """Accounting invariant: the free list holds exactly the blocks with refcount 0, each once."""
        free = list(self.free)
        assert len(free) == len(set(free)), "a block is on the free list twice"
        assert set(free) == {b for b, c in enumerate(self.refcount) if c == 0}, "free list and refcounts disagree"
        assert all(c >= 0 for c in self.refcount)
