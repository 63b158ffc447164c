"""Project 3's model with flash attention (`attn_impl="flash"`), and project 8's engine decoding with flash-decoding.

Project 3's Attention makes one call per layer, `attend(q, k, v, attn_mask=None, dropout_p=0.0, is_causal=False,
enable_gqa=False)`, with F.scaled_dot_product_attention's contract (its default); `Llama(config, attend=fn)`
builds a model whose layers call fn instead. This module provides fn:

- `FlashAttend(cfg)`: a prefill or training forward (T > 1 queries: causal, or the KV cache's mask) goes to
  flash_attention.flash_attention (autograd included) or the Triton kernel; a one-token decode step goes to
  flash-decoding (SplitKDecoder) or stays with SDPA, as FlashConfig says.
- `flash_llama(model_cfg, cfg)`: a NEW model, for training from scratch with flash attention.
- `with_attention(model, attend)`: a twin of an existing model that attends with `attend`: new modules around the
  very same weight tensors (no copy; training the twin trains the model). The caller's model keeps its classes,
  its attention and its forward (tested).
The engine needs no change: `Engine(with_attention(model, FlashAttend(cfg)))` prefills by tiles and decodes each
token by flash-decoding over the cache (project 8's cache hands the layers views of its buffers).
"""

from __future__ import annotations

import copy
import itertools

import torch
import torch.nn as nn
import torch.nn.functional as F

from course.errors import CourseError
from phase1_foundation.project3_pretrain.model import Attention, Llama, LlamaConfig
from phase3_core_inference.project9_flash_attention.config import FlashConfig
from phase3_core_inference.project9_flash_attention.flash_attention import flash_attention
from phase3_core_inference.project9_flash_attention.flash_decoding import SplitKDecoder


class FlashAttend:
    """Project 3's attend hook computed by this project's attention (see the module docstring).

    Owns the flash-decoding threads when decode_impl is flash_decoding: `close()` them (or use `with`)."""

    def __init__(self, cfg: FlashConfig | None = None):
        self.cfg = (cfg or FlashConfig()).validate_config()
        self.decoder = (SplitKDecoder(self.cfg.decode_workers, self.cfg.decode_chunk)
                        if self.cfg.decode_impl == "flash_decoding" else None)
        self.triton = None
        if self.cfg.attn_impl == "triton":
            from phase3_core_inference.project9_flash_attention import triton_flash  # needs triton (GPU stack)
            self.triton = triton_flash.triton_flash_attention

    def __call__(self, q, k, v, attn_mask=None, dropout_p: float = 0.0, is_causal: bool = False,
                 scale: float | None = None, enable_gqa: bool = False) -> torch.Tensor:
        if dropout_p:
            raise CourseError(f"flash attention here has no attention dropout (dropout_p={dropout_p}); "
                              "train with dropout=0 or attn_impl=sdpa")
        c = self.cfg
        if q.shape[2] == 1 and not is_causal and self.decoder is not None:  # a decode step: split the cache
            return self.decoder(q, k, v, attn_mask, scale)
        if c.attn_impl == "sdpa":
            return F.scaled_dot_product_attention(q, k, v, attn_mask=attn_mask, is_causal=is_causal, scale=scale,
                                                  enable_gqa=q.shape[1] != k.shape[1])
        if c.attn_impl == "triton" and attn_mask is None and q.device.type == "cuda":
            return self.triton(q, k, v, causal=is_causal, scale=scale, block_m=c.block_q, block_n=c.block_k)
        # the teaching path; also the Triton setting's path for the cache's masks (the kernel takes none)
        return flash_attention(q, k, v, mask=attn_mask, causal=is_causal, scale=scale, block_q=c.block_q,
                               block_k=c.block_k)

    def close(self) -> None:
        if self.decoder is not None:
            self.decoder.close()

    def __enter__(self) -> "FlashAttend":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def __deepcopy__(self, memo) -> "FlashAttend":
        return self  # a copied model shares its attention (and its threads): nothing in it is per model

    def __repr__(self) -> str:
        c = self.cfg
        return f"FlashAttend(attn_impl={c.attn_impl}, blocks {c.block_q}x{c.block_k}, decode={c.decode_impl})"


def flash_llama(model_cfg: LlamaConfig, cfg: FlashConfig | None = None) -> Llama:
    """A new project 3 model (fresh weights) whose every layer attends with FlashAttend(cfg)."""
    return Llama(model_cfg, attend=FlashAttend(cfg))


def attention_of(model: nn.Module):
    """The attend function of the model's layers (they share one)."""
    fns = {id(m.attend): m.attend for m in model.modules() if isinstance(m, Attention)}
    if len(fns) != 1:
        raise CourseError(f"expected one attention function in the model, found {len(fns)}")
    return next(iter(fns.values()))


def with_attention(model: nn.Module, attend) -> nn.Module:
    """A twin of `model` (a project 3 Llama) whose layers attend with `attend` (SDPA's contract); it shares every
    parameter and buffer with `model` (no memory copied); `model` itself is left exactly as it was."""
    if not any(isinstance(m, Attention) for m in model.modules()):
        raise CourseError(f"{type(model).__name__} has no project 3 Attention layers to give flash attention")
    shared = {id(t): t for t in itertools.chain(model.parameters(), model.buffers())}
    twin = copy.deepcopy(model, memo=dict(shared))  # new modules, the same tensors (tied weights stay tied)
    for m in twin.modules():
        if isinstance(m, Attention):
            m.attend = attend  # the documented hook, on modules this function just made
    return twin
