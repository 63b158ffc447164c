"""Read GGUF model files (llama.cpp's format): a reader for the one door, hf_interop.model_from_tensors.

SOURCES: ggml / llama.cpp (Gerganov et al.), `docs/gguf.md` (the container) and `convert_hf_to_gguf.py` (what
the converter does to a Hugging Face LLaMA on the way in, which we undo on the way out).

FORMAT: a GGUF file is a header, typed key/value metadata (`general.architecture = "llama"`,
`llama.block_count`, `tokenizer.ggml.tokens`, `tokenizer.chat_template`, ...), a table of tensors (name,
dimensions, ggml type, offset) and the aligned tensor data. `GGUFFile` parses the container (checked in the
tests against `gguf.GGUFReader`, llama.cpp's own Python reader); `read_gguf` turns its content into
(LlamaConfig, HF-named float32 tensors).

WHAT THE CONVERTER CHANGED, AND HOW WE UNDO IT
1. Names: `blk.N.attn_q.weight` <- `model.layers.N.self_attn.q_proj.weight`, ... (`GGUF_TO_HF` below).
2. Dimension order: ggml lists dimensions fastest-moving first, so a (out, in) matrix is stored as [in, out];
   the bytes are the same row-major data, we only reverse the shape.
3. RoPE layout: llama.cpp rotates neighbouring pairs (Meta's layout), HF and we rotate split halves, so the
   converter permuted the rows of q_proj (by n_head) and k_proj (by n_kv_head); `permute_rope` puts them back.
4. Tied classifier: a model whose lm_head is its embedding has no `output.weight`; we set tie_embeddings.
5. Quantization: each tensor is de-quantized to float32 by `gguf_quants.dequantize` (our code, not gguf's).
"""

from __future__ import annotations

import re
import struct
from pathlib import Path

import numpy as np
import torch

from course.errors import CourseError
from phase1_foundation.project3_pretrain.gguf_quants import GGML_TYPES, dequantize
from phase1_foundation.project3_pretrain.hf_interop import model_from_tensors, permute_rope
from phase1_foundation.project3_pretrain.model import Llama, LlamaConfig

GGUF_TO_HF = {"token_embd.weight": "model.embed_tokens.weight", "output_norm.weight": "model.norm.weight",
              "output.weight": "lm_head.weight"}
GGUF_LAYER_TO_HF = {"attn_norm": "input_layernorm", "attn_q": "self_attn.q_proj", "attn_k": "self_attn.k_proj",
                    "attn_v": "self_attn.v_proj", "attn_output": "self_attn.o_proj",
                    "ffn_norm": "post_attention_layernorm", "ffn_gate": "mlp.gate_proj", "ffn_up": "mlp.up_proj",
                    "ffn_down": "mlp.down_proj"}
_LAYER = re.compile(r"^blk\.(\d+)\.(\w+)\.weight$")


def hf_name(gguf_name: str, source: str = "gguf") -> str:
    """`blk.3.attn_q.weight` -> `model.layers.3.self_attn.q_proj.weight`; an unknown name is an error."""
    if gguf_name in GGUF_TO_HF:
        return GGUF_TO_HF[gguf_name]
    m = _LAYER.match(gguf_name)
    if m and m.group(2) in GGUF_LAYER_TO_HF:
        return f"model.layers.{m.group(1)}.{GGUF_LAYER_TO_HF[m.group(2)]}.weight"
    hint = " (llama 3.1 RoPE scaling is not supported)" if gguf_name == "rope_freqs.weight" else ""
    raise CourseError(f"{source}: tensor '{gguf_name}' is not part of a plain LLaMA model{hint}")


# ---- the container --------------------------------------------------------------------------------
# GGUF v2/v3, little-endian: b"GGUF", u32 version, u64 tensor count, u64 key/value count; then each key/value
# (u64-length utf-8 key, u32 value type, value); then each tensor (name, u32 n_dims, u64 dims in ggml order,
# u32 ggml type, u64 offset into the data); then padding to `general.alignment` (32) and the data.
_SCALARS = {0: "<B", 1: "<b", 2: "<H", 3: "<h", 4: "<I", 5: "<i", 6: "<f", 7: "<?", 10: "<Q", 11: "<q", 12: "<d"}
_NUMPY = {0: "<u1", 1: "<i1", 2: "<u2", 3: "<i2", 4: "<u4", 5: "<i4", 6: "<f4", 7: "?", 10: "<u8", 11: "<i8",
          12: "<f8"}
STRING, ARRAY = 8, 9


class GGUFFile:
    """The parsed header of a GGUF file: `metadata` (key -> Python value), `tensors` (name -> (shape in torch
    order, ggml type, absolute byte offset)), and `raw(name)`, the tensor's bytes (a view of a memory map).

    WHY our own parser and not `gguf.GGUFReader`: the reader turns every one of the 49,152 tokens and 48,900
    merges into numpy views, which takes seconds; reading them with struct takes milliseconds. The tests
    check that both see the same metadata and tensors.
    """

    def __init__(self, path: str | Path):
        self.path = Path(path)
        if not self.path.is_file():
            raise CourseError(f"GGUF file not found: {self.path}")
        if self.path.stat().st_size < 24:  # magic, version, two counts: an empty or cut file cannot be mapped
            raise CourseError(f"{self.path} is not a GGUF file (only {self.path.stat().st_size} bytes); "
                              "download it again")
        self.buf = np.memmap(self.path, dtype=np.uint8, mode="r")
        if bytes(self.buf[:4]) != b"GGUF":
            raise CourseError(f"{self.path} is not a GGUF file (it starts with {bytes(self.buf[:4])!r}, not b'GGUF')")
        try:
            self._parse()
        except (struct.error, ValueError, IndexError, UnicodeDecodeError, OverflowError) as e:
            raise CourseError(f"{self.path}: cannot read the GGUF header ({type(e).__name__}); the file is "
                              "truncated or corrupt, download it again") from None

    def _take(self, fmt: str):
        (v,) = struct.unpack_from(fmt, self.buf, self.pos)
        self.pos += struct.calcsize(fmt)
        return v

    def _string(self) -> str:
        n = self._take("<Q")
        if self.pos + n > len(self.buf):
            raise ValueError("string past the end of the file")
        s = bytes(self.buf[self.pos:self.pos + n]).decode("utf-8")
        self.pos += n
        return s

    def _value(self, vtype: int):
        if vtype in _SCALARS:
            return self._take(_SCALARS[vtype])
        if vtype == STRING:
            return self._string()
        if vtype == ARRAY:
            etype, n = self._take("<I"), self._take("<Q")
            if etype in _NUMPY:  # numbers: one vectorised read (token types, scores)
                dt = np.dtype(_NUMPY[etype])
                if self.pos + n * dt.itemsize > len(self.buf):
                    raise ValueError("array past the end of the file")
                arr = np.frombuffer(self.buf, dt, count=n, offset=self.pos)
                self.pos += n * dt.itemsize
                return arr.tolist()
            return [self._value(etype) for _ in range(n)]
        raise ValueError(f"unknown metadata value type {vtype}")

    def _parse(self) -> None:
        self.pos = 4
        self.version = self._take("<I")
        if self.version not in (2, 3):
            raise CourseError(f"{self.path}: GGUF version {self.version} is not supported (only 2 and 3)")
        n_tensors, n_kv = self._take("<Q"), self._take("<Q")
        self.metadata = {}
        for _ in range(n_kv):
            key = self._string()
            self.metadata[key] = self._value(self._take("<I"))
        table = []
        for _ in range(n_tensors):
            name = self._string()
            dims = [self._take("<Q") for _ in range(self._take("<I"))]
            table.append((name, tuple(reversed(dims)), self._take("<I"), self._take("<Q")))
        align = int(self.metadata.get("general.alignment", 32))
        start = (self.pos + align - 1) // align * align
        self.tensors = {name: (shape, ggml_type, start + off) for name, shape, ggml_type, off in table}

    def raw(self, name: str, nbytes: int) -> np.ndarray:
        off = self.tensors[name][2]
        if off + nbytes > len(self.buf):
            raise CourseError(f"{self.path}: tensor '{name}' ends past the end of the file ({len(self.buf):,} "
                              "bytes); the file is truncated, download it again")
        return self.buf[off:off + nbytes]


def _nbytes(shape: tuple[int, ...], ggml_type: int) -> int:
    info = GGML_TYPES.get(ggml_type)
    if info is None:
        return 0  # dequantize names the unsupported type
    _, per_block, block_bytes = info
    return int(np.prod(shape)) // per_block * block_bytes


def llama_config_from_gguf(meta: dict, tied: bool, source: str = "gguf") -> LlamaConfig:
    """Metadata (`llama.*` keys) -> our LlamaConfig; anything we cannot represent is one clear error."""
    arch = meta.get("general.architecture")
    if arch != "llama":
        raise CourseError(f"{source}: architecture '{arch}' is not supported (only 'llama'; SmolLM, TinyLlama "
                          "and LLaMA 2 files are llama)")

    def get(key, default=None):
        value = meta.get(f"llama.{key}", default)
        if value is None:
            raise CourseError(f"{source}: metadata key 'llama.{key}' is missing; not a complete llama GGUF")
        return value

    scaling = meta.get("llama.rope.scaling.type", "none")
    if scaling not in ("none", None) and float(meta.get("llama.rope.scaling.factor", 1.0)) != 1.0:
        raise CourseError(f"{source}: RoPE scaling '{scaling}' is not supported (only plain RoPE)")
    if int(meta.get("llama.expert_count", 0) or 0) > 0:
        raise CourseError(f"{source}: mixture-of-experts llama files are not supported")
    n_embd, n_head = int(get("embedding_length")), int(get("attention.head_count"))
    head_dim = int(meta.get("llama.attention.key_length", n_embd // n_head))
    rot = int(meta.get("llama.rope.dimension_count", head_dim))
    if rot != head_dim:
        raise CourseError(f"{source}: partial RoPE (rope.dimension_count {rot} of head_dim {head_dim}) "
                          "is not supported")
    vocab = meta.get("llama.vocab_size") or len(meta.get("tokenizer.ggml.tokens") or []) or None
    cfg = LlamaConfig(
        block_size=int(get("context_length", 2048)),
        vocab_size=int(vocab) if vocab else int(get("vocab_size")),
        n_layer=int(get("block_count")),
        n_head=n_head,
        n_kv_head=int(get("attention.head_count_kv", n_head)),
        n_embd=n_embd,
        head_dim=0 if head_dim * n_head == n_embd else head_dim,
        intermediate_size=int(get("feed_forward_length")),
        rope_theta=float(get("rope.freq_base", 10_000.0)),
        norm_eps=float(get("attention.layer_norm_rms_epsilon", 1e-5)),
        tie_embeddings=tied,
        dropout=0.0,
    )
    try:
        return cfg.validate_config()
    except CourseError as e:
        raise CourseError(f"{source}: {e}") from None


def read_gguf(path: str | Path) -> tuple[LlamaConfig, dict[str, torch.Tensor], dict]:
    """A llama GGUF file -> (our config, float32 tensors by Hugging Face name, the metadata)."""
    f = path if isinstance(path, GGUFFile) else GGUFFile(path)
    cfg = llama_config_from_gguf(f.metadata, tied="output.weight" not in f.tensors, source=str(f.path))
    tensors: dict[str, torch.Tensor] = {}
    for name, (shape, ggml_type, _) in f.tensors.items():
        hf = hf_name(name, str(f.path))
        w = dequantize(f.raw(name, _nbytes(shape, ggml_type)), ggml_type, shape, f"{f.path.name}: {name}")
        if name.endswith("attn_q.weight"):
            w = permute_rope(w, cfg.n_head)
        elif name.endswith("attn_k.weight"):
            w = permute_rope(w, cfg.n_kv_head)
        tensors[hf] = w
    return cfg, tensors, f.metadata


def load_gguf(path: str | Path) -> Llama:
    """A llama GGUF file -> our Llama (float32, eval mode), through the one in-memory door."""
    cfg, tensors, _ = read_gguf(path)
    return model_from_tensors(cfg, tensors, source=str(path))


__all__ = ["read_gguf", "load_gguf", "GGUFFile", "llama_config_from_gguf", "hf_name",
           "GGUF_TO_HF", "GGUF_LAYER_TO_HF"]
