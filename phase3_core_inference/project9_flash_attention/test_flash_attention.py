"""Tests for the tiled attention: the online softmax, the forward and backward against PyTorch's SDPA on random
shapes (GQA, lengths 1..1,000 including primes, blocks that do not divide them, causal, masks), float64
gradcheck, the compiled path against the teaching path, the Triton kernel under Triton's interpreter, bad input.

Run: uv run pytest -q phase3_core_inference/project9_flash_attention
"""

from __future__ import annotations

import os
import random
import re
import subprocess
import sys

import pytest
import torch
import torch.nn.functional as F

from course.errors import CourseError
from course.paths import REPO_ROOT
from phase3_core_inference.project8_kv_cache.fast_decode import compile_works
from phase3_core_inference.project9_flash_attention.fast_flash import CompiledFlashAttention
from phase3_core_inference.project9_flash_attention.flash_attention import flash_attention, flash_forward
from phase3_core_inference.project9_flash_attention.memory import peak_cpu_bytes
from phase3_core_inference.project9_flash_attention.naive_attention import naive_attention
from phase3_core_inference.project9_flash_attention.online_softmax import (combine_by_lse, finish, merge,
                                                                           online_normalizer, online_softmax,
                                                                           partial_attention, softmax_two_pass)

HERE = "phase3_core_inference/project9_flash_attention"


def qkv(B, H, Hkv, Tq, Tk, D, dtype=torch.float32, seed=0, grad=False, Dv=None):
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(B, H, Tq, D, generator=g, dtype=dtype)
    k = torch.randn(B, Hkv, Tk, D, generator=g, dtype=dtype)
    v = torch.randn(B, Hkv, Tk, Dv or D, generator=g, dtype=dtype)
    return [t.requires_grad_(grad) for t in (q, k, v)]


def sdpa(q, k, v, mask=None, causal=False):
    """The reference: PyTorch's SDPA; causal and a mask together as one mask (SDPA takes one or the other)."""
    if causal and mask is not None:
        mask = mask & torch.ones(q.shape[2], k.shape[2], dtype=torch.bool).tril()
        causal = False
    return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=causal, enable_gqa=True)


def random_mask(g: torch.Generator, shape, p=0.7):
    return torch.rand(shape, generator=g) < p


# ---- the online softmax ---------------------------------------------------------------------------------
@pytest.mark.parametrize("n,chunk", [(1, 1), (7, 3), (100, 16), (257, 64), (1000, 999)])
def test_online_and_two_pass_softmax_equal_torch(n, chunk):
    x = torch.randn(4, n, dtype=torch.float64) * 20  # large scores: exp without the max would overflow
    ref = torch.softmax(x, -1)
    torch.testing.assert_close(online_softmax(x, chunk), ref, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(softmax_two_pass(x, chunk), ref, rtol=1e-12, atol=1e-12)
    m, l = online_normalizer(x, chunk)
    torch.testing.assert_close((m + l.log()).squeeze(-1), torch.logsumexp(x, -1), rtol=1e-12, atol=1e-12)


def test_merging_two_partial_states_equals_the_state_of_the_union():
    q, k, v = qkv(2, 3, 3, 5, 40, 8, torch.float64, seed=1)
    vis = torch.rand(2, 3, 5, 40) < 0.6
    vis[0, 0, 0] = False  # a query that sees nothing at all
    vis[1, 1, 1, :25] = False  # a query that sees nothing in the first part
    scale = 0.3
    whole = finish(*partial_attention(q, k, v, scale, vis))
    parts = [partial_attention(q, k[:, :, a:b], v[:, :, a:b], scale, vis[..., a:b]) for a, b in ((0, 25), (25, 40))]
    merged = finish(*merge(*parts))
    ref = F.scaled_dot_product_attention(q, k, v, attn_mask=vis, scale=scale)
    for ours in (whole, merged):
        torch.testing.assert_close(ours[0], ref, rtol=1e-12, atol=1e-12)
    s = (q @ k.transpose(-1, -2) * scale).masked_fill(~vis, float("-inf"))
    torch.testing.assert_close(merged[1], torch.logsumexp(s, -1), rtol=1e-12, atol=1e-12)
    outs, lses = zip(*(finish(*p) for p in parts))
    combined = combine_by_lse(list(outs), list(lses))
    torch.testing.assert_close(combined[0], ref, rtol=1e-12, atol=1e-12)
    assert combined[1][0, 0, 0] == float("-inf") and torch.all(combined[0][0, 0, 0] == 0)


# ---- forward and backward against SDPA -------------------------------------------------------------------
PRIMES = [1, 2, 3, 7, 13, 61, 97, 127, 251, 509, 997]


def _cases(n=24, seed=9):
    """Random shapes: batch 1-3, kv heads 1-3, groups 1-3, lengths 1..1,000 (primes and 1,000 among them), block
    sizes that mostly do not divide them, causal or not, with or without a mask (of one of three shapes)."""
    rnd = random.Random(seed)
    cases = []
    for i in range(n):
        Tq = rnd.choice(PRIMES + [1000, rnd.randint(1, 300)])
        Tk = Tq if rnd.random() < 0.5 else rnd.choice(PRIMES + [1000])
        big = max(Tq, Tk) > 200
        blocks = (rnd.choice([32, 64, 100, 128]) if big else rnd.choice([1, 3, 16, 17, 64]),
                  rnd.choice([32, 64, 100, 128]) if big else rnd.choice([1, 5, 16, 31, 64]))
        cases.append(dict(B=rnd.randint(1, 3) if not big else 1, Hkv=rnd.randint(1, 3), G=rnd.randint(1, 3),
                          Tq=Tq, Tk=Tk, D=rnd.choice([4, 16, 32]), blocks=blocks, causal=rnd.random() < 0.5,
                          mask=rnd.choice([None, "key_padding", "full", "per_head"]), seed=i))
    cases += [dict(B=2, Hkv=2, G=2, Tq=1000, Tk=1000, D=16, blocks=(128, 96), causal=True, mask="key_padding", seed=99),
              dict(B=1, Hkv=1, G=4, Tq=997, Tk=997, D=8, blocks=(64, 64), causal=True, mask=None, seed=98)]
    return cases


def _mask_for(kind, B, H, Tq, Tk, seed):
    g = torch.Generator().manual_seed(seed + 1000)
    if kind is None:
        return None
    if kind == "key_padding":  # each row's keys past its own length hidden: (B, 1, 1, Tk)
        lengths = torch.randint(1, Tk + 1, (B,), generator=g)
        return (torch.arange(Tk)[None, :] < lengths[:, None]).view(B, 1, 1, Tk)
    if kind == "per_head":
        return random_mask(g, (1, H, 1, Tk))
    return random_mask(g, (B, H, Tq, Tk))


@pytest.mark.parametrize("case", _cases(), ids=lambda c: f"B{c['B']}H{c['Hkv'] * c['G']}/{c['Hkv']}-Tq{c['Tq']}-"
                         f"Tk{c['Tk']}-D{c['D']}-b{c['blocks'][0]}x{c['blocks'][1]}"
                         f"{'-causal' if c['causal'] else ''}-{c['mask']}")
def test_forward_equals_sdpa_on_random_shapes(case):
    B, Hkv, G, Tq, Tk, D = (case[n] for n in ("B", "Hkv", "G", "Tq", "Tk", "D"))
    q, k, v = qkv(B, Hkv * G, Hkv, Tq, Tk, D, seed=case["seed"])
    mask = _mask_for(case["mask"], B, Hkv * G, Tq, Tk, case["seed"])
    out, lse = flash_forward(q, k, v, mask, case["causal"], None, *case["blocks"])
    torch.testing.assert_close(out, sdpa(q, k, v, mask, case["causal"]), rtol=0, atol=1e-5)
    # the log-sum-exp saved for the backward: against torch.logsumexp of the full (masked) score matrix
    vis = torch.ones(Tq, Tk, dtype=torch.bool).tril() if case["causal"] else torch.ones(Tq, Tk, dtype=torch.bool)
    vis = vis if mask is None else vis & mask
    s = (q @ k.repeat_interleave(G, 1).transpose(-1, -2)) / D ** 0.5
    torch.testing.assert_close(lse, torch.logsumexp(s.masked_fill(~vis, float("-inf")), -1), rtol=0, atol=1e-5)


@pytest.mark.parametrize("case", _cases(n=8, seed=5), ids=lambda c: f"Tq{c['Tq']}-Tk{c['Tk']}-G{c['G']}-"
                         f"{'causal' if c['causal'] else 'full'}-{c['mask']}")
def test_gradients_equal_sdpa_on_random_shapes(case):
    B, Hkv, G, Tq, Tk, D = (case[n] for n in ("B", "Hkv", "G", "Tq", "Tk", "D"))
    q, k, v = qkv(B, Hkv * G, Hkv, Tq, Tk, D, seed=case["seed"], grad=True)
    mask = _mask_for(case["mask"], B, Hkv * G, Tq, Tk, case["seed"])
    ours = flash_attention(q, k, v, mask, case["causal"], None, *case["blocks"])
    ref = sdpa(q, k, v, mask, case["causal"])
    g = torch.randn_like(ref)
    for a, b in zip(torch.autograd.grad(ours, (q, k, v), g), torch.autograd.grad(ref, (q, k, v), g)):
        torch.testing.assert_close(a, b, rtol=0, atol=1e-4)


@pytest.mark.parametrize("causal,mask_kind,Tq,Tk", [(True, None, 5, 5), (False, "full", 4, 7), (True, "key_padding", 6, 6),
                                                    (True, None, 3, 8)])
def test_gradcheck_float64(causal, mask_kind, Tq, Tk):
    q, k, v = qkv(2, 4, 2, Tq, Tk, 3, torch.float64, seed=3, grad=True)
    mask = _mask_for(mask_kind, 2, 4, Tq, Tk, 3)
    assert torch.autograd.gradcheck(lambda q, k, v: flash_attention(q, k, v, mask, causal, None, 2, 3), (q, k, v))


@pytest.mark.parametrize("causal,mask_kind", [(True, None), (False, "full"), (True, "key_padding")])
def test_the_naive_baseline_equals_sdpa_too(causal, mask_kind):
    q, k, v = qkv(2, 6, 3, 31, 31, 8, seed=11)
    mask = _mask_for(mask_kind, 2, 6, 31, 31, 11)
    torch.testing.assert_close(naive_attention(q, k, v, mask, causal), sdpa(q, k, v, mask, causal), rtol=0, atol=1e-5)


def test_value_head_dim_may_differ_and_scale_is_used():
    q, k, v = qkv(1, 2, 1, 9, 11, 8, seed=4, Dv=5)
    ours = flash_attention(q, k, v, causal=True, scale=0.1, block_q=4, block_k=4)
    ref = F.scaled_dot_product_attention(q, k, v, is_causal=True, scale=0.1, enable_gqa=True)
    assert ours.shape == (1, 2, 9, 5)
    torch.testing.assert_close(ours, ref, rtol=0, atol=1e-6)


def test_fully_masked_rows_give_zero_as_sdpa():
    q, k, v = qkv(1, 2, 2, 6, 6, 4, seed=5, grad=True)
    mask = torch.ones(1, 1, 6, 6, dtype=torch.bool)
    mask[..., 2, :] = False
    ours, ref = flash_attention(q, k, v, mask, block_q=4, block_k=4), sdpa(q, k, v, mask)
    assert torch.all(ours[:, :, 2] == 0)
    torch.testing.assert_close(ours, ref, rtol=0, atol=1e-6)
    gq = torch.autograd.grad(ours.sum(), q)[0]
    assert torch.isfinite(gq).all() and torch.all(gq[:, :, 2] == 0)


def test_causal_tiles_above_the_diagonal_are_never_read():
    """Keys 32..63 hold NaN: query tiles 0..31 with blocks of 16 finish before reaching them (a tile that only
    masked them would still multiply 0 by NaN), and equal SDPA over the first 32 keys."""
    q, k, v = qkv(1, 2, 2, 64, 64, 8, seed=6)
    k[:, :, 32:], v[:, :, 32:] = float("nan"), float("nan")
    out, _ = flash_forward(q, k, v, causal=True, block_q=16, block_k=16)
    assert torch.isfinite(out[:, :, :32]).all() and torch.isnan(out[:, :, 32:]).all()
    torch.testing.assert_close(out[:, :, :32], sdpa(q[:, :, :32], k[:, :, :32], v[:, :, :32], causal=True),
                               rtol=0, atol=1e-6)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_half_precision_inputs_accumulate_in_fp32(dtype):
    q, k, v = qkv(1, 4, 2, 70, 70, 16, dtype, seed=7)
    out = flash_attention(q, k, v, causal=True, block_q=32, block_k=32)
    assert out.dtype == dtype
    ref = sdpa(q.float(), k.float(), v.float(), causal=True)
    torch.testing.assert_close(out.float(), ref, rtol=0, atol=1e-2)


def test_extra_memory_grows_with_tokens_not_their_square():
    """The peak of what one forward allocates (torch.profiler's allocator events): at 4x the tokens, ~4x (the
    output and the per-block state), not 16x; the (T x T) scores of the naive path are far above it."""
    sizes = {}
    for T in (256, 1024):
        q, k, v = qkv(1, 1, 1, T, T, 16, seed=8)
        sizes[T] = peak_cpu_bytes(lambda: flash_forward(q, k, v, causal=True, block_q=64, block_k=64))[0]
    assert sizes[1024] < 5 * sizes[256]
    assert sizes[1024] < 1024 * 1024 * 4 / 8  # an eighth of one fp32 score matrix


def test_peak_cpu_bytes_counts_what_torch_allocates():
    def two_in_turn():
        a = torch.empty(1000)  # 4,000 bytes, freed before b
        del a
        b = torch.empty(250)
        return b
    peak, b = peak_cpu_bytes(two_in_turn)
    assert peak == 4000 and b.numel() == 250
    peak, _ = peak_cpu_bytes(lambda: [torch.empty(100), torch.empty(100)])
    assert peak == 800


# ---- the compiled path equals the teaching path ------------------------------------------------------------
def test_compiled_path_equals_the_teaching_path():
    if not compile_works():
        pytest.skip("torch.compile cannot build CPU kernels here (no C++ compiler)")
    attn = CompiledFlashAttention(block_q=32, block_k=32)
    q, k, v = qkv(1, 4, 2, 100, 100, 16, seed=10)
    mask = _mask_for("key_padding", 1, 4, 100, 100, 10)
    for m, causal in ((None, True), (mask, True), (None, False)):
        ours = attn(q, k, v, m, causal)
        torch.testing.assert_close(ours, flash_forward(q, k, v, m, causal, None, 32, 32)[0], rtol=0, atol=1e-6)
        torch.testing.assert_close(ours, sdpa(q, k, v, m, causal), rtol=0, atol=1e-5)
    q.requires_grad_(True)
    with pytest.raises(CourseError, match="forward-only"):
        attn(q, k, v, causal=True)


# ---- the Triton kernel, under Triton's interpreter (a process of its own: the flag is read at import) -------
def test_triton_kernel_under_the_interpreter():
    env = {**os.environ, "TRITON_INTERPRET": "1", "OMP_NUM_THREADS": "1"}
    proc = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", f"{HERE}/test_triton_flash.py"],
                          cwd=REPO_ROOT, env=env, capture_output=True, text=True, timeout=300)
    passed = re.search(r"(\d+) passed", proc.stdout)
    assert proc.returncode == 0 and passed and int(passed.group(1)) >= 10, proc.stdout[-3000:]  # the GPU-only ones skip


# ---- bad input: one clear line each -----------------------------------------------------------------------
def _bad_cases():
    q, k, v = qkv(1, 4, 2, 5, 6, 8)
    return [
        ((q, k[..., :4], v), {}, "head dims differ: q has 8, k has 4"),
        ((q, k, v), {"block_q": 0}, "block_q (0) must be a positive int"),
        ((q, k, v), {"block_k": -3}, "block_k (-3) must be a positive int"),
        ((q, k.double(), v), {}, "q, k and v must have one dtype"),
        ((q, k.to("meta"), v), {}, "q, k and v must be on one device"),
        ((q, k, v), {"mask": torch.ones(1, 4, 5, 7, dtype=torch.bool)}, "does not broadcast to"),
        ((q, k, v), {"mask": torch.ones(5, 6)}, "mask must be a bool tensor"),
        ((q, k[:, :1].expand(1, 3, 6, 8), v[:, :1].expand(1, 3, 6, 8)), {}, "must be a multiple of k/v's 3 heads"),
        ((q[0], k, v), {}, "q must be a 4-D tensor"),
        ((q, k, v[:, :, :5]), {}, "must agree in batch, heads and tokens"),
        ((q, k, v), {"scale": float("nan")}, "scale (nan) must be a finite number"),
    ]


@pytest.mark.parametrize("args,kwargs,fragment", _bad_cases(), ids=lambda x: x if isinstance(x, str) else "")
def test_bad_input_is_one_clear_line(args, kwargs, fragment):
    with pytest.raises(CourseError) as e:
        flash_attention(*args, **kwargs)
    assert fragment in str(e.value) and "\n" not in str(e.value)


def _demo() -> None:
    """Validation mode: ours beside SDPA on one causal GQA shape, and the memory each holds."""
    q, k, v = qkv(1, 8, 2, 1024, 1024, 64, seed=0)
    ours = flash_forward(q, k, v, causal=True)[0]
    print(f"max |flash - SDPA| at 1,024 tokens, 8 q / 2 kv heads: {(ours - sdpa(q, k, v, causal=True)).abs().max():.2e}")
    print(f"extra memory: ours {peak_cpu_bytes(lambda: flash_forward(q, k, v, causal=True))[0] / 2**20:.1f} MiB, "
          f"the scores alone {8 * 1024 * 1024 * 4 / 2**20:.0f} MiB")
    print(f"run the tests with: uv run pytest -q {HERE}")


if __name__ == "__main__":
    from course.cli import run_demo

    run_demo(_demo, __doc__)
