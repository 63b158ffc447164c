"""Tests of nf4.py: the 16 levels are the published NF4 table, the codes are bitsandbytes' codes, the error of every
block is within half a level gap, packing round-trips exactly, double quantisation saves the paper's 0.373 bits per
weight (computed exactly and measured), and Linear4bit computes with the de-quantised weight in both passes.

    uv run pytest phase2_finetuning/project5_lora/test_nf4.py -q
    uv run python phase2_finetuning/project5_lora/test_nf4.py          # the levels and the bytes per weight
"""

from __future__ import annotations

import math

import pytest
import torch

from course.errors import CourseError
from phase1_foundation.project3_pretrain.testing import tiny_llama
from phase2_finetuning.project5_lora.nf4 import (
    BLOCK,
    DQ_BLOCK,
    NF4,
    Linear4bit,
    NF4Weight,
    base_memory,
    dequantize_blocks,
    dequantize_model,
    double_quantize,
    nf4_bytes,
    nf4_levels,
    pack_4bit,
    quantize_blocks,
    quantize_model,
    unpack_4bit,
)

# The table published with the paper's code (bitsandbytes, functional.py / backends/utils.py), float32.
PUBLISHED_NF4 = [-1.0, -0.6961928009986877, -0.5250730514526367, -0.39491748809814453, -0.28444138169288635,
                 -0.18477343022823334, -0.09105003625154495, 0.0, 0.07958029955625534, 0.16093020141124725,
                 0.24611230194568634, 0.33791524171829224, 0.44070982933044434, 0.5626170039176941,
                 0.7229568362236023, 1.0]


def test_the_16_levels_are_the_published_nf4_table_bit_for_bit():
    assert nf4_levels().tolist() == PUBLISHED_NF4 and NF4.dtype == torch.float32
    assert NF4[7] == 0 and (NF4[1:] > NF4[:-1]).all()  # sorted, with an exact zero
    assert int((NF4 > 0).sum()) == 8 and int((NF4 < 0).sum()) == 7  # the asymmetric split of the paper


def _bnb():
    try:
        import bitsandbytes.functional as bnb_f
    except (ImportError, OSError, RuntimeError) as e:  # not installed, or its native library failed to load
        pytest.skip(f"bitsandbytes could not be imported ({type(e).__name__}: {str(e)[:80]}); it is an optional "
                    "dev dependency")
    return bnb_f


@pytest.mark.parametrize("shape,scale", [((128, 64), 1.0), ((96, 200), 0.02), ((7, 9), 3.0), ((4096,), 1e-3)],
                         ids=str)
def test_codes_equal_bitsandbytes_quantize_4bit(shape, scale):
    bnb_f = _bnb()
    w = torch.randn(shape) * scale
    w.view(-1)[::37] = 0.0  # exact zeros, and the values next to them, are where rounding slips show
    packed, state = bnb_f.quantize_4bit(w, blocksize=BLOCK, quant_type="nf4", compress_statistics=False)
    codes, absmax = quantize_blocks(w)
    ours = pack_4bit(codes)
    n = math.ceil(w.numel() / 2)  # we pad to whole blocks, bitsandbytes to an even count
    assert torch.equal(ours[:n], packed.reshape(-1)[:n])
    assert torch.equal(absmax, state.absmax)
    # (bitsandbytes' dequantize_4bit is torch.compile'd on CPU: seconds per shape; equal codes and absmax are enough)


@pytest.mark.parametrize("dist", ["normal", "uniform", "heavy"])
def test_each_block_is_within_half_a_level_gap_of_its_absmax(dist):
    n = BLOCK * 50
    w = {"normal": torch.randn(n), "uniform": torch.rand(n) * 2 - 1,
         "heavy": torch.distributions.StudentT(2.0).sample((n,))}[dist]
    codes, absmax = quantize_blocks(w)
    back = dequantize_blocks(codes, absmax)[:n]
    half_gap = ((NF4[1:] - NF4[:-1]).max() / 2).item()  # 0.152: between -1 and -0.696
    err = (back - w).abs().view(-1, BLOCK)
    assert (err <= absmax.unsqueeze(1) * half_gap * (1 + 1e-6) + 1e-12).all()
    # and each value took its nearest level: no other level is closer
    scaled = (w.view(-1, BLOCK) / absmax.unsqueeze(1)).reshape(-1)
    dist_to_levels = (scaled.unsqueeze(1) - NF4).abs()
    chosen = dist_to_levels.gather(1, codes[:n].long().unsqueeze(1)).squeeze(1)
    assert (chosen <= dist_to_levels.min(dim=1).values + 1e-6).all()
    # the largest |w| of each block is represented exactly (it maps to -1 or 1)
    top = w.view(-1, BLOCK).abs().argmax(dim=1)
    assert torch.allclose(back.view(-1, BLOCK).gather(1, top.unsqueeze(1)).abs().squeeze(1), absmax)


def test_an_all_zero_block_round_trips_to_zeros():
    w = torch.zeros(2 * BLOCK)
    w[BLOCK:] = torch.randn(BLOCK)
    q = NF4Weight(w)
    assert torch.equal(q.dequantize()[:BLOCK], torch.zeros(BLOCK))


def test_packed_codes_round_trip_exactly():
    codes = torch.randint(0, 16, (10_002,), dtype=torch.uint8)
    packed = pack_4bit(codes)
    assert packed.dtype == torch.uint8 and packed.numel() == 5_001
    assert torch.equal(unpack_4bit(packed), codes)
    assert pack_4bit(torch.tensor([1, 2], dtype=torch.uint8)).item() == 0x12  # first code in the high nibble
    with pytest.raises(CourseError, match="even number"):
        pack_4bit(codes[:3])
    with pytest.raises(CourseError, match="0..15"):
        pack_4bit(torch.tensor([16, 0], dtype=torch.uint8))


def test_double_quantisation_error_is_within_half_an_int8_step():
    absmax = torch.rand(1000) * 0.1 + 0.01
    dq = double_quantize(absmax)
    assert dq.codes.dtype == torch.int8 and dq.scale.numel() == math.ceil(1000 / DQ_BLOCK)
    back = dq.dequantize()
    step = dq.scale.repeat_interleave(DQ_BLOCK)[:1000]
    assert ((back - absmax).abs() <= step / 2 + 1e-7).all()


def test_bytes_per_weight_are_the_papers_exactly_computed_and_measured():
    out_f, in_f = 1536, 576  # one SmolLM2-135M MLP matrix
    w = torch.randn(out_f, in_f) * 0.02
    n = w.numel()
    blocks = n // BLOCK
    plain, double = NF4Weight(w, double_quant=False), NF4Weight(w, double_quant=True)
    assert plain.nbytes == nf4_bytes(n, double_quant=False) == n // 2 + 4 * blocks
    assert double.nbytes == nf4_bytes(n) == n // 2 + blocks + 4 * math.ceil(blocks / DQ_BLOCK) + 4
    saved_bits = 8 * (plain.nbytes - double.nbytes) / n
    # the paper: 32/64 = 0.5 bits of absmax per weight become 8/64 + 32/(64*256) = 0.127, saving 0.373
    exact = 32 / 64 - 8 / 64 - 8 * (4 * math.ceil(blocks / DQ_BLOCK) + 4) / n
    assert saved_bits == pytest.approx(exact, abs=1e-12)
    assert abs(saved_bits - 0.373) < 0.0005
    assert 8 * double.nbytes / n == pytest.approx(4.127, abs=0.001) and double.nbytes / n <= 0.52


def test_the_double_quantised_weights_stay_close_to_the_single_level_ones():
    w = torch.randn(512, 256) * 0.05
    a, b = NF4Weight(w, double_quant=False).dequantize(), NF4Weight(w).dequantize()
    assert (a - b).abs().max() < 0.01 * w.abs().max()  # absmax moved by < 1/254 of its range
    assert (b - w).abs().mean() < 0.1 * w.abs().mean() * 1.5


def test_linear4bit_forward_and_backward_use_the_dequantised_weight():
    torch.manual_seed(0)
    lin = torch.nn.Linear(200, 96, bias=False)
    q = Linear4bit.from_linear(lin)
    w = q.dequantize()
    x = torch.randn(3, 5, 200, requires_grad=True)
    y = q(x)
    torch.testing.assert_close(y, x @ w.T, rtol=1e-6, atol=1e-6)
    g = torch.randn_like(y)
    y.backward(g)
    torch.testing.assert_close(x.grad, g @ w, rtol=1e-6, atol=1e-6)
    assert not list(q.parameters())  # nothing to train: buffers only
    assert q.nbytes == nf4_bytes(200 * 96) and q.num_weights == 200 * 96


def test_linear4bit_autograd_keeps_no_float_weight_between_the_passes():
    q = Linear4bit(torch.randn(256, 256))
    x = torch.randn(4, 256, requires_grad=True)
    y = q(x)
    saved = [t for t in (getattr(y.grad_fn, name) for name in dir(y.grad_fn) if name.startswith("_saved"))
             if torch.is_tensor(t)]
    assert not any(t.numel() == 256 * 256 and t.is_floating_point() for t in saved)


def test_quantize_model_keeps_lm_head_and_tied_weights_and_dequantize_model_restores_plain_linears():
    model = tiny_llama(seed=0)
    idx = torch.randint(0, 97, (2, 10))
    with torch.no_grad():
        ref = model(idx)[0]
    names = quantize_model(model)
    assert len(names) == 14 and "lm_head" not in names
    mem = base_memory(model)
    assert mem.measured_bytes == mem.computed_bytes and mem.bytes_per_param <= 0.6
    with torch.no_grad():
        quant = model(idx)[0]
    assert 0 < (quant - ref).abs().max() < 0.1 * ref.abs().max()
    dequantize_model(model)
    assert not any(isinstance(m, Linear4bit) for m in model.modules())
    with torch.no_grad():
        assert torch.equal(model(idx)[0], quant)
    tied = tiny_llama(tie_embeddings=True)
    assert "lm_head" not in quantize_model(tied, skip=())  # tied to the embedding: stays float


def test_bad_input_to_the_quantiser_is_one_line():
    with pytest.raises(CourseError, match="finite"):
        quantize_blocks(torch.tensor([1.0, float("nan")]))
    with pytest.raises(CourseError, match="finite floating-point"):
        quantize_blocks(torch.ones(4, dtype=torch.int32))
    with pytest.raises(CourseError, match="positive even"):
        quantize_blocks(torch.ones(4), blocksize=3)


def _demo() -> None:
    print("NF4 levels:", " ".join(f"{v:+.4f}" for v in NF4.tolist()))
    n = 576 * 1536
    for dq in (False, True):
        b = nf4_bytes(n, double_quant=dq)
        print(f"double_quant={dq!s:5}: {b:,} bytes for {n:,} weights = {b / n:.4f} bytes = {8 * b / n:.3f} bits/weight")


if __name__ == "__main__":
    from course.cli import run_demo

    run_demo(_demo, __doc__)
