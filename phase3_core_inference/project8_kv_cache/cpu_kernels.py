"""Decode kernels for the CPU: stream the weights at memory speed, and call into Python once per token.

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
on those matrices (more for bigger ones), 1.2-1.8x oneDNN, about what `sum()` gets. Compiling the whole
decode step (gpt-fast's way) also runs its ~400 small ops in one call, fused into few loops (the norms, RoPE,
the gate silu(w1 x) * w3 x, the residual adds): no Python and no dispatch between them.

IMPLEMENTATION
`prepare_for_decode(model)` changes the model in place, without copying a weight:
- every nn.Linear becomes a DecodeLinear (same parameters: tied weights stay tied, the state dict is unchanged):
  one input row inside the compiled step -> the reduction `gemv`, traced and fused there; more rows (prefill,
  batches, or every call when compiling is off) -> oneDNN for matrices >= 1 MiB (2-3x MKL there), MKL's
  F.linear below (its cost per call is lower); anything else (GPU, bf16, training) -> plain F.linear.
- the model's forward becomes a DecodeStep: a batch-1 decode step (one token, from a KV cache) runs compiled
  whole, everything else eager. Prefill stays eager: its products are matrix-matrix (compute-bound, already
  fast), and compiling it would mean a new compile for every prompt length.
The cache is read up to a position that grows every token. Rather than attend to the whole preallocated
cache under a mask (gpt-fast), we let the position be a symbol in the compiled graph (dynamic shapes, see
DecodeStep): the model and the cache stay as they are, and a step reads only the positions it needs.
Measured on TinyLlama, against compiling only each block's q/k/v and MLP (~70 compiled calls per token):
123 vs 143 ms per step when memory is slow, 80 vs 94 ms when it is fast (the README).
Compiling costs seconds at start-up (~7 s to set up the compiler once per process, then 1.5-7 s per model
shape with inductor's on-disk cache warm, up to ~25 s cold), so by default (`compile=None`) it is done only
for models of >= 16 MiB of weights: those that do not fit in the CPU's cache and stream from memory at every
step, where it pays. A 1 MB model such as stories260K sits in the cache and decodes a short story eager in
well under a second (compiled: ~2,200 vs ~890 tok/s, after ~15 s of start-up, cache cold).
`restore(model)` undoes both. Compiling needs a C++ compiler; where torch.compile cannot build a kernel,
`decode_compile_works()` is False and the decode path uses oneDNN instead (one warning).
Numerics: a different summation order than MKL: logits agree to ~1e-6 (tested at 1e-5).
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
RECOMPILE_LIMIT = 64  # compiled decode steps (model shapes) per process before dynamo gives up: see prepare_for_decode


def gemv(x: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    """x (1, in), w (out, in) -> (out,): the matrix-vector product w @ x[0], written as the reduction it is.

    Eager, this allocates W * x; compiled (traced into the decode step, or compiled_gemv) it is one
    streaming loop over the rows.
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
        if self.compiled and torch.compiler.is_compiling() and x.shape[:-1].numel() == 1:
            # traced into the compiled decode step: one streaming loop, fused with what surrounds it there
            return gemv(x.reshape(1, -1), w).view(*x.shape[:-1], w.shape[0])
        # eager only: inductor cannot lower oneDNN's linear on a weight that is a graph input (a user's own
        # torch.compile of a prepared model), and picks its own matmul there anyway
        if self.onednn and not torch.compiler.is_compiling():
            y = torch.ops.mkldnn._linear_pointwise(x.reshape(-1, x.shape[-1]), w, None, "none", [], "")
            return y.view(*x.shape[:-1], w.shape[0])
        return F.linear(x, w)


# what varies from one decode step to the next, by dynamo's names for them (the step's arguments)
DYNAMIC_SOURCES = "L['start_pos'],L['kv_cache'].length"


class DecodeStep:
    """A model's forward, compiled for a batch-1 decode step (one token, from a KV cache); eager otherwise.

    The cache is read up to the current position, a length that grows every token. Left to itself,
    torch.compile would compile the first step for its exact position, and the second again with the position
    as a symbol ("automatic dynamic shapes"). We name the position and the cache's length as symbols from the
    start (DYNAMIC_SOURCES), so one compile serves every step: one kernel for all positions, whose guards check
    at each call that the shapes (model, cache size) are the ones it was built for; another cache size (an
    Engine with another max_len) compiles again. Positions 0 and 1 stay eager: dynamo specialises ints equal
    to 0 or 1, so each would cost a compile of its own.
    Everything else is static (dynamic=False, which the named sources override): what dynamo learnt from other
    compiles of Llama.forward in the process (a no-cache forward over growing lengths) does not reach the step.
    fullgraph=True: a graph break in the step is an error, not a step that silently runs in pieces.
    """

    FIRST_POS = 2  # the first position that runs compiled (Engine warms up there)

    def __init__(self, model: nn.Module):
        # the class's forward (never a wrapper), compiled unbound with the model as its argument: a deep copy
        # of the model gets a DecodeStep of its own that runs the copy's weights, not the original's
        self.model, self.forward = model, type(model).forward
        self.compiled = torch.compile(self.forward, dynamic=False, fullgraph=True, options=COMPILE_OPTIONS)
        self.param = next(model.parameters())  # .to() moves its data in place: tells us where the model is now

    def __call__(self, idx: torch.Tensor, targets=None, kv_cache=None, start_pos: int = 0, left_pad=None,
                 logits_to_keep: int = 0):
        # one token: logits_to_keep 0 (all) or k >= 1 (the last k) both mean its one row, so it is not passed on
        if (kv_cache is not None and targets is None and left_pad is None and idx.shape == (1, 1)
                and start_pos >= self.FIRST_POS and logits_to_keep >= 0 and _fast_path(self.param)):
            with torch.compiler.config.patch(dynamic_sources=DYNAMIC_SOURCES):
                return self.compiled(self.model, idx, kv_cache=kv_cache, start_pos=start_pos)
        return self.forward(self.model, idx, targets, kv_cache, start_pos, left_pad, logits_to_keep)


def weight_bytes(model: nn.Module) -> int:
    return sum(p.numel() * p.element_size() for p in model.parameters())


def prepare_for_decode(model: nn.Module, compile: bool | None = None, min_bytes: int = MIN_BYTES) -> str:
    """Switch `model` (project 3's Llama, on the CPU in fp32) to the decode kernels, in place.

    compile: True / False, or None = only if the model has >= AUTO_COMPILE_BYTES of weights.
    Returns what it set up: "compiled" (the decode step compiled whole, plus oneDNN for prefill),
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
    _uncompile(model)
    if compile:
        # dynamo keeps its compiled versions per code object, here Llama.forward, shared by every model in the
        # process, and past its cap (8) runs that code eager for good. Each model shape is a version of its own,
        # so a test suite or a server loading a 9th model would silently lose the compiled step. A higher cap
        # only ever means compiling instead of giving up.
        torch._dynamo.config.recompile_limit = max(torch._dynamo.config.recompile_limit, RECOMPILE_LIMIT)
        model.forward = DecodeStep(model)  # an instance attribute: nn.Module.__call__ finds it before the class's
    return "compiled" if compile else "oneDNN"


def restore(model: nn.Module) -> None:
    """Undo prepare_for_decode: plain nn.Linear layers and the eager forward again."""
    for m in model.modules():
        if type(m) is DecodeLinear:
            m.__class__ = nn.Linear
            for attr in ("compiled", "onednn"):
                m.__dict__.pop(attr, None)
    _uncompile(model)


def _uncompile(model: nn.Module) -> None:
    if isinstance(model.__dict__.get("forward"), DecodeStep):
        del model.__dict__["forward"]
