"""FLOPs per token and the device peak, for model FLOPs utilisation (MFU).

PAPER: PaLM (Chowdhery et al., 2022), appendix B: MFU = achieved model FLOP/s / peak FLOP/s, with training
FLOPs per token = 6N + 12 * n_layer * n_head * head_dim * T (6N: forward 2N + backward 4N multiply-adds over the
N matmul parameters; the second term: attention scores QK^T and the weighted sum of V, forward and backward).
WHY MFU and not tokens/s: it says how much of the hardware the code uses, independent of the model size, so a
100M model on an H100 and a 4M model on a laptop CPU can be judged on one scale.
WHY measure the CPU peak: CPU vendors publish no single fp32 number for a shared 2-core VM; the best large
fp32 matmul we can time is the honest ceiling.
"""

from __future__ import annotations

import time

import torch
import torch.nn as nn

# Dense (no sparsity) peak tensor-core FLOP/s from the vendors' datasheets, by dtype.
GPU_PEAKS = {
    "H100 PCIe": {"bfloat16": 756e12, "float16": 756e12, "float32": 51e12},  # checked before the SXM entry
    "H100": {"bfloat16": 989e12, "float16": 989e12, "float32": 67e12},       # SXM
    "H200": {"bfloat16": 989e12, "float16": 989e12, "float32": 67e12},
    "A100": {"bfloat16": 312e12, "float16": 312e12, "float32": 19.5e12},
    "L4": {"bfloat16": 121e12, "float16": 121e12, "float32": 30e12},
    "A10": {"bfloat16": 125e12, "float16": 125e12, "float32": 31e12},
    "4090": {"bfloat16": 165e12, "float16": 165e12, "float32": 82e12},
}


def matmul_params(model: nn.Module) -> int:
    """Parameters used in a matmul per token: every nn.Linear weight (a tied lm_head counted as the head)."""
    return sum(m.weight.numel() for m in model.modules() if isinstance(m, nn.Linear))


def flops_per_token(model: nn.Module, n_layer: int, n_head: int, head_dim: int, seq_len: int) -> float:
    """Training FLOPs per token (PaLM): 6 * matmul params + 12 * n_layer * n_head * head_dim * seq_len."""
    return 6 * matmul_params(model) + 12 * n_layer * n_head * head_dim * seq_len


def model_flops_per_token(arch: str, model: nn.Module, cfg) -> float:
    """Training FLOPs per token of either architecture train.py builds ("llama" or "gpt") at cfg's context."""
    head_dim = cfg.hd if arch == "llama" else cfg.n_embd // cfg.n_head
    return flops_per_token(model, cfg.n_layer, cfg.n_head, head_dim, cfg.block_size)


def count_params(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())  # a tied matrix appears once


def gpu_peak(device: torch.device, dtype: torch.dtype) -> float | None:
    name = torch.cuda.get_device_name(device)
    for key, peaks in GPU_PEAKS.items():
        if key in name:
            return peaks[str(dtype).removeprefix("torch.")]
    return None


def measure_matmul_peak(device: torch.device, dtype: torch.dtype = torch.float32, n: int = 1024,
                        seconds: float = 2.0) -> float:
    """Best FLOP/s of an n x n x n matmul on this device, timed for about `seconds` after a warm-up."""
    a = torch.randn(n, n, device=device, dtype=dtype)
    b = torch.randn(n, n, device=device, dtype=dtype)
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    for _ in range(3):
        a @ b
    sync()
    best, start = 0.0, time.perf_counter()
    while time.perf_counter() - start < seconds:
        t0 = time.perf_counter()
        for _ in range(4):
            a @ b
        sync()
        best = max(best, 4 * 2 * n ** 3 / (time.perf_counter() - t0))
    return best
