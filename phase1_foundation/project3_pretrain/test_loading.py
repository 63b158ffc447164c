"""Tests for the one door (hf_interop.model_from_tensors), the llama2.c reader and loading.py.

References: transformers' LlamaForCausalLM on the same tensors (the door, llama2.c files written the way
llama2.c's export.py writes them); every bad input is one CourseError that names what is wrong.

Run: uv run pytest -q phase1_foundation/project3_pretrain/test_loading.py
"""

from __future__ import annotations

import struct
from pathlib import Path

import numpy as np
import pytest
import torch

from course.checkpoint import save_checkpoint
from course.errors import CourseError
from phase1_foundation.project3_pretrain.hf_interop import export_hf, hf_name_map, model_from_tensors
from phase1_foundation.project3_pretrain.llama2c import load_llama2c, read_llama2c
from phase1_foundation.project3_pretrain.loading import (build_model, load_model, load_model_from_checkpoint,
                                                         load_tokenizer_for)
from phase1_foundation.project3_pretrain.testing import tiny_config, tiny_llama

transformers = pytest.importorskip("transformers", reason="transformers (dev dependency) is the reference here")


def hf_random(tie: bool, n_kv: int = 2, seed: int = 0, vocab: int = 97):
    """A tiny transformers LLaMA with random weights, norm gains away from 1 (a skipped norm would show)."""
    torch.manual_seed(seed)
    cfg = transformers.LlamaConfig(vocab_size=vocab, hidden_size=32, intermediate_size=48, num_hidden_layers=2,
                                   num_attention_heads=4, num_key_value_heads=n_kv, max_position_embeddings=32,
                                   rms_norm_eps=1e-5, tie_word_embeddings=tie, attn_implementation="eager")
    hf = transformers.LlamaForCausalLM(cfg).eval()
    with torch.no_grad():
        for name, p in hf.named_parameters():
            if "norm" in name:
                p.uniform_(0.5, 1.5)
    return hf


def ours_config_of(hf, **kw):
    c = hf.config
    return tiny_config(block_size=c.max_position_embeddings, vocab_size=c.vocab_size, n_layer=c.num_hidden_layers,
                       n_head=c.num_attention_heads, n_kv_head=c.num_key_value_heads, n_embd=c.hidden_size,
                       intermediate_size=c.intermediate_size, norm_eps=c.rms_norm_eps,
                       tie_embeddings=c.tie_word_embeddings, **kw)


# ---- the door ----------------------------------------------------------------------------------------
@pytest.mark.parametrize("tie,n_kv", [(True, 2), (False, 1), (False, 4)])
def test_door_equals_transformers_on_the_same_tensors(tie, n_kv):
    hf = hf_random(tie, n_kv, seed=n_kv)
    tensors = dict(hf.state_dict())  # a tied HF model still lists lm_head.weight: the door must accept it
    ours = model_from_tensors(ours_config_of(hf), tensors)
    assert not ours.training and (ours.lm_head.weight is ours.tok_emb.weight) == tie
    idx = torch.randint(0, 97, (2, 17))
    with torch.no_grad():
        torch.testing.assert_close(ours(idx)[0], hf(idx).logits, rtol=1e-5, atol=1e-5)


def test_door_converts_half_precision_tensors_to_float32():
    hf = hf_random(False)
    ours = model_from_tensors(ours_config_of(hf), {k: v.to(torch.bfloat16) for k, v in hf.state_dict().items()})
    assert ours.tok_emb.weight.dtype == torch.float32
    assert torch.equal(ours.layers[1].mlp.w2.weight, hf.model.layers[1].mlp.down_proj.weight.to(torch.bfloat16).float())


def test_hf_name_map_covers_every_tensor_once():
    for tie in (True, False):
        model = tiny_llama(tie_embeddings=tie)
        names = hf_name_map(model.config)
        ours = set(model.state_dict()) - ({"lm_head.weight"} if tie else set())
        assert set(names) == ours and len(set(names.values())) == len(names)


def test_door_names_each_fault():
    hf = hf_random(False)
    cfg, good = ours_config_of(hf), dict(hf.state_dict())
    rng = np.random.default_rng(0)
    victim = sorted(good)[int(rng.integers(len(good)))]
    with pytest.raises(CourseError, match=f"src: tensor\\(s\\) '{victim}' missing"):
        model_from_tensors(cfg, {k: v for k, v in good.items() if k != victim}, source="src")
    with pytest.raises(CourseError, match="unexpected tensor\\(s\\) model.layers.0.self_attn.q_proj.bias"):
        model_from_tensors(cfg, {**good, "model.layers.0.self_attn.q_proj.bias": torch.zeros(32)})
    name = "model.layers.1.mlp.up_proj.weight"
    with pytest.raises(CourseError, match=rf"'{name}' has shape \(32, 48\) but the config implies \(48, 32\)"):
        model_from_tensors(cfg, {**good, name: good[name].T})
    with pytest.raises(CourseError, match="not a float tensor"):
        model_from_tensors(cfg, {**good, name: good[name].to(torch.int8)})
    with pytest.raises(CourseError, match=r"src: .*n_embd \(30\) must be divisible"):
        model_from_tensors(tiny_config(n_embd=30), good, source="src")
    # rotary inv_freq buffers (older transformers saved them) are recomputed, not an error
    model_from_tensors(cfg, {**good, "model.layers.0.self_attn.rotary_emb.inv_freq": torch.ones(4)})


# ---- llama2.c files, written as karpathy/llama2.c's export.py writes them -----------------------------------
def meta_layout(w: torch.Tensor, n_heads: int) -> torch.Tensor:
    """llama2.c export.py's permute_reverse: HF split-half rows -> Meta's interleaved pairs."""
    dim1, dim2 = w.shape
    return w.view(n_heads, 2, dim1 // n_heads // 2, dim2).transpose(1, 2).reshape(dim1, dim2)


def write_llama2c(path: Path, hf, version: int) -> Path:
    c, sd = hf.config, hf.state_dict()
    L, nh, nkv, dim = c.num_hidden_layers, c.num_attention_heads, c.num_key_value_heads, c.hidden_size
    shared = c.tie_word_embeddings
    layer = lambda i, n: sd[f"model.layers.{i}.{n}"]
    stack = lambda n, f=lambda t: t: [f(layer(i, n)) for i in range(L)]
    q = stack("self_attn.q_proj.weight", lambda t: meta_layout(t, nh))
    k = stack("self_attn.k_proj.weight", lambda t: meta_layout(t, nkv))
    v, o = stack("self_attn.v_proj.weight"), stack("self_attn.o_proj.weight")
    w1, w2, w3 = stack("mlp.gate_proj.weight"), stack("mlp.down_proj.weight"), stack("mlp.up_proj.weight")
    att, ffn = stack("input_layernorm.weight"), stack("post_attention_layernorm.weight")
    emb, norm = sd["model.embed_tokens.weight"], sd["model.norm.weight"]
    dims = (dim, c.intermediate_size, L, nh, nkv, c.vocab_size, c.max_position_embeddings)
    if version == 0:  # legacy_export: the classifier is unshared when vocab_size is negative
        header = struct.pack("<7i", *dims[:5], c.vocab_size if shared else -c.vocab_size, dims[6])
        hd = dim // nh
        freqs = [torch.zeros(c.max_position_embeddings, hd // 2)] * 2  # freq_cis real / imag (unused by us)
        parts = [emb, *att, *q, *k, *v, *o, *ffn, *w1, *w2, *w3, norm, *freqs]
    else:  # version1_export
        header = struct.pack("<Ii7iB", 0x616B3432, 1, *dims, int(shared))
        header += b"\0" * (256 - len(header))
        parts = [*att, *ffn, norm, emb, *q, *k, *v, *o, *w1, *w2, *w3]
    if not shared:
        parts.append(sd["lm_head.weight"])
    path.write_bytes(header + b"".join(t.detach().float().contiguous().numpy().tobytes() for t in parts))
    return path


@pytest.mark.parametrize("version,tie,n_kv", [(0, False, 2), (0, True, 4), (1, True, 2), (1, False, 1)])
def test_llama2c_file_equals_transformers(tmp_path, version, tie, n_kv):
    hf = hf_random(tie, n_kv, seed=version + 2 * n_kv)
    path = write_llama2c(tmp_path / "model.bin", hf, version)
    cfg, tensors = read_llama2c(path)
    assert cfg == ours_config_of(hf) and set(tensors) == set(hf_name_map(cfg).values())
    ours = load_llama2c(path)
    idx = torch.randint(0, 97, (2, 19))
    with torch.no_grad():
        torch.testing.assert_close(ours(idx)[0], hf(idx).logits, rtol=1e-5, atol=1e-5)
    loaded = load_model(str(path))
    assert loaded.kind == "llama2c" and torch.equal(loaded.model.tok_emb.weight, ours.tok_emb.weight)


def test_llama2c_bad_files_are_one_line(tmp_path):
    hf = hf_random(True)
    good = write_llama2c(tmp_path / "good.bin", hf, 1).read_bytes()
    (tmp_path / "short.bin").write_bytes(good[:-400])
    with pytest.raises(CourseError, match="truncated"):
        read_llama2c(tmp_path / "short.bin")
    (tmp_path / "long.bin").write_bytes(good + b"\0" * 64)
    with pytest.raises(CourseError, match="64 bytes left over"):
        read_llama2c(tmp_path / "long.bin")
    (tmp_path / "junk.bin").write_bytes(struct.pack("<7i", 32, 48, 2, 3, 2, 97, 32) + b"\0" * 300)  # 32 % 3 != 0
    with pytest.raises(CourseError, match="does not look like a llama2.c model"):
        read_llama2c(tmp_path / "junk.bin")
    with pytest.raises(CourseError, match="model file not found"):
        read_llama2c(tmp_path / "none.bin")


# ---- loading.py: our checkpoints, and the universal load_model -------------------------------------------
def save_ours(path: Path, model, **extra) -> Path:
    state = {"model_state_dict": model.state_dict(), "model_config": model.config.to_dict(), "arch": "llama",
             "iter": 1, **extra}
    save_checkpoint(path, state)
    return path


def test_checkpoint_loads_exactly_and_compiled_names_too(tmp_path):
    model = tiny_llama(seed=3)
    loaded, state = load_model_from_checkpoint(save_ours(tmp_path / "a.pt", model))
    assert state["iter"] == 1 and not loaded.training
    for (name, a), b in zip(model.state_dict().items(), loaded.state_dict().values()):
        assert torch.equal(a, b), name
    compiled = {"_orig_mod." + k: v for k, v in model.state_dict().items()}
    loaded, _ = load_model_from_checkpoint(save_ours(tmp_path / "b.pt", model, model_state_dict=compiled))
    assert torch.equal(loaded.layers[0].attn.wq.weight, model.layers[0].attn.wq.weight)
    gpt = build_model("gpt", model.config)
    save_checkpoint(tmp_path / "gpt.pt", {"model_state_dict": gpt.state_dict(), "model_config": model.config.to_dict(),
                                          "arch": "gpt"})
    assert type(load_model_from_checkpoint(tmp_path / "gpt.pt")[0]).__name__ == "GPT"


def test_checkpoint_faults_are_one_line_each(tmp_path):
    model = tiny_llama()
    sd = model.state_dict()
    save_checkpoint(tmp_path / "p1.pt", {"model_state_dict": sd, "config": {"n_embd": 32}, "chars": ["a"]})
    with pytest.raises(CourseError, match="is a project 1 checkpoint"):
        load_model_from_checkpoint(tmp_path / "p1.pt")
    with pytest.raises(CourseError, match="unknown architecture 'mamba'"):
        load_model_from_checkpoint(save_ours(tmp_path / "a.pt", model, arch="mamba"))
    with pytest.raises(CourseError, match="stored model config is invalid"):
        load_model_from_checkpoint(save_ours(tmp_path / "b.pt", model, model_config={**model.config.to_dict(),
                                                                                       "n_head": 3}))
    with pytest.raises(CourseError, match="missing layers.1.mlp.w2.weight"):
        load_model_from_checkpoint(save_ours(tmp_path / "c.pt", model, model_state_dict={
            k: v for k, v in sd.items() if k != "layers.1.mlp.w2.weight"}))
    with pytest.raises(CourseError, match="unexpected extra.weight"):
        load_model_from_checkpoint(save_ours(tmp_path / "d.pt", model, model_state_dict={**sd, "extra.weight": sd["norm.weight"]}))
    with pytest.raises(CourseError, match=r"'layers.0.attn.wk.weight' has shape \(16, 32\) but the stored config implies \(8, 32\)"):
        load_model_from_checkpoint(save_ours(tmp_path / "e.pt", model, model_config={**model.config.to_dict(),
                                                                                       "n_kv_head": 1}))


def test_load_model_takes_each_kind_of_spec(tmp_path):
    model = tiny_llama(seed=5, tie_embeddings=False)
    ours = load_model(str(save_ours(tmp_path / "ckpt.pt", model)))
    hf = load_model(str(export_hf(model, tmp_path / "hf")), dtype=torch.bfloat16)
    assert ours.kind == "ours" and hf.kind == "hf" and hf.folder == tmp_path / "hf"
    assert hf.model.tok_emb.weight.dtype == torch.bfloat16
    assert torch.equal(ours.model.lm_head.weight, model.lm_head.weight)
    assert torch.equal(hf.model.lm_head.weight, model.lm_head.weight.to(torch.bfloat16))
    (tmp_path / "empty").mkdir()
    for spec, match in [(tmp_path / "empty", "folder without config.json"), (tmp_path / "x.gguf2", "not found"),
                        ("./not/a/hub/id", "model not found")]:
        with pytest.raises(CourseError, match=match):
            load_model(str(spec))
    (tmp_path / "w.xyz").write_bytes(b"1")
    with pytest.raises(CourseError, match="unknown model format"):
        load_model(str(tmp_path / "w.xyz"))


def test_llama2c_tokenizer_is_found_next_to_its_model(tmp_path):
    pieces = [b"<unk>", b"<s>", b"</s>"] + [f"<0x{b:02X}>".encode() for b in range(256)] + [b" ", b"a", b"b", b" a"]
    scores = [0.0] * 259 + [-3.0, -2.0, -1.0, 5.0]  # " a" is the one merge
    blob = struct.pack("<i", 6) + b"".join(struct.pack("<fi", sc, len(p)) + p for sc, p in zip(scores, pieces))
    (tmp_path / "tok263.bin").write_bytes(blob)
    hf = hf_random(True, vocab=len(pieces))
    loaded = load_model(str(write_llama2c(tmp_path / "m.bin", hf, 1)))
    tok = load_tokenizer_for(loaded)
    assert tok.vocab_size == len(pieces) and tok.encode("ab") == [1, 262, 261] and tok.decode([1, 262, 261]) == "ab"
    (tmp_path / "tok2.bin").write_bytes(blob)
    with pytest.raises(CourseError, match="pass the llama2.c tokenizer"):
        load_tokenizer_for(loaded)
