"""Tiny GGUF files for tests, written as llama.cpp's converter writes them, defined once for every project.

`write_gguf(path, model, qtype)` turns one of our Llama models (e.g. `testing.tiny_llama`) into a llama GGUF
file: llama.cpp names, q/k rows permuted to llama.cpp's RoPE layout, ggml dimension order, every matrix in
`qtype` (quantized with `gguf.quants.quantize` where the gguf package can, else random raw blocks with small
valid scales), a small byte-level tokenizer (`tiny_tokenizer`) and a ChatML chat template in the metadata.
Needs the `gguf` package (a dependency of the course) to write; `gguf_io` reads the files back.
"""

from __future__ import annotations

import re

import numpy as np
import torch
from gguf import GGMLQuantizationType as T
from gguf import GGUFWriter, quants

from phase1_foundation.project2_tokenizer.formats import gpt2_bytes_to_unicode
from phase1_foundation.project3_pretrain import gguf_quants as gq
from phase1_foundation.project3_pretrain.gguf_io import GGUF_LAYER_TO_HF, GGUF_TO_HF
from phase1_foundation.project3_pretrain.hf_interop import hf_name_map, unpermute_rope
from phase1_foundation.project3_pretrain.testing import tiny_llama

TYPES = [T.F32, T.F16, T.BF16, T.Q8_0, T.Q4_0, T.Q4_1, T.Q4_K, T.Q5_K, T.Q6_K]
SCALE_AT = {T.Q8_0: [0], T.Q4_0: [0], T.Q4_1: [0, 2], T.Q4_K: [0, 2], T.Q5_K: [0, 2], T.Q6_K: [208]}
CHATML = ("{% for message in messages %}{% if loop.first and messages[0]['role'] != 'system' %}{{ '<|im_start|>"
          "system\\nYou are a tiny test model<|im_end|>\\n' }}{% endif %}{{'<|im_start|>' + message['role'] + '\\n'"
          " + message['content'] + '<|im_end|>' + '\\n'}}{% endfor %}{% if add_generation_prompt %}"
          "{{ '<|im_start|>assistant\\n' }}{% endif %}")


def quantized(x: np.ndarray, qtype: T, rng: np.random.Generator) -> np.ndarray:
    """x quantized by gguf where it can; otherwise random bytes whose f16 scales are small finite values."""
    try:
        return quants.quantize(x, qtype)
    except NotImplementedError:
        _, per, nbytes = gq.GGML_TYPES[int(qtype)]
        raw = rng.integers(0, 256, size=(x.shape[0], x.shape[1] // per * nbytes), dtype=np.uint8)
        blocks = raw.reshape(-1, nbytes)
        for at in SCALE_AT[qtype]:
            blocks[:, at:at + 2] = rng.uniform(1e-5, 1e-4, (len(blocks), 1)).astype(np.float16).view(np.uint8)
        return raw


def tiny_tokenizer(n_merges: int) -> tuple[list[str], list[str], list[int]]:
    """3 control tokens, the 256 bytes in GPT-2's spelling, then n_merges merges learned on a sample text."""
    spell = gpt2_bytes_to_unicode()
    text = ("the cat sat on the mat, then the theme of the other three cats; another mother sang rather "
            "softly at the harbour while the mathematician thought about theorems and their proofs") * 2
    words = [[spell[b] for b in w.encode()] for w in re.findall(r" ?\w+| ?[^\w\s]+|\s+", text)]
    tokens, merges = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"] + [spell[b] for b in range(256)], []
    for _ in range(n_merges):
        counts: dict[tuple[str, str], int] = {}
        for w in words:
            for pair in zip(w, w[1:]):
                counts[pair] = counts.get(pair, 0) + 1
        a, b = max(counts, key=lambda p: (counts[p], p))
        merges.append(f"{a} {b}")
        tokens.append(a + b)
        for w in words:
            i = 0
            while i < len(w) - 1:
                if (w[i], w[i + 1]) == (a, b):
                    w[i:i + 2] = [a + b]
                i += 1
    return tokens, merges, [3, 3, 3] + [1] * (len(tokens) - 3)


def write_gguf(path, model, qtype: T, arch: str = "llama", tok_model: str = "gpt2", template: str | None = CHATML,
               seed: int = 0):
    """Write model as llama.cpp's converter would: GGUF names, q/k rows permuted, ggml dim order, quantized."""
    cfg = model.config
    rng = np.random.default_rng(seed)
    w = GGUFWriter(str(path), arch)
    w.add_context_length(cfg.block_size)
    w.add_embedding_length(cfg.n_embd)
    w.add_block_count(cfg.n_layer)
    w.add_feed_forward_length(cfg.ffn_dim)
    w.add_head_count(cfg.n_head)
    w.add_head_count_kv(cfg.n_kv_head)
    w.add_rope_freq_base(cfg.rope_theta)
    w.add_layer_norm_rms_eps(cfg.norm_eps)
    w.add_rope_dimension_count(cfg.hd)
    w.add_vocab_size(cfg.vocab_size)
    tokens, merges, types = tiny_tokenizer(cfg.vocab_size - 259)
    w.add_tokenizer_model(tok_model)
    w.add_tokenizer_pre("smollm")
    w.add_token_list(tokens)
    w.add_token_merges(merges)
    w.add_token_types(types)
    w.add_bos_token_id(1)
    w.add_eos_token_id(2)
    w.add_add_bos_token(False)
    if template:
        w.add_chat_template(template)
    to_gguf = {v: k for k, v in GGUF_TO_HF.items()}
    state = model.state_dict()
    for ours, hf in hf_name_map(cfg).items():
        x = state[ours].detach().numpy().astype(np.float32)
        if hf in to_gguf:
            name = to_gguf[hf]
        else:
            _, _, i, *rest = hf.split(".")
            name = f"blk.{i}." + next(g for g, h in GGUF_LAYER_TO_HF.items() if h == ".".join(rest[:-1])) + ".weight"
        if name.endswith("attn_q.weight"):
            x = unpermute_rope(torch.from_numpy(x), cfg.n_head).numpy()
        elif name.endswith("attn_k.weight"):
            x = unpermute_rope(torch.from_numpy(x), cfg.n_kv_head).numpy()
        if x.ndim == 1 or qtype == T.F32:
            w.add_tensor(name, x)
        elif qtype == T.F16:
            w.add_tensor(name, x.astype(np.float16))
        else:
            w.add_tensor(name, quantized(x, qtype, rng), raw_dtype=qtype)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return path


def tiny_gguf_llama(tied: bool = True, seed: int = 3):
    """A tiny Llama whose rows (256 wide) fit every block size (K-quants' 256 too); 300 tokens, 512 positions."""
    return tiny_llama(seed=seed, block_size=512, n_embd=256, n_head=4, n_kv_head=2, intermediate_size=512,
                      vocab_size=300, tie_embeddings=tied)
