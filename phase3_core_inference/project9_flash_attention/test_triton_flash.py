"""The Triton kernels (forward and backward) against PyTorch's SDPA.

Two ways they run:
- on a CPU, under Triton's interpreter, on small shapes in fp32 (tight tolerances):
      TRITON_INTERPRET=1 uv run pytest -q phase3_core_inference/project9_flash_attention/test_triton_flash.py
  (test_flash_attention.py runs this file so, in a process of its own: triton reads the flag when imported);
- on a CUDA GPU (marked gpu), compiled, on larger shapes in fp16/bf16 (tolerances of half precision).
Without either, every test here is skipped.
"""

from __future__ import annotations

import os

import pytest
import torch
import torch.nn.functional as F

triton = pytest.importorskip("triton", reason="triton is not installed")

from course.errors import CourseError  # noqa: E402
from phase3_core_inference.project9_flash_attention.triton_flash import (  # noqa: E402
    triton_flash_attention, triton_forward)

INTERPRETED = os.environ.get("TRITON_INTERPRET") == "1"
DEVICE = "cpu" if INTERPRETED else "cuda"
if INTERPRETED:
    pytestmark = []
elif torch.cuda.is_available():
    pytestmark = [pytest.mark.gpu]
else:
    pytestmark = [pytest.mark.skip(reason="needs CUDA, or TRITON_INTERPRET=1 (test_flash_attention.py runs this file "
                                          "under the interpreter)")]


def qkv(B, H, Hkv, Tq, Tk, D, dtype=torch.float32, seed=0):
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(s, generator=g).to(DEVICE, dtype).requires_grad_(True)
            for s in ((B, H, Tq, D), (B, Hkv, Tk, D), (B, Hkv, Tk, D))]


def sdpa(q, k, v, causal):
    return F.scaled_dot_product_attention(q, k, v, is_causal=causal, enable_gqa=True)


# small shapes for the interpreter: lengths that are not multiples of the 16-wide blocks, GQA, both masks
SMALL = [(2, 4, 2, 37, 37, 16, True), (1, 2, 1, 13, 29, 16, False), (1, 3, 3, 50, 50, 32, True), (1, 2, 2, 1, 1, 16, True),
         (1, 4, 1, 20, 45, 16, True)]


@pytest.mark.parametrize("B,H,Hkv,Tq,Tk,D,causal", SMALL)
def test_forward_and_backward_equal_sdpa_small(B, H, Hkv, Tq, Tk, D, causal):
    q, k, v = qkv(B, H, Hkv, Tq, Tk, D)
    ours = triton_flash_attention(q, k, v, causal=causal, block_m=16, block_n=16)
    ref = sdpa(q, k, v, causal)
    tol = 1e-5 if INTERPRETED else 1e-3  # compiled fp32 products: IEEE, but another summation order
    torch.testing.assert_close(ours, ref, rtol=0, atol=tol)
    g = torch.randn_like(ref)
    for a, b in zip(torch.autograd.grad(ours, (q, k, v), g), torch.autograd.grad(ref, (q, k, v), g)):
        torch.testing.assert_close(a, b, rtol=0, atol=10 * tol)


def test_log_sum_exp_is_saved():
    q, k, v = qkv(1, 2, 1, 19, 19, 16, seed=1)
    _, lse = triton_forward(q.detach(), k.detach(), v.detach(), causal=True, block_m=16, block_n=16)
    s = (q @ k.repeat_interleave(2, 1).transpose(-1, -2)) / 4.0
    s = s.masked_fill(~torch.ones(19, 19, dtype=torch.bool, device=DEVICE).tril(), float("-inf"))
    torch.testing.assert_close(lse, torch.logsumexp(s, -1).detach(), rtol=0, atol=1e-5 if INTERPRETED else 1e-3)


@pytest.mark.parametrize("kwargs,fragment", [
    ({"block_m": 24}, "block_m (24) must be a power of two >= 16"),
    ({"block_n": 8}, "block_n (8) must be a power of two >= 16"),
    ({"block_m": 0}, "block_m (0) must be a positive int"),
])
def test_bad_blocks_are_one_line(kwargs, fragment):
    q, k, v = qkv(1, 2, 2, 8, 8, 16)
    with pytest.raises(CourseError, match=fragment.replace("(", r"\(").replace(")", r"\)")):
        triton_flash_attention(q, k, v, **kwargs)


def test_head_dim_not_a_power_of_two_is_one_line():
    q, k, v = qkv(1, 2, 2, 8, 8, 24)
    with pytest.raises(CourseError, match="power of two in 16..256"):
        triton_flash_attention(q, k, v)


@pytest.mark.skipif(INTERPRETED, reason="GPU sizes: too slow for the interpreter")
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("T,causal", [(1000, True), (2048, True), (777, False)])
def test_gpu_half_precision_equals_sdpa(dtype, T, causal):
    q, k, v = qkv(2, 8, 2, T, T, 64, dtype)
    ours = triton_flash_attention(q, k, v, causal=causal)
    ref = sdpa(q, k, v, causal)
    torch.testing.assert_close(ours.float(), ref.float(), rtol=0, atol=2e-2)
    g = torch.randn_like(ref)
    for a, b in zip(torch.autograd.grad(ours, (q, k, v), g), torch.autograd.grad(ref, (q, k, v), g)):
        torch.testing.assert_close(a.float(), b.float(), rtol=0, atol=5e-2)
