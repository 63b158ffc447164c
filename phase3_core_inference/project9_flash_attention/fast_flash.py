"""The fast path (opt-in, forward only): flash_attention.py's loops with each tile's update compiled by torch.compile.

PAPERS: Dao et al. 2022 (FlashAttention) and Dao 2023 (FlashAttention-2): the algorithm is flash_attention.py's,
unchanged; only where the arithmetic of one tile runs changes.

INTUITION
Eager, one tile's update is about ten PyTorch operations (scores, mask, row max, exp, row sum, two rescales, the
product with V, ...), and each reads and writes the whole (block_q x block_k) tile in memory: the tile is built
to stay in cache, but every operation streams it once more. Compiled, inductor fuses everything between the two
matrix products into one C++ loop over the tile (the products stay MKL's): the tile is read about three times
instead of ten, and a tile costs one Python call.

IMPLEMENTATION
- `_update` / `_update_masked`: the body of flash_forward's inner loop, as a function of the tile and the
  running state (m, l, acc); compiled once per tile shape (dynamo marks a size dynamic once it changes: an
  edge tile adds a version, not one per length), fullgraph: a graph break is an error, not a slow path.
- The loops, the causal skipping and the tile masks are flash_attention.py's (`tile_mask`, `grouped`): same
  tiles, same order, so the output equals the teaching path's up to the fused arithmetic (~1e-7, tested).
- Blocks of 256: fewer Python calls per token than the teaching path's 64; the tile (heads x 256 x 256 fp32 per
  score matrix) still fits the L2 cache of one core for a few heads. benchmark.py measured 128 and 256.
- Forward only, under no autograd: training uses the teaching path's autograd.Function (flash_attention.py).
- Nothing global is changed; the caller's tensors are only read.
"""

from __future__ import annotations

import math

import torch

from course.errors import CourseError
from phase3_core_inference.project8_kv_cache.fast_decode import compile_works
from phase3_core_inference.project9_flash_attention.flash_attention import (check_blocks, check_inputs, compute_dtype,
                                                                            group_matmul, grouped, tile_mask)
from phase3_core_inference.project9_flash_attention.online_softmax import NEG_INF, finish, safe_max

BLOCK = 256


def _update(qi, kj, vj, m, l, acc, scale: float):
    """One tile with every pair visible: the online-softmax update of (m, l, acc)."""
    s = group_matmul(qi, kj.transpose(-1, -2)) * scale
    m_new = torch.maximum(m, s.amax(-1, keepdim=True))
    ref = safe_max(m_new)
    p = torch.exp(s - ref)
    alpha = torch.exp(m - ref)
    return m_new, alpha * l + p.sum(-1, keepdim=True), alpha * acc + group_matmul(p, vj)


def _update_masked(qi, kj, vj, m, l, acc, scale: float, visible):
    """One tile where `visible` (bool, broadcastable to the scores) hides some pairs."""
    s = (group_matmul(qi, kj.transpose(-1, -2)) * scale).masked_fill(~visible, NEG_INF)
    m_new = torch.maximum(m, s.amax(-1, keepdim=True))
    ref = safe_max(m_new)
    p = torch.exp(s - ref)
    alpha = torch.exp(m - ref)
    return m_new, alpha * l + p.sum(-1, keepdim=True), alpha * acc + group_matmul(p, vj)


class CompiledFlashAttention:
    """`attn(q, k, v, mask=None, causal=False, scale=None) -> out`, flash_forward's result with compiled tiles.

    Same shapes and contract as flash_attention.flash_attention (GQA, any lengths, bool mask, causal), forward
    only. Raises CourseError where torch.compile cannot build CPU kernels (no C++ compiler)."""

    def __init__(self, block_q: int = BLOCK, block_k: int = BLOCK):
        check_blocks(block_q=block_q, block_k=block_k)
        if not compile_works():
            raise CourseError("torch.compile cannot build CPU kernels on this machine (it needs a C++ compiler); "
                              "use flash_attention.flash_attention, the eager path")
        self.block_q, self.block_k = block_q, block_k
        self.update = torch.compile(_update, fullgraph=True)
        self.update_masked = torch.compile(_update_masked, fullgraph=True)

    def __call__(self, q, k, v, mask=None, causal: bool = False, scale: float | None = None) -> torch.Tensor:
        check_inputs(q, k, v, mask, self.block_q, self.block_k, scale)
        if torch.is_grad_enabled() and any(t.requires_grad for t in (q, k, v)):
            raise CourseError("the compiled flash attention is forward-only; train with flash_attention.flash_attention "
                              "(its autograd backward), or call this under torch.no_grad()")
        with torch.no_grad():
            return self._forward(q, k, v, mask, causal, scale)

    def _forward(self, q, k, v, mask, causal, scale):
        B, H, Tq, D = q.shape
        Tk, Dv, cd = k.shape[2], v.shape[-1], compute_dtype(q.dtype)
        scale = 1.0 / math.sqrt(D) if scale is None else float(scale)
        qg, kg, vg, mask = grouped(q.to(cd), k.to(cd), v.to(cd), mask)
        lead = qg.shape[:3]
        out = torch.empty(*lead, Tq, Dv, dtype=cd, device=q.device)
        bq, bk = self.block_q, self.block_k
        for q0 in range(0, Tq, bq):
            q1 = min(q0 + bq, Tq)
            qi = qg[..., q0:q1, :]
            m = torch.full((*lead, q1 - q0, 1), NEG_INF, dtype=cd, device=q.device)
            l = torch.zeros_like(m)
            acc = torch.zeros(*lead, q1 - q0, Dv, dtype=cd, device=q.device)
            for k0 in range(0, Tk, bk):
                if causal and k0 > q1 - 1:
                    break
                k1 = min(k0 + bk, Tk)
                kj, vj = kg[:, :, k0:k1], vg[:, :, k0:k1]
                visible = tile_mask(mask, causal, q0, q1, k0, k1, q.device)
                if visible is None:
                    m, l, acc = self.update(qi, kj, vj, m, l, acc, scale)
                else:
                    m, l, acc = self.update_masked(qi, kj, vj, m, l, acc, scale, visible)
            out[..., q0:q1, :] = finish(m, l, acc)[0]
        return out.view(B, H, Tq, Dv).to(q.dtype)
