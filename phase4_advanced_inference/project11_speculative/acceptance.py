"""The verification rule of speculative decoding: which drafted tokens the target keeps, and what comes next.

PAPERS
- Leviathan, Kalman, Matias 2023, "Fast Inference from Transformers via Speculative Decoding" (Algorithm 1,
  Appendix A.1: the proof that the output is distributed exactly as the target's samples).
- Chen, Borgeaud, Irving, Lespiau, Sifre, Jumper 2023, "Accelerating Large Language Model Decoding with
  Speculative Sampling" (the same rule, "modified rejection sampling", found independently).

INTUITION
A draft proposed x ~ q. Keep it with probability min(1, p(x) / q(x)): where the draft is too eager (q(x) > p(x))
some of its proposals are thrown back, where it is too shy (q(x) < p(x)) all of them stay, and the mass the
draft under-proposed, max(0, p - q), is exactly what a rejection must supply, so on a rejection the token is drawn
from norm(max(0, p - q)). Kept-from-the-draft + drawn-on-rejection = min(p, q) + max(0, p - q) = p, token by
token. After the first rejection the rest of the draft is conditioned on a token that is no longer there, so
it is dropped; if every drafted token stays, the target's last row (computed in the same forward) gives one more
token for free (the "bonus" token).
Greedy is the limit temperature -> 0: p and q become one-hot at their argmax; keep drafted tokens while they equal
the target's argmax, then take the target's argmax.

IMPLEMENTATION
Both rules are vectorised over a leading batch dimension (the engine passes B = 1; the exactness test passes
hundreds of thousands of rows at once). A deterministic draft (prompt lookup, which has no distribution) is the
one-hot q at its token: then p(x)/q(x) = p(x) and the residual is p without x, renormalised.
The bonus needs no special case: q is padded with a zero row at position k, so "the residual at the first
rejected position" at n = k is max(0, p_k - 0) = p_k.

WHY the rule and not "keep the draft when the target would have sampled it too": that needs the target's random
draw to be coupled with the draft's; min(1, p/q) is the coupling that keeps the most drafted tokens (the acceptance
probability sum_x min(p(x), q(x)) = 1 - total variation distance(p, q) is the best any exact scheme can do).
"""

from __future__ import annotations

import torch

__all__ = ["one_hot_q", "verify_greedy", "verify_sampled", "residual", "accepted_prefix"]


def accepted_prefix(ok: torch.Tensor) -> torch.Tensor:
    """ok (B, k) bool -> (B,) the number of leading True values (the draft is kept up to the first False)."""
    return ok.long().cumprod(dim=1).sum(dim=1)


def verify_greedy(draft: torch.Tensor, target_logits: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """draft (B, k) ids; target_logits (B, k + 1, V) (already through the sampling pipeline's penalty).

    Returns (n (B,), next (B,)): the first n drafted tokens are kept and `next` follows them, the target's argmax
    at position n (a correction where the draft was wrong, the bonus token where all k were right)."""
    best = target_logits.argmax(dim=-1)  # (B, k + 1)
    n = accepted_prefix(draft == best[:, :draft.size(1)])
    return n, best.gather(1, n[:, None])[:, 0]


def one_hot_q(draft: torch.Tensor, vocab: int) -> torch.Tensor:
    """The distribution of a deterministic draft: all mass on the proposed token, (B, k) -> (B, k, V)."""
    return torch.nn.functional.one_hot(draft, vocab).float()


def residual(p: torch.Tensor, q: torch.Tensor) -> torch.Tensor:
    """norm(max(0, p - q)) over the last dimension: what to sample from after a rejection.

    Where p = q to the last bit the residual is all zeros but then nothing is ever rejected (p(x)/q(x) = 1); a
    row that rounding makes all zeros anyway falls back to p."""
    r = (p - q).clamp(min=0)
    total = r.sum(dim=-1, keepdim=True)
    return torch.where(total > 0, r / total.clamp(min=torch.finfo(r.dtype).tiny), p)


def verify_sampled(draft: torch.Tensor, q: torch.Tensor, p: torch.Tensor,
                   generator: torch.Generator | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """The speculative sampling rule (Leviathan et al. 2023, Algorithm 1; Chen et al. 2023, Algorithm 2).

    draft (B, k): tokens drawn from q; q (B, k, V): the draft's distributions they were drawn from; p (B, k + 1, V):
    the target's distributions at the same positions plus one (all after the same sampling pipeline).
    Returns (n (B,), next (B,)): tokens 0 .. n-1 of the draft are kept and `next` is appended. Each drafted token
    is kept with probability min(1, p(x) / q(x)); at the first rejection, position n, `next` ~ norm(max(0, p_n -
    q_n)); when all k are kept, `next` ~ p_k (q is padded with zeros there)."""
    B, k = draft.shape
    px = p[:, :k].gather(-1, draft[..., None])[..., 0]  # (B, k): the target's probability of each drafted token
    qx = q.gather(-1, draft[..., None])[..., 0]         # (B, k): the draft's (> 0: it was drawn from q)
    u = torch.rand(B, k, generator=generator, device=p.device, dtype=p.dtype)
    n = accepted_prefix(u * qx < px)  # u < p/q without dividing; p(x) >= q(x) always keeps it
    q_padded = torch.cat([q, q.new_zeros(B, 1, q.size(-1))], dim=1)  # (B, k + 1, V): the bonus row is 0
    rows = torch.arange(B, device=p.device)
    dist = residual(p[rows, n], q_padded[rows, n])  # (B, V): residual at the first rejection, or p_k
    return n, torch.multinomial(dist, 1, generator=generator)[:, 0]
