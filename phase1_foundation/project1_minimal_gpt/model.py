"""A GPT (decoder-only Transformer) written from scratch, small enough to read in one sitting.

PAPERS
    Vaswani et al., 2017, "Attention Is All You Need": scaled dot-product attention,
        multi-head attention, the residual + position-wise MLP block.
    Radford et al., 2018, "Improving Language Understanding by Generative Pre-Training" (GPT-1):
        a decoder-only Transformer trained to predict the next token, learned position embeddings, GELU.
    Radford et al., 2019, "Language Models are Unsupervised Multitask Learners" (GPT-2):
        LayerNorm moved to the input of each sub-block (pre-LN) plus a final LayerNorm,
        residual projections initialised with std 0.02/sqrt(2 * n_layer).
    Ba, Kiros & Hinton, 2016, "Layer Normalization".
    Hendrycks & Gimpel, 2016, "Gaussian Error Linear Units (GELUs)".
    Press & Wolf, 2017, "Using the Output Embedding to Improve Language Models": weight tying.

The shape of the code follows nanoGPT's model.py: LayerNorm -> CausalSelfAttention -> MLP ->
Block -> GPT, top to bottom in dependency order.

Shapes used in comments: B batch, T sequence length, C = n_embd, H = n_head, D = C // H, V vocab.
"""

from __future__ import annotations

import math

import torch
import torch.nn as nn
import torch.nn.functional as F

from course.errors import CourseError
from phase1_foundation.project1_minimal_gpt.config import GPTConfig


class LayerNorm(nn.Module):
    """LayerNorm with an optional bias.

    PAPER: Ba et al. 2016. For each token vector x (size C):
        y = (x - mean(x)) / sqrt(var(x) + eps) * weight + bias      (var is the biased variance)
    INTUITION: every token's features are re-centred and re-scaled to unit variance, so the
        residual stream can grow without the inputs of each sub-layer growing with it.
    WHY our own class: nn.LayerNorm only gained `bias=False` recently; this keeps the formula in view
        (test_model.py checks F.layer_norm against the explicit formula above).
    """

    def __init__(self, ndim: int, bias: bool):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(ndim))
        self.bias = nn.Parameter(torch.zeros(ndim)) if bias else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.layer_norm(x, self.weight.shape, self.weight, self.bias, 1e-5)


class CausalSelfAttention(nn.Module):
    """Multi-head self-attention where position t may only look at positions <= t.

    PAPER: Vaswani et al. 2017, section 3.2:
        Attention(Q, K, V) = softmax(Q K^T / sqrt(d_k)) V
        MultiHead(X) = Concat(head_1, ..., head_H) W_O,   head_i = Attention(X W_Q_i, X W_K_i, X W_V_i)
    PAPER CONTEXT: the decoder of the original Transformer masks "illegal connections" (future
        positions) by setting their scores to -inf before the softmax; GPT keeps only that decoder.
    INTUITION: each head asks a question (query) of every earlier character (keys) and takes a
        weighted average of what they carry (values); dividing by sqrt(D) keeps the scores' variance
        near 1 so the softmax does not saturate at initialisation.
    IMPLEMENTATION: one Linear produces Q, K and V for all heads at once (C -> 3C); they are split
        into H heads of size D, attended independently, concatenated and projected back (C -> C).
        Two interchangeable paths compute the same thing:
            "manual": the formula written out, with an explicit (T, T) causal mask
            "sdpa":   F.scaled_dot_product_attention(is_causal=True), PyTorch's fused kernel
    WHY both: the manual path is the one to read; the fused one is faster and never materialises
        the (B, H, T, T) matrix. test_model.py checks that they agree to 1e-5.
    """

    def __init__(self, config: GPTConfig):
        super().__init__()
        assert config.n_embd % config.n_head == 0
        self.n_head, self.n_embd, self.dropout = config.n_head, config.n_embd, config.dropout
        self.attn_impl = config.attn_impl
        self.c_attn = nn.Linear(config.n_embd, 3 * config.n_embd, bias=config.bias)  # W_Q, W_K, W_V stacked
        self.c_proj = nn.Linear(config.n_embd, config.n_embd, bias=config.bias)      # W_O
        self.attn_dropout = nn.Dropout(config.dropout)
        self.resid_dropout = nn.Dropout(config.dropout)
        # Lower-triangular mask for the manual path; not persistent, so both paths share state dicts.
        mask = torch.tril(torch.ones(config.block_size, config.block_size, dtype=torch.bool))
        self.register_buffer("causal_mask", mask.view(1, 1, config.block_size, config.block_size),
                             persistent=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        B, T, C = x.shape
        q, k, v = self.c_attn(x).split(self.n_embd, dim=2)
        # (B, T, C) -> (B, H, T, D): heads become a batch dimension
        q = q.view(B, T, self.n_head, C // self.n_head).transpose(1, 2)
        k = k.view(B, T, self.n_head, C // self.n_head).transpose(1, 2)
        v = v.view(B, T, self.n_head, C // self.n_head).transpose(1, 2)
        if self.attn_impl == "sdpa":
            y = F.scaled_dot_product_attention(q, k, v, attn_mask=None, is_causal=True,
                                               dropout_p=self.dropout if self.training else 0.0)
        else:
            y = self.manual_attention(q, k, v)
        y = y.transpose(1, 2).contiguous().view(B, T, C)  # concatenate the heads
        return self.resid_dropout(self.c_proj(y))

    def manual_attention(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        """softmax(Q K^T / sqrt(D)) V with future positions masked to -inf, written out."""
        T, D = q.size(-2), q.size(-1)
        att = (q @ k.transpose(-2, -1)) * (1.0 / math.sqrt(D))                 # (B, H, T, T) scores
        att = att.masked_fill(~self.causal_mask[:, :, :T, :T], float("-inf"))  # no peeking ahead
        att = F.softmax(att, dim=-1)                                           # each row sums to 1
        att = self.attn_dropout(att)
        return att @ v                                                         # (B, H, T, D)


class MLP(nn.Module):
    """Position-wise feed-forward network: Linear(C, 4C) -> GELU -> Linear(4C, C).

    PAPER: Vaswani et al. 2017, section 3.3 (FFN with inner size 4 * d_model); GPT-1 swaps ReLU
        for GELU (Hendrycks & Gimpel 2016), a smooth gate x * Phi(x).
    INTUITION: attention moves information between positions; the MLP then processes each
        position on its own - most of the parameters (8 C^2 of the 12 C^2 per block) live here.
    """

    def __init__(self, config: GPTConfig):
        super().__init__()
        self.c_fc = nn.Linear(config.n_embd, 4 * config.n_embd, bias=config.bias)
        self.gelu = nn.GELU()
        self.c_proj = nn.Linear(4 * config.n_embd, config.n_embd, bias=config.bias)
        self.dropout = nn.Dropout(config.dropout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.dropout(self.c_proj(self.gelu(self.c_fc(x))))


class Block(nn.Module):
    """One Transformer block, pre-LN: x = x + attn(ln_1(x)); x = x + mlp(ln_2(x)).

    PAPER: GPT-2 (Radford et al. 2019, section 2.3) moves LayerNorm "to the input of each
        sub-block" instead of after the residual sum as in Vaswani et al. 2017.
    WHY: with pre-LN the residual stream is a clean sum of every sub-block's output, gradients
        reach early layers unchanged through the identity path, and training is stable at
        higher learning rates without a long warmup.
    """

    def __init__(self, config: GPTConfig):
        super().__init__()
        self.ln_1 = LayerNorm(config.n_embd, bias=config.bias)
        self.attn = CausalSelfAttention(config)
        self.ln_2 = LayerNorm(config.n_embd, bias=config.bias)
        self.mlp = MLP(config)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.attn(self.ln_1(x))
        x = x + self.mlp(self.ln_2(x))
        return x


class GPT(nn.Module):
    """Token + learned position embeddings -> n_layer Blocks -> final LayerNorm -> tied output layer.

    PAPER: GPT-1/GPT-2. The output layer shares its weight matrix with the token embedding
        (Press & Wolf 2017): the same V x C matrix maps ids to vectors and vectors to logits.
    INTUITION of tying: a token that is embedded near vector e is predicted when the model's final
        hidden state points along e - one table learned from both ends; it also saves V * C params.
    INIT (GPT-2): every Linear / Embedding weight ~ N(0, 0.02), biases 0, and the two projections
        that write into the residual stream (attn.c_proj, mlp.c_proj) ~ N(0, 0.02 / sqrt(2 * n_layer)),
        so the residual stream's variance does not grow with depth. With these small weights the
        initial logits are near 0 and the initial loss is close to ln(V) (uniform guessing).
    """

    def __init__(self, config: GPTConfig):
        super().__init__()
        config.validate_config()
        self.config = config
        self.transformer = nn.ModuleDict(dict(
            wte=nn.Embedding(config.vocab_size, config.n_embd),   # token embedding
            wpe=nn.Embedding(config.block_size, config.n_embd),   # learned position embedding
            drop=nn.Dropout(config.dropout),
            h=nn.ModuleList([Block(config) for _ in range(config.n_layer)]),
            ln_f=LayerNorm(config.n_embd, bias=config.bias),      # GPT-2's extra final LayerNorm
        ))
        self.lm_head = nn.Linear(config.n_embd, config.vocab_size, bias=False)
        self.transformer.wte.weight = self.lm_head.weight  # weight tying (Press & Wolf 2017)

        self.apply(self._init_weights)
        for name, p in self.named_parameters():
            if name.endswith("c_proj.weight"):
                nn.init.normal_(p, mean=0.0, std=0.02 / math.sqrt(2 * config.n_layer))

    @staticmethod
    def _init_weights(module: nn.Module) -> None:
        if isinstance(module, nn.Linear):
            nn.init.normal_(module.weight, mean=0.0, std=0.02)
            if module.bias is not None:
                nn.init.zeros_(module.bias)
        elif isinstance(module, nn.Embedding):
            nn.init.normal_(module.weight, mean=0.0, std=0.02)

    def num_params(self, non_embedding: bool = True) -> int:
        """Parameter count; by default without the position embedding (the token embedding is the
        tied output layer, so it does real work and is counted)."""
        n = sum(p.numel() for p in self.parameters())
        return n - self.transformer.wpe.weight.numel() if non_embedding else n

    def forward(self, idx: torch.Tensor, targets: torch.Tensor | None = None
                ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """idx (B, T) token ids -> (logits (B, T, V), mean cross-entropy vs targets (B, T) or None).

        Logits are returned for every position: training needs them all, and generation reads
        the last one (`model(idx)[0][:, -1]`). Targets equal to -1 are ignored by the loss.
        """
        B, T = idx.shape
        if T > self.config.block_size:
            raise CourseError(f"sequence length {T} exceeds block_size {self.config.block_size}; "
                              "crop the input to the last block_size tokens")
        pos = torch.arange(T, dtype=torch.long, device=idx.device)
        x = self.transformer.drop(self.transformer.wte(idx) + self.transformer.wpe(pos))  # (B, T, C)
        for block in self.transformer.h:
            x = block(x)
        logits = self.lm_head(self.transformer.ln_f(x))                                   # (B, T, V)
        loss = None
        if targets is not None:
            loss = F.cross_entropy(logits.view(-1, logits.size(-1)), targets.reshape(-1), ignore_index=-1)
        return logits, loss

    def set_attn_impl(self, impl: str) -> None:
        """Switch every attention layer between the "sdpa" and "manual" paths (same weights)."""
        if impl not in ("sdpa", "manual"):
            raise CourseError(f"attn_impl ({impl!r}) must be one of: sdpa, manual")
        self.config.attn_impl = impl
        for block in self.transformer.h:
            block.attn.attn_impl = impl

    def configure_optimizer(self, weight_decay: float, learning_rate: float, betas: tuple[float, float],
                            device_type: str) -> torch.optim.AdamW:
        """AdamW (Loshchilov & Hutter 2019) with two parameter groups.

        Decayed: every parameter with 2+ dimensions - the Linear weight matrices and the embedding
        tables (the tied wte/lm_head matrix and wpe), as in nanoGPT and GPT-2.
        Not decayed: 1-D parameters - biases and LayerNorm gains. Pulling a LayerNorm gain towards 0
        or a bias towards 0 is not regularisation, it just fights the optimiser.
        WHY fused/foreach: one kernel (or a few) updates all tensors instead of a Python loop over
        parameters - a measurable share of the step time for a model this small.
        """
        params = {n: p for n, p in self.named_parameters() if p.requires_grad}  # tied weight appears once
        decay = [p for p in params.values() if p.dim() >= 2]
        no_decay = [p for p in params.values() if p.dim() < 2]
        groups = [{"params": decay, "weight_decay": weight_decay},
                  {"params": no_decay, "weight_decay": 0.0}]
        kwargs: dict = {}
        if device_type in ("cpu", "cuda"):
            kwargs["fused"] = True
        else:
            kwargs["foreach"] = True
        return torch.optim.AdamW(groups, lr=learning_rate, betas=betas, **kwargs)
