"""Tiny random LLaMA models for tests, defined once for every project that builds on project 3.

Unit tests across the course (project 3's model, project 8's caches, the loaders, fine-tuning, quantization)
need a model that is small enough to run in milliseconds yet exercises every code path: grouped-query
attention (n_kv_head < n_head), more than one layer, a vocabulary that is not a power of two. Norm gains are
drawn away from their initial value of 1, so a bug that skips a norm, or reads the wrong gain, cannot hide
behind the init.
"""

from __future__ import annotations

import torch

from phase1_foundation.project3_pretrain.model import Llama, LlamaConfig

TINY = dict(block_size=64, vocab_size=97, n_layer=2, n_head=4, n_kv_head=2, n_embd=32, intermediate_size=64)


def tiny_config(**overrides) -> LlamaConfig:
    """The tiny shape above with any field overridden (`tiny_config(n_kv_head=4, tie_embeddings=True)`)."""
    return LlamaConfig(**{**TINY, **overrides})


def tiny_llama(seed: int = 0, random_norms: bool = True, **overrides) -> Llama:
    """A freshly initialised tiny Llama in eval mode, float32 on CPU, seeded: the same seed, the same weights."""
    torch.manual_seed(seed)
    model = Llama(tiny_config(**overrides)).eval()
    if random_norms:
        with torch.no_grad():
            for m in model.modules():
                if hasattr(m, "eps"):  # RMSNorm gains
                    m.weight.uniform_(0.5, 1.5)
    return model
