"""The fast decode path (fast_decode.py) equals the plain one and leaves the caller's model alone.

- equal: logits at every step within 1e-5 and identical greedy tokens, on tiny models and on stories260K;
- the caller's model afterwards: same module classes, no replaced forward, same state dict (the same tensors),
  dynamo's settings as they were;
- real bugs it once had, each guarded: a graph break that left the step silently eager (the decode step must
  compile whole, also after another compile of the model), the 9th model shape in a process running eager
  (dynamo's cap of 8 compiled versions per code object), a copy of the model decoding the original's weights,
  a recompile per token (the position baked into the kernel).

Run: uv run pytest -q phase3_core_inference/project8_kv_cache/test_fast_decode.py
"""

from __future__ import annotations

import copy
import functools

import pytest
import torch
import torch.nn as nn

from phase1_foundation.project3_pretrain.model import Llama, LlamaConfig
from phase1_foundation.project3_pretrain.testing import tiny_llama
from phase3_core_inference.project8_kv_cache import fast_decode
from phase3_core_inference.project8_kv_cache.download_data import DEST
from phase3_core_inference.project8_kv_cache.engine import Engine
from phase3_core_inference.project8_kv_cache.fast_decode import FIRST_POS, FastDecoder, GemvLinear, decode_twin, gemv


@functools.cache
def compiler_available() -> bool:
    """Can torch.compile build a CPU kernel at all? Probed with a function of its own, not ours: a bug in our
    kernels must fail the tests below, not skip them."""
    try:
        a = torch.randn(3, 5)
        return torch.allclose(torch.compile(lambda t: (t * 2).sum(-1), dynamic=False)(a), (a * 2).sum(-1))
    except Exception:  # noqa: BLE001 - no compiler, no compiled tests
        return False


pytestmark = pytest.mark.skipif(not compiler_available(),
                                reason="torch.compile cannot build CPU kernels here (no C++ compiler?)")


def run_both(model, prompt, n, max_len=40, decoder=None):
    """(plain tokens, plain logits, fast tokens, fast logits, decoder): the same prompt through both engines."""
    decoder = decoder or FastDecoder(model, max_len)
    logs = {"plain": [], "fast": []}
    out = {}
    for name, step in (("plain", None), ("fast", decoder)):
        eng = Engine(model, max_len=max_len, step=step)
        inner = eng.step
        eng.step = lambda token, cache, inner=inner, log=logs[name]: log.append(inner(token, cache)) or log[-1]
        out[name] = list(eng.generate(prompt, n))
    return out["plain"], logs["plain"], out["fast"], logs["fast"], decoder


@pytest.mark.parametrize("out_f,in_f", [(13, 37), (64, 32), (300, 64), (5, 1000),
                                        (8, 5000), (12, 8200), (6, 4099)])  # chunked rows; a prime width
def test_compiled_gemv_equals_linear(out_f, in_f):
    gen = torch.Generator().manual_seed(out_f * in_f)
    x, w = torch.randn(1, in_f, generator=gen), torch.randn(out_f, in_f, generator=gen)
    exact = torch.nn.functional.linear(x.double(), w.double())[0]
    assert fast_decode.compile_works()  # the scripts' own check: they would stay eager otherwise
    with torch.no_grad():
        # fp32 rounding over in_f unit-scale terms grows like sqrt(in_f) (a random walk), whatever the order
        got = torch.compile(gemv, dynamic=False)(x, w)
        torch.testing.assert_close(got.double(), exact, rtol=0, atol=2e-6 * in_f ** 0.5)


def test_compiled_gemv_takes_a_non_contiguous_weight():
    gen = torch.Generator().manual_seed(5)
    x, w = torch.randn(1, 5000, generator=gen), torch.randn(5000, 8, generator=gen).t()  # rows chunked and blocked
    with torch.no_grad():
        torch.testing.assert_close(torch.compile(gemv, dynamic=False)(x, w).double(), (w.double() @ x[0].double()),
                                   rtol=0, atol=2e-6 * 5000 ** 0.5)


@pytest.mark.parametrize("n_kv_head,tie,prompt_len", [(2, True, 6), (1, False, 1), (4, False, 6)])
def test_fast_path_equals_plain_path_at_every_step(n_kv_head, tie, prompt_len):
    """Every decode step from FIRST_POS on runs compiled (positions 0 and 1 stay eager), and each equals the
    plain engine's: logits within 1e-5, greedy tokens identical."""
    model = tiny_llama(seed=8 + n_kv_head, n_kv_head=n_kv_head, tie_embeddings=tie)
    prompt = torch.randint(0, 97, (prompt_len,), generator=torch.Generator().manual_seed(n_kv_head)).tolist()
    plain, plain_logits, fast, fast_logits, dec = run_both(model, prompt, 12)
    assert dec.compiled_calls == 1 + len(range(max(prompt_len, FIRST_POS), prompt_len + 11))  # + the warm-up
    assert fast == plain and len(fast_logits) == len(plain_logits) == 11
    for mine, theirs in zip(fast_logits, plain_logits):
        torch.testing.assert_close(mine, theirs, rtol=0, atol=1e-5)


def test_the_callers_model_is_left_as_it_was():
    model = tiny_llama(seed=6, tie_embeddings=False)
    classes = [type(m) for m in model.modules()]
    state = {k: (v.clone(), v.data_ptr()) for k, v in model.state_dict().items()}
    settings = (torch._dynamo.config.recompile_limit, torch.compiler.config.dynamic_sources)
    dec = FastDecoder(model, 40)
    list(Engine(model, max_len=40, step=dec).generate([3, 4, 5], 8))
    assert [type(m) for m in model.modules()] == classes and "forward" not in vars(model)
    assert all(type(m) is nn.Linear for m in (model.lm_head, model.layers[0].attn.wq))
    after = model.state_dict()
    assert list(after) == list(state)
    assert all(torch.equal(after[k], v) and after[k].data_ptr() == p for k, (v, p) in state.items())
    assert (torch._dynamo.config.recompile_limit, torch.compiler.config.dynamic_sources) == settings
    # the twin is the decoder's own: new modules around the very same weight tensors
    assert type(dec.twin.lm_head) is GemvLinear and dec.twin.lm_head.weight is model.lm_head.weight
    assert dec.twin.layers[0] is not model.layers[0]


def test_the_twin_swaps_registered_types_only():
    class MyLinear(nn.Linear):  # a subclass is another kernel's business (e.g. a quantized linear)
        pass

    m = nn.Sequential(nn.Linear(4, 4, bias=False), MyLinear(4, 4, bias=False), nn.Linear(4, 4), nn.ReLU())
    twin = decode_twin(m)
    assert [type(c) for c in twin] == [GemvLinear, MyLinear, nn.Linear, nn.ReLU]  # with a bias: kept
    assert twin[1].weight is m[1].weight and twin[1] is not m[1]
    x = torch.randn(1, 4)
    with torch.no_grad():
        torch.testing.assert_close(twin(x), m(x), rtol=0, atol=1e-6)


def test_one_compile_serves_every_position_turn_and_reset():
    """The compile happens once, in FastDecoder(); generation, a chat turn with cache reuse and a reset compile
    nothing more (a position baked into the kernel would be correct but ~seconds per token)."""
    model = tiny_llama(seed=9)
    dec = FastDecoder(model, 40)
    graphs = torch._dynamo.utils.counters["stats"]["unique_graphs"]
    eng = Engine(model, max_len=40, step=dec)
    ref = Engine(model, max_len=40)
    out, ref_out = list(eng.generate([5, 6, 7], 12)), list(ref.generate([5, 6, 7], 12))
    out += list(eng.generate([5, 6, 7] + out + [9], 8, reuse_cache=True))
    ref_out += list(ref.generate([5, 6, 7] + ref_out + [9], 8, reuse_cache=True))
    eng.reset(), ref.reset()
    out += list(eng.generate([1], 20))
    ref_out += list(ref.generate([1], 20))
    assert torch._dynamo.utils.counters["stats"]["unique_graphs"] == graphs and out == ref_out
    assert dec.compiled_calls > 30


def test_every_model_in_a_process_gets_its_compiled_step():
    """Nine model shapes, one decoder each: every one compiles its own step and runs it (dynamo's cap of 8 compiled
    versions per code object would leave the 9th shape eager, silently, if they shared one)."""
    for n in range(9):
        torch.manual_seed(n)
        model = Llama(LlamaConfig(block_size=16, vocab_size=31, n_layer=1, n_head=2, n_kv_head=1, n_embd=8 * (n + 1),
                                  intermediate_size=16)).eval()
        graphs = torch._dynamo.utils.counters["stats"]["unique_graphs"]
        dec = FastDecoder(model)
        assert torch._dynamo.utils.counters["stats"]["unique_graphs"] == graphs + 1, f"model {n + 1}"
        plain, _, fast, _, _ = run_both(model, [1, 2, 3], 6, max_len=16, decoder=dec)
        assert fast == plain and dec.compiled_calls == 1 + 5, f"model {n + 1}"


def test_the_step_compiles_whole_after_another_compile_of_the_model():
    """Another torch.compile of Llama.forward in the process (the benchmark's no-cache side, with dynamic
    lengths) must not change how the decode step compiles: a graph break there once made dynamo run Llama.forward
    eager in every later compile, the decode step in pieces (10-20% slower, no error). fullgraph=True turns a
    graph break in the step into an error; one graph per decoder."""
    other = tiny_llama(seed=10)
    nocache = torch.compile(type(other).forward, backend="eager", dynamic=True)
    with torch.no_grad():
        for T in (3, 5):
            nocache(other, torch.zeros(1, T, dtype=torch.long))
    graphs = torch._dynamo.utils.counters["stats"]["unique_graphs"]
    dec = FastDecoder(tiny_llama(seed=11), 40)
    assert torch._dynamo.utils.counters["stats"]["unique_graphs"] == graphs + 1


def test_a_copy_of_the_model_decodes_with_its_own_weights():
    """A decoder reads its model's weights at every step, never a snapshot: a deep copy (e.g. a frozen reference
    model) decodes with the copy's weights, and an in-place change of the model's weights is seen."""
    model = tiny_llama(seed=12)
    dec = FastDecoder(model, 40)
    twin = copy.deepcopy(model)
    with torch.no_grad():
        for p in twin.parameters():
            p.add_(0.05 * torch.randn(p.shape, generator=torch.Generator().manual_seed(p.numel())))
    plain, plain_logits, fast, fast_logits, _ = run_both(twin, [1, 2, 3, 4, 5], 8)
    assert fast == plain
    for mine, theirs in zip(fast_logits, plain_logits):
        torch.testing.assert_close(mine, theirs, rtol=0, atol=1e-5)
    with torch.no_grad():
        model.lm_head.weight.mul_(1.5)  # the caller changes its weights in place: the decoder sees them
    plain, plain_logits, fast, fast_logits, _ = run_both(model, [1, 2, 3, 4, 5], 8, decoder=dec)
    for mine, theirs in zip(fast_logits, plain_logits):
        torch.testing.assert_close(mine, theirs, rtol=0, atol=1e-5)


def test_the_scripts_heuristic(monkeypatch):
    model = tiny_llama(seed=7)
    assert not fast_decode.wanted(model)  # 0.05 MB: eager by default
    assert fast_decode.wanted(model, True) and not fast_decode.wanted(model, False)
    monkeypatch.setattr(fast_decode, "AUTO_COMPILE_BYTES", fast_decode.weight_bytes(model))
    assert fast_decode.wanted(model)
    assert not fast_decode.wanted(model.to(torch.bfloat16), True)  # CPU fp32 only


@pytest.mark.skipif(not (DEST / "stories260K.bin").is_file(), reason="data/stories260k absent: run "
                    "phase3_core_inference/project8_kv_cache/download_data.py (or --source DIR)")
def test_stories260k_fast_path_equals_plain_path():
    from phase1_foundation.project3_pretrain.llama2c import load_llama2c

    model = load_llama2c(DEST / "stories260K.bin").eval()
    plain, plain_logits, fast, fast_logits, _ = run_both(model, [1], 60, max_len=model.config.block_size)
    assert fast == plain
    for mine, theirs in zip(fast_logits, plain_logits):
        # logits of up to ~20 here: another summation order differs by a few float32 ulps of them (seen: 1.0e-5)
        torch.testing.assert_close(mine, theirs, rtol=1e-5, atol=1e-5)


if __name__ == "__main__":
    from course.cli import run_demo

    run_demo(lambda: print("this file holds only tests: uv run pytest -q " + __file__), __doc__)
