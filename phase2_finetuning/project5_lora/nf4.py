"""4-bit NormalFloat (NF4): the frozen base of QLoRA in about half a byte per weight, built from scratch.

PAPER: QLoRA: Efficient Finetuning of Quantized LLMs, Dettmers, Pagnoni, Holtzman, Zettlemoyer, 2023.
    Three ideas, all here: (1) NF4, a 4-bit data type whose 16 levels are quantiles of a standard normal, so
    that normally distributed weights fill every level about equally often ("information-theoretically
    optimal" for N(0, 1) data); (2) block-wise absmax scaling (64 weights share one scale); (3) double
    quantisation: the 32-bit scales themselves are quantised to 8 bits in blocks of 256.
    (Paged optimizers, the paper's third memory trick, only matter on a GPU that runs out of memory.)

PAPER CONTEXT: weights of a trained network are close to normal with a per-tensor (and per-block) scale. An
    evenly spaced 4-bit grid (int4) wastes levels in the tails, where few weights live; the normal quantiles put
    the levels where the weights are. LoRA trains only small adapters, so the base never needs gradients or an
    optimizer and can sit in 4 bits: it is de-quantised block by block, on the fly, in every forward.

INTUITION of the sizes (per weight):
    4 bits code + 32/64 bits absmax                         = 4.5   bits = 0.5625 bytes  (no double quant)
    4 bits code + 8/64 bits absmax + 32/(64*256) bits scale = 4.127 bits = 0.5159 bytes  (double quant)
    double quantisation saves 32/64 - 8/64 - 32/(64*256) = 0.373 bits per weight (the paper's number).

IMPLEMENTATION, in the order a weight goes through it:
    nf4_levels          the 16 levels from normal quantiles (matches the table published with the paper)
    quantize_blocks     w -> (codes 0..15, absmax per block of 64): scale each block into [-1, 1], nearest level
    pack_4bit           two codes per byte (the first in the high nibble, as bitsandbytes does)
    double_quantize     absmax -> int8 codes per block of 256 + one float32 scale per block + one float32 offset
    NF4Weight           all of the above for one matrix, with `dequantize()` and exact `nbytes`
    Linear4bit          a frozen nn.Linear replacement that stores an NF4Weight and de-quantises in forward
                        (and again in backward: a custom autograd Function keeps only the 4-bit copy alive)
    quantize_model / dequantize_model    swap a model's block linears to Linear4bit and back

WHY bitsandbytes differs in one place: bitsandbytes quantises the absmax constants with its 8-bit "dynamic"
    float map; here they are plain symmetric int8 of (absmax - mean), a simpler code with exactly the same bytes
    (1 per block of 64, plus a float32 per 256 blocks). The 4-bit codes themselves are bit-for-bit
    bitsandbytes' `quantize_4bit(..., quant_type="nf4", blocksize=64)` (tested).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from course.errors import CourseError

BLOCK = 64          # weights per absmax scale (the paper's and bitsandbytes' default)
DQ_BLOCK = 256      # absmax constants per second-level scale (double quantisation)
NF4_OFFSET = 0.9677083  # the outermost quantile: (1 - 1/(2*15) + 1 - 1/(2*16)) / 2, as in the paper's code


def nf4_levels(offset: float = NF4_OFFSET) -> torch.Tensor:
    """The 16 NF4 levels, sorted, in [-1, 1], with an exact 0.

    PAPER (QLoRA, section 3): estimate the 2^k quantiles of N(0, 1), normalise them into [-1, 1]. A symmetric
    set of 16 would have no exact zero (zero matters: padding, pruned weights), so NF4 is asymmetric: 8
    positive levels from 9 evenly spaced probabilities in [offset, 0.5], 7 negative ones from 8, and 0.
    IMPLEMENTATION: torch's ndtri is the normal quantile function (scipy's norm.ppf). The reference code takes
    float32 probabilities (torch.linspace), float64 quantiles, then a float32 tensor normalised by its maximum:
    done in that order the 16 levels equal the published table bit for bit (tested).
    """
    pos = torch.special.ndtri(torch.linspace(offset, 0.5, 9)[:-1].double())        # 8 values > 0
    neg = -torch.special.ndtri(torch.linspace(offset, 0.5, 8)[:-1].double())       # 7 values < 0
    levels = torch.cat([pos, torch.zeros(1, dtype=torch.float64), neg]).float()
    return (levels / levels.max()).sort().values


NF4 = nf4_levels()
# Decision boundaries: a scaled weight goes to the nearest level; exactly halfway goes to the lower one.
NF4_MIDPOINTS = (NF4[:-1] + NF4[1:]) / 2


# ---- level 1: 4-bit codes with an absmax per block --------------------------------------------------------
def _blocks(w: torch.Tensor, blocksize: int) -> torch.Tensor:
    """w flattened into rows of `blocksize` (the last block zero-padded: zeros do not change an absmax)."""
    flat = w.reshape(-1).float()
    pad = (-flat.numel()) % blocksize
    return F.pad(flat, (0, pad)).view(-1, blocksize)


def quantize_blocks(w: torch.Tensor, blocksize: int = BLOCK) -> tuple[torch.Tensor, torch.Tensor]:
    """(codes, absmax): uint8 codes 0..15, one per weight (padded to whole blocks), and float32 absmax per block.

    Each block is divided by its largest |w|, so it lies in [-1, 1], and each value takes the nearest NF4 level.
    IMPLEMENTATION: `x * (1 / absmax)` (not x / absmax) and a bucketize over the midpoints, exactly as
    bitsandbytes' CPU kernel, so the codes agree bit for bit; an all-zero block gets absmax 0 and code 7 (0.0).
    """
    if blocksize <= 0 or blocksize % 2:
        raise CourseError(f"blocksize ({blocksize}) must be a positive even number")
    if not w.is_floating_point() or not torch.isfinite(w).all():
        raise CourseError("NF4 quantisation needs finite floating-point weights")
    blocks = _blocks(w, blocksize)
    absmax = blocks.abs().amax(dim=1)
    scaled = torch.clamp(blocks * (1.0 / absmax.clamp(min=1e-38)).unsqueeze(1), -1, 1)
    codes = torch.bucketize(scaled.reshape(-1), NF4_MIDPOINTS.to(w.device)).to(torch.uint8)
    return codes, absmax


def dequantize_blocks(codes: torch.Tensor, absmax: torch.Tensor, blocksize: int = BLOCK) -> torch.Tensor:
    """The flat float32 weights back (padded length): level[code] * absmax of the code's block."""
    return (NF4.to(codes.device)[codes.long()].view(-1, blocksize) * absmax.unsqueeze(1)).reshape(-1)


def pack_4bit(codes: torch.Tensor) -> torch.Tensor:
    """Two 4-bit codes per byte: element 2i in the high nibble, 2i+1 in the low one (bitsandbytes' order)."""
    if codes.numel() % 2:
        raise CourseError(f"pack_4bit needs an even number of codes, got {codes.numel()}")
    if codes.numel() and int(codes.max()) > 15:
        raise CourseError("pack_4bit: codes must be in 0..15")
    c = codes.reshape(-1).to(torch.uint8)
    return (c[0::2] << 4) | c[1::2]


def unpack_4bit(packed: torch.Tensor) -> torch.Tensor:
    """The inverse of pack_4bit: uint8 codes, two per byte."""
    out = torch.empty(packed.numel() * 2, dtype=torch.uint8, device=packed.device)
    out[0::2] = packed >> 4
    out[1::2] = packed & 0xF
    return out


# ---- level 2: double quantisation of the absmax constants ------------------------------------------------
@dataclass
class DoubleQuant:
    """absmax ~= codes * scale[block] + offset: int8 codes, a float32 scale per DQ_BLOCK constants, one offset.

    PAPER (QLoRA, "Double Quantization"): the absmax constants c2 are themselves quantised, 8-bit, blocks of
    256. All absmax values are positive, so the mean is subtracted first (bitsandbytes does the same) and the
    centred values use the whole signed range.
    """

    codes: torch.Tensor    # int8, one per absmax
    scale: torch.Tensor    # float32, one per block of `blocksize` codes
    offset: torch.Tensor   # float32 scalar: the mean absmax
    blocksize: int = DQ_BLOCK

    def dequantize(self) -> torch.Tensor:
        n = self.codes.numel()
        padded = F.pad(self.codes.float(), (0, (-n) % self.blocksize)).view(-1, self.blocksize)
        return (padded * self.scale.unsqueeze(1)).reshape(-1)[:n] + self.offset

    @property
    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in (self.codes, self.scale, self.offset))


def double_quantize(absmax: torch.Tensor, blocksize: int = DQ_BLOCK) -> DoubleQuant:
    """Symmetric int8 (-127..127) of (absmax - mean) in blocks of `blocksize`: error <= scale / 2 per constant."""
    offset = absmax.float().mean()
    centred = absmax.float() - offset
    blocks = _blocks(centred, blocksize)
    scale = blocks.abs().amax(dim=1) / 127
    codes = torch.round(blocks / scale.clamp(min=1e-38).unsqueeze(1)).clamp(-127, 127).to(torch.int8)
    return DoubleQuant(codes.reshape(-1)[:absmax.numel()].contiguous(), scale, offset.reshape(()), blocksize)


# ---- one matrix -------------------------------------------------------------------------------------------
def nf4_bytes(numel: int, blocksize: int = BLOCK, double_quant: bool = True, dq_blocksize: int = DQ_BLOCK) -> int:
    """The exact bytes NF4Weight stores for `numel` weights: codes (half a byte each, whole blocks) + the scales."""
    blocks = math.ceil(numel / blocksize)
    codes = blocks * blocksize // 2
    if not double_quant:
        return codes + 4 * blocks                                   # float32 absmax per block
    return codes + blocks + 4 * math.ceil(blocks / dq_blocksize) + 4  # int8 absmax, float32 scale, offset


class NF4Weight:
    """A weight matrix in NF4: packed codes + (double-quantised) absmax + its shape. `dequantize()` gives it back."""

    def __init__(self, w: torch.Tensor, blocksize: int = BLOCK, double_quant: bool = True,
                 dq_blocksize: int = DQ_BLOCK):
        codes, absmax = quantize_blocks(w.detach(), blocksize)
        self.shape, self.numel, self.blocksize = tuple(w.shape), w.numel(), blocksize
        self.packed = pack_4bit(codes)
        self.absmax = double_quantize(absmax, dq_blocksize) if double_quant else absmax
        self.double_quant = double_quant

    def absmax_values(self) -> torch.Tensor:
        return self.absmax.dequantize() if self.double_quant else self.absmax

    def dequantize(self, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        return dequantize_packed(self.packed, self.absmax_values(), self.blocksize, self.numel).view(self.shape).to(dtype)

    @property
    def nbytes(self) -> int:
        """The bytes actually held by the tensors (measured, not computed: see nf4_bytes for the formula)."""
        scales = self.absmax.nbytes if self.double_quant else self.absmax.numel() * self.absmax.element_size()
        return self.packed.numel() * self.packed.element_size() + scales

    def tensors(self) -> dict[str, torch.Tensor]:
        if self.double_quant:
            return {"packed": self.packed, "absmax_codes": self.absmax.codes, "absmax_scale": self.absmax.scale,
                    "absmax_offset": self.absmax.offset}
        return {"packed": self.packed, "absmax": self.absmax}

    def to(self, device) -> NF4Weight:
        self.packed = self.packed.to(device)
        if self.double_quant:
            a = self.absmax
            self.absmax = DoubleQuant(a.codes.to(device), a.scale.to(device), a.offset.to(device), a.blocksize)
        else:
            self.absmax = self.absmax.to(device)
        return self


def _pair_table(device) -> torch.Tensor:
    """(256, 2): the two levels each byte stands for, so de-quantising is one lookup per byte."""
    b = torch.arange(256, device=device)
    levels = NF4.to(device)
    return torch.stack([levels[b >> 4], levels[b & 0xF]], dim=1)


_PAIRS: dict = {}


def dequantize_packed(packed: torch.Tensor, absmax: torch.Tensor, blocksize: int, numel: int) -> torch.Tensor:
    """Flat float32 weights from packed codes: one table lookup per byte (two levels), times the block's absmax."""
    table = _PAIRS.get(packed.device)
    if table is None:
        table = _PAIRS[packed.device] = _pair_table(packed.device)
    w = table.index_select(0, packed.int()).view(-1, blocksize) * absmax.unsqueeze(1)  # index_select: ~4x table[i]
    return w.reshape(-1)[:numel]


# ---- the frozen 4-bit base layer ----------------------------------------------------------------------------
class _NF4Matmul(torch.autograd.Function):
    """y = x W^T with W de-quantised on the fly, in forward AND in backward.

    WHY: with a plain F.linear(x, layer.dequantize()) autograd would keep every de-quantised float matrix
    alive until backward (it needs W for dL/dx): the whole base in float32 again, the memory QLoRA exists to
    save. Here backward de-quantises once more (compute traded for memory, as bitsandbytes' MatMul4Bit does),
    and nothing but the 4-bit copy lives between the passes. No gradient for W: the base is frozen.
    """

    @staticmethod
    def forward(ctx, x, layer):
        ctx.layer, ctx.dtype = layer, x.dtype
        return F.linear(x, layer.weight_nf4.dequantize(x.dtype))

    @staticmethod
    def backward(ctx, grad):
        w = ctx.layer.weight_nf4.dequantize(grad.dtype)
        return (grad @ w).to(ctx.dtype), None


class Linear4bit(nn.Module):
    """A frozen bias-free linear layer whose weight is stored in NF4 (what LoRA wraps in QLoRA).

    The packed codes and scales are registered as buffers, so `.to(device)`, `state_dict()` and the memory
    accounting see them; `num_weights` is the logical parameter count (in x out) the 4 bits stand for.
    """

    def __init__(self, weight: torch.Tensor, blocksize: int = BLOCK, double_quant: bool = True):
        super().__init__()
        self.out_features, self.in_features = weight.shape
        self.weight_nf4 = NF4Weight(weight, blocksize, double_quant)
        for name, t in self.weight_nf4.tensors().items():
            self.register_buffer(name, t)
        self.bias = None

    @classmethod
    def from_linear(cls, linear: nn.Linear, blocksize: int = BLOCK, double_quant: bool = True) -> Linear4bit:
        if linear.bias is not None:
            raise CourseError("Linear4bit has no bias (LLaMA's linear layers have none)")
        return cls(linear.weight.data, blocksize, double_quant)

    def _apply(self, fn, recurse=True):  # .to(device) moves the buffers: point the NF4Weight at the moved ones
        out = super()._apply(fn, recurse)
        q = self.weight_nf4
        q.packed = self.packed
        if q.double_quant:
            q.absmax = DoubleQuant(self.absmax_codes, self.absmax_scale, self.absmax_offset, q.absmax.blocksize)
        else:
            q.absmax = self.absmax
        return out

    @property
    def num_weights(self) -> int:
        return self.in_features * self.out_features

    @property
    def nbytes(self) -> int:
        return self.weight_nf4.nbytes

    def dequantize(self, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        return self.weight_nf4.dequantize(dtype)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return _NF4Matmul.apply(x, self)

    def extra_repr(self) -> str:
        return (f"in_features={self.in_features}, out_features={self.out_features}, nf4 blocksize="
                f"{self.weight_nf4.blocksize}, double_quant={self.weight_nf4.double_quant}")


def _set_module(model: nn.Module, name: str, new: nn.Module) -> None:
    parent, _, child = name.rpartition(".")
    setattr(model.get_submodule(parent) if parent else model, child, new)


def _tied_ids(model: nn.Module) -> set[int]:
    """ids of parameters that appear under more than one name (a tied embedding / lm_head)."""
    seen: dict[int, int] = {}
    for _, p in model.named_parameters(remove_duplicate=False):
        seen[id(p)] = seen.get(id(p), 0) + 1
    return {k for k, v in seen.items() if v > 1}


def quantize_model(model: nn.Module, skip: tuple[str, ...] = ("lm_head",), blocksize: int = BLOCK,
                   double_quant: bool = True) -> list[str]:
    """Replace every nn.Linear (but `skip` and any whose weight is tied) by a Linear4bit, in place; return names.

    QLoRA keeps the embedding and the output layer in 16/32 bits (bitsandbytes skips lm_head by default): they
    are a table lookup and the last, most sensitive projection; in a tied model they are one matrix anyway.
    """
    tied = _tied_ids(model)
    names = [n for n, m in model.named_modules() if type(m) is nn.Linear and n.rpartition(".")[2] not in skip
             and n not in skip and id(m.weight) not in tied]
    for name in names:
        lin = model.get_submodule(name)
        q = Linear4bit.from_linear(lin, blocksize, double_quant).to(lin.weight.device)
        _set_module(model, name, q)
    return names


def dequantize_model(model: nn.Module, dtype: torch.dtype = torch.float32) -> list[str]:
    """Replace every Linear4bit by an nn.Linear holding its de-quantised weight, in place (before a merge/export)."""
    names = [n for n, m in model.named_modules() if isinstance(m, Linear4bit)]
    for name in names:
        q = model.get_submodule(name)
        lin = nn.Linear(q.in_features, q.out_features, bias=False, device=q.packed.device, dtype=dtype)
        with torch.no_grad():
            lin.weight.copy_(q.dequantize(dtype))
        lin.weight.requires_grad_(False)
        _set_module(model, name, lin)
    return names


@dataclass
class BaseMemory:
    """Bytes of a model's quantised layers: measured (tensors held) and computed (nf4_bytes)."""

    weights: int          # logical parameters stored in 4 bits
    measured_bytes: int   # sum of the bytes of every buffer of every Linear4bit
    computed_bytes: int   # nf4_bytes summed over the layers

    @property
    def bytes_per_param(self) -> float:
        return self.measured_bytes / self.weights if self.weights else float("nan")


def base_memory(model: nn.Module) -> BaseMemory:
    layers = [m for m in model.modules() if isinstance(m, Linear4bit)]
    measured = sum(b.numel() * b.element_size() for m in layers for b in m.buffers())
    computed = sum(nf4_bytes(m.num_weights, m.weight_nf4.blocksize, m.weight_nf4.double_quant) for m in layers)
    return BaseMemory(sum(m.num_weights for m in layers), measured, computed)
