"""The block-hash prefix cache, vLLM's automatic prefix caching: full blocks named by a chain of hashes.

PAPERS
- Kwon et al. 2023, "Efficient Memory Management for Large Language Model Serving with PagedAttention": the
  KV cache in fixed-size blocks (pages); here the unit of sharing as well.
- vLLM documentation, "Automatic Prefix Caching" (design): block i of a sequence is named by
  hash(hash of block i - 1, the block's tokens), so a name stands for the block AND everything before it; a
  lookup hashes the prompt's full blocks in order and stops at the first name it does not hold. Free blocks
  sit in an LRU queue; a sequence's blocks are queued tail first, so its last blocks are evicted before its
  first ones (a missing early block would make the later ones unreachable anyway).

The trade-off against the radix tree (radix_cache.py): no tree, no splits, one dict lookup per block, and a
block is exactly a page of a paged cache (project 13); but only whole blocks are shared: a prompt matches at
most floor(shared / block_size) blocks, the last partial block is always recomputed, and a prompt shorter than
a block never hits. SHA-256 rather than Python's hash(): a collision would hand a request another text's K/V.
"""

from __future__ import annotations

import hashlib
from array import array
from collections import OrderedDict

import torch

from course.errors import CourseError
from phase4_advanced_inference.project10_prefix_caching.kv_store import KVSpec, Match, PrefixStore, stack_kv


class Block:
    __slots__ = ("k", "v", "ref")

    def __init__(self, k, v):
        self.k, self.v, self.ref = k, v, 0


def block_hashes(tokens: list[int], block_size: int) -> list[bytes]:
    """The name of every full block: h_i = sha256(h_{i-1} + the block's token ids as int64 bytes)."""
    out, h = [], b""
    for i in range(len(tokens) // block_size):
        h = hashlib.sha256(h + array("q", tokens[i * block_size:(i + 1) * block_size]).tobytes()).digest()
        out.append(h)
    return out


class BlockHashCache(PrefixStore):
    """Blocks of `block_size` tokens in an LRU-ordered dict (first = next to evict) under a byte budget."""

    def __init__(self, spec: KVSpec, budget_bytes: int, block_size: int = 16):
        super().__init__(spec, budget_bytes)
        if not isinstance(block_size, int) or block_size <= 0:
            raise CourseError(f"block_size ({block_size!r}) must be a positive number of tokens")
        self.block_size = block_size
        self.blocks: OrderedDict[bytes, Block] = OrderedDict()

    def _touch(self, names: list[bytes]) -> None:
        for h in reversed(names):  # tail first: the first block ends up the most recently used
            self.blocks.move_to_end(h)

    def match(self, tokens: list[int], limit: int | None = None) -> Match:
        n = len(tokens) if limit is None else max(0, min(limit, len(tokens)))
        found = []
        for h in block_hashes(tokens[:n], self.block_size):
            if h not in self.blocks:
                break
            found.append(h)
        self._touch(found)
        self.count(len(found) * self.block_size, len(tokens))
        return Match(len(found) * self.block_size, [self.blocks[h] for h in found])

    def insert(self, tokens: list[int], k: list[torch.Tensor], v: list[torch.Tensor]) -> int:
        self.check_kv(k, v, len(tokens))
        names, added, bs = block_hashes(tokens, self.block_size), 0, self.block_size
        for i, h in enumerate(names):
            if h not in self.blocks:
                self.blocks[h] = block = Block(stack_kv(k, i * bs, (i + 1) * bs), stack_kv(v, i * bs, (i + 1) * bs))
                self.nbytes += block.k.nbytes + block.v.nbytes
                added += bs
        self._touch(names)
        self.evict_to_budget()
        return added

    def chunks(self, match: Match) -> list[Block]:
        if any(b.k is None for b in match.handle):
            raise CourseError("a block of this match was evicted while unlocked; lock a match before inserting")
        return match.handle

    def lock(self, match: Match) -> None:
        for b in self.chunks(match):
            b.ref += 1

    def unlock(self, match: Match) -> None:
        if any(b.ref <= 0 for b in match.handle):
            raise CourseError("unlock without a matching lock (a prefix released twice)")
        for b in match.handle:
            b.ref -= 1

    def evict_to_budget(self) -> list[Block]:
        evicted = []
        for h in list(self.blocks):  # oldest first
            if self.nbytes <= self.budget_bytes:
                break
            block = self.blocks[h]
            if block.ref == 0:
                del self.blocks[h]
                self.nbytes -= block.k.nbytes + block.v.nbytes
                self.evictions += 1
                self.evicted_tokens += self.block_size
                block.k = block.v = None
                evicted.append(block)
        return evicted

    def __repr__(self) -> str:
        return f"BlockHashCache({len(self.blocks)} blocks of {self.block_size}; {self.summary()})"
