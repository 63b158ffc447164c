"""Project 3's model with attn_impl="flash": the same logits and the same training loss curve as with SDPA; project
8's engine decoding through flash-decoding gives the same tokens and logits; the caller's model is never changed.

Run: uv run pytest -q phase3_core_inference/project9_flash_attention/test_flash_model.py
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from course.errors import CourseError
from phase1_foundation.project3_pretrain.model import Llama, LlamaConfig
from phase3_core_inference.project8_kv_cache.engine import Engine, generate_cached
from phase3_core_inference.project9_flash_attention.config import FlashConfig
from phase3_core_inference.project9_flash_attention.flash_model import (FlashAttend, attention_of, flash_llama,
                                                                        with_attention)

TINY = dict(block_size=64, vocab_size=101, n_layer=2, n_head=4, n_kv_head=2, n_embd=32, intermediate_size=48)
FLASH = FlashConfig(attn_impl="flash", block_q=8, block_k=8, decode_impl="flash_decoding", decode_workers=2,
                    decode_chunk=8)  # small tiles and chunks: every path (several tiles, several chunks) runs


def tiny(seed=0, attend=None) -> Llama:
    torch.manual_seed(seed)
    return Llama(LlamaConfig(**TINY), attend=attend)


def test_flash_model_gives_sdpas_logits_and_gradients():
    ref = tiny()
    with FlashAttend(FLASH) as attend:
        flash = with_attention(ref, attend)
        idx = torch.randint(0, TINY["vocab_size"], (3, 37))  # 37: a prime, not a multiple of the tiles
        tgt = torch.randint(0, TINY["vocab_size"], (3, 37))
        (lf, loss_f), (lr, loss_r) = flash(idx, tgt), ref(idx, tgt)
        torch.testing.assert_close(lf, lr, rtol=0, atol=1e-5)
        gf = torch.autograd.grad(loss_f, list(ref.parameters()))  # the twin's parameters ARE ref's
        gr = torch.autograd.grad(loss_r, list(ref.parameters()))
        for a, b in zip(gf, gr):
            torch.testing.assert_close(a, b, rtol=0, atol=1e-5)


def test_same_training_loss_curve_as_sdpa():
    """Two models from the same seed, one built with attn_impl=flash: 12 AdamW steps on the same two batches."""
    curves = {}
    for name, attend in (("sdpa", None), ("flash", FlashAttend(FlashConfig(block_q=8, block_k=16)))):
        model = tiny(seed=1, attend=attend).train()
        opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
        g = torch.Generator().manual_seed(2)
        batches = [torch.randint(0, TINY["vocab_size"], (4, 33), generator=g) for _ in range(2)]
        curve = []
        for step in range(12):
            idx = batches[step % 2]
            loss = model(idx[:, :-1], idx[:, 1:])[1]
            opt.zero_grad()
            loss.backward()
            opt.step()
            curve.append(loss.item())
        curves[name] = curve
    assert curves["sdpa"][-1] < curves["sdpa"][0] - 0.5  # it learns the two batches
    assert max(abs(a - b) for a, b in zip(curves["sdpa"], curves["flash"])) < 1e-4, curves


def test_flash_llama_builds_a_new_model_with_flash_attention():
    model = flash_llama(LlamaConfig(**TINY), FLASH)
    assert isinstance(attention_of(model), FlashAttend) and attention_of(model).cfg.block_q == 8
    attention_of(model).close()


def test_the_callers_model_is_left_as_it_was():
    ref = tiny()
    before = {k: v.clone() for k, v in ref.state_dict().items()}
    params = [id(p) for p in ref.parameters()]
    twin = with_attention(ref, FlashAttend(FLASH))
    assert attention_of(ref) is F.scaled_dot_product_attention and isinstance(attention_of(twin), FlashAttend)
    assert [id(p) for p in ref.parameters()] == params == [id(p) for p in twin.parameters()]  # shared, not copied
    assert twin.lm_head.weight is twin.tok_emb.weight  # tied weights stay tied
    assert all(torch.equal(before[k], v) for k, v in ref.state_dict().items()) and twin is not ref
    attention_of(twin).close()


def test_engine_decodes_with_flash_decoding_same_tokens_and_logits():
    """Project 8's engine and batched generation, unchanged, over the twin: prefill by tiles, every decode step by
    flash-decoding over the cache (2 threads, chunks of 8 keys); ragged rows use the cache's mask."""
    ref = tiny(seed=3).eval()
    calls = []
    with FlashAttend(FLASH) as attend:
        real = attend.decoder.__call__
        attend.decoder = type("Counting", (), {"__call__": lambda self, *a: calls.append(a[1].shape[2]) or real(*a),
                                               "close": lambda self: None})()
        twin = with_attention(ref, attend)
        prompts = [[1, 5, 7, 9, 2, 3, 11, 4, 8, 13, 6], [4, 4, 2], [9] * 20]
        out_f, logits_f = generate_cached(twin, prompts, 12, return_logits=True)
        out_r, logits_r = generate_cached(ref, prompts, 12, return_logits=True)
        assert out_f == out_r
        for a, b in zip(logits_f, logits_r):
            torch.testing.assert_close(a, b, rtol=0, atol=1e-5)
        assert calls and max(calls) > 8  # decode steps went through flash-decoding, over several chunks
        e_f, e_r = Engine(twin), Engine(ref)
        for prompt in ([1, 2, 3, 4, 5, 6, 7, 8, 9, 10], [1, 2, 3, 4, 5, 6, 7, 20, 21]):  # the 2nd reuses the cache
            toks = [list(e.generate(prompt, 15, reuse_cache=True)) for e in (e_f, e_r)]
            assert toks[0] == toks[1] and e_f.stats.reused_tokens == e_r.stats.reused_tokens
        assert e_f.stats.reused_tokens == 7


def test_bad_settings_are_one_line_each():
    with pytest.raises(CourseError, match="attn_impl \\('fast'\\) must be one of: sdpa, flash, triton"):
        FlashConfig(attn_impl="fast").validate_config()
    with pytest.raises(CourseError) as e:
        FlashConfig(block_q=0, block_k=-1, decode_workers=0).validate_config()
    assert "block_q (0) must be > 0" in str(e.value) and "block_k (-1) must be > 0" in str(e.value)
    assert "decode_workers (0) must be > 0" in str(e.value)
    with pytest.raises(CourseError, match="block_q \\(24\\) must be a power of two >= 16"):
        FlashConfig(attn_impl="triton", block_q=24).validate_config()
    model = tiny(attend=FlashAttend(FlashConfig(decode_impl="sdpa")))
    model.config.dropout = 0.1  # what a config with attention dropout would make the layers pass
    for layer in model.layers:
        layer.attn.dropout = 0.1
    with pytest.raises(CourseError, match="no attention dropout"):
        model.train()(torch.zeros(1, 4, dtype=torch.long))
    with pytest.raises(CourseError, match="has no project 3 Attention layers"):
        with_attention(torch.nn.Linear(2, 2), FlashAttend(FLASH))
