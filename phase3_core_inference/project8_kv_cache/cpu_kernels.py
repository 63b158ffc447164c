"""A faster matrix-vector kernel for CPU decoding: route the model's Linear layers through oneDNN.

WHY (measured by benchmark.py, and first by hand on this course's 2-core AMD EPYC machine):
a decode step is one matrix-vector product per weight matrix, so its speed is the speed at which the
kernel streams the weights from memory. PyTorch's `F.linear` on fp32 CPU calls MKL's GEMM, which for a
single row (M = 1) reached only 12-21 GB/s there, while a plain `tensor.sum()` reads memory at ~37-40 GB/s.
oneDNN's matmul (bundled with PyTorch, the kernel `torch.compile` uses for CPU linears), called on the
very same weight tensor, streamed 30-34 GB/s: close to the bandwidth floor of Pope et al. 2022.

IMPLEMENTATION
`use_onednn_linear(model)` switches each nn.Linear of a model to a subclass whose forward calls
`torch.ops.mkldnn._linear_pointwise` when it is safe (CPU, fp32, no autograd), and F.linear otherwise.
The parameters are untouched (same tensors, no copy, tied weights stay tied), so the model is the same
model; `restore_linear(model)` switches back. If this PyTorch build has no oneDNN, nothing changes.
Numerics: a different summation order, so results differ from MKL's in the last bits (~1e-7 relative).
"""

from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F


def onednn_available() -> bool:
    try:
        if not torch.backends.mkldnn.is_available():
            return False
        x, w = torch.randn(1, 8), torch.randn(4, 8)
        y = torch.ops.mkldnn._linear_pointwise(x, w, None, "none", [], "")
        return torch.allclose(y, F.linear(x, w), atol=1e-5)
    except (AttributeError, RuntimeError, NotImplementedError):
        return False


class OneDNNLinear(nn.Linear):
    """nn.Linear whose inference forward on CPU fp32 runs oneDNN's matmul (same weights)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        w = self.weight
        if x.device.type != "cpu" or x.dtype != torch.float32 or w.dtype != torch.float32 or torch.is_grad_enabled():
            return F.linear(x, w, self.bias)
        y = torch.ops.mkldnn._linear_pointwise(x.reshape(-1, x.shape[-1]), w, self.bias, "none", [], "")
        return y.view(*x.shape[:-1], w.shape[0])


def use_onednn_linear(model: nn.Module) -> int:
    """Switch every plain nn.Linear of `model` to OneDNNLinear in place; returns how many were switched."""
    if not onednn_available():
        return 0
    n = 0
    for m in model.modules():
        if type(m) is nn.Linear:
            m.__class__ = OneDNNLinear
            n += 1
    return n


def restore_linear(model: nn.Module) -> None:
    for m in model.modules():
        if type(m) is OneDNNLinear:
            m.__class__ = nn.Linear
