"""A paged KV cache behind project 8's protocol: per-sequence block tables over a shared pool of blocks.

PAPERS
- Kwon et al. 2023, "Efficient Memory Management for Large Language Model Serving with PagedAttention" (vLLM):
  block tables, blocks allocated on demand, sharing by reference count and copy-on-write, which makes parallel
  sampling (n continuations of one prompt) store the prompt once.
- Prabhu et al. 2024, "vAttention: Dynamic Memory Management for Serving LLMs without PagedAttention": the
  counterpoint: keep K/V virtually contiguous and let the OS/driver page it, so attention kernels need no block
  tables; the price of the tables is the indirection measured in benchmark.py.

INTUITION
Row b's token at position p lives at slot (table[b][p // block_size], p % block_size) of the pool. Nothing else
changes for the model: `begin` still says where the T new tokens sit and which keys each query sees; `update`
still stores the new K/V and returns the keys to attend to, here gathered through the block table into the
(B, kv_heads, keys, head_dim) layout attention wants. Memory follows the tokens: a row holds
ceil(length / block_size) blocks, never max_len slots.

IMPLEMENTATION
- `reserve(row, length)`: blocks are taken as a row grows; a block about to be written that is shared with
  another row (refcount > 1) is first copied to a private block (copy-on-write), so a fork never sees its
  sibling's writes.
- `fork(src, dst)`: dst's table = src's blocks, each retained (+1): parallel sampling shares the prompt.
- `free(row)`: every block of the row released (a shared block survives while another row holds it).
- `claim(row, tokens)`: admission for a scheduler (project 12's engine asks it before admitting a request): are
  there enough free blocks, after what running rows have claimed and not yet used, for `tokens` more?
- Slots: `slots(rows, positions)` = table[rows, positions // bs] * bs + positions % bs on a (batch, blocks)
  tensor of the tables (rebuilt only when a table changed); the pool viewed as (slots, kv_heads, head_dim) is
  then written and read with one index each (`write_tokens` / `read_tokens`, what project 12's packed forward
  uses). A gather in plain PyTorch: readable first; a kernel that reads blocks in place is a later step.
"""

from __future__ import annotations

import copy
import math

import torch

from course.errors import CourseError
from phase1_foundation.project3_pretrain.model import CachePlan
from phase3_core_inference.project8_kv_cache.kv_cache import model_dims
from phase4_advanced_inference.project13_paged_attention.block_allocator import BlockPool


class PagedCache:
    def __init__(self, n_layers: int, batch: int, n_kv_heads: int, head_dim: int, max_len: int,
                 block_size: int = 16, num_blocks: int | None = None, dtype: torch.dtype = torch.float32,
                 device: torch.device | str = "cpu"):
        if not isinstance(block_size, int) or block_size <= 0:
            raise CourseError(f"block_size ({block_size!r}) must be a positive int (tokens per KV block)")
        if not isinstance(batch, int) or batch <= 0 or not isinstance(max_len, int) or max_len <= 0:
            raise CourseError(f"batch ({batch!r}) and max_len ({max_len!r}) must be positive ints")
        num_blocks = num_blocks if num_blocks is not None else batch * math.ceil(max_len / block_size)
        self.pool = BlockPool(n_layers, num_blocks, block_size, n_kv_heads, head_dim, dtype, device)
        self.n_layers, self.batch, self.max_len, self.block_size = n_layers, batch, max_len, block_size
        self.n_kv_heads, self.head_dim, self.dtype = n_kv_heads, head_dim, dtype
        self.tables: list[list[int]] = [[] for _ in range(batch)]
        self.lengths = [0] * batch
        self.claims = [0] * batch  # blocks a row's request may still need (claim), counted against the pool
        self.selected: list[int] | None = None
        self._shared = {"table": None}  # the tables as a tensor, shared with rows() views; None = rebuild
        self._new_slots = self._key_slots = None

    @classmethod
    def for_model(cls, config, batch: int = 1, max_len: int | None = None, block_size: int = 16,
                  num_blocks: int | None = None, dtype: torch.dtype = torch.float32,
                  device: torch.device | str = "cpu") -> "PagedCache":
        n_layers, n_kv_heads, head_dim, block = model_dims(config)
        return cls(n_layers, batch, n_kv_heads, head_dim, max_len or block, block_size, num_blocks, dtype, device)

    @property
    def device(self) -> torch.device:
        return self.pool.k[0].device

    # ---- blocks --------------------------------------------------------------------------------------
    def blocks_for(self, tokens: int) -> int:
        return math.ceil(tokens / self.block_size)

    def _changed(self) -> None:
        self._shared["table"] = None

    def reserve(self, row: int, length: int) -> None:
        """Blocks for `length` tokens in `row`; the blocks to be written from lengths[row] on made private."""
        if length > self.max_len:
            raise CourseError(f"KV cache is full: row {row} needs {length} positions, max_len is {self.max_len}")
        table = self.tables[row]
        start = self.lengths[row]
        for i in range(start // self.block_size, min(len(table), self.blocks_for(length))):
            if self.pool.refcount[table[i]] > 1:  # copy-on-write: shared and about to be written
                new = self.pool.allocate()
                self.pool.copy_block(table[i], new)
                self.pool.release(table[i])
                table[i] = new
                self._changed()
        while len(table) < self.blocks_for(length):
            table.append(self.pool.allocate())
            self._changed()

    def table_tensor(self) -> torch.Tensor:
        """(batch, most blocks of any row) physical block ids; a shorter row is padded with block 0 (never read
        unmasked)."""
        if self._shared["table"] is None:
            width = max(1, max(len(t) for t in self.tables))
            self._shared["table"] = torch.tensor([t + [0] * (width - len(t)) for t in self.tables],
                                                 dtype=torch.long, device=self.device)
        return self._shared["table"]

    def slots(self, rows: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        """Flat pool slot of each (row, position): block * block_size + offset (any matching shapes)."""
        table = self.table_tensor()
        return table[rows, positions // self.block_size] * self.block_size + positions % self.block_size

    # ---- what the model asks ----------------------------------------------------------------------------
    def begin(self, T: int) -> CachePlan:
        rows = self.selected if self.selected is not None else list(range(self.batch))
        starts = [self.lengths[b] for b in rows]
        end = max(starts) + T
        if end > self.max_len:
            raise CourseError(f"KV cache is full: positions up to {end} requested, max_len is {self.max_len}; "
                              "use a shorter prompt or fewer new tokens")
        for b, s in zip(rows, starts):
            self.reserve(b, s + T)
        for b in rows:
            self.lengths[b] += T
        dev = self.device
        r = torch.tensor(rows, device=dev)[:, None]
        positions = torch.tensor(starts, device=dev)[:, None] + torch.arange(T, device=dev)  # (B, T)
        self._new_slots = self.slots(r.expand(-1, T), positions)
        self._key_slots = self.slots(r.expand(-1, end), torch.arange(end, device=dev).expand(len(rows), -1))
        if all(s == starts[0] for s in starts):
            mask = None
            if starts[0] > 0 and T > 1:
                mask = torch.ones(T, end, dtype=torch.bool, device=dev).tril(diagonal=starts[0])
            return CachePlan(starts[0], None, mask, end)
        mask = torch.arange(end, device=dev)[None, None, :] <= positions[:, :, None]  # (B, T, keys)
        return CachePlan(None, positions, mask.unsqueeze(1), end)

    def update(self, layer: int, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        if self._new_slots is None:
            raise CourseError("PagedCache.update before begin(): the model calls begin(T) once per forward")
        n = self.batch if self.selected is None else len(self.selected)
        if k.shape[0] != n or k.shape[1] != self.n_kv_heads or k.shape[3] != self.head_dim:
            raise CourseError(f"paged cache expects k of shape ({n}, {self.n_kv_heads}, T, {self.head_dim}), "
                              f"got {tuple(k.shape)}")
        kf, vf = self.pool.flat(layer)
        kf[self._new_slots] = k.transpose(1, 2)  # (B, T, kv_heads, head_dim) into their slots
        vf[self._new_slots] = v.transpose(1, 2)
        return kf[self._key_slots].transpose(1, 2), vf[self._key_slots].transpose(1, 2)  # (B, kv, keys, hd)

    # ---- token-wise access (project 12's packed forward) ------------------------------------------------
    def write_tokens(self, layer: int, rows: torch.Tensor, positions: torch.Tensor, k: torch.Tensor,
                     v: torch.Tensor) -> None:
        kf, vf = self.pool.flat(layer)
        s = self.slots(rows, positions)
        kf[s] = k
        vf[s] = v

    def read_tokens(self, layer: int, rows: torch.Tensor, positions: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        kf, vf = self.pool.flat(layer)
        s = self.slots(rows, positions)
        return kf[s], vf[s]

    # ---- what an engine asks -------------------------------------------------------------------------
    def rows(self, indices: list[int]) -> "PagedCache":
        indices = list(indices)
        if not indices or any(not 0 <= b < self.batch for b in indices) or len(set(indices)) != len(indices):
            raise CourseError(f"rows {indices} must be distinct rows of this cache (0 .. {self.batch - 1})")
        view = copy.copy(self)  # shares the pool, the tables, the lengths and the table tensor
        view.selected = None if indices == list(range(self.batch)) else indices
        view._new_slots = view._key_slots = None
        return view

    def free(self, row: int) -> None:
        for b in self.tables[row]:
            self.pool.release(b)
        self.tables[row] = []
        self.lengths[row] = 0
        self.claims[row] = 0
        self._changed()

    def reset(self) -> None:
        for row in range(self.batch):
            self.free(row)

    def crop(self, n: int, row: int | None = None) -> None:
        if n < 0:
            raise CourseError(f"crop length ({n}) must be >= 0")
        for b in range(self.batch) if row is None else [row]:
            self.lengths[b] = min(self.lengths[b], n)
            keep = self.blocks_for(self.lengths[b])
            for blk in self.tables[b][keep:]:
                self.pool.release(blk)
            del self.tables[b][keep:]
        self._changed()

    def fork(self, src: int, dst: int) -> None:
        """Row dst continues from row src's tokens, sharing its blocks (no copy until one of them writes)."""
        if self.tables[dst] or self.lengths[dst]:
            raise CourseError(f"fork into row {dst}: the row is in use; free it first")
        for b in self.tables[src]:
            self.pool.retain(b)
        self.tables[dst] = list(self.tables[src])
        self.lengths[dst] = self.lengths[src]
        self._changed()

    def claim(self, row: int, tokens: int) -> bool:
        """Reserve room for `tokens` tokens in `row` (a request's prompt + max_new_tokens) if the pool can give
        it, counting what the other rows have claimed and not yet taken; False changes nothing."""
        need = self.blocks_for(min(tokens, self.max_len))
        promised = sum(max(0, c - len(t)) for r, (c, t) in enumerate(zip(self.claims, self.tables)) if r != row)
        if self.pool.num_free - promised < need - len(self.tables[row]):
            return False
        self.claims[row] = need
        return True

    # ---- memory ----------------------------------------------------------------------------------------
    def usage(self) -> dict:
        """Blocks in use, the tokens they hold (a shared block counted once, at its fullest) and the waste:
        (allocated slots - filled slots) / allocated slots."""
        fill: dict[int, int] = {}
        for table, n in zip(self.tables, self.lengths):
            for i, b in enumerate(table):
                fill[b] = max(fill.get(b, 0), min(self.block_size, n - i * self.block_size))
        allocated = self.pool.num_used * self.block_size
        filled = sum(fill.values())
        return {"blocks": self.pool.num_used, "allocated_tokens": allocated, "filled_tokens": filled,
                "waste": (allocated - filled) / allocated if allocated else 0.0,
                "bytes": self.pool.num_used * self.pool.bytes_per_block()}

    @property
    def nbytes(self) -> int:
        return self.pool.nbytes

    def __repr__(self) -> str:
        return (f"PagedCache(layers={self.n_layers}, rows={self.batch}, blocks={self.pool.num_blocks} x "
                f"{self.block_size}, used={self.pool.num_used}, lengths={self.lengths})")
