"""A faster matrix-vector kernel for CPU decoding: route the model's Linear layers through oneDNN.

WHY (measured by benchmark.py, and first by hand on this course's 2-core AMD EPYC machine):
a decode step is one matrix-vector product per weight matrix, so its speed is the speed at which the
kernel streams the weights from memory. PyTorch's `F.linear` on fp32 CPU calls MKL's GEMM, which for a
single row (M = 1) reached only 19-21 GB/s there, while a plain `tensor.sum()` reads memory at 32-56 GB/s
(that VM's bandwidth drifts with its host's load). oneDNN's matmul (bundled with PyTorch, the kernel
`torch.compile` uses for CPU linears), called on the very same weight tensor, streamed 35-47 GB/s: about
what `sum()` got at the same moment, i.e. close to the bandwidth floor of Pope et al. 2022.

But not for every matrix: for small ones (under ~1 MB, e.g. 288 x 288) MKL's fixed cost per call is lower
(8 us vs 20 us, measured), and a small model's decode step is mostly such calls. Measured in decode loops on
that machine, switching only the matrices of >= 1 MB made project 3's cpu model 35% faster per token than
switching all of them (1.56 vs 2.41 ms/token), and never slower on the stories15M or TinyLlama shapes.

IMPLEMENTATION
`use_onednn_linear(model)` switches each nn.Linear whose weight has at least `min_bytes` (default 1 MiB) to a
subclass whose forward calls `torch.ops.mkldnn._linear_pointwise` when it is safe (CPU, fp32, no autograd),
and F.linear otherwise.
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


MIN_BYTES = 1 << 20  # below this, MKL's F.linear has the lower cost per call (see above)


def use_onednn_linear(model: nn.Module, min_bytes: int = MIN_BYTES) -> int:
    """Switch every plain nn.Linear of `model` whose weight has >= min_bytes to OneDNNLinear, in place;
    returns how many were switched."""
    if not onednn_available():
        return 0
    n = 0
    for m in model.modules():
        if type(m) is nn.Linear and m.weight.numel() * m.weight.element_size() >= min_bytes:
            m.__class__ = OneDNNLinear
            n += 1
    return n


def restore_linear(model: nn.Module) -> None:
    for m in model.modules():
        if type(m) is OneDNNLinear:
            m.__class__ = nn.Linear
