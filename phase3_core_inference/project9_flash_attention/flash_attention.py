"""Tiled attention with an online softmax: FlashAttention's forward and FlashAttention-2's backward, as plain loops.

PAPERS
- Dao, Fu, Ermon, Rudra, Ré 2022, "FlashAttention: Fast and Memory-Efficient Exact Attention with IO-Awareness":
  attention computed tile by tile, so the T x T score matrix never exists; the softmax is made exact across
  tiles by the online normaliser; the backward recomputes the scores from q, k and the saved log-sum-exp
  instead of storing them.
- Dao 2023, "FlashAttention-2: Faster Attention with Better Parallelism and Work Partitioning": the loop order
  used here (queries outside, keys inside, the output rescaled once at the end; in backward, keys outside),
  the log-sum-exp as the one statistic saved per query, and causal tiles above the diagonal skipped.
- Milakov & Gimelshein 2018, "Online normalizer calculation for softmax" (online_softmax.py);
  Rabe & Staats 2021, "Self-attention does not need O(n^2) memory" (the same idea, chunks of keys).

INTUITION
softmax(q K^T) V for one query is a weighted average of the values. Averages can be built incrementally: keep,
per query, the best score so far m, the sum of weights l and the weighted sum of values acc; fold in one tile of
keys at a time; when a tile raises m, shrink what is already summed by exp(m_old - m_new). At the end acc / l is
exactly the softmax average. Memory: one (block_q x block_k) tile of scores at a time, never (T x T).

IMPLEMENTATION (shapes: q (B, H, Tq, D); k (B, Hkv, Tk, D); v (B, Hkv, Tk, Dv); H a multiple of Hkv)
- GQA: the H query heads are viewed as (Hkv, G): each key/value head serves its G query heads by broadcasting,
  never copied. Batch and heads are the leading dims of every tile operation: the loops run over tokens only.
- The mask: bool, True = attend, broadcastable to (B, H, Tq, Tk), like SDPA's attn_mask (a padding mask, the
  KV cache's masks). Causal = SDPA's is_causal: query i sees keys j <= i. Both may be given (they combine).
- A tile wholly above the causal diagonal is skipped; a tile wholly below it needs no mask.
- Lengths need not be multiples of the block sizes: the last tile is smaller.
- fp16/bf16 inputs are computed in fp32 (as the GPU kernels accumulate) and the output cast back.
- A query with no visible key gets output 0 and lse -inf, as SDPA gives a fully masked row.
WHY: memory linear in T instead of quadratic (benchmark.py measures it); on a GPU, also fewer bytes moved
between HBM and on-chip SRAM, which is where FlashAttention's speed comes from (triton_flash.py).
"""

from __future__ import annotations

import math

import torch

from course.errors import CourseError
from phase3_core_inference.project9_flash_attention.online_softmax import NEG_INF, finish, safe_max

__all__ = ["flash_attention", "flash_forward", "flash_backward", "FlashAttention", "check_inputs", "check_blocks", "grouped",
           "group_matmul", "group_matmul_t", "tile_mask"]


# ---- input checks: every bad input is one line --------------------------------------------------------------
def check_blocks(**blocks: int) -> None:
    """Each block size a positive int: `check_blocks(block_q=64, block_k=0)` raises for block_k."""
    for name, b in blocks.items():
        if not isinstance(b, int) or isinstance(b, bool) or b <= 0:
            raise CourseError(f"{name} ({b!r}) must be a positive int")


def check_inputs(q, k, v, mask=None, block_q: int = 64, block_k: int = 64, scale: float | None = None) -> None:
    """Raise CourseError naming what is wrong with the inputs of an attention call (SDPA's shapes, see above)."""
    for name, t in (("q", q), ("k", k), ("v", v)):
        if not isinstance(t, torch.Tensor) or t.dim() != 4:
            got = tuple(t.shape) if isinstance(t, torch.Tensor) else type(t).__name__
            raise CourseError(f"{name} must be a 4-D tensor (batch, heads, tokens, head_dim); got {got}")
    if len({q.dtype, k.dtype, v.dtype}) > 1:
        raise CourseError(f"q, k and v must have one dtype; got {q.dtype}, {k.dtype}, {v.dtype}")
    if not q.dtype.is_floating_point:
        raise CourseError(f"q, k and v must be floating point; got {q.dtype}")
    if len({q.device, k.device, v.device}) > 1:
        raise CourseError(f"q, k and v must be on one device; got {q.device}, {k.device}, {v.device}")
    if q.shape[-1] != k.shape[-1]:
        raise CourseError(f"head dims differ: q has {q.shape[-1]}, k has {k.shape[-1]}; q . k needs them equal")
    if k.shape[:3] != v.shape[:3]:
        raise CourseError(f"k {tuple(k.shape)} and v {tuple(v.shape)} must agree in batch, heads and tokens")
    if q.shape[0] != k.shape[0]:
        raise CourseError(f"batch sizes differ: q has {q.shape[0]}, k and v have {k.shape[0]}")
    if k.shape[1] == 0 or q.shape[1] % k.shape[1]:
        raise CourseError(f"q's {q.shape[1]} heads must be a multiple of k/v's {k.shape[1]} heads (GQA groups)")
    check_blocks(block_q=block_q, block_k=block_k)
    if scale is not None and not (isinstance(scale, (int, float)) and math.isfinite(scale)):
        raise CourseError(f"scale ({scale!r}) must be a finite number, or None for 1/sqrt(head_dim)")
    if mask is not None:
        full = (q.shape[0], q.shape[1], q.shape[2], k.shape[2])
        if not isinstance(mask, torch.Tensor) or mask.dtype != torch.bool:
            raise CourseError(f"mask must be a bool tensor (True = attend); got "
                              f"{mask.dtype if isinstance(mask, torch.Tensor) else type(mask).__name__}")
        if mask.dim() > 4 or any(m not in (1, f) for m, f in zip(mask.shape[::-1], full[::-1])):
            raise CourseError(f"mask of shape {tuple(mask.shape)} does not broadcast to (batch, heads, q tokens, "
                              f"k tokens) = {full}")
        if mask.device != q.device:
            raise CourseError(f"mask is on {mask.device} but q, k, v are on {q.device}")


# ---- shapes: GQA groups ------------------------------------------------------------------------------------
def grouped(q, k, v, mask):
    """q (B, H, Tq, D) -> (B, Hkv, G, Tq, D), the G query heads under their key/value head; k, v unchanged
    (B, Hkv, Tk, D); mask -> 5-D (B|1, Hkv|1, G|1, Tq|1, Tk|1) with the same head split."""
    B, H, Tq, D = q.shape
    Hkv = k.shape[1]
    qg = q.view(B, Hkv, H // Hkv, Tq, D)
    if mask is not None:
        mask = mask.view((1,) * (4 - mask.dim()) + tuple(mask.shape))
        mb, mh, mq, mk = mask.shape
        mask = mask.view(mb, Hkv, H // Hkv, mq, mk) if mh == H and H > 1 else mask.view(mb, 1, 1, mq, mk)
    return qg, k, v, mask


def group_matmul(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """a (B, Hkv, G, n, x) @ b (B, Hkv, x, y) -> (B, Hkv, G, n, y): the G query heads of a group as G x n rows of
    ONE product with their shared b (a broadcast matmul would first copy b G times)."""
    B, Hkv, G, n, x = a.shape
    return (a.reshape(B, Hkv, G * n, x) @ b).view(B, Hkv, G, n, b.shape[-1])


def group_matmul_t(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """a^T b summed over the group: a (B, Hkv, G, n, x), b (B, Hkv, G, n, y) -> (B, Hkv, x, y). The gradient of
    a key/value head collects all G query heads it served."""
    B, Hkv, G, n, x = a.shape
    return a.reshape(B, Hkv, G * n, x).transpose(-1, -2) @ b.reshape(B, Hkv, G * n, b.shape[-1])


def tile_mask(mask, causal: bool, q0: int, q1: int, k0: int, k1: int, device) -> torch.Tensor | None:
    """The visible (query, key) pairs of the tile [q0, q1) x [k0, k1), or None when all are visible."""
    visible = None
    if causal and k1 - 1 > q0:  # the tile crosses the diagonal (tiles wholly below it need no mask)
        rows = torch.arange(q0, q1, device=device)[:, None]
        visible = torch.arange(k0, k1, device=device)[None, :] <= rows
    if mask is not None:  # a broadcast dim (size 1) is kept whole, a full one is sliced to the tile
        m = mask[..., q0:q1, :] if mask.shape[-2] > 1 else mask
        m = m[..., k0:k1] if mask.shape[-1] > 1 else m
        visible = m if visible is None else visible & m
    return visible


def compute_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.float32 if dtype in (torch.float16, torch.bfloat16) else dtype


# ---- forward: FlashAttention-2, algorithm 1 ---------------------------------------------------------------
def flash_forward(q, k, v, mask=None, causal: bool = False, scale: float | None = None, block_q: int = 64,
                  block_k: int = 64) -> tuple[torch.Tensor, torch.Tensor]:
    """(output (B, H, Tq, Dv) in q's dtype, log-sum-exp (B, H, Tq) in fp32/fp64) by tiles; no autograd."""
    check_inputs(q, k, v, mask, block_q, block_k, scale)
    B, H, Tq, D = q.shape
    Tk, Dv, cd = k.shape[2], v.shape[-1], compute_dtype(q.dtype)
    scale = 1.0 / math.sqrt(D) if scale is None else scale
    qg, kg, vg, mask = grouped(q.to(cd), k.to(cd), v.to(cd), mask)
    lead = qg.shape[:3]  # (B, Hkv, G)
    out = torch.empty(*lead, Tq, Dv, dtype=cd, device=q.device)
    lse = torch.empty(*lead, Tq, dtype=cd, device=q.device)
    for q0 in range(0, Tq, block_q):
        q1 = min(q0 + block_q, Tq)
        qi = qg[..., q0:q1, :]
        m = torch.full((*lead, q1 - q0, 1), NEG_INF, dtype=cd, device=q.device)  # running max of the scores
        l = torch.zeros_like(m)                                                  # running sum of exp(s - m)
        acc = torch.zeros(*lead, q1 - q0, Dv, dtype=cd, device=q.device)         # running sum of exp(s - m) v
        for k0 in range(0, Tk, block_k):
            if causal and k0 > q1 - 1:  # this tile and every later one lie above the diagonal: nothing to see
                break
            k1 = min(k0 + block_k, Tk)
            s = group_matmul(qi, kg[:, :, k0:k1].transpose(-1, -2)) * scale    # (B, Hkv, G, bq, bk)
            visible = tile_mask(mask, causal, q0, q1, k0, k1, q.device)
            if visible is not None:
                s = s.masked_fill(~visible, NEG_INF)
            m_new = torch.maximum(m, s.amax(-1, keepdim=True))
            ref = safe_max(m_new)                # rows that have seen nothing visible yet subtract 0, not -inf
            p = torch.exp(s - ref)
            alpha = torch.exp(m - ref)           # how much the old max overstated: rescale what is summed
            l = alpha * l + p.sum(-1, keepdim=True)
            acc = alpha * acc + group_matmul(p, vg[:, :, k0:k1])
            m = m_new
        out[..., q0:q1, :], lse[..., q0:q1] = finish(m, l, acc)  # divide once, at the end (FlashAttention-2)
    return out.view(B, H, Tq, Dv).to(q.dtype), lse.view(B, H, Tq)


# ---- backward: FlashAttention-2, algorithm 2 (recompute the scores from q, k and the log-sum-exp) -----------
def flash_backward(q, k, v, out, lse, grad_out, mask=None, causal: bool = False, scale: float | None = None,
                   block_q: int = 64, block_k: int = 64) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(dq, dk, dv) of `flash_forward`'s output, given dL/dout. The probabilities of a tile are recomputed:
    P = exp(q k^T * scale - lse), exact because lse is the row's full log-sum-exp. With dP = dO V^T and
    D = rowsum(dO * O) (= rowsum(P * dP)), the softmax's backward is dS = P * (dP - D); then dQ = dS K, dK = dS^T Q,
    dV = P^T dO (times scale for dQ, dK). GQA: a key/value head's gradient sums over its G query heads."""
    B, H, Tq, D = q.shape
    Hkv, Tk, Dv, cd = k.shape[1], k.shape[2], v.shape[-1], compute_dtype(q.dtype)
    G = H // Hkv
    scale = 1.0 / math.sqrt(D) if scale is None else scale
    qg, kg, vg, mask = grouped(q.to(cd), k.to(cd), v.to(cd), mask)
    do = grad_out.to(cd).reshape(B, Hkv, G, Tq, Dv)
    og = out.to(cd).reshape(B, Hkv, G, Tq, Dv)
    lse = safe_max(lse.to(cd).reshape(B, Hkv, G, Tq, 1))  # fully masked rows: every p is exp(-inf - 0) = 0
    Drow = (do * og).sum(-1, keepdim=True)                  # (B, Hkv, G, Tq, 1)
    dq = torch.zeros_like(qg)
    dk = torch.zeros(B, Hkv, Tk, D, dtype=cd, device=q.device)
    dv = torch.zeros(B, Hkv, Tk, Dv, dtype=cd, device=q.device)
    for k0 in range(0, Tk, block_k):  # keys outside: dK, dV of a tile are summed in registers, written once
        k1 = min(k0 + block_k, Tk)
        kj, vj = kg[:, :, k0:k1], vg[:, :, k0:k1]
        first = (k0 // block_q) * block_q if causal else 0  # query tiles before the diagonal see none of these keys
        for q0 in range(first, Tq, block_q):
            q1 = min(q0 + block_q, Tq)
            qi, doi = qg[..., q0:q1, :], do[..., q0:q1, :]
            s = group_matmul(qi, kj.transpose(-1, -2)) * scale
            visible = tile_mask(mask, causal, q0, q1, k0, k1, q.device)
            if visible is not None:
                s = s.masked_fill(~visible, NEG_INF)
            p = torch.exp(s - lse[..., q0:q1, :])                 # the forward's probabilities, recomputed
            dv[:, :, k0:k1] += group_matmul_t(p, doi)             # summed over the G query heads of the group
            dp = group_matmul(doi, vj.transpose(-1, -2))
            ds = p * (dp - Drow[..., q0:q1, :])
            dq[..., q0:q1, :] += group_matmul(ds, kj) * scale
            dk[:, :, k0:k1] += group_matmul_t(ds, qi) * scale
    return dq.view(B, H, Tq, D).to(q.dtype), dk.to(k.dtype), dv.to(v.dtype)


class FlashAttention(torch.autograd.Function):
    """Autograd for the tiled attention: forward saves q, k, v, the output and the log-sum-exp (O(T) extra),
    not the (T x T) probabilities; backward recomputes them tile by tile (flash_backward)."""

    @staticmethod
    def forward(ctx, q, k, v, mask, causal, scale, block_q, block_k):
        out, lse = flash_forward(q, k, v, mask, causal, scale, block_q, block_k)
        ctx.save_for_backward(q, k, v, out, lse)
        ctx.args = (mask, causal, scale, block_q, block_k)
        return out

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad_out):
        q, k, v, out, lse = ctx.saved_tensors
        dq, dk, dv = flash_backward(q, k, v, out, lse, grad_out, *ctx.args)
        return dq, dk, dv, None, None, None, None, None


def flash_attention(q, k, v, mask=None, causal: bool = False, scale: float | None = None, block_q: int = 64,
                    block_k: int = 64) -> torch.Tensor:
    """softmax(q k^T * scale [masked]) v by tiles, differentiable: q (B, H, Tq, D), k (B, Hkv, Tk, D), v (B, Hkv,
    Tk, Dv) -> (B, H, Tq, Dv). mask: bool, True = attend, broadcastable to (B, H, Tq, Tk); causal: key j <= query i."""
    check_inputs(q, k, v, mask, block_q, block_k, scale)
    return FlashAttention.apply(q, k, v, mask, bool(causal), scale, block_q, block_k)
