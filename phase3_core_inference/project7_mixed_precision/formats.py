"""Floating-point formats from their bit layouts: fp32, fp16, bf16, fp8 e4m3fn and e5m2, and rounding by hand.

PAPERS
    IEEE 754-2008: sign, biased exponent, fraction; subnormals; round to nearest, ties to even.
    Kalamkar et al., 2019, "A Study of BFLOAT16 for Deep Learning Training": bf16 keeps fp32's 8 exponent bits
        (its range) and drops 16 fraction bits, so conversion is a truncation plus a rounding carry.
    Micikevicius et al., 2022, "FP8 Formats for Deep Learning": e4m3 (no infinities, one NaN code per sign, so
        the top binade holds numbers up to 448) for weights and activations; e5m2 (IEEE-like) for gradients.

INTUITION
    A float is (-1)^s * 1.f * 2^(e - bias) with e exponent bits and m fraction bits. The exponent bits buy range
    (how large and how small), the fraction bits buy precision (eps = 2^-m: the gap after 1.0). Below the smallest
    normal 2^(1 - bias) the leading 1 is dropped (subnormals: evenly spaced down to 2^(1 - bias - m)); below half
    of that, everything is 0. fp16 spends 5 bits on range and 10 on precision, bf16 8 and 7: bf16 has fp32's range
    (no overflow, almost no underflow) and a quarter of fp16's precision (eps 2^-7 against 2^-10).

IMPLEMENTATION
    `FloatFormat` derives every property (largest/smallest normal, smallest subnormal, eps, the codes of inf and
    NaN) from (exp_bits, man_bits, ieee). `encode` rounds a float32 (or float64, for the fp32 target) tensor to a
    format with integer operations on the bit pattern only: write the input as an integer significand times a
    power of two, find the target's quantum (its ulp) at that magnitude, drop the bits below it and round to
    nearest, ties to even (or stochastically, `rounding="stochastic"`). The carry of a rounding that spills into
    the next binade needs no special case: codes of positive floats are in the same order as their values, so
    code = (binade - emin) << m + rounded significand walks from subnormals to normals to overflow by itself.
    `decode` turns codes back into values. test_formats.py checks both against torch's casts and `torch.finfo`.

WHY
    Every mixed-precision decision of this project follows from these numbers: fp16's smallest subnormal 2^-24
    ~ 6e-8 is why its gradients underflow (loss_scaler.py); bf16's half-ulp at 1.0, 2^-8 ~ 0.004, is why a pure
    bf16 weight cannot take an update of 1e-3 (optimizer.py).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from course.errors import CourseError

__all__ = [
    "BF16",
    "FORMATS",
    "FP8_E4M3FN",
    "FP8_E5M2",
    "FP16",
    "FP32",
    "FloatFormat",
    "cast",
    "decode",
    "encode",
    "get_format",
    "round_to",
    "stochastic_round_bf16",
    "ulp",
]


@dataclass(frozen=True)
class FloatFormat:
    """A binary floating-point format: 1 sign bit, `exp_bits` exponent bits, `man_bits` fraction bits.

    ieee=True: the all-ones exponent holds +-inf (fraction 0) and NaNs (IEEE 754; fp32, fp16, bf16, fp8 e5m2).
    ieee=False ("fn": finite, NaN): no infinities; only the all-ones code S.1111.111 is NaN, every other code of
    the top binade is a number (fp8 e4m3fn, whose largest value is therefore 1.75 * 2^8 = 448, not 240).
    Overflow: IEEE formats round to inf; fn formats saturate at +-max (torch's casts; see `encode`).
    """

    name: str
    exp_bits: int
    man_bits: int
    ieee: bool
    torch_dtype: torch.dtype

    # ---- the layout -------------------------------------------------------------------------------
    @property
    def bits(self) -> int:
        return 1 + self.exp_bits + self.man_bits

    @property
    def bias(self) -> int:
        return (1 << (self.exp_bits - 1)) - 1

    @property
    def emin(self) -> int:
        """Exponent of the smallest normal number (exponent field 1)."""
        return 1 - self.bias

    @property
    def emax(self) -> int:
        """Exponent of the largest finite binade: field all-ones minus 1 (IEEE), all-ones itself (fn)."""
        top = (1 << self.exp_bits) - 1
        return (top - 1 if self.ieee else top) - self.bias

    # ---- codes (the unsigned bit pattern without the sign) -------------------------------------------
    @property
    def sign_bit(self) -> int:
        return 1 << (self.exp_bits + self.man_bits)

    @property
    def max_code(self) -> int:
        """Code of the largest finite magnitude: IEEE: just below inf; fn: just below the one NaN code."""
        return (((1 << self.exp_bits) - 1) << self.man_bits) - 1 if self.ieee else self.sign_bit - 2

    @property
    def inf_code(self) -> int | None:
        return ((1 << self.exp_bits) - 1) << self.man_bits if self.ieee else None

    @property
    def nan_code(self) -> int:
        """The NaN this module writes: IEEE's quiet NaN (top fraction bit set), fn's only NaN (all ones)."""
        return self.inf_code | (1 << (self.man_bits - 1)) if self.ieee else self.sign_bit - 1

    # ---- the numbers, from the layout -----------------------------------------------------------------
    @property
    def max(self) -> float:
        top_fraction = (1 << self.man_bits) - (1 if self.ieee else 2)  # fn: the all-ones fraction is NaN
        return 2.0 ** self.emax * (1 + top_fraction / 2 ** self.man_bits)

    @property
    def smallest_normal(self) -> float:
        return 2.0 ** self.emin

    @property
    def smallest_subnormal(self) -> float:
        return 2.0 ** (self.emin - self.man_bits)

    @property
    def eps(self) -> float:
        """Machine epsilon: the gap between 1.0 and the next number, 2^-man_bits."""
        return 2.0 ** -self.man_bits

    @property
    def resolution(self) -> float:
        """torch.finfo's (and numpy's) decimal resolution: 10^-floor(-log10(eps))."""
        digits = 0
        while 10.0 ** -(digits + 1) >= self.eps:
            digits += 1
        return 10.0 ** -digits

    def describe(self) -> str:
        return (f"{self.name:<10} 1+{self.exp_bits}+{self.man_bits} bits, bias {self.bias:>3}: max {self.max:.6g}, "
                f"smallest normal {self.smallest_normal:.6g}, smallest subnormal {self.smallest_subnormal:.6g}, "
                f"eps {self.eps:.6g}" + ("" if self.ieee else " (no inf)"))


FP32 = FloatFormat("fp32", 8, 23, True, torch.float32)
FP16 = FloatFormat("fp16", 5, 10, True, torch.float16)
BF16 = FloatFormat("bf16", 8, 7, True, torch.bfloat16)
FP8_E4M3FN = FloatFormat("fp8_e4m3fn", 4, 3, False, torch.float8_e4m3fn)
FP8_E5M2 = FloatFormat("fp8_e5m2", 5, 2, True, torch.float8_e5m2)
FORMATS = {f.name: f for f in (FP32, FP16, BF16, FP8_E4M3FN, FP8_E5M2)}
_ALIASES = {"float32": "fp32", "float16": "fp16", "half": "fp16", "bfloat16": "bf16", "e4m3": "fp8_e4m3fn",
            "e4m3fn": "fp8_e4m3fn", "float8_e4m3fn": "fp8_e4m3fn", "e5m2": "fp8_e5m2", "float8_e5m2": "fp8_e5m2"}


def get_format(name: str | torch.dtype) -> FloatFormat:
    """The format of a name ("bf16", "bfloat16", "e4m3") or torch dtype; an unknown one is one CourseError."""
    if isinstance(name, torch.dtype):
        for f in FORMATS.values():
            if f.torch_dtype == name:
                return f
        raise CourseError(f"unsupported dtype {name}; this project knows {', '.join(FORMATS)}")
    key = _ALIASES.get(str(name).strip().lower(), str(name).strip().lower())
    if key not in FORMATS:
        raise CourseError(f"unsupported dtype name '{name}'; choose one of {', '.join(FORMATS)} "
                          f"(or {', '.join(_ALIASES)})")
    return FORMATS[key]


# ---- the source: float32 (or float64) bit patterns as integers --------------------------------------------
def _source_fields(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, int, int]:
    """(sign, biased exponent, fraction) of a float32/float64 tensor as int64, plus its (bias, man_bits)."""
    if x.dtype == torch.float32:
        bits = x.contiguous().view(torch.int32).to(torch.int64) & 0xFFFF_FFFF
        sign, mag, man_bits, bias = bits >> 31, bits & 0x7FFF_FFFF, 23, 127
    elif x.dtype == torch.float64:
        bits = x.contiguous().view(torch.int64)
        sign, mag, man_bits, bias = (bits < 0).to(torch.int64), bits & 0x7FFF_FFFF_FFFF_FFFF, 52, 1023
    else:
        raise CourseError(f"encode takes float32 (or float64) input, got {x.dtype}; convert with .float() first")
    return sign, mag >> man_bits, mag & ((1 << man_bits) - 1), bias, man_bits


def encode(x: torch.Tensor, fmt: FloatFormat, rounding: str = "nearest",
           random_bits: torch.Tensor | None = None) -> torch.Tensor:
    """Round x (float32, or float64 for FP32) to `fmt`; return the codes (int64 bit patterns, sign included).

    rounding="nearest": round to nearest, ties to even (IEEE's default, and torch's casts).
    rounding="stochastic": round up with probability (dropped bits) / (one quantum), so E[result] = x;
        `random_bits` (int64, same shape, non-negative) supplies the randomness: its low `shift` bits are compared
        with the dropped bits.
    Overflow goes to inf (IEEE formats) or saturates at +-max (e4m3fn: there is no inf to go to; inf saturates too),
    as torch's casts do (PyTorch 2.15; older releases and the FP8 paper's non-saturating mode give NaN). NaN stays NaN.
    """
    if rounding not in ("nearest", "stochastic"):
        raise CourseError(f"unknown rounding '{rounding}'; use nearest or stochastic")
    sign, exp_s, man_s, bias_s, man_bits_s = _source_fields(x)
    if fmt.man_bits >= man_bits_s:
        raise CourseError(f"{fmt.name} is not narrower than the {x.dtype} input: nothing to round")
    all_ones = (1 << (11 if man_bits_s == 52 else 8)) - 1
    is_nan = (exp_s == all_ones) & (man_s != 0)
    is_inf = (exp_s == all_ones) & (man_s == 0)
    normal = exp_s > 0
    # value = sig * 2^(lsb): a normal number has the hidden leading 1; a subnormal's exponent field reads as 1
    sig = torch.where(normal, man_s | (1 << man_bits_s), man_s)
    lsb = torch.clamp(exp_s, min=1) - bias_s - man_bits_s
    # its binade 2^k (k = exponent); a source subnormal lies below every target's normal range (our targets'
    # emin >= the source's), so its exact k does not matter: it is in the target's subnormal binade too
    k = torch.where(normal, exp_s - bias_s, torch.full_like(exp_s, fmt.emin))
    k = torch.clamp(k, min=fmt.emin)  # below the smallest normal, the target's quantum stops shrinking
    quantum = k - fmt.man_bits        # the target's ulp at this magnitude is 2^quantum
    # how many low bits of sig fall below the quantum; more than man_bits_s + 2 rounds to 0 like man_bits_s + 2
    shift = torch.clamp(quantum - lsb, 1, man_bits_s + 2)
    one = torch.ones_like(shift)
    q = sig >> shift
    dropped = sig & ((one << shift) - 1)
    if rounding == "nearest":
        half = one << (shift - 1)
        up = (dropped > half) | ((dropped == half) & ((q & 1) == 1))  # ties to the even neighbour
    else:
        if random_bits is None:
            random_bits = torch.randint(0, 1 << 62, x.shape, dtype=torch.int64, device=x.device)
        up = (random_bits & ((one << shift) - 1)) < dropped
    q = q + up.to(torch.int64)
    # the code: binades above emin shift the significand's field; a carry out of the fraction bumps the exponent
    code = ((k - fmt.emin) << fmt.man_bits) + q
    overflow = (code > fmt.max_code) | is_inf
    code = torch.where(overflow, torch.full_like(code, fmt.inf_code if fmt.ieee else fmt.max_code), code)
    code = torch.where(is_nan, torch.full_like(code, fmt.nan_code), code)
    return code | (sign << (fmt.bits - 1))


def decode(code: torch.Tensor, fmt: FloatFormat) -> torch.Tensor:
    """The values (float64, exact for every format here) of integer codes of `fmt` (any integer dtype)."""
    code = code.to(torch.int64) & ((1 << fmt.bits) - 1)
    sign = (code >> (fmt.bits - 1)) & 1
    exp = (code >> fmt.man_bits) & ((1 << fmt.exp_bits) - 1)
    man = code & ((1 << fmt.man_bits) - 1)
    sig = torch.where(exp > 0, man + (1 << fmt.man_bits), man).to(torch.float64)
    value = torch.ldexp(sig, (torch.clamp(exp, min=1) - fmt.bias - fmt.man_bits).to(torch.float64))
    top = exp == (1 << fmt.exp_bits) - 1
    if fmt.ieee:
        value = torch.where(top & (man == 0), torch.full_like(value, float("inf")), value)
        value = torch.where(top & (man != 0), torch.full_like(value, float("nan")), value)
    else:
        value = torch.where(top & (man == (1 << fmt.man_bits) - 1), torch.full_like(value, float("nan")), value)
    return torch.where(sign == 1, -value, value)


_STORAGE = {8: torch.uint8, 16: torch.int16, 32: torch.int32}


def cast(x: torch.Tensor, fmt: FloatFormat, rounding: str = "nearest",
         random_bits: torch.Tensor | None = None) -> torch.Tensor:
    """Our cast: x rounded to `fmt`, returned as a tensor of fmt.torch_dtype (the bits of `encode`, reinterpreted)."""
    code = encode(x, fmt, rounding, random_bits)
    # int64 -> a signed narrower integer keeps the low bits (two's complement), which is all a view needs
    return code.to(_STORAGE[fmt.bits]).view(fmt.torch_dtype)


def round_to(x: torch.Tensor, fmt: FloatFormat) -> torch.Tensor:
    """x rounded to the nearest value of `fmt`, as float32 (float64 for the FP32 target): a simulated cast."""
    return decode(encode(x, fmt), fmt).to(x.dtype if fmt is not FP32 else torch.float32)


def ulp(x: torch.Tensor, fmt: FloatFormat) -> torch.Tensor:
    """The spacing of `fmt` at |x| (float32): 2^(max(binade of x, emin) - man_bits), from x's exponent bits.

    For a weight stored in `fmt`, an update smaller than ulp/2 is rounded away entirely (round to nearest).
    At an exact power of two this is the spacing above it (the one below is half of it).
    """
    _, exp_s, _, bias_s, _ = _source_fields(x.float())
    k = torch.clamp(torch.where(exp_s > 0, exp_s - bias_s, torch.full_like(exp_s, fmt.emin)), min=fmt.emin)
    return torch.ldexp(torch.ones_like(x, dtype=torch.float32), (k - fmt.man_bits).to(torch.float32))


def stochastic_round_bf16(x: torch.Tensor, generator: torch.Generator | None = None,
                          noise: torch.Tensor | None = None) -> torch.Tensor:
    """float32 -> bf16, rounding up with probability (the 16 dropped bits) / 2^16: unbiased, E[result] = x.

    PAPER: Gupta et al., 2015, "Deep Learning with Limited Numerical Precision"; Zamirai et al., 2020 apply it to
    bf16 weight updates. IMPLEMENTATION: add 16 random bits to the float32 pattern and cut them off. The sum
    carries into bit 16 exactly when noise >= 2^16 - dropped, i.e. with probability dropped / 2^16; adding to
    the magnitude bits rounds away from zero for either sign. Non-finite values are passed through unchanged.
    The fast path of `encode(x, BF16, "stochastic")` (test_formats.py checks they agree bit for bit).
    """
    if x.dtype != torch.float32:
        raise CourseError(f"stochastic_round_bf16 takes float32, got {x.dtype}")
    if noise is None:
        noise = torch.randint(0, 1 << 16, x.shape, dtype=torch.int32, device=x.device, generator=generator)
    rounded = x.view(torch.int32) + noise
    rounded.bitwise_and_(-65536)  # -65536 = 0xFFFF0000: keep the sign, the exponent and 7 fraction bits
    out = rounded.view(torch.float32).to(torch.bfloat16)  # exact: the low 16 bits are zero
    bad = ~torch.isfinite(x)  # inf survives the masking, but a NaN's payload could carry into inf: keep them as is
    if bad.any():
        out[bad] = x[bad].to(torch.bfloat16)
    return out


# ---- a look at the bits: `uv run python -m phase3_core_inference.project7_mixed_precision.formats 0.1 1e-8` ------
def bit_string(code: int, fmt: FloatFormat) -> str:
    """'s eeeee mmmmmmmmmm': the sign, exponent and fraction fields of a code."""
    b = format(code & ((1 << fmt.bits) - 1), f"0{fmt.bits}b")
    return f"{b[0]} {b[1:1 + fmt.exp_bits]} {b[1 + fmt.exp_bits:]}"


def main(argv: list[str] | None = None) -> None:
    """Print every format's numbers, then each VALUE rounded (once, from float64) to each format, with its bits."""
    from course.cli import ArgumentParser, finite_float

    parser = ArgumentParser(description="The floating-point formats from their bit layouts, and what each one does "
                                        "to a number (round to nearest, ties to even; fp8 e4m3fn saturates).")
    parser.add_argument("values", nargs="*", type=finite_float, help="numbers to round (default: 0.1 3e-8 70000)")
    parser.add_argument("--format", action="append", metavar="NAME",
                        help=f"only this format (repeatable): {', '.join(FORMATS)}")
    args = parser.parse_args(argv)
    formats = [get_format(name) for name in args.format] if args.format else list(FORMATS.values())
    for f in formats:
        print(f.describe())
    for value in args.values or [0.1, 3e-8, 70000.0]:
        print(f"\n{value!r}:")
        x = torch.tensor([value], dtype=torch.float64)
        for f in formats:
            code = int(encode(x, f)[0])
            print(f"  {f.name:<10} {decode(torch.tensor([code]), f).item():<24.10g} {bit_string(code, f)}")


if __name__ == "__main__":
    from course.errors import run_cli

    run_cli(main)
