"""The online softmax: a softmax computed in one pass over chunks, and partial results merged by log-sum-exp.

PAPERS
- Milakov & Gimelshein 2018, "Online normalizer calculation for softmax": the running maximum and the running
  sum of exponentials can be updated together, chunk by chunk; when the maximum grows, the sum so far is
  rescaled by exp(old max - new max). One pass instead of two (max, then sum), and no chunk is read twice.
- Rabe & Staats 2021, "Self-attention does not need O(n^2) memory": the same trick applied to attention's
  weighted sum of values: keep (max, sum, unnormalised output) per query and fold in one chunk of keys at a time.
- Dao et al. 2022, "FlashAttention": the tiled attention kernel built on it (flash_attention.py).

INTUITION
softmax(x)_i = exp(x_i - m) / sum_j exp(x_j - m) for ANY constant m; m = max(x) only keeps exp() from
overflowing. So a chunk can be exponentiated against the largest value seen SO FAR; when a later chunk brings a
larger value, everything accumulated against the old maximum is multiplied by exp(m_old - m_new), which is
exactly what it would have been against the new one. The pair (m, l = sum exp(x - m)) summarises any set of
scores; log-sum-exp, m + log l, summarises it in one number, and two summaries merge without the scores.

THE STATE OF A SET OF KEYS, for one query:  m (max score), l (sum of exp(score - m)), o (sum of exp(score - m) v)
    merge(A, B):  m = max(m_A, m_B);  l = l_A e^(m_A - m) + l_B e^(m_B - m);  o = o_A e^(m_A - m) + o_B e^(m_B - m)
    result:       attention output = o / l;  log-sum-exp of the scores = m + log l
A set with no visible key has m = -inf, l = 0, o = 0: the merge must treat exp(-inf - (-inf)) as 0, not nan.
"""

from __future__ import annotations

import torch

NEG_INF = float("-inf")


def safe_max(m: torch.Tensor) -> torch.Tensor:
    """m with -inf replaced by 0: the reference point to subtract when a row has seen no visible score yet, so
    exp(-inf - 0) = 0 instead of exp(-inf - (-inf)) = nan."""
    return torch.where(torch.isinf(m) & (m < 0), torch.zeros_like(m), m)


def softmax_two_pass(x: torch.Tensor, chunk: int) -> torch.Tensor:
    """The safe softmax as usually written, over the last dim, read in chunks: pass 1 the maximum, pass 2 the sum
    of exponentials, then the normalised values (a third read). The baseline the online version improves on."""
    chunks = x.split(chunk, dim=-1)
    m = torch.stack([c.amax(-1) for c in chunks], -1).amax(-1, keepdim=True)  # pass 1
    l = sum(torch.exp(c - m).sum(-1, keepdim=True) for c in chunks)           # pass 2
    return torch.cat([torch.exp(c - m) / l for c in chunks], -1)


def online_normalizer(x: torch.Tensor, chunk: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(m, l) of the last dim in ONE pass over chunks (Milakov & Gimelshein, algorithm 3, chunk by chunk):
    m = max(x), l = sum(exp(x - m)), each chunk read once."""
    m = torch.full(x.shape[:-1] + (1,), NEG_INF, dtype=x.dtype, device=x.device)
    l = torch.zeros_like(m)
    for c in x.split(chunk, dim=-1):
        m_new = torch.maximum(m, c.amax(-1, keepdim=True))
        ref = safe_max(m_new)
        l = l * torch.exp(m - ref) + torch.exp(c - ref).sum(-1, keepdim=True)  # rescale the old sum, add the new
        m = m_new
    return m, l


def online_softmax(x: torch.Tensor, chunk: int) -> torch.Tensor:
    """softmax over the last dim from the one-pass normaliser: exp(x - m) / l."""
    m, l = online_normalizer(x, chunk)
    return torch.exp(x - safe_max(m)) / l


def partial_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float,
                      visible: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The state (m, l, o) of one chunk of keys for every query: q (..., Tq, D), k, v (..., Tk, D) ->
    m, l (..., Tq, 1), o (..., Tq, D), unnormalised. `visible` (bool, broadcastable to (..., Tq, Tk)) hides keys."""
    s = (q @ k.transpose(-1, -2)) * scale
    if visible is not None:
        s = s.masked_fill(~visible, NEG_INF)
    m = s.amax(-1, keepdim=True)
    p = torch.exp(s - safe_max(m))
    return m, p.sum(-1, keepdim=True), p @ v


def merge(a: tuple[torch.Tensor, torch.Tensor, torch.Tensor],
          b: tuple[torch.Tensor, torch.Tensor, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The state of the union of two disjoint sets of keys, from their states (m, l, o): see the module docstring."""
    (m_a, l_a, o_a), (m_b, l_b, o_b) = a, b
    m = torch.maximum(m_a, m_b)
    ref = safe_max(m)
    wa, wb = torch.exp(m_a - ref), torch.exp(m_b - ref)
    return m, l_a * wa + l_b * wb, o_a * wa + o_b * wb


def finish(m: torch.Tensor, l: torch.Tensor, o: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(attention output o / l, log-sum-exp m + log l) of a state; a query that saw no key gets output 0 (as
    PyTorch's SDPA gives a fully masked row) and log-sum-exp -inf."""
    empty = l == 0
    out = o / torch.where(empty, torch.ones_like(l), l)
    lse = torch.where(empty, torch.full_like(m, NEG_INF), m + torch.log(torch.where(empty, torch.ones_like(l), l)))
    return out, lse.squeeze(-1)


def combine_by_lse(outs: list[torch.Tensor], lses: list[torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
    """Merge NORMALISED partial outputs: o_c (..., D) with their log-sum-exps lse_c (...) -> (o, lse).

    PAPER: Flash-Decoding (Dao, Haziza, Massa, Sizov 2023), the reduction step. A chunk's normalised output and
    its lse are all that is needed: o = sum_c exp(lse_c - lse) o_c with lse = logsumexp_c(lse_c). Chunks with
    no visible key (lse -inf) weigh 0; if every chunk is empty the output is 0 and lse -inf."""
    lse_all = torch.stack(lses, 0)                     # (C, ...)
    lse = torch.logsumexp(lse_all, 0)                  # -inf only where every chunk is empty
    w = torch.exp(lse_all - safe_max(lse))             # (C, ...): exp(-inf) = 0 for empty chunks
    out = (w.unsqueeze(-1) * torch.stack(outs, 0)).sum(0)
    return out, lse
