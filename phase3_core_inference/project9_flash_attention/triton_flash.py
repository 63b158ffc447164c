"""FlashAttention-2 as Triton kernels for GPUs: the forward, and the backward by recomputation.

PAPERS
- Dao et al. 2022 (FlashAttention) and Dao 2023 (FlashAttention-2): flash_attention.py's algorithm, now where
  it pays: each program keeps its query tile, its running (m, l, acc) and one key/value tile in on-chip SRAM and
  registers; the (T x T) scores never reach the GPU's main memory (HBM), so the bytes moved drop from O(T^2)
  to O(T^2 d^2 / SRAM size) per head, and the matrix products run on the tensor cores.
- Tillet, Kung, Cox 2019, "Triton: An Intermediate Language and Compiler for Tiled Neural Network Computations":
  a kernel is written per tile (`tl.load` a block, `tl.dot`, `tl.store`); the compiler maps it onto threads.
  The kernels follow the structure of Triton's fused-attention tutorial (after Dao's FlashAttention-2).

IMPLEMENTATION
- `_fwd_kernel`: one program per (query block, batch x head). It loops over key blocks up to the diagonal
  (causal) or to the end, in exp2 (exp(x) = 2^(x log2 e): the GPU's native instruction), and writes the output
  and the log-sum-exp (natural log, fp32) that the backward needs.
- `_bwd_dkdv_kernel`: one program per (key block, batch x key/value head): loops over the G query heads of its
  group and every query block that sees the keys, recomputing P = exp(S - lse); accumulates dK, dV on chip.
  `_bwd_dq_kernel`: one program per (query block, batch x head): dQ = sum over key blocks of dS K. Two kernels
  instead of atomics: each output is written by exactly one program.
- GQA: the program of query head h reads key/value head h // G. Lengths need not be multiples of the blocks
  (loads past the end are masked, scores there are -inf). Causal is SDPA's (key j <= query i).
- fp16/bf16 (and fp32, whose products use IEEE fp32, not TF32) in, fp32 accumulation, the inputs' dtype out.
- Not here: a bool mask (use flash_attention.py), dropout, head dims that are not a power of two in 16..256.
CPU: under Triton's interpreter (TRITON_INTERPRET=1 set before triton is imported) the same kernels run on CPU
tensors, slowly, with numpy: test_triton_flash.py checks them so on small shapes.
"""

from __future__ import annotations

import math
import os

import torch
import triton
import triton.language as tl

from course.errors import CourseError
from phase3_core_inference.project9_flash_attention.flash_attention import check_blocks, check_inputs

LOG2E = 1.4426950408889634
INTERPRETED = os.environ.get("TRITON_INTERPRET") == "1"  # what triton.jit read when this module was imported


@triton.jit
def _fwd_kernel(Q, K, V, O, LSE, sm_scale, sqb, sqh, sqt, skb, skh, skt, svb, svh, svt, sob, soh, sot,
                H, G, Tq, Tk, CAUSAL: tl.constexpr, PREC: tl.constexpr, BLOCK_M: tl.constexpr,
                BLOCK_N: tl.constexpr, D: tl.constexpr):
    start_m = tl.program_id(0)
    bh = tl.program_id(1)
    b, h = bh // H, bh % H
    hk = h // G  # the key/value head of this query head's group
    rows = start_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, D)
    q = tl.load(Q + b * sqb + h * sqh + rows[:, None] * sqt + offs_d[None, :], mask=rows[:, None] < Tq, other=0.0)
    m_i = tl.full([BLOCK_M], float("-inf"), tl.float32)
    l_i = tl.zeros([BLOCK_M], tl.float32)
    acc = tl.zeros([BLOCK_M, D], tl.float32)
    qk_scale = sm_scale * 1.4426950408889634  # scores in log2 units: exp(x) = exp2(x * log2 e)
    hi = Tk
    if CAUSAL:  # key blocks wholly above the diagonal are never loaded
        hi = tl.minimum(Tk, (start_m + 1) * BLOCK_M)
    for start_n in range(0, hi, BLOCK_N):
        cols = start_n + tl.arange(0, BLOCK_N)
        kt = tl.load(K + b * skb + hk * skh + cols[None, :] * skt + offs_d[:, None], mask=cols[None, :] < Tk,
                     other=0.0)  # (D, BLOCK_N): k transposed by the addressing, no copy
        s = tl.dot(q, kt, input_precision=PREC) * qk_scale
        valid = cols[None, :] < Tk
        if CAUSAL:
            valid = valid & (cols[None, :] <= rows[:, None])
        s = tl.where(valid, s, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(s, 1))
        ref = tl.where(m_new == float("-inf"), 0.0, m_new)  # a row with nothing visible yet: subtract 0
        p = tl.math.exp2(s - ref[:, None])
        alpha = tl.math.exp2(m_i - ref)
        l_i = l_i * alpha + tl.sum(p, 1)
        v = tl.load(V + b * svb + hk * svh + cols[:, None] * svt + offs_d[None, :], mask=cols[:, None] < Tk,
                    other=0.0)
        acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v, input_precision=PREC)
        m_i = m_new
    l_safe = tl.where(l_i == 0.0, 1.0, l_i)
    acc = acc / l_safe[:, None]
    lse = tl.where(l_i == 0.0, float("-inf"), (m_i + tl.math.log2(l_safe)) / 1.4426950408889634)
    tl.store(O + b * sob + h * soh + rows[:, None] * sot + offs_d[None, :], acc.to(O.dtype.element_ty),
             mask=rows[:, None] < Tq)
    tl.store(LSE + bh * Tq + rows, lse, mask=rows < Tq)


@triton.jit
def _bwd_dkdv_kernel(Q, K, V, DO, LSE, DELTA, DK, DV, sm_scale, sqb, sqh, sqt, skb, skh, skt, H, Hkv, G, Tq, Tk,
                     CAUSAL: tl.constexpr, PREC: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
                     D: tl.constexpr):
    start_n = tl.program_id(0)
    bhk = tl.program_id(1)
    b, hk = bhk // Hkv, bhk % Hkv
    cols = start_n * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, D)
    kv_off = b * skb + hk * skh + cols[:, None] * skt + offs_d[None, :]
    k = tl.load(K + kv_off, mask=cols[:, None] < Tk, other=0.0)
    v = tl.load(V + kv_off, mask=cols[:, None] < Tk, other=0.0)
    dk = tl.zeros([BLOCK_N, D], tl.float32)
    dv = tl.zeros([BLOCK_N, D], tl.float32)
    lo = 0
    if CAUSAL:  # query blocks before this key block see none of its keys
        lo = (start_n * BLOCK_N // BLOCK_M) * BLOCK_M
    for g in range(0, G):
        h = hk * G + g
        for start_m in range(lo, Tq, BLOCK_M):
            rows = start_m + tl.arange(0, BLOCK_M)
            q_off = b * sqb + h * sqh + rows[:, None] * sqt + offs_d[None, :]
            q = tl.load(Q + q_off, mask=rows[:, None] < Tq, other=0.0)
            do = tl.load(DO + q_off, mask=rows[:, None] < Tq, other=0.0)
            lse = tl.load(LSE + (b * H + h) * Tq + rows, mask=rows < Tq, other=0.0)
            lse = tl.where(lse == float("-inf"), 0.0, lse)
            delta = tl.load(DELTA + (b * H + h) * Tq + rows, mask=rows < Tq, other=0.0)
            s = tl.dot(q, tl.trans(k), input_precision=PREC) * sm_scale  # (BLOCK_M, BLOCK_N)
            valid = (rows[:, None] < Tq) & (cols[None, :] < Tk)
            if CAUSAL:
                valid = valid & (cols[None, :] <= rows[:, None])
            p = tl.where(valid, tl.exp(s - lse[:, None]), 0.0)  # the forward's probabilities, recomputed
            dv += tl.dot(tl.trans(p.to(do.dtype)), do, input_precision=PREC)
            dp = tl.dot(do, tl.trans(v), input_precision=PREC)
            ds = p * (dp - delta[:, None])
            dk += tl.dot(tl.trans(ds.to(q.dtype)), q, input_precision=PREC) * sm_scale
    tl.store(DK + kv_off, dk.to(DK.dtype.element_ty), mask=cols[:, None] < Tk)
    tl.store(DV + kv_off, dv.to(DV.dtype.element_ty), mask=cols[:, None] < Tk)


@triton.jit
def _bwd_dq_kernel(Q, K, V, DO, LSE, DELTA, DQ, sm_scale, sqb, sqh, sqt, skb, skh, skt, H, G, Tq, Tk,
                   CAUSAL: tl.constexpr, PREC: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
                   D: tl.constexpr):
    start_m = tl.program_id(0)
    bh = tl.program_id(1)
    b, h = bh // H, bh % H
    hk = h // G
    rows = start_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, D)
    q_off = b * sqb + h * sqh + rows[:, None] * sqt + offs_d[None, :]
    q = tl.load(Q + q_off, mask=rows[:, None] < Tq, other=0.0)
    do = tl.load(DO + q_off, mask=rows[:, None] < Tq, other=0.0)
    lse = tl.load(LSE + bh * Tq + rows, mask=rows < Tq, other=0.0)
    lse = tl.where(lse == float("-inf"), 0.0, lse)
    delta = tl.load(DELTA + bh * Tq + rows, mask=rows < Tq, other=0.0)
    dq = tl.zeros([BLOCK_M, D], tl.float32)
    hi = Tk
    if CAUSAL:
        hi = tl.minimum(Tk, (start_m + 1) * BLOCK_M)
    for start_n in range(0, hi, BLOCK_N):
        cols = start_n + tl.arange(0, BLOCK_N)
        kv_off = b * skb + hk * skh + cols[:, None] * skt + offs_d[None, :]
        k = tl.load(K + kv_off, mask=cols[:, None] < Tk, other=0.0)
        v = tl.load(V + kv_off, mask=cols[:, None] < Tk, other=0.0)
        s = tl.dot(q, tl.trans(k), input_precision=PREC) * sm_scale
        valid = (rows[:, None] < Tq) & (cols[None, :] < Tk)
        if CAUSAL:
            valid = valid & (cols[None, :] <= rows[:, None])
        p = tl.where(valid, tl.exp(s - lse[:, None]), 0.0)
        dp = tl.dot(do, tl.trans(v), input_precision=PREC)
        ds = p * (dp - delta[:, None])
        dq += tl.dot(ds.to(k.dtype), k, input_precision=PREC) * sm_scale
    tl.store(DQ + q_off, dq.to(DQ.dtype.element_ty), mask=rows[:, None] < Tq)


def _precision(q: torch.Tensor) -> str:
    """tl.dot's input precision: fp32 products in IEEE fp32 (the default, TF32, keeps 10 mantissa bits only)."""
    return "ieee" if q.dtype == torch.float32 else "tf32"


def check_triton_inputs(q, k, v, causal, block_m: int, block_n: int, mask=None) -> None:
    """What the kernels take, beyond flash_attention's checks: a device they run on, a power-of-two head dim."""
    check_inputs(q, k, v, mask)
    check_blocks(block_m=block_m, block_n=block_n)
    if mask is not None:
        raise CourseError("the Triton kernel takes causal=True/False, not a bool mask; use flash_attention.py")
    if q.device.type != "cuda" and not INTERPRETED:
        raise CourseError(f"the Triton kernel runs on CUDA tensors (got {q.device}); on a CPU set TRITON_INTERPRET=1 "
                          "before importing triton to run it in Triton's interpreter")
    D = q.shape[-1]
    if v.shape[-1] != D or D < 16 or D > 256 or D & (D - 1):
        raise CourseError(f"the Triton kernel needs q, k, v of one head dim, a power of two in 16..256; got "
                          f"{D} and {v.shape[-1]}")
    for name, b in (("block_m", block_m), ("block_n", block_n)):
        if b < 16 or b & (b - 1):
            raise CourseError(f"{name} ({b}) must be a power of two >= 16 (tl.dot's smallest tile)")


def triton_forward(q, k, v, causal: bool = False, scale: float | None = None, block_m: int = 64,
                   block_n: int = 64) -> tuple[torch.Tensor, torch.Tensor]:
    """(output (B, H, Tq, D) in q's dtype, lse (B, H, Tq) fp32), no autograd."""
    check_triton_inputs(q, k, v, causal, block_m, block_n)
    q, k, v = q.contiguous(), k.contiguous(), v.contiguous()
    B, H, Tq, D = q.shape
    Hkv, Tk = k.shape[1], k.shape[2]
    scale = 1.0 / math.sqrt(D) if scale is None else float(scale)
    out = torch.empty_like(q)
    lse = torch.empty(B, H, Tq, dtype=torch.float32, device=q.device)
    grid = (triton.cdiv(Tq, block_m), B * H)
    _fwd_kernel[grid](q, k, v, out, lse, scale, *q.stride()[:3], *k.stride()[:3], *v.stride()[:3],
                      *out.stride()[:3], H, H // Hkv, Tq, Tk, CAUSAL=bool(causal), PREC=_precision(q),
                      BLOCK_M=block_m, BLOCK_N=block_n, D=D)
    return out, lse


def triton_backward(q, k, v, out, lse, grad_out, causal: bool, scale: float | None, block_m: int, block_n: int):
    """(dq, dk, dv): delta = rowsum(dO * O) in PyTorch, then the two kernels."""
    q, k, v, grad_out = q.contiguous(), k.contiguous(), v.contiguous(), grad_out.contiguous()
    B, H, Tq, D = q.shape
    Hkv, Tk = k.shape[1], k.shape[2]
    scale = 1.0 / math.sqrt(D) if scale is None else float(scale)
    delta = (out.float() * grad_out.float()).sum(-1).contiguous()
    dq, dk, dv = torch.empty_like(q), torch.empty_like(k), torch.empty_like(v)
    _bwd_dkdv_kernel[(triton.cdiv(Tk, block_n), B * Hkv)](
        q, k, v, grad_out, lse, delta, dk, dv, scale, *q.stride()[:3], *k.stride()[:3], H, Hkv, H // Hkv, Tq, Tk,
        CAUSAL=bool(causal), PREC=_precision(q), BLOCK_M=block_m, BLOCK_N=block_n, D=D)
    _bwd_dq_kernel[(triton.cdiv(Tq, block_m), B * H)](
        q, k, v, grad_out, lse, delta, dq, scale, *q.stride()[:3], *k.stride()[:3], H, H // Hkv, Tq, Tk,
        CAUSAL=bool(causal), PREC=_precision(q), BLOCK_M=block_m, BLOCK_N=block_n, D=D)
    return dq, dk, dv


class TritonFlashAttention(torch.autograd.Function):
    @staticmethod
    def forward(ctx, q, k, v, causal, scale, block_m, block_n):
        out, lse = triton_forward(q, k, v, causal, scale, block_m, block_n)
        ctx.save_for_backward(q, k, v, out, lse)
        ctx.args = (causal, scale, block_m, block_n)
        return out

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad_out):
        q, k, v, out, lse = ctx.saved_tensors
        dq, dk, dv = triton_backward(q, k, v, out, lse, grad_out, *ctx.args)
        return dq, dk, dv, None, None, None, None


def triton_flash_attention(q, k, v, causal: bool = False, scale: float | None = None, block_m: int = 64,
                           block_n: int = 64) -> torch.Tensor:
    """flash_attention.flash_attention's contract (without a mask) on the GPU: q (B, H, Tq, D), k, v (B, Hkv, Tk,
    D) -> (B, H, Tq, D), differentiable."""
    check_triton_inputs(q, k, v, causal, block_m, block_n)
    return TritonFlashAttention.apply(q, k, v, bool(causal), scale, block_m, block_n)
