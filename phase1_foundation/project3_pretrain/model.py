"""A LLaMA-style decoder: project 1's GPT with the changes every modern open model made.

Papers (each change below cites its own):
    Root Mean Square Layer Normalization        Zhang & Sennrich, 2019   RMSNorm instead of LayerNorm
    RoFormer: Enhanced Transformer with Rotary Position Embedding
                                                Su, Lu, Pan, Murtadha, Wen, Liu, 2021   rotary positions
    GLU Variants Improve Transformer            Shazeer, 2020            SwiGLU feed-forward
    GQA: Training Generalized Multi-Query Transformer Models from Multi-Head Checkpoints
                                                Ainslie et al., 2023     grouped-query attention
    LLaMA: Open and Efficient Foundation Language Models
                                                Touvron et al., 2023     the recipe: pre-norm RMSNorm, RoPE
                                                                         (split-half pairing), SwiGLU, no biases

Differences from project 1's GPT, one line each:
    LayerNorm(+bias)         -> RMSNorm (no mean subtraction, no bias)
    learned position table   -> RoPE on q and k (relative positions, no parameters, tables precomputed)
    GELU MLP 4d              -> SwiGLU MLP (3 matrices, hidden ~8/3 d)
    n_head K/V heads         -> n_kv_head K/V heads shared by groups of query heads
    biases everywhere        -> no biases
    tied embeddings          -> optional (tie_embeddings)

Inference protocol (project 8's `kv_cache.Cache`): `forward(idx, targets=None, kv_cache=None, logits_to_keep=0)`.
Without a cache the model is the plain causal LM (training, evaluation). With one, the model ASKS the cache instead of
taking positions: `plan = kv_cache.begin(T)` once per forward returns a `CachePlan` for the T new tokens of every row
(their RoPE positions: one shared `start` slice, or a (B, T) `positions` tensor when rows differ; an attention `mask`
or None; `end`, the highest position + 1), and every attention layer i calls `k, v = kv_cache.update(i, k, v)` with
k, v of shape (B, n_kv_head, T, head_dim), k already rotated, and attends to the keys/values it gets back. The cache
owns the per-row lengths, so rows of different lengths (a ragged batch, a row that joined later) need nothing more
from the model. A batch whose rows share one length and decode one token builds no mask and allocates nothing but
the activations.
`logits_to_keep=k > 0` returns the logits of the last k positions only (HF's argument of the same name):
generation needs the last one, and the classifier over the whole prompt is vocab x n_embd FLOPs per token for
nothing (~30% of a no-cache step of project 3's `cpu` model, measured in project 8).
"""

from __future__ import annotations

import argparse
import math
from typing import NamedTuple

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint

from course.errors import CourseError, run_cli
from phase1_foundation.project1_minimal_gpt.model import GPT
from phase1_foundation.project3_pretrain import flops
from phase1_foundation.project3_pretrain.config import LlamaConfig

__all__ = ["LlamaConfig", "Llama", "RMSNorm", "rope_tables", "apply_rope", "Attention", "SwiGLU", "Block", "CachePlan"]


class CachePlan(NamedTuple):
    """What a KV cache tells the model about the T new tokens of one forward (returned by `kv_cache.begin(T)`).

    start:     the position of every row's first new token, when all rows share it (RoPE is then a slice of the
               tables, no allocation); None when rows differ.
    positions: (B, T) long tensor of each row's positions when they differ; None when `start` is given.
    mask:      boolean attention mask broadcastable to (B, 1, T, keys) (True = attend), or None: one query with
               nothing to hide (a decode step), or a plain causal prefill (is_causal).
    end:       the highest position + 1 over the rows: must fit the RoPE tables (block_size).
    """

    start: int | None
    positions: torch.Tensor | None
    mask: torch.Tensor | None
    end: int


class RMSNorm(nn.Module):
    """Root-mean-square normalisation with a learned gain.

    PAPER: Zhang & Sennrich, 2019. y = x / sqrt(mean(x^2) + eps) * g.
    INTUITION: LayerNorm's re-centring (subtracting the mean) turned out not to matter; re-scaling does.
    IMPLEMENTATION: computed in float32 and cast back, exactly as HF's LlamaRMSNorm, so bf16 training is stable
    and our logits match transformers to 1e-5 in fp32.
    WHY: one reduction instead of two and no bias: cheaper, and what every LLaMA-family checkpoint expects.
    """

    def __init__(self, dim: int, eps: float = 1e-5):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        xf = x.float()
        xf = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * xf.to(x.dtype)


def rope_tables(head_dim: int, max_pos: int, theta: float = 10_000.0) -> tuple[torch.Tensor, torch.Tensor]:
    """cos and sin tables of shape (max_pos, head_dim) for rotary embeddings, LLaMA/HF split-half layout.

    PAPER: Su et al., 2021 (RoFormer). Pair i of a head vector is rotated by angle pos * theta^(-2i/d).
    IMPLEMENTATION: LLaMA-HF pairs dimension i with dimension i + d/2 ("split-half"), so the per-pair
    frequencies are concatenated twice: [f0 .. f(d/2-1), f0 .. f(d/2-1)]. (Meta's original code pairs
    neighbours (2i, 2i+1); hf_interop.permute_rope converts weights between the two layouts.)
    WHY precompute: the decode step of project 8 must not recompute trig functions per token.
    """
    inv_freq = 1.0 / (theta ** (torch.arange(0, head_dim, 2, dtype=torch.int64).float() / head_dim))
    freqs = torch.outer(torch.arange(max_pos, dtype=torch.int64).float(), inv_freq)  # (max_pos, d/2)
    emb = torch.cat((freqs, freqs), dim=-1)
    return emb.cos(), emb.sin()


def rotate_half(x: torch.Tensor) -> torch.Tensor:
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat((-x2, x1), dim=-1)


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate x (B, H, T, D) by the angles in cos/sin (T, D): x*cos + rotate_half(x)*sin.

    INTUITION: q_m . k_n after rotation depends only on m - n, so attention sees relative positions and
    nothing about position is stored in the residual stream.
    """
    return x * cos + rotate_half(x) * sin


class Attention(nn.Module):
    """Causal self-attention with grouped-query heads, RoPE and an optional KV cache.

    PAPER: Ainslie et al., 2023 (GQA). n_head query heads share n_kv_head key/value heads in groups of
    n_head / n_kv_head; n_kv_head == n_head is ordinary multi-head attention, 1 is multi-query attention.
    INTUITION: queries need to be diverse; keys/values much less so, and they are what a KV cache stores.
    IMPLEMENTATION: F.scaled_dot_product_attention (flash kernels on GPU) with enable_gqa, which reads each KV
    head once for its whole group instead of materialising repeated copies.
    WHY: the KV cache shrinks by n_head / n_kv_head, which is what makes long-context decoding affordable.
    THE ATTEND HOOK: `attend(q, k, v, attn_mask=None, dropout_p=0.0, is_causal=False, enable_gqa=False) -> y` is
    the one call that turns q, k, v into the heads' outputs, with SDPA's contract (the default is SDPA itself).
    `Llama(config, attend=fn)` builds a model whose layers call another algorithm with the same contract (project
    9's tiled flash attention and flash-decoding); weights, state dict and everything else stay the same.
    """

    def __init__(self, cfg: LlamaConfig, attend=None):
        super().__init__()
        self.attend = attend or F.scaled_dot_product_attention
        self.n_head, self.n_kv_head, self.head_dim = cfg.n_head, cfg.n_kv_head, cfg.hd
        self.wq = nn.Linear(cfg.n_embd, cfg.n_head * cfg.hd, bias=False)
        self.wk = nn.Linear(cfg.n_embd, cfg.n_kv_head * cfg.hd, bias=False)
        self.wv = nn.Linear(cfg.n_embd, cfg.n_kv_head * cfg.hd, bias=False)
        self.wo = nn.Linear(cfg.n_head * cfg.hd, cfg.n_embd, bias=False)
        self.dropout = cfg.dropout
        self.gqa = cfg.n_kv_head != cfg.n_head

    def qkv(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor):
        """Everything a token needs before it meets the cache: q, k (rotated) and v, each (B, heads, T, hd)."""
        B, T, _ = x.shape
        q = self.wq(x).view(B, T, self.n_head, self.head_dim).transpose(1, 2)
        k = self.wk(x).view(B, T, self.n_kv_head, self.head_dim).transpose(1, 2)
        v = self.wv(x).view(B, T, self.n_kv_head, self.head_dim).transpose(1, 2)
        return apply_rope(q, cos, sin), apply_rope(k, cos, sin), v

    def forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, kv_cache=None,
                layer_idx: int = 0, mask: torch.Tensor | None = None) -> torch.Tensor:
        B, T, _ = x.shape
        q, k, v = self.qkv(x, cos, sin)
        if kv_cache is not None:
            k, v = kv_cache.update(layer_idx, k, v)  # stores the new K/V, returns every key/value to attend to
        drop = self.dropout if self.training else 0.0
        if mask is not None:  # from the cache: a chunk after cached keys, or rows of different lengths
            y = self.attend(q, k, v, attn_mask=mask, dropout_p=drop, enable_gqa=self.gqa)
        elif T == 1:  # decode step: the one query sees every key it was given, no mask
            y = self.attend(q, k, v, dropout_p=drop, enable_gqa=self.gqa)
        else:  # plain prefill: the standard causal mask (a branch, not is_causal=T > 1: under torch.compile
            # with dynamic shapes T > 1 is a symbolic bool, which SDPA refuses, and the whole forward ran eager)
            y = self.attend(q, k, v, dropout_p=drop, is_causal=True, enable_gqa=self.gqa)
        y = y.transpose(1, 2).reshape(B, T, self.n_head * self.head_dim)
        return self.wo(y)


class SwiGLU(nn.Module):
    """Gated feed-forward: w2( silu(w1 x) * w3 x ).

    PAPER: Shazeer, 2020 (GLU Variants). A learned gate multiplies the hidden units; with the Swish/SiLU
    activation it beat ReLU and GELU MLPs at equal compute.
    IMPLEMENTATION: three bias-free matrices; LLaMA shrinks the hidden width to ~8/3 d to keep the
    parameter count of a 4d two-matrix MLP. Names follow HF: gate (w1), up (w3), down (w2).
    """

    def __init__(self, cfg: LlamaConfig):
        super().__init__()
        self.w1 = nn.Linear(cfg.n_embd, cfg.ffn_dim, bias=False)  # gate_proj
        self.w3 = nn.Linear(cfg.n_embd, cfg.ffn_dim, bias=False)  # up_proj
        self.w2 = nn.Linear(cfg.ffn_dim, cfg.n_embd, bias=False)  # down_proj
        self.dropout = nn.Dropout(cfg.dropout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.dropout(self.w2(F.silu(self.w1(x)) * self.w3(x)))


class Block(nn.Module):
    """Pre-norm residual block: x + attn(norm(x)), then x + mlp(norm(x)) (as in project 1, with RMSNorm)."""

    def __init__(self, cfg: LlamaConfig, attend=None):
        super().__init__()
        self.attn_norm = RMSNorm(cfg.n_embd, cfg.norm_eps)
        self.attn = Attention(cfg, attend)
        self.mlp_norm = RMSNorm(cfg.n_embd, cfg.norm_eps)
        self.mlp = SwiGLU(cfg)
        self.resid_drop = nn.Dropout(cfg.dropout)

    def forward(self, x, cos, sin, kv_cache=None, layer_idx: int = 0, mask=None):
        x = x + self.resid_drop(self.attn(self.attn_norm(x), cos, sin, kv_cache, layer_idx, mask))
        return x + self.mlp(self.mlp_norm(x))


class Llama(nn.Module):
    """The decoder: token embedding -> n_layer blocks -> RMSNorm -> lm_head (optionally tied to the embedding).

    `attend`: the attention algorithm of every layer (Attention's hook, SDPA's contract); None = SDPA."""

    def __init__(self, config: LlamaConfig, attend=None):
        super().__init__()
        config.validate_config()
        self.config = config
        self.tok_emb = nn.Embedding(config.vocab_size, config.n_embd)
        self.layers = nn.ModuleList(Block(config, attend) for _ in range(config.n_layer))
        self.norm = RMSNorm(config.n_embd, config.norm_eps)
        self.lm_head = nn.Linear(config.n_embd, config.vocab_size, bias=False)
        if config.tie_embeddings:
            # LLaMA 1/2 untie, small models (and LLaMA 3.2 1B/3B) tie: saves vocab*d parameters.
            self.lm_head.weight = self.tok_emb.weight
        cos, sin = rope_tables(config.hd, config.block_size, config.rope_theta)
        # Non-persistent: derived from the config, not stored in checkpoints; moved by .to(device).
        self.register_buffer("rope_cos", cos, persistent=False)
        self.register_buffer("rope_sin", sin, persistent=False)
        self.gradient_checkpointing = False
        self.apply(self._init_weights)
        # GPT-2 scaled init: residual projections get std / sqrt(2 * n_layer) so the stream's variance
        # does not grow with depth.
        for name, p in self.named_parameters():
            if name.endswith("attn.wo.weight") or name.endswith("mlp.w2.weight"):
                nn.init.normal_(p, mean=0.0, std=config.init_std / math.sqrt(2 * config.n_layer))

    def _init_weights(self, module: nn.Module) -> None:
        if isinstance(module, (nn.Linear, nn.Embedding)):
            nn.init.normal_(module.weight, mean=0.0, std=self.config.init_std)

    # ---- sizes ------------------------------------------------------------------------------
    def num_params(self) -> int:
        """Every trainable parameter, a tied matrix counted once."""
        return sum(p.numel() for p in self.parameters())

    def matmul_params(self) -> int:
        """Parameters that take part in a matmul per token (all Linear weights, lm_head included).

        The input embedding is a table lookup (no FLOPs) unless it is tied to lm_head.
        """
        return flops.matmul_params(self)

    def flops_per_token(self, seq_len: int | None = None) -> float:
        """Training FLOPs per token: 6N (forward 2N + backward 4N) plus attention scores and values,
        12 * n_layer * n_head * head_dim * T (PaLM, Chowdhery et al. 2022, appendix B; see flops.py)."""
        c = self.config
        return flops.flops_per_token(self, c.n_layer, c.n_head, c.hd, seq_len or c.block_size)

    # ---- forward ----------------------------------------------------------------------------
    def rope_for(self, plan: CachePlan, T: int) -> tuple[torch.Tensor, torch.Tensor]:
        """RoPE tables for the new tokens: a (T, D) slice when the rows share a start, else (B, 1, T, D) gathered
        at each row's own positions (a row that joined later, or is longer, sits at other positions)."""
        if plan.start is not None:
            return self.rope_cos[plan.start:plan.start + T], self.rope_sin[plan.start:plan.start + T]
        return self.rope_cos[plan.positions].unsqueeze(1), self.rope_sin[plan.positions].unsqueeze(1)

    def forward(self, idx: torch.Tensor, targets: torch.Tensor | None = None, kv_cache=None,
                logits_to_keep: int = 0):
        B, T = idx.shape
        if logits_to_keep < 0 or (logits_to_keep and targets is not None):
            raise CourseError(f"logits_to_keep must be 0 (all positions) or a positive count, and 0 with targets "
                              f"(the loss needs every position); got {logits_to_keep}")
        # without a cache: positions 0 .. T-1, causal; with one, the cache knows each row's length and answers
        plan = CachePlan(0, None, None, T) if kv_cache is None else kv_cache.begin(T)
        if plan.end > self.config.block_size:
            raise CourseError(f"sequence positions up to {plan.end - 1} exceed block_size {self.config.block_size} "
                              "(the RoPE tables); crop the context")
        cos, sin = self.rope_for(plan, T)
        mask = plan.mask
        x = self.tok_emb(idx)
        for i, layer in enumerate(self.layers):
            if self.gradient_checkpointing and self.training and kv_cache is None:
                # Recompute the block's activations in backward instead of storing them: ~1/3 more compute,
                # activation memory per layer drops to its input.
                x = checkpoint(layer, x, cos, sin, None, i, mask, use_reentrant=False)
            else:
                x = layer(x, cos, sin, kv_cache, i, mask)
        if logits_to_keep:
            x = x[:, -logits_to_keep:]  # the norm and the classifier act per position: skip the unwanted ones
        logits = self.lm_head(self.norm(x))
        loss = None
        if targets is not None:
            loss = F.cross_entropy(logits.float().view(-1, logits.size(-1)), targets.reshape(-1), ignore_index=-1)
        return logits, loss

    def configure_optimizer(self, weight_decay: float, learning_rate: float, betas=(0.9, 0.95),
                            device_type: str = "cpu") -> torch.optim.AdamW:
        """AdamW with decay groups, reused from project 1: matrices (Linear weights, the embedding) decay,
        1-D parameters (here only the RMSNorm gains, whose natural value is 1) do not."""
        return GPT.configure_optimizer(self, weight_decay, learning_rate, betas, device_type)


def main() -> None:
    parser = argparse.ArgumentParser(description="Print a LLaMA-style config and its exact parameter count.")
    LlamaConfig.add_args(parser, default_preset="cpu")
    cfg = LlamaConfig.from_args(parser.parse_args())
    cfg.print_config()
    with torch.device("meta"):
        model = Llama(cfg)
    n = model.num_params()
    print(f"parameters: {n:,} ({n / 1e6:.2f}M); matmul parameters {model.matmul_params():,}; "
          f"training FLOPs/token at T={cfg.block_size}: {model.flops_per_token() / 1e6:.1f} MFLOP")


if __name__ == "__main__":
    run_cli(main)
