"""The KV cache is exact: cached decoding gives the logits of a full recompute, and our greedy output
equals `transformers` generate() token for token; real checkpoints (stories260K) reproduce their reference.

Batches: rows of one prompt length are prefilled together; rows of different lengths join one by one and then
decode together, each at its own position (the shared contract for every cache is test_cache_contract.py).
The fast decode path (fast_decode.py) has its own tests, against this plain path: test_fast_decode.py.

Run: uv run pytest -q phase3_core_inference/project8_kv_cache/test_kv_cache.py
As a script it prints a cache-size table for a few real model shapes:
     uv run python phase3_core_inference/project8_kv_cache/test_kv_cache.py
"""

from __future__ import annotations

import json

import pytest
import torch

from course.errors import CourseError
from phase1_foundation.project3_pretrain.testing import tiny_llama
from phase3_core_inference.project8_kv_cache.download_data import DEST
from phase3_core_inference.project8_kv_cache.engine import Engine, generate_cached, generate_nocache
from phase3_core_inference.project8_kv_cache.kv_cache import KVCache, kv_cache_bytes
from phase3_core_inference.project8_kv_cache.sampling import SamplingParams

DATA = DEST  # data/stories260k
REFERENCE = ("Once upon a time, there was a little girl named Lily. She loved to play outside in the park. "
             "One day, she saw a big, red ball. She wanted to play with it, but it was too high.\n"
             "Lily's mom said, \"Lily, let's go to the park.\" Lily was sad and didn't know what to do.")


# ---- the cache itself -------------------------------------------------------------------------------
def test_update_writes_in_place_and_returns_prefix():
    c = KVCache(n_layers=2, batch=3, n_kv_heads=2, max_len=10, head_dim=4)
    ptr = c.k[1].data_ptr()
    k1, v1 = torch.randn(3, 2, 4, 4), torch.randn(3, 2, 4, 4)
    plan = c.begin(4)
    assert plan.start == 0 and plan.mask is None and plan.positions is None and plan.end == 4
    k, v = c.update(1, k1, v1)
    assert k.shape == (3, 2, 4, 4) and torch.equal(k, k1) and torch.equal(v, v1)
    k2, v2 = torch.randn(3, 2, 1, 4), torch.randn(3, 2, 1, 4)
    plan = c.begin(1)
    assert plan.start == 4 and plan.mask is None  # a decode step: no mask
    k, v = c.update(1, k2, v2)
    assert k.shape == (3, 2, 5, 4)
    assert torch.equal(k[:, :, :4], k1) and torch.equal(k[:, :, 4:], k2) and torch.equal(v[:, :, 4:], v2)
    assert c.k[1].data_ptr() == ptr and k.data_ptr() == ptr  # a view of the preallocated buffer
    assert c.lengths == [5, 5, 5] and torch.count_nonzero(c.k[0]) == 0  # other layers untouched


def test_rows_of_different_lengths_write_at_their_own_slots():
    c = KVCache(n_layers=1, batch=2, n_kv_heads=1, max_len=8, head_dim=2)
    r0 = c.rows([0])
    r0.begin(3)
    r0.update(0, torch.full((1, 1, 3, 2), 1.0), torch.full((1, 1, 3, 2), 1.0))
    assert c.lengths == [3, 0]  # the view shares the lengths
    plan = c.begin(1)
    assert plan.start is None and plan.positions.tolist() == [[3], [0]] and plan.end == 4
    assert plan.mask.shape == (2, 1, 1, 4) and plan.mask[:, 0, 0].tolist() == [[True] * 4, [True, False, False, False]]
    k, _ = c.update(0, torch.tensor([[[[7.0, 7.0]]], [[[9.0, 9.0]]]]), torch.zeros(2, 1, 1, 2))
    assert k.shape == (2, 1, 4, 2) and k[0, 0, 3, 0] == 7.0 and k[1, 0, 0, 0] == 9.0 and k[0, 0, 0, 0] == 1.0
    assert c.lengths == [4, 1]
    c.free(0)
    assert c.lengths == [0, 1]


def test_reset_crop_and_overwrite():
    c = KVCache(1, 1, 1, 8, 2)
    c.begin(6)
    c.update(0, torch.ones(1, 1, 6, 2), torch.ones(1, 1, 6, 2))
    c.crop(3)
    assert c.length == 3
    c.begin(1)
    k, _ = c.update(0, torch.full((1, 1, 1, 2), 7.0), torch.zeros(1, 1, 1, 2))
    assert k.shape[2] == 4 and k[0, 0, 3, 0] == 7.0 and k[0, 0, 2, 0] == 1.0
    c.reset()
    assert c.length == 0 and c.used_bytes == 0


def test_overflow_and_bad_shapes_are_clear_errors():
    c = KVCache(1, 2, 2, 4, 8)
    with pytest.raises(CourseError, match="KV cache is full"):
        c.begin(5)
    c.begin(1)
    with pytest.raises(CourseError, match="expects k of shape"):
        c.update(0, torch.zeros(1, 2, 1, 8), torch.zeros(1, 2, 1, 8))
    with pytest.raises(CourseError, match="positive int"):
        KVCache(0, 1, 1, 1, 1)
    with pytest.raises(CourseError, match="distinct rows"):
        c.rows([0, 0])
    with pytest.raises(CourseError, match="distinct rows"):
        c.rows([2])


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_memory_accounting_is_exact(dtype):
    L, B, H, T, D = 3, 2, 5, 17, 8
    c = KVCache(L, B, H, T, D, dtype=dtype)
    allocated = sum(t.numel() * t.element_size() for t in c.k + c.v)
    assert c.nbytes == allocated == 2 * L * H * D * T * torch.empty((), dtype=dtype).element_size() * B
    c.begin(5)
    assert c.used_bytes == kv_cache_bytes(L, H, D, 5, dtype, B)
    c.rows([1]).begin(2)  # rows of different lengths: each counts its own
    assert c.used_bytes == kv_cache_bytes(L, H, D, 12, dtype)


def test_gqa_shrinks_the_cache_by_the_group_size():
    # TinyLlama-1.1B: 22 layers, 32 query heads, 4 KV heads, head_dim 64, fp16, 2048 tokens
    gqa = kv_cache_bytes(22, 4, 64, 2048, torch.float16)
    mha = kv_cache_bytes(22, 32, 64, 2048, torch.float16)
    assert mha == 8 * gqa and gqa == 44 * 2**20  # 44 MiB instead of 352 MiB


# ---- the model with the cache equals the model without it ---------------------------------------------
@pytest.mark.parametrize("n_head,n_kv_head", [(4, 4), (4, 2), (4, 1)])  # MHA, GQA, MQA
@pytest.mark.parametrize("prompt_len", [1, 5, 16])
def test_cached_logits_equal_full_recompute_at_every_step(n_head, n_kv_head, prompt_len):
    model = tiny_llama(seed=prompt_len, n_head=n_head, n_kv_head=n_kv_head)
    idx = torch.randint(0, 97, (3, prompt_len), generator=torch.Generator().manual_seed(prompt_len))
    out, step_logits = generate_cached(model, idx, max_new_tokens=12, return_logits=True)
    with torch.no_grad():
        for i, logits in enumerate(step_logits):
            full = model(out[:, :prompt_len + i])[0][:, -1]
            torch.testing.assert_close(logits, full, rtol=0, atol=1e-5)
    assert torch.equal(out, generate_nocache(model, idx, 12))


@pytest.mark.parametrize("n_kv_head", [4, 2, 1])
def test_ragged_batch_equals_each_prompt_alone_and_full_recompute(n_kv_head):
    """Prompts of different lengths in one batch: at every step each row's logits equal running that prompt
    alone with the cache, and a full recompute of its sequence without one."""
    model = tiny_llama(seed=11, n_head=4, n_kv_head=n_kv_head)
    gen = torch.Generator().manual_seed(n_kv_head)
    prompts = [torch.randint(0, 97, (n,), generator=gen).tolist() for n in (3, 9, 1, 6)]
    out, steps = generate_cached(model, prompts, max_new_tokens=10, return_logits=True)
    with torch.no_grad():
        for b, prompt in enumerate(prompts):
            alone, alone_steps = generate_cached(model, torch.tensor([prompt]), 10, return_logits=True)
            assert out[b] == alone[0].tolist()
            for i, (mine, ref) in enumerate(zip(steps, alone_steps)):
                torch.testing.assert_close(mine[b], ref[0], rtol=0, atol=1e-5)
                full = model(torch.tensor([out[b][:len(prompt) + i]]))[0][0, -1]
                torch.testing.assert_close(mine[b], full, rtol=0, atol=1e-5)


def test_ragged_batch_with_repetition_penalty_equals_each_alone():
    """Each row's penalty sees its own history only (a short row's padding adds no ids)."""
    model = tiny_llama(seed=13)
    params = SamplingParams(temperature=0.0, repetition_penalty=1.3)
    prompts = [[5, 6, 7, 8, 9, 10], [11, 12]]
    both = generate_cached(model, prompts, 12, params)
    assert both == [generate_cached(model, [p], 12, params)[0] for p in prompts]


def test_ragged_batch_bad_input_is_one_clear_error():
    with pytest.raises(CourseError, match="at least one token"):
        generate_cached(tiny_llama(), [[1, 2], []], 3)


def test_chunked_prefill_matches_and_no_cache_path_is_unchanged():
    model = tiny_llama(seed=3)
    idx = torch.randint(0, 97, (2, 20), generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        full = model(idx)[0]
        cache = KVCache.for_model(model.config, batch=2)
        a = model(idx[:, :7], kv_cache=cache)[0]
        b = model(idx[:, 7:], kv_cache=cache)[0]  # a chunk of queries after cached keys
        torch.testing.assert_close(torch.cat([a, b], 1), full, rtol=0, atol=1e-5)
        cache2 = KVCache.for_model(model.config, batch=2)
        assert torch.equal(model(idx, kv_cache=cache2)[0], full)


def test_engine_reuses_the_cache_across_turns():
    model = tiny_llama(seed=4)
    eng = Engine(model)
    first = [5, 6, 7, 8]
    out1 = list(eng.generate(first, 6))
    assert eng.tokens == first + out1[:-1] and eng.cache.length == len(eng.tokens)
    second = first + out1 + [9, 10]  # the next turn extends the conversation
    out2 = list(eng.generate(second, 6, reuse_cache=True))
    assert eng.stats.reused_tokens == len(first + out1) - 1
    fresh = Engine(model)
    assert out2 == list(fresh.generate(second, 6))
    edited = [5, 6, 90, 1, 2]  # a diverging prompt: the cache is cropped to the common prefix [5, 6]
    assert list(eng.generate(edited, 5, reuse_cache=True)) == list(Engine(model).generate(edited, 5))


def test_engine_runs_the_step_it_is_given():
    """Engine(step=...) calls it for every decode step (the prefill is the model's): what fast_decode plugs into."""
    model = tiny_llama(seed=14)
    calls = []

    def step(token, cache):
        calls.append(cache.length)
        return model(token, kv_cache=cache, logits_to_keep=1)[0][:, -1]

    assert list(Engine(model, step=step).generate([1, 2, 3], 6)) == list(Engine(model).generate([1, 2, 3], 6))
    assert calls == [3, 4, 5, 6, 7]  # 6 new tokens: the first from the prefill, then 5 steps


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


# ---- against transformers -----------------------------------------------------------------------------
transformers = pytest.importorskip("transformers", reason="transformers (dev group) is needed")


@pytest.mark.parametrize("tie,n_kv", [(True, 2), (False, 1), (False, 4)])
def test_greedy_equals_transformers_generate(tmp_path, tie, n_kv):
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
    assert torch.equal(generate_cached(ours, prompt, n), theirs)
    eng = Engine(ours)  # batch 1 through the Engine, row by row
    assert torch.equal(torch.tensor([row + list(eng.generate(row, n)) for row in prompt.tolist()]), theirs)
    assert len(set(theirs[0, 7:].tolist())) > 3  # not a degenerate repeat of one token


def test_ragged_batch_greedy_equals_transformers_with_left_padding(tmp_path):
    """Independent check of per-row positions and masks: transformers' generate() on the same prompts,
    left-padded with its attention_mask (it derives position ids from the mask)."""
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
    T = max(len(p) for p in prompts)
    idx = torch.tensor([[0] * (T - len(p)) + p for p in prompts])
    mask = torch.tensor([[0] * (T - len(p)) + [1] * len(p) for p in prompts])
    n = 30
    theirs = hf.generate(idx, attention_mask=mask, max_new_tokens=n, min_new_tokens=n, do_sample=False,
                         pad_token_id=0)
    mine = generate_cached(ours, prompts, n)
    assert [row[len(p):] for row, p in zip(mine, prompts)] == theirs[:, T:].tolist()


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
    from course.cli import run_demo

    run_demo(main, __doc__)
