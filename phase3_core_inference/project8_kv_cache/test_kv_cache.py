"""The KV cache is exact: cached decoding gives the logits of a full recompute, and our greedy output
equals `transformers` generate() token for token; real checkpoints (stories260K) reproduce their reference.

Batches: rows of one batch share a prompt length, or come left-padded (ragged batches, tested separately).
Kernels: every exactness test also runs with project 8's decode kernels (cpu_kernels.py), which must not change
the results beyond summation order (1e-5).

Run: uv run pytest -q phase3_core_inference/project8_kv_cache/test_kv_cache.py
As a script it prints a cache-size table for a few real model shapes:
     uv run python phase3_core_inference/project8_kv_cache/test_kv_cache.py
"""

from __future__ import annotations

import copy
import functools
import json

import pytest
import torch

from course.errors import CourseError
from phase1_foundation.project3_pretrain.model import Llama, LlamaConfig
from phase3_core_inference.project8_kv_cache.cpu_kernels import (DecodeLinear, DecodeStep, compiled_gemv,
                                                                 decode_compile_works, onednn_available,
                                                                 prepare_for_decode, restore)
from phase3_core_inference.project8_kv_cache.download_data import DEST
from phase3_core_inference.project8_kv_cache.engine import Engine, generate_cached, generate_nocache, left_pad_batch
from phase3_core_inference.project8_kv_cache.kv_cache import KVCache, kv_cache_bytes
from phase3_core_inference.project8_kv_cache.sampling import SamplingParams

DATA = DEST  # data/stories260k
REFERENCE = ("Once upon a time, there was a little girl named Lily. She loved to play outside in the park. "
             "One day, she saw a big, red ball. She wanted to play with it, but it was too high.\n"
             "Lily's mom said, \"Lily, let's go to the park.\" Lily was sad and didn't know what to do.")


def tiny_llama(seed=0, n_head=4, n_kv_head=2, **kw) -> Llama:
    torch.manual_seed(seed)
    cfg = LlamaConfig(block_size=64, vocab_size=97, n_layer=2, n_head=n_head, n_kv_head=n_kv_head, n_embd=32,
                      intermediate_size=64, **kw)
    model = Llama(cfg).eval()
    with torch.no_grad():  # non-trivial norm gains, so a wrong cache read cannot hide behind init values
        for m in model.modules():
            if hasattr(m, "eps"):
                m.weight.uniform_(0.5, 1.5)
    return model


# ---- the cache itself -------------------------------------------------------------------------------
def test_update_writes_in_place_and_returns_prefix():
    c = KVCache(n_layers=2, batch=3, n_kv_heads=2, max_len=10, head_dim=4)
    ptr = c.k[1].data_ptr()
    k1, v1 = torch.randn(3, 2, 4, 4), torch.randn(3, 2, 4, 4)
    k, v = c.update(1, k1, v1, 0)
    assert k.shape == (3, 2, 4, 4) and torch.equal(k, k1) and torch.equal(v, v1)
    k2, v2 = torch.randn(3, 2, 1, 4), torch.randn(3, 2, 1, 4)
    k, v = c.update(1, k2, v2, 4)
    assert k.shape == (3, 2, 5, 4)
    assert torch.equal(k[:, :, :4], k1) and torch.equal(k[:, :, 4:], k2) and torch.equal(v[:, :, 4:], v2)
    assert c.k[1].data_ptr() == ptr and k.data_ptr() == ptr  # a view of the preallocated buffer
    assert c.length == 5 and torch.count_nonzero(c.k[0]) == 0  # other layers untouched


def test_reset_crop_and_overwrite():
    c = KVCache(1, 1, 1, 8, 2)
    c.update(0, torch.ones(1, 1, 6, 2), torch.ones(1, 1, 6, 2), 0)
    c.crop(3)
    assert c.length == 3
    k, _ = c.update(0, torch.full((1, 1, 1, 2), 7.0), torch.zeros(1, 1, 1, 2), 3)
    assert k.shape[2] == 4 and k[0, 0, 3, 0] == 7.0 and k[0, 0, 2, 0] == 1.0
    c.reset()
    assert c.length == 0 and c.used_bytes == 0


def test_overflow_and_bad_shapes_are_clear_errors():
    c = KVCache(1, 2, 2, 4, 8)
    with pytest.raises(CourseError, match="KV cache is full"):
        c.update(0, torch.zeros(2, 2, 5, 8), torch.zeros(2, 2, 5, 8), 0)
    with pytest.raises(CourseError, match="expects k of shape"):
        c.update(0, torch.zeros(1, 2, 1, 8), torch.zeros(1, 2, 1, 8), 0)
    c.update(0, torch.zeros(2, 2, 1, 8), torch.zeros(2, 2, 1, 8), 0)
    with pytest.raises(CourseError, match="would have a gap"):  # position 1 was never written
        c.update(0, torch.zeros(2, 2, 1, 8), torch.zeros(2, 2, 1, 8), 2)
    with pytest.raises(CourseError, match="positive int"):
        KVCache(0, 1, 1, 1, 1)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_memory_accounting_is_exact(dtype):
    L, B, H, T, D = 3, 2, 5, 17, 8
    c = KVCache(L, B, H, T, D, dtype=dtype)
    allocated = sum(t.numel() * t.element_size() for t in c.k + c.v)
    assert c.nbytes == allocated == 2 * L * H * D * T * torch.empty((), dtype=dtype).element_size() * B
    c.update(0, torch.zeros(B, H, 5, D, dtype=dtype), torch.zeros(B, H, 5, D, dtype=dtype), 0)
    assert c.used_bytes == kv_cache_bytes(L, H, D, 5, dtype, B)


def test_gqa_shrinks_the_cache_by_the_group_size():
    # TinyLlama-1.1B: 22 layers, 32 query heads, 4 KV heads, head_dim 64, fp16, 2048 tokens
    gqa = kv_cache_bytes(22, 4, 64, 2048, torch.float16)
    mha = kv_cache_bytes(22, 32, 64, 2048, torch.float16)
    assert mha == 8 * gqa and gqa == 44 * 2**20  # 44 MiB instead of 352 MiB


# ---- the model with the cache equals the model without it ---------------------------------------------
@functools.cache
def compiler_available() -> bool:
    """Can torch.compile build a CPU kernel at all? Probed with a function of its own, not ours: a bug in our
    kernels must fail the tests below, not skip them."""
    try:
        a = torch.randn(3, 5)
        return torch.allclose(torch.compile(lambda t: (t * 2).sum(-1), dynamic=False)(a), (a * 2).sum(-1))
    except Exception:  # noqa: BLE001 - no compiler, no compiled tests
        return False


needs_compile = pytest.mark.skipif(not compiler_available(),
                                   reason="torch.compile cannot build CPU kernels here (no C++ compiler?)")


@pytest.mark.parametrize("kernels", ["default", "oneDNN"])
@pytest.mark.parametrize("n_head,n_kv_head", [(4, 4), (4, 2), (4, 1)])  # MHA, GQA, MQA
@pytest.mark.parametrize("prompt_len", [1, 5, 16])
def test_cached_logits_equal_full_recompute_at_every_step(n_head, n_kv_head, prompt_len, kernels):
    model = tiny_llama(seed=prompt_len, n_head=n_head, n_kv_head=n_kv_head)
    if kernels == "oneDNN":  # batch 3: more than one row, so the decode kernels pick oneDNN (every Linear here)
        prepare_for_decode(model, compile=False, min_bytes=0)
    idx = torch.randint(0, 97, (3, prompt_len), generator=torch.Generator().manual_seed(prompt_len))
    out, step_logits = generate_cached(model, idx, max_new_tokens=12, return_logits=True)
    with torch.no_grad():
        for i, logits in enumerate(step_logits):
            full = model(out[:, :prompt_len + i])[0][:, -1]
            torch.testing.assert_close(logits, full, rtol=0, atol=1e-5)
    assert torch.equal(out, generate_nocache(model, idx, 12))


@pytest.mark.parametrize("n_kv_head", [4, 2, 1])
def test_ragged_batch_equals_each_prompt_alone_and_full_recompute(n_kv_head):
    """Prompts of different lengths in one left-padded batch: at every step each row's logits equal running
    that prompt alone with the cache, and a full recompute of its unpadded sequence without one."""
    model = tiny_llama(seed=11, n_head=4, n_kv_head=n_kv_head)
    gen = torch.Generator().manual_seed(n_kv_head)
    prompts = [torch.randint(0, 97, (n,), generator=gen).tolist() for n in (3, 9, 1, 6)]
    idx, pad = left_pad_batch(prompts)
    assert pad.tolist() == [6, 0, 8, 3]
    out, steps = generate_cached(model, idx, max_new_tokens=10, return_logits=True, left_pad=pad)
    with torch.no_grad():
        for b, prompt in enumerate(prompts):
            alone, alone_steps = generate_cached(model, torch.tensor([prompt]), 10, return_logits=True)
            assert torch.equal(out[b, pad[b]:], alone[0])
            for i, (mine, ref) in enumerate(zip(steps, alone_steps)):
                torch.testing.assert_close(mine[b], ref[0], rtol=0, atol=1e-5)
                full = model(out[b:b + 1, pad[b]:idx.shape[1] + i])[0][0, -1]
                torch.testing.assert_close(mine[b], full, rtol=0, atol=1e-5)


def test_ragged_batch_bad_input_is_one_clear_error():
    model = tiny_llama()
    with pytest.raises(CourseError, match="at least one token"):
        left_pad_batch([[1, 2], []])
    with pytest.raises(CourseError, match="left_pad must have shape"):
        model(torch.zeros(2, 3, dtype=torch.long), left_pad=torch.zeros(2, 1, dtype=torch.long))


def test_chunked_prefill_matches_and_no_cache_path_is_unchanged():
    model = tiny_llama(seed=3)
    idx = torch.randint(0, 97, (2, 20), generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        full = model(idx)[0]
        cache = KVCache.for_model(model.config, batch=2)
        a = model(idx[:, :7], kv_cache=cache, start_pos=0)[0]
        b = model(idx[:, 7:], kv_cache=cache, start_pos=7)[0]  # a chunk of queries after cached keys
        torch.testing.assert_close(torch.cat([a, b], 1), full, rtol=0, atol=1e-5)
        cache2 = KVCache.for_model(model.config, batch=2)
        assert torch.equal(model(idx, kv_cache=cache2, start_pos=0)[0], full)


@needs_compile
@pytest.mark.parametrize("out_f,in_f", [(13, 37), (64, 32), (300, 64), (5, 1000),
                                        (8, 5000), (12, 8200), (6, 4099)])  # chunked rows; a prime width
def test_compiled_gemv_equals_linear(out_f, in_f):
    gen = torch.Generator().manual_seed(out_f * in_f)
    x, w = torch.randn(1, in_f, generator=gen), torch.randn(out_f, in_f, generator=gen)
    exact = torch.nn.functional.linear(x.double(), w.double())[0]
    assert decode_compile_works()  # the engine's own check: it would fall back to oneDNN otherwise
    with torch.no_grad():
        # fp32 rounding over in_f unit-scale terms grows like sqrt(in_f) (a random walk), whatever the order
        torch.testing.assert_close(compiled_gemv()(x, w).double(), exact, rtol=0, atol=2e-6 * in_f ** 0.5)


@needs_compile
def test_compiled_gemv_takes_a_non_contiguous_weight():
    gen = torch.Generator().manual_seed(5)
    x, w = torch.randn(1, 5000, generator=gen), torch.randn(5000, 8, generator=gen).t()  # rows chunked and blocked
    with torch.no_grad():
        torch.testing.assert_close(compiled_gemv()(x, w).double(), (w.double() @ x[0].double()), rtol=0,
                                   atol=2e-6 * 5000 ** 0.5)


@needs_compile
@pytest.mark.parametrize("n_kv_head,tie,prompt_len", [(2, True, 6), (1, False, 1), (4, False, 6)])
def test_compiled_decode_equals_default_kernels_at_every_step(n_kv_head, tie, prompt_len):
    """Batch 1, so every decode step from position 2 on runs the compiled step (0 and 1 stay eager).
    (The engine compiles only models of >= 16 MiB by default; compile=True forces it on this tiny one.)"""
    ref = tiny_llama(seed=8 + n_kv_head, n_kv_head=n_kv_head, tie_embeddings=tie)
    model = tiny_llama(seed=8 + n_kv_head, n_kv_head=n_kv_head, tie_embeddings=tie)
    assert prepare_for_decode(model, compile=True) == "compiled"
    step = vars(model)["forward"]
    assert isinstance(step, DecodeStep) and type(model.lm_head) is DecodeLinear
    calls = []
    step.compiled = (lambda f: lambda *a, **k: calls.append(k["start_pos"]) or f(*a, **k))(step.compiled)
    idx = torch.randint(0, 97, (1, prompt_len), generator=torch.Generator().manual_seed(n_kv_head))
    out, steps = generate_cached(model, idx, max_new_tokens=10, return_logits=True)
    ref_out, ref_steps = generate_cached(ref, idx, max_new_tokens=10, return_logits=True)
    assert calls == list(range(max(prompt_len, 2), prompt_len + 9))  # every decode step but those at 0 and 1
    assert torch.equal(out, ref_out)
    for mine, theirs in zip(steps, ref_steps):
        torch.testing.assert_close(mine, theirs, rtol=0, atol=1e-5)


@pytest.fixture
def fresh_dynamo():
    """dynamo's compile counters, after it forgot the earlier tests' graphs and which of their arguments it had
    learnt to treat as dynamic (which would hide a missing dynamic source)."""
    assert decode_compile_works()  # its probe compiles too: run it before anything is counted
    torch._dynamo.reset()
    return torch._dynamo.utils.counters["stats"]


@needs_compile
def test_engine_compiles_the_decode_step_once_at_start_up(fresh_dynamo):
    """One compile, in Engine(), serves every position and prompt: a recompile per token (a position baked
    into the kernel) would be correct but ~seconds per token, invisible to the exactness tests."""
    model = tiny_llama(seed=9)
    before = fresh_dynamo["unique_graphs"]
    eng = Engine(model, max_len=40, compile=True)
    assert eng.kernels == "compiled" and fresh_dynamo["unique_graphs"] == before + 1
    out = list(eng.generate([5, 6, 7], 12))
    out += list(eng.generate([5, 6, 7] + out + [9], 8, reuse_cache=True))  # a chat turn: the cache is kept
    eng.reset()
    out += list(eng.generate([1], 20))
    assert fresh_dynamo["unique_graphs"] == before + 1
    restore(model)
    ref = Engine(model, max_len=40, fast_kernels=False)
    ref_out = list(ref.generate([5, 6, 7], 12))
    ref_out += list(ref.generate([5, 6, 7] + ref_out + [9], 8, reuse_cache=True))
    ref.reset()
    assert out == ref_out + list(ref.generate([1], 20))


@needs_compile
def test_every_model_in_a_process_gets_its_compiled_step(fresh_dynamo):
    """Every model shape is a compiled version of the one Llama.forward; dynamo's default cap of 8 would leave
    the 9th model eager, silently (same results, a fraction of the speed)."""
    for n in range(10):
        torch.manual_seed(n)
        model = Llama(LlamaConfig(block_size=16, vocab_size=31, n_layer=1, n_head=2, n_kv_head=1, n_embd=8 * (n + 1),
                                  intermediate_size=16)).eval()
        before = fresh_dynamo["unique_graphs"]
        eng = Engine(model, compile=True)
        assert eng.kernels == "compiled" and fresh_dynamo["unique_graphs"] == before + 1, f"model {n + 1}"


@needs_compile
def test_the_decode_step_compiles_whole_after_another_compile_of_the_model(fresh_dynamo):
    """Another torch.compile of Llama.forward in the process (the benchmark's no-cache side, with dynamic
    lengths) must not change how the decode step compiles. It did: that compile broke its graph (is_causal=T > 1,
    a symbolic bool), dynamo then ran Llama.forward eager in every later compile, and each block of the decode
    step became a graph of its own (stories15M: 10-20% slower, no error)."""
    other = tiny_llama(seed=10)
    nocache = torch.compile(type(other).forward, backend="eager", dynamic=True)
    with torch.no_grad():
        for T in (3, 5):
            nocache(other, torch.zeros(1, T, dtype=torch.long))
    model = tiny_llama(seed=11)
    before = fresh_dynamo["unique_graphs"]
    eng = Engine(model, max_len=40, compile=True)
    list(eng.generate([5, 6, 7], 6))
    assert eng.kernels == "compiled" and fresh_dynamo["unique_graphs"] == before + 1


@needs_compile
def test_a_deep_copy_of_a_prepared_model_decodes_with_its_own_weights():
    """The compiled step takes the model as an argument: a copy (e.g. a frozen reference model) must not run the
    original's weights."""
    model = tiny_llama(seed=12)
    prepare_for_decode(model, compile=True)
    twin = copy.deepcopy(model)
    with torch.no_grad():
        for p in twin.parameters():
            p.add_(0.05 * torch.randn(p.shape, generator=torch.Generator().manual_seed(p.numel())))
    idx = torch.randint(0, 97, (1, 5), generator=torch.Generator().manual_seed(12))
    out, steps = generate_cached(twin, idx, max_new_tokens=8, return_logits=True)
    restore(twin)
    ref_out, ref_steps = generate_cached(twin, idx, max_new_tokens=8, return_logits=True)
    assert torch.equal(out, ref_out)
    for mine, theirs in zip(steps, ref_steps):
        torch.testing.assert_close(mine, theirs, rtol=0, atol=1e-5)


@pytest.mark.skipif(not onednn_available(), reason="this PyTorch build has no oneDNN")
def test_decode_kernels_keep_the_weights_and_training_and_restore():
    model = tiny_llama(seed=6, tie_embeddings=False)
    idx = torch.randint(0, 97, (2, 9), generator=torch.Generator().manual_seed(6))
    with torch.no_grad():
        ref = model(idx)[0]
        ptrs = [p.data_ptr() for p in model.parameters()]
        keys = list(model.state_dict())
        assert prepare_for_decode(model, compile=False, min_bytes=0) == "oneDNN"
        assert all(type(m) is DecodeLinear and m.onednn for m in model.modules() if isinstance(m, torch.nn.Linear))
        assert [p.data_ptr() for p in model.parameters()] == ptrs and list(model.state_dict()) == keys
        fast = model(idx)[0]
    torch.testing.assert_close(fast, ref, rtol=1e-5, atol=1e-5)
    loss = model(idx, targets=idx)[1]  # with autograd on it falls back to F.linear: training still works
    loss.backward()
    assert model.lm_head.weight.grad is not None
    if compiler_available():
        assert prepare_for_decode(model, compile=True) == "compiled"
        assert isinstance(vars(model)["forward"], DecodeStep)
    restore(model)
    assert type(model.lm_head) is torch.nn.Linear and "forward" not in vars(model)


@needs_compile
@pytest.mark.skipif(not onednn_available(), reason="this PyTorch build has no oneDNN")
def test_a_prepared_model_still_compiles_whole_for_many_rows():
    """A user's own torch.compile of a prepared model (a no-cache forward: many rows, oneDNN's path when eager)
    must trace: inductor cannot lower oneDNN's linear on a weight that is a graph input, so it gets F.linear."""
    model = tiny_llama(seed=8)
    idx = torch.randint(0, 97, (2, 7), generator=torch.Generator().manual_seed(8))
    with torch.no_grad():
        ref = model(idx)[0]
        prepare_for_decode(model, compile=False, min_bytes=0)
        out = torch.compile(type(model).forward, dynamic=False)(model, idx)[0]
    torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-5)


def test_engine_compiles_only_big_models_by_default_and_can_switch_back(monkeypatch):
    from phase3_core_inference.project8_kv_cache import cpu_kernels

    model = tiny_llama(seed=7)
    assert Engine(model).kernels == ("oneDNN" if onednn_available() else "default")  # 0.05 MB: not compiled
    if compiler_available():
        monkeypatch.setattr(cpu_kernels, "AUTO_COMPILE_BYTES", cpu_kernels.weight_bytes(model))
        assert Engine(model).kernels == "compiled"
        assert prepare_for_decode(model, compile=False) == "oneDNN" and "forward" not in vars(model)
        assert Engine(model).kernels == "compiled"
    assert Engine(model, fast_kernels=False).kernels == "default"
    assert type(model.lm_head) is torch.nn.Linear and "forward" not in vars(model)


def test_engine_reuses_the_cache_across_turns():
    model = tiny_llama(seed=4)
    eng = Engine(model)
    first = [5, 6, 7, 8]
    out1 = list(eng.generate(first, 6))
    assert eng.tokens == first + out1[:-1] and eng.cache.length == len(eng.tokens)
    second = first + out1 + [9, 10]  # the next turn extends the conversation
    out2 = list(eng.generate(second, 6, reuse_cache=True))
    fresh = Engine(model)
    assert out2 == list(fresh.generate(second, 6))
    edited = [5, 6, 90, 1, 2]  # a diverging prompt: the cache is cropped to the common prefix [5, 6]
    assert list(eng.generate(edited, 5, reuse_cache=True)) == list(Engine(model).generate(edited, 5))


def test_engine_context_errors():
    eng = Engine(tiny_llama())
    with pytest.raises(CourseError, match="context window"):
        list(eng.generate(list(range(70)), 1))
    with pytest.raises(CourseError, match="lower --max_new_tokens"):
        list(eng.generate([1, 2, 3], 62))


def test_seeded_sampling_is_reproducible():
    model = tiny_llama(seed=5)
    params = SamplingParams(temperature=1.0, top_p=0.95)

    def run(seed):
        return list(Engine(model).generate([1, 2], 20, params, torch.Generator().manual_seed(seed)))

    assert run(3) == run(3) and run(3) != run(4)


# ---- against transformers -----------------------------------------------------------------------------
transformers = pytest.importorskip("transformers", reason="transformers (dev group) is needed")


@pytest.mark.parametrize("tie,n_kv,kernels", [(True, 2, "oneDNN"), (False, 1, "compiled"), (False, 4, "default"),
                                              (True, 1, "compiled")])
def test_greedy_equals_transformers_generate(tmp_path, tie, n_kv, kernels):
    from phase1_foundation.project3_pretrain.loading import load_model

    torch.manual_seed(n_kv)
    hf_cfg = transformers.LlamaConfig(vocab_size=300, hidden_size=64, intermediate_size=128, num_hidden_layers=3,
                                      num_attention_heads=4, num_key_value_heads=n_kv, max_position_embeddings=128,
                                      rms_norm_eps=1e-5, tie_word_embeddings=tie, bos_token_id=1, eos_token_id=2)
    hf = transformers.LlamaForCausalLM(hf_cfg).eval()
    with torch.no_grad():  # a spikier init, so greedy paths are long and distinctive
        for p in hf.parameters():
            p.normal_(0, 0.15 if p.dim() > 1 else 1.0)
    hf.save_pretrained(tmp_path)
    ours = load_model(str(tmp_path)).model
    prompt = torch.randint(3, 300, (2, 7), generator=torch.Generator().manual_seed(n_kv))
    n = 40
    theirs = hf.generate(prompt, attention_mask=torch.ones_like(prompt), max_new_tokens=n, min_new_tokens=n,
                         do_sample=False, pad_token_id=0)
    if kernels == "compiled":  # batch 1 through the Engine: the compiled decode path
        if not compiler_available():
            pytest.skip("torch.compile cannot build CPU kernels here")
        eng = Engine(ours, compile=True)
        assert eng.kernels == "compiled"
        mine = torch.tensor([row + list(eng.generate(row, n)) for row in prompt.tolist()])
    else:
        if kernels == "oneDNN":
            prepare_for_decode(ours, compile=False, min_bytes=0)
        mine = generate_cached(ours, prompt, n)
    assert torch.equal(mine, theirs)
    assert len(set(mine[0, 7:].tolist())) > 3  # not a degenerate repeat of one token


def test_ragged_batch_greedy_equals_transformers_with_left_padding(tmp_path):
    """Independent check of the padding mask and per-row RoPE positions: transformers' generate() on the same
    left-padded batch with its attention_mask (it derives position ids from the mask)."""
    from phase1_foundation.project3_pretrain.loading import load_model

    torch.manual_seed(5)
    hf_cfg = transformers.LlamaConfig(vocab_size=300, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128,
                                      rms_norm_eps=1e-5, tie_word_embeddings=False, bos_token_id=1, eos_token_id=2)
    hf = transformers.LlamaForCausalLM(hf_cfg).eval()
    with torch.no_grad():
        for p in hf.parameters():
            p.normal_(0, 0.15 if p.dim() > 1 else 1.0)
    hf.save_pretrained(tmp_path)
    ours = load_model(str(tmp_path)).model
    gen = torch.Generator().manual_seed(5)
    prompts = [torch.randint(3, 300, (n,), generator=gen).tolist() for n in (4, 11, 7)]
    idx, pad = left_pad_batch(prompts)
    mask = (torch.arange(idx.shape[1])[None, :] >= pad[:, None]).long()
    n = 30
    theirs = hf.generate(idx, attention_mask=mask, max_new_tokens=n, min_new_tokens=n, do_sample=False,
                         pad_token_id=0)
    mine = generate_cached(ours, idx, n, left_pad=pad)
    assert torch.equal(mine[:, idx.shape[1]:], theirs[:, idx.shape[1]:])


# ---- a real pretrained checkpoint ---------------------------------------------------------------------
needs_data = pytest.mark.skipif(not (DATA / "stories260K.bin").is_file() or not (DATA / "tok512.bin").is_file(),
                                reason="data/stories260k absent: run phase3_core_inference/project8_kv_cache/"
                                       "download_data.py (or --source DIR)")


@needs_data
def test_stories260k_greedy_matches_reference_text():
    from phase3_core_inference.project8_kv_cache.engine import TextStream
    from phase1_foundation.project3_pretrain.loading import load_model, load_tokenizer_for

    loaded = load_model(str(DATA / "stories260K.bin"))
    tok = load_tokenizer_for(loaded)
    eng = Engine(loaded.model)
    stream = TextStream(tok, prev_id=1)
    text = "".join(stream.push(t) for t in eng.generate([1], 120, stop_ids={1, 2}))
    assert text.startswith(REFERENCE), text
    assert tok.encode(REFERENCE[:60]) == [1] + eng.tokens[1:len(tok.encode(REFERENCE[:60]))]


@needs_data
def test_stories260k_equals_transformers_on_the_same_weights():
    """Our model on the converted llama2.c tensors equals HF's model on the same tensors.

    This checks the import path and our forward pass. Both models see the same permuted wq/wk, so a
    wrong permutation would pass here: the permutation itself is checked end to end by the reference
    story above and, against Meta's complex rotation, by project 3's
    test_rope_split_half_equals_complex_rotation_of_permuted_pairs."""
    from phase1_foundation.project3_pretrain.hf_interop import hf_config_from_llama
    from phase1_foundation.project3_pretrain.llama2c import read_llama2c
    from phase1_foundation.project3_pretrain.loading import load_model

    config, state = read_llama2c(DATA / "stories260K.bin")
    hf = transformers.LlamaForCausalLM(transformers.LlamaConfig(**{k: v for k, v in hf_config_from_llama(config).items()
                                                                   if k != "architectures"})).eval()
    missing, unexpected = hf.load_state_dict(state, strict=False)
    assert not unexpected and set(missing) <= {"lm_head.weight"}  # only the tied classifier is absent
    ours = load_model(str(DATA / "stories260K.bin")).model
    idx = torch.tensor([[1, 403, 407, 261, 378]])
    with torch.no_grad():
        torch.testing.assert_close(ours(idx)[0], hf(idx).logits, rtol=1e-5, atol=1e-5)


# ---- as a script: cache sizes of real shapes ------------------------------------------------------------
def main() -> None:
    shapes = {  # name: layers, query heads, kv heads, head_dim, context
        "stories260K": (5, 8, 4, 8, 512), "stories15M": (6, 6, 6, 48, 256),
        "TinyLlama-1.1B": (22, 32, 4, 64, 2048), "Llama-2-7B": (32, 32, 32, 128, 4096),
        "Llama-3-8B": (32, 32, 8, 128, 8192),
    }
    print(f"{'model':<16}{'kv/q heads':>11}{'fp16 KV/token':>15}{'full context':>14}{'as MHA':>12}")
    for name, (L, H, KV, D, T) in shapes.items():
        per_tok = kv_cache_bytes(L, KV, D, 1, torch.float16)
        print(f"{name:<16}{f'{KV}/{H}':>11}{per_tok / 1024:>12.1f} KiB{kv_cache_bytes(L, KV, D, T, torch.float16) / 2**20:>10.1f} MiB"
              f"{kv_cache_bytes(L, H, D, T, torch.float16) / 2**20:>8.1f} MiB")
    print(json.dumps({"formula": "2 x layers x kv_heads x head_dim x tokens x bytes/element"}))


if __name__ == "__main__":
    main()
