"""formats.py against PyTorch: every property against torch.finfo, every code against torch's view of the bits,
and our round-to-nearest-even casts against torch's casts over sweeps of float32 inputs that reach every fp16,
bf16 and fp8 bit pattern (ties, their neighbours, subnormals, overflow, inf, NaN).

Run as a script: prints the table of formats and what each does to a few numbers.
"""

from __future__ import annotations

import pytest
import torch

from course.cli import run_demo
from course.errors import CourseError
from phase3_core_inference.project7_mixed_precision.formats import (
    BF16,
    FORMATS,
    FP8_E4M3FN,
    FP8_E5M2,
    FP16,
    FP32,
    FloatFormat,
    cast,
    decode,
    encode,
    get_format,
    round_to,
    stochastic_round_bf16,
    ulp,
)

NARROW = [FP16, BF16, FP8_E4M3FN, FP8_E5M2]
STORAGE = {8: torch.uint8, 16: torch.int16, 32: torch.int32, 64: torch.int64}


def torch_codes(x: torch.Tensor, fmt: FloatFormat) -> torch.Tensor:
    """torch's cast of x to fmt, as int64 codes."""
    return x.to(fmt.torch_dtype).view(STORAGE[fmt.bits]).to(torch.int64) & ((1 << fmt.bits) - 1)


def sweep(fmt: FloatFormat, src: torch.dtype, gen: torch.Generator, sample: int | None = None) -> torch.Tensor:
    """Inputs around every finite value of fmt (or `sample` random ones): the value, the tie with the next value,
    the source numbers just below and above the tie, a random point between; both signs; plus random bit patterns
    of the source type (NaN payloads, huge and subnormal numbers) and the special values."""
    if sample is None:
        codes = torch.arange(fmt.max_code + 1, dtype=torch.int64)
    else:
        codes = torch.randint(0, fmt.max_code + 1, (sample,), dtype=torch.int64, generator=gen)
    v = decode(codes, fmt)
    # the value after the largest finite one: where the next binade would start (inf's value, or 480 for e4m3fn)
    below_max = decode(torch.tensor([fmt.max_code - 1]), fmt).item()
    nxt = torch.where(codes < fmt.max_code, decode(codes + 1, fmt), torch.full_like(v, 2 * fmt.max - below_max))
    mid = ((v + nxt) / 2).to(src)
    inf = torch.full_like(mid, float("inf"))
    u = torch.rand(v.shape, dtype=torch.float64, generator=gen)
    pts = [v.to(src), mid, torch.nextafter(mid, torch.zeros_like(mid)), torch.nextafter(mid, inf),
           (v + (nxt - v) * u).to(src)]
    x = torch.cat(pts)
    x = torch.cat([x, -x])
    info = torch.finfo(src)
    raw = torch.randint(0, 1 << 32, (200_000, src.itemsize // 4), dtype=torch.int64, generator=gen)
    raw = raw.to(torch.int32).flatten()  # random 32-bit words: one per float32, two per float64
    special = torch.tensor([0.0, -0.0, float("inf"), float("-inf"), float("nan"), info.max, -info.max, info.tiny,
                            info.tiny / 2 ** 10, info.smallest_normal * info.eps, 1.0, -1.0], dtype=src)
    return torch.cat([x, raw.view(src), special])


@pytest.mark.parametrize("fmt", list(FORMATS.values()), ids=list(FORMATS))
def test_properties_equal_torch_finfo(fmt):
    fi = torch.finfo(fmt.torch_dtype)
    assert (fmt.bits, fmt.max, -fmt.max, fmt.eps, fmt.smallest_normal, fmt.resolution) == \
           (fi.bits, fi.max, fi.min, fi.eps, fi.tiny, fi.resolution)
    # the smallest subnormal is code 1, read by torch
    one = torch.tensor([1], dtype=STORAGE[fmt.bits]).view(fmt.torch_dtype).double().item()
    assert fmt.smallest_subnormal == one


@pytest.mark.parametrize("fmt", NARROW + [FP32], ids=lambda f: f.name)
def test_decode_equals_torch_for_every_code(fmt):
    if fmt.bits <= 16:
        codes = torch.arange(1 << fmt.bits, dtype=torch.int64)
    else:  # fp32: a million random codes and the edges of every region
        edges = [0, 1, 0x007F_FFFF, 0x0080_0000, 0x3F80_0000, 0x7F7F_FFFF, 0x7F80_0000, 0x7F80_0001, 0x7FC0_0000]
        codes = torch.cat([torch.randint(0, 1 << 32, (1 << 20,), dtype=torch.int64), torch.tensor(edges),
                           torch.tensor(edges) | (1 << 31)])
    ours = decode(codes, fmt)
    stored = codes.to(STORAGE[fmt.bits]) if fmt.bits < 64 else codes  # wraps to the signed type's bit pattern
    theirs = stored.view(fmt.torch_dtype).double()
    assert torch.equal(ours.isnan(), theirs.isnan())
    keep = ~theirs.isnan()
    assert torch.equal(ours[keep], theirs[keep])
    # the sign of zero too
    assert torch.equal(torch.signbit(ours[keep]), torch.signbit(theirs[keep]))


def _check_cast(x: torch.Tensor, fmt: FloatFormat) -> None:
    ours, theirs = encode(x, fmt), torch_codes(x, fmt)
    nan_ours = decode(ours, fmt).isnan()
    nan_theirs = decode(theirs, fmt).isnan()
    # NaN in, NaN out; the NaN's payload and sign differ between torch's own scalar and vectorised casts
    # (bf16: 0x7FC0 vs 0xFFFF), so only NaN-ness is compared
    assert torch.equal(nan_ours, nan_theirs), x[nan_ours != nan_theirs][:5]
    bad = (ours != theirs) & ~nan_theirs
    assert not bad.any(), f"{int(bad.sum())} differ, e.g. {x[bad][:5].tolist()}: ours {ours[bad][:5].tolist()}, " \
                          f"torch {theirs[bad][:5].tolist()}"


@pytest.mark.parametrize("fmt", NARROW, ids=lambda f: f.name)
def test_cast_equals_torch_on_a_sweep_reaching_every_code(fmt):
    gen = torch.Generator().manual_seed(torch.seed())  # fresh inputs each run (the failing values are printed)
    x = sweep(fmt, torch.float32, gen)
    _check_cast(x, fmt)
    # the sweep reaches every bit pattern torch's cast can produce: all finite codes, +-inf or +-max, NaN
    reached = torch.unique(torch_codes(x, fmt))
    nan = decode(reached, fmt).isnan()
    finite_and_inf = (fmt.inf_code if fmt.ieee else fmt.max_code) + 1
    assert len(reached[~nan]) == 2 * finite_and_inf and nan.any()
    # and our typed cast is the same tensor as torch's
    keep = ~x.isnan()
    assert torch.equal(cast(x[keep], fmt).view(STORAGE[fmt.bits]), x[keep].to(fmt.torch_dtype).view(STORAGE[fmt.bits]))


def test_fp32_from_float64_equals_torch():
    gen = torch.Generator().manual_seed(torch.seed())
    _check_cast(sweep(FP32, torch.float64, gen, sample=200_000), FP32)


@pytest.mark.parametrize("fmt,x,expected", [
    (FP16, 1 + 2 ** -11, 1.0),                       # a tie: to the even neighbour (1.0's fraction ends in 0)
    (FP16, 1 + 3 * 2 ** -11, 1 + 2 ** -9),           # a tie: up, to the even neighbour
    (FP16, 65519.996, 65504.0),                      # just below the tie with "65536": the largest number
    (FP16, 65520.0, float("inf")),                   # the tie: 65504's fraction is odd, so up: overflow
    (FP16, 2.0 ** -25, 0.0),                         # half the smallest subnormal: a tie with 0, which is even
    (FP16, 2.0 ** -25 * (1 + 2 ** -20), 2.0 ** -24), # a hair above it: the smallest subnormal
    (FP16, 3 * 2.0 ** -25, 2.0 ** -23),              # a tie between subnormals 1 and 2: to 2 (even)
    (FP16, 2.0 ** -14 - 2.0 ** -26, 2.0 ** -14),     # the largest subnormal rounds up into the smallest normal
    (BF16, 1 + 2 ** -8, 1.0),                        # bf16's tie at 1.0
    (BF16, 1 + 2 ** -8 + 2 ** -23, 1 + 2 ** -7),
    (BF16, 3.4e38, float("inf")),                    # above bf16's max 3.3895e38 by more than half an ulp
    (BF16, 1e-40, 9.183549615799121e-41),            # an fp32 subnormal stays a (bf16) subnormal: same range
    (FP8_E4M3FN, 464.0, 448.0),                      # the tie with the NaN code: to 448 (even)
    (FP8_E4M3FN, 465.0, 448.0),                      # beyond: saturates (torch 2.15; there is no inf)
    (FP8_E4M3FN, float("inf"), 448.0),
    (FP8_E4M3FN, 2.0 ** -10, 0.0),                   # half of 2^-9, the smallest subnormal: tie to 0
    (FP8_E5M2, 61440.0, float("inf")),               # the tie between 57344 (odd) and "65536": overflow
    (FP8_E5M2, 61439.0, 57344.0),
    (FP8_E5M2, float("nan"), float("nan")),
])
def test_edge_cases(fmt, x, expected):
    t = torch.tensor([x, -x], dtype=torch.float32)
    ours = round_to(t, fmt).double()
    theirs = t.to(fmt.torch_dtype).double()
    want = torch.tensor([expected, -expected], dtype=torch.float64)
    torch.testing.assert_close(ours, want, rtol=0, atol=0, equal_nan=True)
    torch.testing.assert_close(theirs, want, rtol=0, atol=0, equal_nan=True)


def test_stochastic_fast_path_equals_the_generic_encoder():
    gen = torch.Generator().manual_seed(torch.seed())
    x = torch.randn(100_000, generator=gen) * torch.exp2(torch.randint(-140, 128, (100_000,), generator=gen).float())
    x = x[torch.isfinite(x)]
    noise = torch.randint(0, 1 << 16, x.shape, dtype=torch.int32, generator=gen)
    fast = stochastic_round_bf16(x, noise=noise)
    # the carry happens when dropped + noise >= 2^16, i.e. when (2^16 - 1 - noise) < dropped
    generic = cast(x, BF16, rounding="stochastic", random_bits=(0xFFFF - noise).to(torch.int64))
    assert torch.equal(fast.view(torch.int16), generic.view(torch.int16))


def test_stochastic_rounding_is_unbiased_and_stays_between_the_neighbours():
    gen = torch.Generator().manual_seed(torch.seed())
    lo = torch.tensor(1.0 + 5 * 2 ** -7)  # a bf16 number; the next one is lo + 2^-7
    frac = torch.rand((), generator=gen).item() * 0.8 + 0.1
    x = torch.full((400_000,), lo.item() + frac * 2 ** -7)
    r = stochastic_round_bf16(x, generator=gen).double()
    assert set(torch.unique(r).tolist()) == {lo.item(), lo.item() + 2 ** -7}
    sigma = 2 ** -7 * (frac * (1 - frac) / len(x)) ** 0.5
    assert abs(r.mean().item() - x[0].item()) < 5 * sigma  # round-to-nearest would be off by >= 0.1 ulp = 150 sigma
    # the non-finite pass through, and a stochastic round of a bf16 number is that number
    special = torch.tensor([float("inf"), float("-inf"), float("nan"), 0.0, -0.0])
    torch.testing.assert_close(stochastic_round_bf16(special).float(), special, equal_nan=True, rtol=0, atol=0)
    exact = torch.randn(1000, generator=gen).bfloat16().float()
    assert torch.equal(stochastic_round_bf16(exact, generator=gen).float(), exact)


@pytest.mark.parametrize("fmt", [FP16, BF16, FP32], ids=lambda f: f.name)
def test_ulp_is_the_gap_to_the_next_number(fmt):
    gen = torch.Generator().manual_seed(torch.seed())
    codes = torch.randint(0, fmt.max_code, (50_000,), dtype=torch.int64, generator=gen)
    bits = codes.to(STORAGE[fmt.bits])
    v = bits.view(fmt.torch_dtype)
    gap = (bits + 1).view(fmt.torch_dtype).double() - v.double()
    assert torch.equal(ulp(v.float(), fmt).double(), gap)


def test_unsupported_dtype_names_are_one_clear_error():
    for name in ("fp12", "int8", ""):
        with pytest.raises(CourseError, match=f"unsupported dtype name '{name}'; choose one of fp32, fp16, bf16"):
            get_format(name)
    assert get_format("bfloat16") is BF16 and get_format("E4M3") is FP8_E4M3FN and get_format(torch.float16) is FP16
    with pytest.raises(CourseError, match="unsupported dtype torch.int8"):
        get_format(torch.int8)


def _demo() -> None:
    print("the formats, from their bit layouts (all equal to torch.finfo):")
    for f in FORMATS.values():
        print("  " + f.describe())
    values = torch.tensor([0.1, 1 + 2 ** -9, 3e-8, 70000.0, 1e-40], dtype=torch.float32)
    print("\nwhat each format does to a few float32 numbers (round to nearest, ties to even):")
    print(f"  {'x':>14}" + "".join(f"{f.name:>14}" for f in (FP16, BF16, FP8_E4M3FN, FP8_E5M2)))
    for x in values:
        row = "".join(f"{round_to(x.view(1), f).item():>14.6g}" for f in (FP16, BF16, FP8_E4M3FN, FP8_E5M2))
        print(f"  {x.item():>14.6g}" + row)


if __name__ == "__main__":
    run_demo(_demo, __doc__)
