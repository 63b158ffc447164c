"""Settings of project 9: which attention a model runs (`FlashConfig`) and what benchmark.py measures (`BenchConfig`).

Presets:
    cpu  the teaching path (flash_attention.py, blocks of 64) and flash-decoding over the machine's cores;
         the benchmark at the sizes of the README (2 CPU cores, a few minutes)
    gpu  the Triton kernel (blocks of 64) in bf16 on CUDA; the benchmark adds the kernel's TFLOP/s beside SDPA's
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

from course.config import BaseConfig

ATTN_IMPLS = ("sdpa", "flash", "triton")         # project 3's default, flash_attention.py, triton_flash.py
DECODE_IMPLS = ("sdpa", "flash_decoding")        # a decode step's attention: project 3's default, flash_decoding.py
BENCH_PARTS = ("memory", "time", "decode", "gpu")


def int_list(text: str) -> list[int]:
    """'512,1024' -> [512, 1024]; ValueError on anything else (the configs report it in one line)."""
    values = [int(x) for x in text.split(",") if x.strip()]
    if not values:
        raise ValueError("empty list")
    return values


def check_int_list(errors: list[str], name: str, text: str, lo: int = 1) -> None:
    try:
        values = int_list(text)
    except (ValueError, AttributeError):
        errors.append(f"{name} ({text!r}) must be a comma-separated list of integers, e.g. 512,1024")
        return
    if min(values) < lo:
        errors.append(f"{name} ({text!r}): every value must be >= {lo}")


@dataclass
class FlashConfig(BaseConfig):
    """The attention of a project 3 model (flash_model.py builds the model; its weights are unchanged)."""

    attn_impl: str = "flash"              # prefill/training attention: sdpa | flash | triton
    block_q: int = 64                     # query rows per tile (flash, triton)
    block_k: int = 64                     # keys per tile (flash, triton)
    decode_impl: str = "flash_decoding"   # attention of a one-token decode step: sdpa | flash_decoding
    decode_workers: int | None = None     # flash-decoding threads; None = the machine's cores
    decode_chunk: int | None = None       # keys per flash-decoding chunk; None = the cache split over the workers

    PRESETS: ClassVar[dict] = {
        "cpu": dict(attn_impl="flash", block_q=64, block_k=64, decode_impl="flash_decoding"),
        "gpu": dict(attn_impl="triton", block_q=64, block_k=64, decode_impl="sdpa"),
    }

    def check(self) -> list[str]:
        errors = super().check()
        self.check_choice(errors, "attn_impl", ATTN_IMPLS)
        self.check_choice(errors, "decode_impl", DECODE_IMPLS)
        if errors:
            return errors
        self.check_positive(errors, "block_q", "block_k")
        for name in ("decode_workers", "decode_chunk"):
            if getattr(self, name) is not None and getattr(self, name) <= 0:
                errors.append(f"{name} ({getattr(self, name)}) must be > 0 (leave it out for automatic)")
        if self.attn_impl == "triton":
            for name in ("block_q", "block_k"):
                b = getattr(self, name)
                if b > 0 and (b < 16 or b & (b - 1)):
                    errors.append(f"{name} ({b}) must be a power of two >= 16 for the Triton kernel")
        return errors


@dataclass
class BenchConfig(BaseConfig):
    """What benchmark.py measures. Shapes are (batch, heads, tokens, head_dim), fp32 on the CPU."""

    parts: str = "memory,time,decode,gpu"     # any of: memory, time, decode, gpu (gpu: skipped without CUDA)
    mem_lengths: str = "512,1024,2048,4096,8192,16384"
    mem_n_head: int = 1                       # the naive path holds 2-3 (T x T) fp32 matrices per head: 3 GiB at 16K
    time_lengths: str = "2048,8192"
    batch_size: int = 1
    n_head: int = 8                           # the time part: query heads
    n_kv_head: int = 8                        # key/value heads (GQA when fewer)
    head_dim: int = 64
    block_q: int = 64                         # the teaching path's tiles
    block_k: int = 64
    fast_block: int = 256                     # the compiled path's tiles (both sides)
    decode_lengths: str = "4096,8192,16384,32768"
    decode_n_head: int = 32                   # the decode part: Llama-3-8B's attention shape (32 q / 8 kv heads, 128)
    decode_n_kv_head: int = 8
    decode_head_dim: int = 128
    decode_workers: int | None = None         # flash-decoding threads; None = the machine's cores
    gpu_lengths: str = "4096,8192,16384"
    gpu_n_head: int = 16
    gpu_head_dim: int = 64
    rounds: int = 5                           # interleaved timing rounds (best and median reported)
    threads: int = 1                          # torch.set_num_threads for every part (decode: plain also at 2)
    seed: int = 0
    device: str = "cpu"                       # memory/time/decode run here; gpu always on cuda
    out_dir: str = "checkpoints/project9/bench"

    PRESETS: ClassVar[dict] = {
        "cpu": dict(),
        "gpu": dict(device="cuda", mem_n_head=8, threads=1),
    }

    def check(self) -> list[str]:
        errors = super().check()
        if errors:
            return errors
        parts = [p.strip() for p in self.parts.split(",") if p.strip()]
        if not parts or any(p not in BENCH_PARTS for p in parts):
            errors.append(f"parts ({self.parts!r}) must be a comma list of: {', '.join(BENCH_PARTS)}")
        for name in ("mem_lengths", "time_lengths", "decode_lengths", "gpu_lengths"):
            check_int_list(errors, name, getattr(self, name))
        self.check_positive(errors, "mem_n_head", "batch_size", "n_head", "n_kv_head", "head_dim", "block_q",
                            "block_k", "fast_block", "decode_n_head", "decode_n_kv_head", "decode_head_dim",
                            "gpu_n_head", "gpu_head_dim", "rounds", "threads")
        for heads, kv in (("n_head", "n_kv_head"), ("decode_n_head", "decode_n_kv_head")):
            h, k = getattr(self, heads), getattr(self, kv)
            if h > 0 and k > 0 and h % k:
                errors.append(f"{heads} ({h}) must be a multiple of {kv} ({k})")
        if self.decode_workers is not None and self.decode_workers <= 0:
            errors.append(f"decode_workers ({self.decode_workers}) must be > 0 (leave it out for the machine's cores)")
        return errors
