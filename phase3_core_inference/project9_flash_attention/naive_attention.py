"""Attention as the formula reads: softmax(Q K^T / sqrt(d)) V, with the whole (T x T) score matrix in memory.

PAPER: Vaswani et al. 2017, "Attention Is All You Need", equation 1. The baseline flash attention is measured
against (benchmark.py): the scores, the masked scores and the probabilities are each a (B, H, Tq, Tk) tensor,
so the memory of one call grows with the square of the length (1 GiB per head per such tensor at 16K tokens
in fp32). Same contract as flash_attention.flash_attention (GQA, bool mask, causal = key j <= query i).
"""

from __future__ import annotations

import math

import torch

from phase3_core_inference.project9_flash_attention.flash_attention import check_inputs


def naive_attention(q, k, v, mask=None, causal: bool = False, scale: float | None = None) -> torch.Tensor:
    """q (B, H, Tq, D), k, v (B, Hkv, Tk, D) -> (B, H, Tq, Dv), materialising every score."""
    check_inputs(q, k, v, mask, scale=scale)
    G = q.shape[1] // k.shape[1]
    if G > 1:  # each key/value head serves G query heads (copied here: the naive way)
        k, v = k.repeat_interleave(G, 1), v.repeat_interleave(G, 1)
    scale = 1.0 / math.sqrt(q.shape[-1]) if scale is None else scale
    s = (q @ k.transpose(-1, -2)) * scale                                    # (B, H, Tq, Tk)
    if causal:
        s = s.masked_fill(torch.ones(s.shape[-2:], dtype=torch.bool, device=q.device).triu(1), float("-inf"))
    if mask is not None:
        s = s.masked_fill(~mask, float("-inf"))
    return torch.softmax(s, dim=-1).nan_to_num(0.0) @ v                      # a row with no visible key: 0
