"""What a prefix cache holds, how its keys/values move into a request's KV cache, and what it counts.

PAPERS
- Zheng et al. 2024, "SGLang: Efficient Execution of Structured Language Model Programs" (RadixAttention):
  keep the K/V of finished requests in a tree keyed by their tokens; a new request starts from the longest
  cached prefix; reference counts protect what running requests use; LRU eviction of the rest.
- Gim et al. 2024, "Prompt Cache: Modular Attention Reuse for Low-Latency Inference": attention states of
  reused prompt pieces, computed once; exact reuse needs the same tokens at the same positions.
- vLLM's automatic prefix caching (docs, "Automatic Prefix Caching"; Kwon et al. 2023, PagedAttention, for
  the block view): the same idea over fixed-size blocks named by a hash of their tokens and their parent's.

INTUITION
A transformer's K/V at position t depend only on tokens 0..t (causal attention) and on t itself (RoPE). So two
prompts that begin with the same n tokens have the same K/V for those n positions, bit for bit: whoever
computed them first can hand them to the other. Only the rest of the prompt needs a forward pass.

IMPLEMENTATION
- `KVSpec`: what K/V a store holds (layers, K/V heads, head size, dtype, device) and which model made them
  (RoPE base and a fingerprint of a few weights). A store refuses a model or a cache of another spec in one
  line: reused K/V of another model would not crash, they would silently give wrong answers.
- `PrefixStore`: the counters (hit and miss tokens, evictions, bytes held) and the budget both stores share;
  `load()` places a match's K/V into a request's cache through the protocol's own two calls, `begin(T)` and
  `update(layer, k, v)`, exactly as if the model had just computed them (here a copy into project 8's
  contiguous cache; project 13's paged cache will point at shared blocks instead).
WHY the budget is in bytes: K/V are what fills memory (SmolLM2-135M in fp32: 45 KiB per token), so the
budget says how many tokens fit; eviction frees whole entries until the bytes held fit the budget again.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import NamedTuple

import torch

from course.errors import CourseError


@dataclass(frozen=True)
class KVSpec:
    """The shape, dtype and origin of the K/V a store holds."""

    n_layers: int
    n_kv_heads: int
    head_dim: int
    dtype: torch.dtype
    device: str
    model_tag: str = ""  # RoPE base + a checksum of a few weights: another model with the same shapes differs

    @classmethod
    def of_model(cls, model) -> "KVSpec":
        c = model.config
        p = next(model.parameters())
        return cls(c.n_layer, c.n_kv_head, c.hd, p.dtype, str(p.device), fingerprint(model))

    def bytes_per_token(self) -> int:
        """K and V of one position in every layer."""
        return 2 * self.n_layers * self.n_kv_heads * self.head_dim * torch.empty((), dtype=self.dtype).element_size()

    def describe(self) -> str:
        return (f"{self.n_layers} layers x {self.n_kv_heads} K/V heads x {self.head_dim}, {self.dtype}, "
                f"{self.device}")


def fingerprint(model) -> str:
    """RoPE base and sums over every 4099th value of the embedding and of the first key projection: cheap
    (a few thousand values), and two models with different weights almost surely differ."""
    with torch.no_grad():
        sums = [float(w.detach().flatten()[::4099].double().sum()) for w in
                (model.tok_emb.weight, model.layers[0].attn.wk.weight)]
    return f"rope {model.config.rope_theta:g}; " + " ".join(f"{s:.6e}" for s in sums)


class Match(NamedTuple):
    """The longest cached prefix of a request: `length` tokens, and what holds them (the store's own handle:
    the tree's last node on the path, or the list of blocks)."""

    length: int
    handle: object


class PrefixStore:
    """The budget, the counters and the K/V plumbing the radix tree and the block-hash store share.

    A subclass provides `match(tokens, limit)`, `insert(tokens, k, v)`, `chunks(match)` (the K/V pieces of a
    match in order, each with .k and .v of shape (layers, kv_heads, n, head_dim)), `lock` / `unlock` and
    `evict_to_budget()`.
    """

    def __init__(self, spec: KVSpec, budget_bytes: int):
        if not isinstance(budget_bytes, int) or isinstance(budget_bytes, bool) or budget_bytes <= 0:
            raise CourseError(f"prefix cache budget ({budget_bytes!r} bytes) must be > 0; give --prefix_cache_mb "
                              "a positive number of MiB")
        self.spec, self.budget_bytes = spec, budget_bytes
        self.nbytes = 0          # bytes of K/V held right now (always the sum over the entries)
        self.hit_tokens = 0      # prompt tokens found in the store (their K/V not computed again)
        self.miss_tokens = 0     # prompt tokens that had to be prefilled
        self.evictions = 0       # entries (tree nodes, blocks) evicted
        self.evicted_tokens = 0

    @classmethod
    def for_model(cls, model, budget_mb: float, **kwargs) -> "PrefixStore":
        """A store for this model's K/V with a budget of `budget_mb` MiB."""
        if not isinstance(budget_mb, (int, float)) or not budget_mb > 0:  # also refuses nan
            raise CourseError(f"prefix_cache_mb ({budget_mb}) must be > 0 (MiB of K/V the prefix cache may hold)")
        return cls(KVSpec.of_model(model), max(1, int(budget_mb * 2**20)), **kwargs)

    # ---- refusing what is not ours ----------------------------------------------------------------
    def check_model(self, model) -> None:
        spec = KVSpec.of_model(model)
        if spec != self.spec:
            raise CourseError(f"this prefix cache holds K/V of another model ({self.spec.describe()}, "
                              f"{self.spec.model_tag}), not of this one ({spec.describe()}, {spec.model_tag}); "
                              "they are never reused: make a new prefix cache for this model")

    def check_cache(self, cache) -> None:
        got = (cache.n_layers, cache.n_kv_heads, cache.head_dim, cache.dtype)
        want = (self.spec.n_layers, self.spec.n_kv_heads, self.spec.head_dim, self.spec.dtype)
        if got != want:
            raise CourseError(f"the request's KV cache holds {got[0]} layers x {got[1]} K/V heads x {got[2]}, "
                              f"{got[3]}, the prefix cache {self.spec.describe()}: refused, never reused; "
                              "make the cache for the same model and dtype")

    def check_kv(self, k: list[torch.Tensor], v: list[torch.Tensor], n: int) -> None:
        """k[layer], v[layer]: (kv_heads, >= n, head_dim) of the store's dtype and device."""
        s = self.spec
        ok = len(k) == len(v) == s.n_layers and all(
            t.dim() == 3 and t.shape[0] == s.n_kv_heads and t.shape[1] >= n and t.shape[2] == s.head_dim
            and t.dtype == s.dtype and str(t.device) == s.device for t in (*k, *v))
        if not ok:
            got = f"{len(k)} layers of {tuple(k[0].shape) if k else ()}, {k[0].dtype if k else '?'}"
            raise CourseError(f"K/V of {got} do not fit this prefix cache ({s.describe()}, {n} tokens): refused, "
                              "never reused")

    # ---- what a request does ---------------------------------------------------------------------------
    def load(self, match: Match, cache, start: int = 0) -> None:
        """Place the K/V of positions start .. match.length - 1 into `cache` (batch 1, holding `start` tokens),
        piece by piece through `begin(T)` / `update(layer, k, v)`: the cache stores them as the model would."""
        self.check_cache(cache)
        if list(cache.lengths) != [start]:
            raise CourseError(f"load expects a batch-1 cache holding {start} tokens, it holds {cache.lengths}")
        pos = 0
        for piece in self.chunks(match):
            n = piece.k.shape[2]
            a, b = max(start, pos), min(match.length, pos + n)
            if a < b:
                cache.begin(b - a)
                lo, hi = a - pos, b - pos  # this piece's positions a .. b-1, in its own coordinates
                for layer in range(self.spec.n_layers):
                    cache.update(layer, piece.k[layer, None, :, lo:hi], piece.v[layer, None, :, lo:hi])
            pos += n

    # ---- counters ------------------------------------------------------------------------------------
    def count(self, hit: int, total: int) -> None:
        self.hit_tokens += hit
        self.miss_tokens += total - hit

    @property
    def hit_rate(self) -> float:
        """Share of looked-up prompt tokens that were found (0 before any lookup)."""
        seen = self.hit_tokens + self.miss_tokens
        return self.hit_tokens / seen if seen else 0.0

    def counters(self) -> dict:
        return {"hit_tokens": self.hit_tokens, "miss_tokens": self.miss_tokens, "hit_rate": self.hit_rate,
                "evictions": self.evictions, "evicted_tokens": self.evicted_tokens, "bytes": self.nbytes,
                "budget_bytes": self.budget_bytes, "tokens_held": self.nbytes // self.spec.bytes_per_token()}

    def summary(self) -> str:
        c = self.counters()
        return (f"hit rate {100 * c['hit_rate']:.1f}% ({c['hit_tokens']:,} of {c['hit_tokens'] + c['miss_tokens']:,} "
                f"prompt tokens), {c['tokens_held']:,} tokens held ({c['bytes'] / 2**20:.1f} of "
                f"{c['budget_bytes'] / 2**20:.1f} MiB), {c['evictions']} evictions")

    # ---- what each store defines ----------------------------------------------------------------------
    def match(self, tokens: list[int], limit: int | None = None) -> Match:
        raise NotImplementedError

    def insert(self, tokens: list[int], k: list[torch.Tensor], v: list[torch.Tensor]) -> int:
        raise NotImplementedError

    def chunks(self, match: Match) -> list:
        raise NotImplementedError

    def lock(self, match: Match) -> None:
        raise NotImplementedError

    def unlock(self, match: Match) -> None:
        raise NotImplementedError


def stack_kv(k: list[torch.Tensor], a: int, b: int) -> torch.Tensor:
    """Positions a .. b-1 of every layer as one compact (layers, kv_heads, b - a, head_dim) copy: the store
    owns its bytes (a view would keep the request's whole cache alive)."""
    return torch.stack([t[:, a:b] for t in k])
