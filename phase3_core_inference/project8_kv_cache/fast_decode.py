"""The fast decode path (opt-in): a batch-1 decode step compiled whole by torch.compile, on the CPU in fp32.

PAPERS / PRIOR ART
- Pope et al. 2022, "Efficiently Scaling Transformer Inference": a batch-1 decode step reads every weight once
  and does ~2 FLOPs per 4 bytes: its time is set by how fast the weights stream from memory.
- gpt-fast (pytorch-labs, 2023): compile the whole decode step into one graph, so the norms, RoPE, the cache
  write and the residual adds are fused around the matrix products and a token costs one Python call.

INTUITION
Eager, a step of a small model is a few hundred small operations, each a Python call and a kernel launch; and on
one row PyTorch's `F.linear` runs a GEMM that streams the weights at a fraction of the memory's speed. Written
as the reduction it is, `(w * x).sum(-1)`, and compiled, a matrix-vector product becomes one vectorised
streaming loop; compiled with the rest of the step, each layer becomes one C++ function.

IMPLEMENTATION
- `FastDecoder(model, max_len)` is a step function for the Engine (`step(token, cache) -> logits`), built beside
  the caller's model, never inside it: the caller's modules, forward and settings stay as they are (tested).
- It owns a twin of the model: a copy of the module tree that shares every weight tensor (no memory copied),
  in which each module with an entry in DECODE_KERNELS is replaced by its decode kernel (`nn.Linear` ->
  `GemvLinear`). The lookup is by exact type: project 14's quantized linears register kernels of their own.
- Its step function (`_decode_step`) is a fresh copy per decoder: dynamo keeps its compiled versions per code
  object, up to a cap of 8; sharing one code object, a 9th model shape in a process (a test suite, a server)
  would silently run eager. One code object per decoder needs no change to dynamo's settings.
- The position is a symbol in the graph: the step's `pos` argument is named dynamic (`dynamic_sources`, set
  only around the call), so one compile at start-up serves every position; the cache is read up to `pos`, not
  attended whole under a mask. Dynamo specialises ints equal to 0 or 1, so positions < FIRST_POS run eager.
- fullgraph=True: a graph break in the step is an error, not a step that silently runs in pieces.
- Anything else (prefill, batches, other caches, GPU, bf16, autograd) runs the caller's model eager.
When to use it (`wanted`): compiling costs seconds at start-up (~7 s to set up the compiler once per process,
then 1.5-7 s per model shape with inductor's on-disk cache warm, ~25 s cold), so by default only models of
>= 16 MiB of weights, which stream from memory at every step, get it; a 1 MB model such as stories260K decodes a
story eager in well under a second. Numerics: a different summation order than MKL: logits agree to ~1e-6.
"""

from __future__ import annotations

import copy
import functools
import itertools
import time
import types
import warnings
from collections.abc import Callable

import torch
import torch.nn as nn
import torch.nn.functional as F

from phase1_foundation.project3_pretrain.model import CachePlan
from phase3_core_inference.project8_kv_cache.engine import decode_step
from phase3_core_inference.project8_kv_cache.kv_cache import KVCache

AUTO_COMPILE_BYTES = 16 << 20  # wanted(None): the fast path for models with at least this many weight bytes
FIRST_POS = 2  # the first position that runs compiled (dynamo specialises the ints 0 and 1)
ROW_BLOCKS = 4  # long rows: this many computed together in one loop iteration, sharing each load of x
MAX_REDUCTION = 4096  # inductor switches to a slower (cascade) summation for longer reductions
# fused multiply-add in inductor's C++ (its default keeps x*w and +acc apart): +4-8% on one core for rows of 2048
COMPILE_OPTIONS = {"cpp.enable_floating_point_contract_flag": "fast"}


def gemv(x: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    """x (1, in), w (out, in) -> (out,): the matrix-vector product w @ x[0], written as the reduction it is.

    Eager, this allocates W * x; compiled (traced into the decode step) it is one streaming loop over the rows.
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


class GemvLinear(nn.Module):
    """The decode kernel of a bias-free nn.Linear: the same weight tensor (shared, not copied), `gemv` for one row."""

    def __init__(self, weight: nn.Parameter):
        super().__init__()
        self.weight = weight

    @classmethod
    def from_linear(cls, m: nn.Linear) -> nn.Module:
        return m if m.bias is not None else cls(m.weight)  # a bias: keep the layer as it is

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.shape[:-1].numel() != 1:
            return F.linear(x, self.weight)
        return gemv(x.reshape(1, -1), self.weight).view(*x.shape[:-1], self.weight.shape[0])


# module type (exact) -> a function building its decode kernel from it (sharing its weights)
DECODE_KERNELS: dict[type, Callable[[nn.Module], nn.Module]] = {nn.Linear: GemvLinear.from_linear}


def decode_twin(model: nn.Module) -> nn.Module:
    """A copy of model's module tree sharing every parameter and buffer, with DECODE_KERNELS swapped in."""
    shared = {id(t): t for t in itertools.chain(model.parameters(), model.buffers())}
    twin = copy.deepcopy(model, memo=dict(shared))  # new modules, the same tensors (tied weights stay tied)
    for module in list(twin.modules()):
        for name, child in list(module.named_children()):
            kernel = DECODE_KERNELS.get(type(child))
            if kernel is not None:
                setattr(module, name, kernel(child))
    return twin.eval()


class _At:
    """The contiguous cache as one decode step at `pos` sees it (built inside the compiled step, so `pos` is the
    step's argument, a symbol): the model's two protocol calls, without the row bookkeeping (done eagerly)."""

    def __init__(self, cache: KVCache, pos: int):
        self.cache, self.pos = cache, pos

    def begin(self, T: int) -> CachePlan:
        return CachePlan(self.pos, None, None, self.pos + T)

    def update(self, layer: int, k: torch.Tensor, v: torch.Tensor):
        return self.cache.write(layer, k, v, self.pos)


def _decode_step(model, token, cache, pos):
    return type(model).forward(model, token, kv_cache=_At(cache, pos), logits_to_keep=1)[0][:, -1]


_copies = itertools.count()


def _own_copy(fn):
    """fn with a code object of its own: dynamo's compiled versions (and their cap) are kept per code object."""
    code = fn.__code__.replace(co_name=f"{fn.__name__}_{next(_copies)}")
    return types.FunctionType(code, fn.__globals__, code.co_name, fn.__defaults__, fn.__closure__)


@functools.cache
def compile_works() -> bool:
    """Can torch.compile build our kernel here (it needs a C++ compiler), and does it match F.linear? Once per
    process; without it the fast path is not offered (one warning)."""
    try:
        with torch.no_grad():
            x, w = torch.randn(1, 8), torch.randn(4, 8)
            return torch.allclose(torch.compile(_own_copy(gemv), dynamic=False)(x, w), F.linear(x, w), atol=1e-5)
    except Exception as e:  # noqa: BLE001 - any failure of the compiler stack means: do not use it
        warnings.warn(f"torch.compile cannot build CPU kernels here ({type(e).__name__}); decoding stays eager "
                      "(slower, same results)", stacklevel=2)
        return False


def weight_bytes(model: nn.Module) -> int:
    return sum(p.numel() * p.element_size() for p in model.parameters())


def supported(model: nn.Module) -> bool:
    """The fast path's case: a model on the CPU in fp32."""
    p = next(model.parameters())
    return p.device.type == "cpu" and p.dtype == torch.float32


def wanted(model: nn.Module, choice: bool | None = None) -> bool:
    """The scripts' heuristic: True / False as asked (True where it cannot run is False), or None = models of
    >= AUTO_COMPILE_BYTES of weights; always on the CPU in fp32 with a working compiler."""
    if choice is False or not supported(model):
        return False
    if choice is None and weight_bytes(model) < AUTO_COMPILE_BYTES:
        return False
    return compile_works()


class FastDecoder:
    """A decode step for the Engine, `step(token (1, 1), cache) -> logits (1, vocab)`: compiled for batch 1 on
    a KVCache from position FIRST_POS on, the caller's model eager otherwise. Compiles at construction."""

    def __init__(self, model: nn.Module, max_len: int | None = None):
        if not supported(model):
            raise ValueError("FastDecoder runs fp32 models on the CPU; use the Engine's default step")
        self.model = model
        self.twin = decode_twin(model)
        step = _own_copy(_decode_step)
        self.code = step.__code__  # what dynamo keeps this decoder's compiled versions on (tests count them)
        self.compiled = torch.compile(step, dynamic=False, fullgraph=True, options=COMPILE_OPTIONS)
        self.max_len = max_len or model.config.block_size
        self.compiled_calls = 0
        t0 = time.perf_counter()
        if self.max_len > FIRST_POS:  # compile now, not mid-generation, on a scratch cache of the engine's shape
            p = next(model.parameters())
            scratch = KVCache.for_model(model.config, 1, self.max_len, p.dtype, p.device)
            with torch.inference_mode():
                decode_step(model, torch.zeros(1, FIRST_POS, dtype=torch.long), scratch)
                self(torch.zeros(1, 1, dtype=torch.long), scratch)
        self.compile_s = time.perf_counter() - t0

    def __call__(self, token: torch.Tensor, cache) -> torch.Tensor:
        if (type(cache) is KVCache and cache.batch == 1 and cache.selected is None and token.shape == (1, 1)
                and cache.max_len == self.max_len and cache.lengths[0] >= FIRST_POS and not torch.is_grad_enabled()):
            pos = cache.begin(1).start  # the row's bookkeeping, eager; the compiled step does the math
            self.compiled_calls += 1
            with torch.compiler.config.patch(dynamic_sources="L['pos']"):  # restored on exit
                return self.compiled(self.twin, token, cache, pos)
        return decode_step(self.model, token, cache)
