"""De-quantize GGUF tensors from scratch: llama.cpp's block formats, one small function per type.

PAPERS / SOURCES
- Dettmers et al. 2022, "LLM.int8()": absmax quantization, one scale per block of values.
- Frantar et al. 2022, "GPTQ" and Lin et al. 2023, "AWQ": 4-bit weight-only quantization in groups.
- ggml / llama.cpp (Gerganov et al., `ggml-quants.c`, the "k-quants" pull request #1684 by Kawrakow, 2023):
  the exact byte layouts below. This is the first look at block quantization; project 14 builds on it.

INTUITION: a weight matrix is cut, row by row, into blocks of 32 (or 256) consecutive values. Each block keeps
a few small integers per value (4, 5, 6 or 8 bits) and one or two floats for the whole block (a scale d, and
for the "_1"/K types a minimum m): x ~ d * q + m. The K-quants ("super-blocks" of 256) go one level deeper:
the per-32 scales and minimums are themselves quantized to 6 or 8 bits against one f16 super-scale.

IMPLEMENTATION: every function takes `blocks`, a uint8 array of shape (n_blocks, bytes_per_block) cut from
the file, and returns float32 values of shape (n_blocks, values_per_block). Everything is numpy on whole
arrays (no Python loop over values): SmolLM2-135M de-quantizes in about a second. `dequantize(raw, type,
shape)` dispatches on the ggml type id and returns a torch tensor in torch dimension order.
WHY float32 arithmetic in this order: it is the order ggml (and `gguf.quants`) computes in, so the result is
bit-identical to the reference, not merely close.
"""

from __future__ import annotations

import numpy as np
import torch

from course.errors import CourseError

QK = 32      # values per block of the simple types
QK_K = 256   # values per super-block of the K-quants

# ggml type id -> (name, values per block, bytes per block); the ids are ggml's `enum ggml_type`.
GGML_TYPES = {
    0: ("F32", 1, 4), 1: ("F16", 1, 2), 2: ("Q4_0", QK, 18), 3: ("Q4_1", QK, 20), 6: ("Q5_0", QK, 22),
    7: ("Q5_1", QK, 24), 8: ("Q8_0", QK, 34), 9: ("Q8_1", QK, 40), 10: ("Q2_K", QK_K, 84),
    11: ("Q3_K", QK_K, 110), 12: ("Q4_K", QK_K, 144), 13: ("Q5_K", QK_K, 176), 14: ("Q6_K", QK_K, 210),
    15: ("Q8_K", QK_K, 292), 30: ("BF16", 1, 2),
}


def _f16(blocks: np.ndarray, start: int) -> np.ndarray:
    """Bytes [start, start+2) of every block as one float16 -> float32 column (n_blocks, 1)."""
    return blocks[:, start:start + 2].copy().view(np.float16).astype(np.float32)


def _nibbles(qs: np.ndarray) -> np.ndarray:
    """(n, k) bytes -> (n, 2k) 4-bit values: all low nibbles first, then all high nibbles (ggml's order)."""
    return np.concatenate([qs & 0x0F, qs >> 4], axis=-1)


# ---- plain floats -------------------------------------------------------------------------------
def dequant_f32(blocks: np.ndarray) -> np.ndarray:
    """F32: 4 bytes per value, little-endian IEEE float32. Nothing to undo."""
    return blocks.reshape(-1).view(np.float32).reshape(-1, 1).copy()


def dequant_f16(blocks: np.ndarray) -> np.ndarray:
    """F16: 2 bytes per value, IEEE half precision, widened to float32 (exact)."""
    return blocks.reshape(-1).view(np.float16).astype(np.float32).reshape(-1, 1)


def dequant_bf16(blocks: np.ndarray) -> np.ndarray:
    """BF16: 2 bytes per value, the top 16 bits of a float32 (same exponent, 7-bit mantissa).

    Shifting the 16 bits back to the top of a 32-bit word gives the float32 exactly.
    """
    bits = blocks.reshape(-1).view(np.uint16).astype(np.uint32) << 16
    return bits.view(np.float32).reshape(-1, 1)


# ---- 32-value blocks ----------------------------------------------------------------------------
def dequant_q8_0(blocks: np.ndarray) -> np.ndarray:
    """Q8_0, 34 bytes per 32 values: f16 d | int8 q[32].  x = d * q  (absmax: d = max|x| / 127)."""
    d = _f16(blocks, 0)
    q = blocks[:, 2:].view(np.int8).astype(np.float32)
    return d * q


def dequant_q4_0(blocks: np.ndarray) -> np.ndarray:
    """Q4_0, 18 bytes per 32 values: f16 d | 16 bytes of 4-bit q.  x = d * (q - 8).

    Byte j holds value j in its low nibble and value j+16 in its high nibble; q - 8 centres the 16 levels
    on zero (symmetric, no minimum).
    """
    d = _f16(blocks, 0)
    q = _nibbles(blocks[:, 2:]).astype(np.int8) - np.int8(8)
    return d * q.astype(np.float32)


def dequant_q4_1(blocks: np.ndarray) -> np.ndarray:
    """Q4_1, 20 bytes per 32 values: f16 d | f16 m | 16 bytes of 4-bit q.  x = d * q + m.

    Same nibble order as Q4_0, but asymmetric: m is the block's minimum, d = (max - min) / 15, so a block
    whose values are all positive wastes no level on negatives. SmolLM2's GGUF stores its matrices so.
    """
    d, m = _f16(blocks, 0), _f16(blocks, 2)
    q = _nibbles(blocks[:, 4:]).astype(np.float32)
    return d * q + m


# ---- 256-value super-blocks (K-quants) ----------------------------------------------------------
def _k_scales_mins(scales: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """12 bytes -> 8 six-bit scales and 8 six-bit minimums (ggml's get_scale_min_k4), as float32.

    Bytes 0-3: low 6 bits = scale 0-3, top 2 bits = high bits of scale 4-7.
    Bytes 4-7: low 6 bits = min 0-3, top 2 bits = high bits of min 4-7.
    Bytes 8-11: low nibble = low 4 bits of scale 4-7, high nibble = low 4 bits of min 4-7.
    """
    a, b, c = scales[:, 0:4], scales[:, 4:8], scales[:, 8:12]
    sc = np.concatenate([a & 63, (c & 0x0F) | ((a >> 6) << 4)], axis=-1)
    mn = np.concatenate([b & 63, (c >> 4) | ((b >> 6) << 4)], axis=-1)
    return sc.astype(np.float32), mn.astype(np.float32)


def dequant_q4_k(blocks: np.ndarray) -> np.ndarray:
    """Q4_K, 144 bytes per 256 values: f16 d | f16 dmin | 12 bytes scales | 128 bytes of 4-bit q.

    8 sub-blocks of 32, sub-block s: x = (d * scale_s) * q - (dmin * min_s), the 6-bit scale_s/min_s
    packed as in `_k_scales_mins`. The 128 q bytes are 4 chunks of 32 bytes; chunk c holds sub-block 2c in
    its low nibbles and sub-block 2c+1 in its high nibbles.
    """
    n = len(blocks)
    d, dmin = _f16(blocks, 0), _f16(blocks, 2)
    sc, mn = _k_scales_mins(blocks[:, 4:16])
    q = _nibbles(blocks[:, 16:].reshape(n, 4, 32)).reshape(n, 8, 32).astype(np.float32)
    return ((d * sc)[..., None] * q - (dmin * mn)[..., None]).reshape(n, QK_K)


def dequant_q5_k(blocks: np.ndarray) -> np.ndarray:
    """Q5_K, 176 bytes per 256 values: f16 d | f16 dmin | 12 bytes scales | 32 bytes qh | 128 bytes ql.

    As Q4_K, with a fifth bit per value: value i of sub-block s takes bit s of qh[i] as its bit 4, so
    q = low/high nibble (as Q4_K) + 16 * ((qh[i] >> s) & 1), in 0..31.
    """
    n = len(blocks)
    d, dmin = _f16(blocks, 0), _f16(blocks, 2)
    sc, mn = _k_scales_mins(blocks[:, 4:16])
    qh = blocks[:, 16:48]                                                 # (n, 32)
    low = _nibbles(blocks[:, 48:].reshape(n, 4, 32)).reshape(n, 8, 32)    # sub-block s = 2c (+1 high)
    high = (qh[:, None, :] >> np.arange(8, dtype=np.uint8)[None, :, None]) & 1   # (n, 8, 32)
    q = (low | (high << 4)).astype(np.float32)
    return ((d * sc)[..., None] * q - (dmin * mn)[..., None]).reshape(n, QK_K)


def dequant_q6_k(blocks: np.ndarray) -> np.ndarray:
    """Q6_K, 210 bytes per 256 values: 128 bytes ql (low 4 bits) | 64 bytes qh (high 2 bits) |
    16 int8 scales | f16 d.  16 sub-blocks of 16: x = d * scale_s * (q - 32), q in 0..63.

    Each half of 128 values uses 64 ql bytes and 32 qh bytes: for l in 0..31 the four values l, l+32,
    l+64, l+96 take ql[l] low, ql[l+32] low, ql[l] high, ql[l+32] high nibble, and bits (0-1), (2-3), (4-5),
    (6-7) of qh[l] as their two high bits.
    """
    n = len(blocks)
    ql = blocks[:, :128].reshape(n, 2, 2, 32)                 # half, (first/second 32 bytes), l
    qh = blocks[:, 128:192].reshape(n, 2, 1, 32)              # half, -, l
    scales = blocks[:, 192:208].view(np.int8).astype(np.float32)  # (n, 16)
    d = _f16(blocks, 208)
    low = np.concatenate([ql & 0x0F, ql >> 4], axis=2)        # (n, 2, 4, 32): quarter j = 0..3
    shifts = np.array([0, 2, 4, 6], dtype=np.uint8)[None, None, :, None]
    high = (qh >> shifts) & 3                                 # (n, 2, 4, 32)
    q = (low | (high << 4)).astype(np.int8) - np.int8(32)
    q = q.astype(np.float32).reshape(n, 16, 16)               # sub-block of 16 = (half, quarter, l // 16)
    return ((d * scales)[..., None] * q).reshape(n, QK_K)


DEQUANTIZERS = {0: dequant_f32, 1: dequant_f16, 30: dequant_bf16, 8: dequant_q8_0, 2: dequant_q4_0,
                3: dequant_q4_1, 12: dequant_q4_k, 13: dequant_q5_k, 14: dequant_q6_k}


def type_name(ggml_type: int) -> str:
    return GGML_TYPES.get(int(ggml_type), (f"type id {int(ggml_type)}",))[0]


def dequantize(raw: np.ndarray, ggml_type: int, shape: tuple[int, ...], name: str = "tensor") -> torch.Tensor:
    """Raw bytes of one GGUF tensor -> a float32 torch tensor of `shape` (torch order, last dim fastest).

    ggml quantizes along the fastest dimension (a row of the matrix), so a tensor of shape (out, in) is
    out * in / block_size blocks laid end to end.
    """
    ggml_type = int(ggml_type)
    fn = DEQUANTIZERS.get(ggml_type)
    if fn is None:
        supported = ", ".join(type_name(t) for t in DEQUANTIZERS)
        raise CourseError(f"{name}: quantization type {type_name(ggml_type)} is not supported "
                          f"(supported: {supported}); re-quantize the model to one of them")
    _, per_block, block_bytes = GGML_TYPES[ggml_type]
    n_values = int(np.prod(shape))
    if n_values % per_block:
        raise CourseError(f"{name}: {n_values} values is not a whole number of {type_name(ggml_type)} blocks")
    data = np.ascontiguousarray(raw).reshape(-1).view(np.uint8)
    n_blocks = n_values // per_block
    if data.size != n_blocks * block_bytes:
        raise CourseError(f"{name}: {data.size} bytes of {type_name(ggml_type)} data, expected "
                          f"{n_blocks * block_bytes} for shape {tuple(shape)}; the file is corrupt or truncated")
    values = fn(data.reshape(n_blocks, block_bytes))
    return torch.from_numpy(np.ascontiguousarray(values, dtype=np.float32).reshape(shape))


__all__ = ["dequantize", "DEQUANTIZERS", "GGML_TYPES", "type_name", "dequant_f32", "dequant_f16",
           "dequant_bf16", "dequant_q8_0", "dequant_q4_0", "dequant_q4_1", "dequant_q4_k", "dequant_q5_k",
           "dequant_q6_k"]
