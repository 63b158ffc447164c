"""Decode kernels for the CPU: stream the weights at memory speed, and call into Python fewer times per token.

PAPERS / PRIOR ART
- Pope et al. 2022, "Efficiently Scaling Transformer Inference": at batch 1 a decode step is one
  matrix-vector product per weight matrix, so its speed is the speed at which the weights stream from memory.
- gpt-fast (PyTorch team, 2023): `torch.compile` the decode step instead of writing kernels by hand.

WHAT WE MEASURED (this course's 2-core AMD EPYC VM, fp32, weights cold in memory as in a real decode step of a
model bigger than the CPU's cache; see the README)
- `F.linear` on one row calls MKL's GEMM, which ran at 8-12 GB/s, the same with 1 or 2 threads: one core
  (a likely reason, not verified: MKL is known to pick generic code paths on non-Intel CPUs). oneDNN's matmul
  used both cores: 10-20 GB/s. `w.sum()` read the very same matrices at ~28 GB/s. The kernel, not the
  memory, was the limit.
- A small model's decode step is also ~400 small ops, each costing a few microseconds of Python and dispatch.
- Long rows need care: on TinyLlama's down projection (2048 x 5632) the plain compiled reduction streamed only
  15 GB/s on one core, against 27 GB/s once 4 rows share each load of x and no reduction exceeds 4096 values
  (see `gemv`).

INTUITION
A matrix-vector product is a reduction: y_i = sum_j W_ij x_j, i.e. `(W * x).sum(-1)`. Eager PyTorch would
materialise W * x (a second pass over memory); torch.compile (inductor) instead emits ONE C++ loop, vectorised
and split across the cores, that reads each weight once and keeps the running sums in registers: 14-29 GB/s
on those matrices (more for bigger ones), 1.2-1.8x oneDNN, about what `sum()` gets. Compiling a whole region
(a block's q/k/v projections with RoPE; its SwiGLU MLP) runs its products and elementwise ops in one call
and lets inductor fuse the elementwise ones (RoPE, the gate silu(w1 x) * w3 x) into its loops.

IMPLEMENTATION
`prepare_for_decode(model)` changes the model in place, without copying a weight:
- every nn.Linear becomes a DecodeLinear (same parameters: tied weights stay tied, the state dict is unchanged):
  one input row (a batch-1 decode step), CPU fp32, no autograd -> the compiled reduction; more rows (prefill,
  batches, or every call when compiling is off) -> oneDNN for matrices >= 1 MiB (2-3x MKL there), MKL's
  F.linear below (its cost per call is lower); anything else (GPU, bf16, training) -> plain F.linear.
- each block's `attn.qkv` and `mlp` are compiled as regions, used only for one-row inputs. Prefill stays
  eager: its products are matrix-matrix (compute-bound, already fast), and compiling them would mean a new
  compile for every prompt length.
Compiling costs seconds at start-up (~8 s here, with inductor's on-disk cache warm), so by default
(`compile=None`) it is done only for models of >= 16 MiB of weights: those that do not fit in the CPU's cache
and stream from memory at every step, where it pays (stories15M: 1.5x+). A 1 MB model such as stories260K sits
in the cache, where MKL is already fast and compiling buys nothing measurable.
`restore(model)` undoes both. Compiling needs a C++ compiler; where torch.compile cannot build a kernel,
`decode_compile_works()` is False and the decode path uses oneDNN instead (one warning).
Numerics: a different summation order than MKL: logits agree to ~1e-6 (tested at 1e-5).
WHY NOT COMPILE THE WHOLE STEP: the KV cache is read up to a position that grows every step, a shape that
changes per token; compiling around it needs a mask over the whole preallocated cache (gpt-fast's way) and
makes the model harder to read. The regions hold every weight but wo and the classifier (which run the
compiled reduction on their own) and most of the small ops.
"""

from __future__ import annotations

import functools
import warnings

import torch
import torch.nn as nn
import torch.nn.functional as F

MIN_BYTES = 1 << 20  # prefill: oneDNN for matrices of at least this many bytes, MKL below (lower cost per call)
AUTO_COMPILE_BYTES = 16 << 20  # compile=None: compile the decode path for models with at least this many weight bytes
ROW_BLOCKS = 4  # long rows: this many computed together in one loop iteration, sharing each load of x
MAX_REDUCTION = 4096  # inductor switches to a slower (cascade) summation for longer reductions
# fused multiply-add in inductor's C++ (its default keeps x*w and +acc apart): +4-8% on one core for rows of
# 2048; with both cores streaming, within this VM's noise
COMPILE_OPTIONS = {"cpp.enable_floating_point_contract_flag": "fast"}


def gemv(x: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    """x (1, in), w (out, in) -> (out,): the matrix-vector product w @ x[0], written as the reduction it is.

    Eager, this allocates W * x; compiled (compiled_gemv) it is one streaming loop over the rows.
    Rows longer than 4096 values (TinyLlama's down projection: 2048 x 5632) get two changes, measured on that
    matrix on one core: 15 -> 27 GB/s (`w.sum()`: 29-31):
    - the rows are taken in 4 blocks, whose reductions inductor fuses into one loop: each step reads 4 rows
      and loads x once for them. One row of 5632 floats plus x (22 KB) crowd the 32 KB L1 cache, and x kept
      being fetched again. (For short rows the blocks measured no better, or worse: 39 vs 45 GB/s on q/k/v.)
    - each row is reduced in chunks of <= 4096 values: a longer reduction gets a cascade summation (kept for
      accuracy over long sums) that cost ~25% more here; fp32 over 4096 terms is accurate enough.
    Same result up to summation order.
    """
    out_f, in_f = w.shape
    chunks = next(c for c in range(-(-in_f // MAX_REDUCTION), in_f + 1) if in_f % c == 0)
    if in_f // chunks < 64:  # no divisor near 4096 (e.g. a prime width): one plain reduction
        chunks = 1
    blocks = ROW_BLOCKS if in_f > MAX_REDUCTION and out_f % ROW_BLOCKS == 0 else 1
    rows = out_f // blocks
    xc = x.reshape(1, chunks, in_f // chunks)
    return torch.cat([(w[b * rows:(b + 1) * rows].reshape(rows, chunks, -1) * xc).sum(-1).sum(-1)
                      for b in range(blocks)])


@functools.cache
def compiled_gemv():
    return torch.compile(gemv, dynamic=False, options=COMPILE_OPTIONS)


@functools.cache
def onednn_available() -> bool:
    try:
        if not torch.backends.mkldnn.is_available():
            return False
        x, w = torch.randn(1, 8), torch.randn(4, 8)
        return torch.allclose(torch.ops.mkldnn._linear_pointwise(x, w, None, "none", [], ""), F.linear(x, w),
                              atol=1e-5)
    except (AttributeError, RuntimeError, NotImplementedError):
        return False


@functools.cache
def decode_compile_works() -> bool:
    """Can torch.compile build our decode kernel here (it needs a C++ compiler), and does it match F.linear?
    Checked once per process; the engine falls back to oneDNN otherwise."""
    try:
        with torch.no_grad():
            x, w = torch.randn(1, 8), torch.randn(4, 8)
            return torch.allclose(compiled_gemv()(x, w), F.linear(x, w), atol=1e-5)
    except Exception as e:  # noqa: BLE001 - any failure of the compiler stack means: do not use it
        warnings.warn(f"torch.compile cannot build CPU kernels here ({type(e).__name__}); decoding uses "
                      "oneDNN's matmul instead (slower, same results)", stacklevel=2)
        return False


def _fast_path(*tensors: torch.Tensor) -> bool:
    """CPU, fp32, no autograd: the only case the decode kernels handle."""
    return not torch.is_grad_enabled() and all(t.device.type == "cpu" and t.dtype == torch.float32 for t in tensors)


class DecodeLinear(nn.Linear):
    """nn.Linear with the kernel chosen per call: see the module docstring. Same weights, same results."""

    compiled = True  # class defaults; prepare_for_decode sets them per instance
    onednn = False

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        w = self.weight
        if self.bias is not None or not _fast_path(x, w):
            return F.linear(x, w, self.bias)
        if self.compiled and x.shape[:-1].numel() == 1:
            # inside a compiled region the plain reduction is traced and fused there; outside, call its kernel
            fn = gemv if torch.compiler.is_compiling() else compiled_gemv()
            return fn(x.reshape(1, -1), w).view(*x.shape[:-1], w.shape[0])
        if self.onednn:
            y = torch.ops.mkldnn._linear_pointwise(x.reshape(-1, x.shape[-1]), w, None, "none", [], "")
            return y.view(*x.shape[:-1], w.shape[0])
        return F.linear(x, w)


class DecodeRegion:
    """Calls `fn` compiled when its first argument is a single row (a batch-1 decode step), eager otherwise."""

    def __init__(self, fn):
        # static shapes: one kernel specialised to each model's shapes, never a switch to symbolic sizes
        self.eager, self.compiled = fn, torch.compile(fn, dynamic=False, options=COMPILE_OPTIONS)

    def __call__(self, x: torch.Tensor, *args):
        if x.shape[:-1].numel() == 1 and _fast_path(x):  # an fp32 activation: an fp32 model
            return self.compiled(x, *args)
        return self.eager(x, *args)


def weight_bytes(model: nn.Module) -> int:
    return sum(p.numel() * p.element_size() for p in model.parameters())


def prepare_for_decode(model: nn.Module, compile: bool | None = None, min_bytes: int = MIN_BYTES) -> str:
    """Switch `model` (project 3's Llama, on the CPU in fp32) to the decode kernels, in place.

    compile: True / False, or None = only if the model has >= AUTO_COMPILE_BYTES of weights.
    Returns what it set up: "compiled" (reduction kernels and compiled regions, plus oneDNN for prefill),
    "oneDNN" (compile off or unavailable) or "default" (neither available: nothing changed).
    """
    if compile is None:
        compile = weight_bytes(model) >= AUTO_COMPILE_BYTES
    compile = compile and decode_compile_works()
    onednn = onednn_available()
    if not (compile or onednn):
        restore(model)
        return "default"
    for m in model.modules():
        if type(m) in (nn.Linear, DecodeLinear):
            m.__class__ = DecodeLinear
            m.compiled = compile
            m.onednn = onednn and m.weight.numel() * m.weight.element_size() >= min_bytes
    _remove_regions(model)
    if compile:
        for block in getattr(model, "layers", []):
            block.attn.qkv = DecodeRegion(block.attn.qkv)
            block.mlp.forward = DecodeRegion(block.mlp.forward)
    return "compiled" if compile else "oneDNN"


def _remove_regions(model: nn.Module) -> None:
    for block in getattr(model, "layers", []):
        for mod, name in ((block.attn, "qkv"), (block.mlp, "forward")):
            if isinstance(mod.__dict__.get(name), DecodeRegion):
                del mod.__dict__[name]


def restore(model: nn.Module) -> None:
    """Undo prepare_for_decode: plain nn.Linear layers and eager regions again."""
    for m in model.modules():
        if type(m) is DecodeLinear:
            m.__class__ = nn.Linear
            for attr in ("compiled", "onednn"):
                m.__dict__.pop(attr, None)
    _remove_regions(model)
