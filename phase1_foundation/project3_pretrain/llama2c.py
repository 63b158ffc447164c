"""Read llama2.c model files (.bin): a reader for the one door, hf_interop.model_from_tensors.

PAPER / SOURCE: karpathy/llama2.c (2023), a LLaMA-2 architecture in one C file; its `export.py` writes
checkpoints as a small header followed by raw float32 weights.

FORMATS
- legacy (version 0): 7 int32 (dim, hidden_dim, n_layers, n_heads, n_kv_heads, vocab_size, seq_len), then
  token_embedding, rms_att, wq, wk, wv, wo, rms_ffn, w1, w2, w3, rms_final, freq_cis_real, freq_cis_imag and,
  if vocab_size < 0 (unshared classifier), wcls. Each matrix [out, in], row-major, all layers stacked.
- version 1: 256-byte header (magic "ak42", version 1, the 7 ints, a shared-classifier byte), then
  norms first, embedding, the attention and FFN matrices layer by layer, optional classifier.

ROPE LAYOUT (why we permute)
llama2.c (like Meta's original code) rotates neighbouring pairs (2i, 2i+1) of each head; HF and project 3
rotate dimension i with i + head_dim/2 ("split-half"). Both are the same rotation applied to a permuted
basis, so reordering the output rows of wq and wk head by head (HF's convert_llama_weights_to_hf
`permute`, project 3's `permute_rope`) makes split-half RoPE compute exactly what interleaved RoPE computed. q.k is unchanged because
q and k get the same permutation; wv and wo are untouched.

`read_llama2c(path)` returns (LlamaConfig, tensors named as Hugging Face names them); `load_llama2c(path)`
builds the model from them through `model_from_tensors`, in memory, as every other format does.
"""

from __future__ import annotations

import struct
from pathlib import Path

import numpy as np
import torch

from course.errors import CourseError
from phase1_foundation.project3_pretrain.hf_interop import model_from_tensors, permute_rope
from phase1_foundation.project3_pretrain.model import Llama, LlamaConfig

MAGIC_V1 = 0x616B3432  # "ak42"


def read_llama2c_header(path: Path) -> tuple[dict, int, int, bool]:
    """(params, weights offset in bytes, version, shared classifier) of a llama2.c .bin."""
    with open(path, "rb") as f:
        head = f.read(256)
    if len(head) < 28:
        raise CourseError(f"{path} is too short to be a llama2.c model")
    (magic,) = struct.unpack_from("<I", head, 0)
    if magic == MAGIC_V1:
        (version,) = struct.unpack_from("<i", head, 4)
        if version != 1:
            raise CourseError(f"{path}: llama2.c format version {version} (quantised) is not supported; "
                              "export it with version 0 or 1 (float32)")
        dims = struct.unpack_from("<7i", head, 8)
        shared = bool(head[36])
        offset = 256
    else:
        version, dims, offset = 0, struct.unpack_from("<7i", head, 0), 28
        shared = dims[5] > 0
    names = ("dim", "hidden_dim", "n_layers", "n_heads", "n_kv_heads", "vocab_size", "seq_len")
    p = dict(zip(names, dims))
    p["vocab_size"] = abs(p["vocab_size"])
    if any(p[n] <= 0 for n in names) or p["dim"] % p["n_heads"] or p["n_heads"] % p["n_kv_heads"]:
        raise CourseError(f"{path} does not look like a llama2.c model (header {dims}); pass a llama2.c .bin, "
                          "a checkpoint .pt or a Hugging Face folder to --model")
    return p, offset, version, shared


def read_llama2c(path: str | Path) -> tuple[LlamaConfig, dict[str, torch.Tensor]]:
    """Read a llama2.c .bin; return (our config, HF-named tensors with the q/k RoPE rows permuted)."""
    path = Path(path)
    if not path.is_file():
        raise CourseError(f"model file not found: {path}")
    p, offset, version, shared = read_llama2c_header(path)
    dim, hidden, L = p["dim"], p["hidden_dim"], p["n_layers"]
    nh, nkv, vocab, seq = p["n_heads"], p["n_kv_heads"], p["vocab_size"], p["seq_len"]
    hd = dim // nh
    kv_dim = nkv * hd
    data = np.memmap(path, dtype=np.float32, mode="r", offset=offset)
    pos = 0

    def take(*shape):
        nonlocal pos
        n = int(np.prod(shape))
        if pos + n > data.size:
            raise CourseError(f"{path} is truncated: the header (dim {dim}, layers {L}, vocab {vocab}) needs more "
                              f"weights than the file holds ({data.size * 4 + offset:,} bytes)")
        t = torch.from_numpy(np.array(data[pos:pos + n])).view(*shape)
        pos += n
        return t

    w: dict[str, torch.Tensor] = {}
    if version == 0:
        w["emb"] = take(vocab, dim)
        w["rms_att"] = take(L, dim)
        w["wq"], w["wk"], w["wv"], w["wo"] = take(L, dim, dim), take(L, kv_dim, dim), take(L, kv_dim, dim), take(L, dim, dim)
        w["rms_ffn"] = take(L, dim)
        w["w1"], w["w2"], w["w3"] = take(L, hidden, dim), take(L, dim, hidden), take(L, hidden, dim)
        w["rms_final"] = take(dim)
        take(seq, hd // 2), take(seq, hd // 2)  # freq_cis_real / imag: recomputed from rope_theta
    else:
        w["rms_att"], w["rms_ffn"], w["rms_final"] = take(L, dim), take(L, dim), take(dim)
        w["emb"] = take(vocab, dim)
        w["wq"], w["wk"] = take(L, dim, dim), take(L, kv_dim, dim)
        w["wv"], w["wo"] = take(L, kv_dim, dim), take(L, dim, dim)
        w["w1"], w["w2"], w["w3"] = take(L, hidden, dim), take(L, dim, hidden), take(L, hidden, dim)
    if not shared:
        w["wcls"] = take(vocab, dim)
    if pos != data.size:
        raise CourseError(f"{path}: {(data.size - pos) * 4:,} bytes left over after the weights the header "
                          f"describes; the header does not match the weights")

    sd = {"model.embed_tokens.weight": w["emb"], "model.norm.weight": w["rms_final"]}
    for i in range(L):
        pre = f"model.layers.{i}."
        sd[pre + "input_layernorm.weight"] = w["rms_att"][i]
        sd[pre + "self_attn.q_proj.weight"] = permute_rope(w["wq"][i], nh)
        sd[pre + "self_attn.k_proj.weight"] = permute_rope(w["wk"][i], nkv)
        sd[pre + "self_attn.v_proj.weight"] = w["wv"][i]
        sd[pre + "self_attn.o_proj.weight"] = w["wo"][i]
        sd[pre + "post_attention_layernorm.weight"] = w["rms_ffn"][i]
        sd[pre + "mlp.gate_proj.weight"] = w["w1"][i]
        sd[pre + "mlp.down_proj.weight"] = w["w2"][i]
        sd[pre + "mlp.up_proj.weight"] = w["w3"][i]
    if not shared:
        sd["lm_head.weight"] = w["wcls"]
    sd = {k: v.contiguous() for k, v in sd.items()}
    # llama2.c's run.c: RMSNorm eps 1e-5, RoPE base 10000, the context its model was trained with
    config = LlamaConfig(block_size=seq, vocab_size=vocab, n_layer=L, n_head=nh, n_kv_head=nkv, n_embd=dim,
                         intermediate_size=hidden, rope_theta=10000.0, norm_eps=1e-5, tie_embeddings=shared,
                         dropout=0.0)
    return config, sd


def load_llama2c(path: str | Path) -> Llama:
    """A llama2.c .bin -> our Llama (eval, float32), through the one door."""
    config, tensors = read_llama2c(path)
    return model_from_tensors(config, tensors, source=str(path))
