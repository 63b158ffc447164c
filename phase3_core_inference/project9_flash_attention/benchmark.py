"""Measure flash attention: its extra memory against the naive path and SDPA, its time against SDPA, flash-decoding
against a plain decode attention, and (on a GPU) the Triton kernel's TFLOP/s beside SDPA's.

    uv run python phase3_core_inference/project9_flash_attention/benchmark.py            # the README's numbers
    uv run python phase3_core_inference/project9_flash_attention/benchmark.py --check    # + the quality bar
    uv run python phase3_core_inference/project9_flash_attention/benchmark.py --quick    # a smoke run, not the numbers

Every part compares the peers in one run; timings are interleaved (course/bench.py's method: the candidates take
turns, round after round, so a slow phase of a shared machine hits them alike; best and median of --rounds).
All on the CPU in fp32, causal, at --threads torch threads (default 1), unless said otherwise:
 1. memory: the peak bytes one call allocates (memory.py: torch.profiler's allocator events, kernels' scratch
    included; the output counts, the inputs do not), (1, mem_n_head, T, head_dim) for T in mem_lengths:
    naive softmax(QK^T)V (naive_attention.py), ours (flash_attention.py, the teaching path), SDPA. Table + PNG.
 2. time: (batch, n_head, T, head_dim) at T in time_lengths: SDPA (on the CPU itself a fused flash-style
    kernel), ours eager (the teaching loops), ours compiled (fast_flash.py); outputs checked equal.
 3. decode: one token's attention over a cache of L keys (decode_n_head / decode_n_kv_head heads, decode_head_dim)
    for L in decode_lengths: the plain decode attention (flash_decoding.decode_attention) on 1 thread and on
    `workers` threads (PyTorch splitting its own operations), SDPA on both, flash-decoding with `workers` threads
    of 1 torch thread each (chunks over the cores).
 4. gpu (CUDA only): the Triton kernel's forward beside SDPA's (flash backend) in fp16 and bf16, TFLOP/s.
Writes OUT_DIR/{benchmark.md, benchmark.json, memory.png, decode.png}.
"""

from __future__ import annotations

import json
import os
import statistics
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from tqdm import tqdm

from course.bench import markdown_table, timed
from course.checkpoint import atomic_write
from course.cli import ArgumentParser
from course.device import machine_summary, set_seed
from course.errors import CourseError, run_cli
from course.paths import repo_path
from course.plots import plot_curves
from phase3_core_inference.project8_kv_cache.fast_decode import compile_works
from phase3_core_inference.project9_flash_attention.config import BenchConfig, int_list
from phase3_core_inference.project9_flash_attention.fast_flash import CompiledFlashAttention
from phase3_core_inference.project9_flash_attention.flash_attention import flash_forward
from phase3_core_inference.project9_flash_attention.flash_decoding import SplitKDecoder, decode_attention
from phase3_core_inference.project9_flash_attention.memory import peak_bytes
from phase3_core_inference.project9_flash_attention.naive_attention import naive_attention

QUICK = dict(mem_lengths="64,128,256", time_lengths="128", decode_lengths="512,1024", n_head=2, n_kv_head=1,
             head_dim=16, decode_n_head=4, decode_n_kv_head=2, decode_head_dim=16, rounds=2, fast_block=32,
             gpu_lengths="256", block_q=32, block_k=32)
MiB = 2**20
DECODE_BURST = 8  # decode part: consecutive calls per timed turn (a model's layers call attention back to back)


def causal_flops(B: int, H: int, T: int, D: int) -> float:
    """Matmul FLOPs of causal attention: QK^T and PV, 2 T^2 D each, half of them under the diagonal."""
    return 4 * B * H * T * T * D / 2


def rand(*shape, device="cpu", dtype=torch.float32) -> torch.Tensor:
    return torch.randn(*shape, device=device, dtype=dtype)


def interleave(fns: dict, rounds: int, threads: dict | None = None, base: int = 1) -> dict:
    """{name: {"best", "median"}} in seconds; fns take turns each round; `threads[name]` torch threads for one."""
    times = {n: [] for n in fns}
    for _ in range(rounds):
        for name, fn in fns.items():
            torch.set_num_threads((threads or {}).get(name, base))
            times[name].append(timed(fn))
    torch.set_num_threads(base)
    return {n: {"best": min(t), "median": statistics.median(t)} for n, t in times.items()}


# ---- 1. memory ----------------------------------------------------------------------------------------------
def part_memory(cfg: BenchConfig, device) -> dict:
    rows = []
    for T in tqdm(int_list(cfg.mem_lengths), desc="memory", leave=False):
        q, k, v = (rand(1, cfg.mem_n_head, T, cfg.head_dim, device=device) for _ in range(3))
        peers = {"naive": lambda: naive_attention(q, k, v, causal=True),
                 "ours": lambda: flash_forward(q, k, v, causal=True, block_q=cfg.block_q, block_k=cfg.block_k)[0],
                 "sdpa": lambda: F.scaled_dot_product_attention(q, k, v, is_causal=True)}
        row, outs = {"tokens": T}, {}
        for name, fn in peers.items():
            t0 = time.perf_counter()
            row[name], outs[name] = peak_bytes(fn, device)
            row[f"{name}_s"] = time.perf_counter() - t0  # profiled: slower than a plain call
        row["max_diff"] = max((outs[n] - outs["sdpa"]).abs().max().item() for n in ("naive", "ours"))
        rows.append(row)
        del q, k, v, outs
    return {"rows": rows, "shape": f"(1, {cfg.mem_n_head}, T, {cfg.head_dim}) fp32, causal",
            "blocks": f"{cfg.block_q}x{cfg.block_k}"}


# ---- 2. time ------------------------------------------------------------------------------------------------
def part_time(cfg: BenchConfig, device) -> dict:
    compiled = CompiledFlashAttention(cfg.fast_block, cfg.fast_block) if compile_works() else None
    rows = []
    for T in tqdm(int_list(cfg.time_lengths), desc="time", leave=False):
        q, k, v = rand(cfg.batch_size, cfg.n_head, T, cfg.head_dim), *(
            rand(cfg.batch_size, cfg.n_kv_head, T, cfg.head_dim) for _ in range(2))
        gqa = cfg.n_head != cfg.n_kv_head
        fns = {"sdpa": lambda: F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=gqa),
               "ours eager": lambda: flash_forward(q, k, v, causal=True, block_q=cfg.block_q, block_k=cfg.block_k)[0]}
        compile_s = None
        if compiled is not None:
            fns["ours compiled"] = lambda: compiled(q, k, v, causal=True)
            compile_s = timed(fns["ours compiled"])  # the first call compiles the tile updates (later: cached)
        with torch.no_grad():
            ref = fns["sdpa"]()
            diff = max((fn() - ref).abs().max().item() for n, fn in fns.items() if n != "sdpa")
            res = interleave(fns, cfg.rounds, base=cfg.threads)
        flops = causal_flops(cfg.batch_size, cfg.n_head, T, cfg.head_dim)
        rows.append({"tokens": T, "max_diff": diff, "compile_s": compile_s,
                     **{n: {**r, "gflops": flops / r["best"] / 1e9, "vs_sdpa": r["best"] / res["sdpa"]["best"]}
                        for n, r in res.items()}})
    return {"rows": rows, "shape": f"({cfg.batch_size}, {cfg.n_head}/{cfg.n_kv_head} heads, T, {cfg.head_dim}) fp32, "
            f"causal", "blocks": f"eager {cfg.block_q}x{cfg.block_k}, compiled {cfg.fast_block}x{cfg.fast_block}"}


# ---- 3. decode ----------------------------------------------------------------------------------------------
def part_decode(cfg: BenchConfig, device) -> dict:
    workers = cfg.decode_workers or os.cpu_count() or 1
    lengths = int_list(cfg.decode_lengths)
    caches = {L: (rand(1, cfg.decode_n_head, 1, cfg.decode_head_dim),
                  *(rand(1, cfg.decode_n_kv_head, L, cfg.decode_head_dim) for _ in range(2))) for L in lengths}
    rows = {L: {"keys": L} for L in lengths}
    fd = f"flash-decoding {workers} workers"

    def measure(L, names, n_threads):
        q, k, v = caches[L]
        sdpa = lambda: F.scaled_dot_product_attention(q, k, v, enable_gqa=True)  # noqa: E731
        plain = lambda: decode_attention(q, k, v)  # noqa: E731
        every = {"plain 1 thread": plain, "sdpa 1 thread": sdpa, fd: lambda: dec(q, k, v),
                 f"plain {workers} threads": plain, f"sdpa {workers} threads": sdpa}
        # a decode step calls attention once per layer, back to back: each turn times a burst of DECODE_BURST calls
        # (per call: burst / DECODE_BURST), so worker threads are as warm as in a real step, not woken each call
        fns = {n: (lambda f=every[n]: [f() for _ in range(DECODE_BURST)]) for n in names}
        with torch.no_grad():
            torch.set_num_threads(n_threads)
            ref = sdpa()
            rows[L]["max_diff"] = max(rows[L].get("max_diff", 0.0), *((every[n]() - ref).abs().max().item()
                                                                     for n in names))
            interleave(fns, 1, base=n_threads)  # warm-up: first calls, thread pools started
            res = interleave(fns, cfg.rounds * 2, base=n_threads)
            rows[L].update({n: {m: t / DECODE_BURST for m, t in r.items()} for n, r in res.items()})
            torch.set_num_threads(cfg.threads)

    # Two phases: PyTorch's own multi-threaded operations leave an OpenMP thread busy for a while after they return,
    # which slowed the next flash-decoding call by ~40% (measured, also 50 ms later), and switching torch's thread
    # count between calls sometimes cost 15 ms a call. So flash-decoding and the 1-thread peers take turns first,
    # at every length; then PyTorch's peers on `workers` threads take turns, the thread count left as it is.
    with SplitKDecoder(workers) as dec:
        for L in tqdm(lengths, desc="decode (1 thread, flash-decoding)", leave=False):
            measure(L, ["plain 1 thread", "sdpa 1 thread", fd], 1)
        for L in tqdm(lengths, desc=f"decode ({workers} threads)", leave=False):
            measure(L, [f"plain {workers} threads", f"sdpa {workers} threads"], workers)
    for row in rows.values():
        base = row["plain 1 thread"]
        for r in row.values():
            if isinstance(r, dict):
                r.update(speedup_best=base["best"] / r["best"], speedup_median=base["median"] / r["median"])
    return {"rows": list(rows.values()), "workers": workers, "shape": f"q (1, {cfg.decode_n_head}, 1, "
            f"{cfg.decode_head_dim}), cache (1, {cfg.decode_n_kv_head}, L, {cfg.decode_head_dim}) fp32"}


# ---- 4. gpu -------------------------------------------------------------------------------------------------
def cuda_time(fn, rounds: int) -> float:
    """Best of `rounds` CUDA-event timings of fn (after a warm-up call)."""
    fn()
    best = float("inf")
    for _ in range(rounds):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        torch.cuda.synchronize()
        best = min(best, start.elapsed_time(end) / 1e3)
    return best


def part_gpu(cfg: BenchConfig, device) -> dict:
    if not torch.cuda.is_available():
        return {"skipped": "no CUDA device"}
    from phase3_core_inference.project9_flash_attention.triton_flash import triton_forward  # needs the GPU stack

    rows = []
    for dtype in (torch.float16, torch.bfloat16):
        for T in int_list(cfg.gpu_lengths):
            q, k, v = (rand(1, cfg.gpu_n_head, T, cfg.gpu_head_dim, device="cuda", dtype=dtype) for _ in range(3))
            with torch.no_grad():
                ours = lambda: triton_forward(q, k, v, causal=True)[0]  # noqa: E731
                sdpa = lambda: F.scaled_dot_product_attention(q, k, v, is_causal=True)  # noqa: E731
                diff = (ours().float() - sdpa().float()).abs().max().item()
                t_ours, t_sdpa = cuda_time(ours, cfg.rounds), cuda_time(sdpa, cfg.rounds)
            flops = causal_flops(1, cfg.gpu_n_head, T, cfg.gpu_head_dim)
            rows.append({"dtype": str(dtype).split(".")[1], "tokens": T, "max_diff": diff,
                         "triton_tflops": flops / t_ours / 1e12, "sdpa_tflops": flops / t_sdpa / 1e12})
    return {"rows": rows, "device": torch.cuda.get_device_name(0),
            "shape": f"(1, {cfg.gpu_n_head}, T, {cfg.gpu_head_dim}), causal"}


# ---- report -------------------------------------------------------------------------------------------------
def tables(report: dict) -> str:
    out = [f"Machine: {report['machine']}; torch threads {report['threads']}."]
    if "memory" in report:
        m = report["memory"]
        rows = [[r["tokens"], f"{r['naive'] / MiB:,.1f}", f"{r['ours'] / MiB:,.2f}", f"{r['sdpa'] / MiB:,.2f}",
                 f"{r['naive'] / max(r['ours'], 1):,.0f}x"] for r in m["rows"]]
        out += ["", f"Extra memory of one attention call (MiB), {m['shape']}, our tiles {m['blocks']}:", "",
                markdown_table(["tokens", "naive", "ours", "SDPA", "naive / ours"], rows, "rrrrr")]
    if "time" in report:
        t = report["time"]
        rows = []
        for r in t["rows"]:
            for name in ("sdpa", "ours eager", "ours compiled"):
                if name in r:
                    rows.append([r["tokens"], name, f"{r[name]['best'] * 1e3:,.1f}", f"{r[name]['median'] * 1e3:,.1f}",
                                 f"{r[name]['gflops']:.1f}", f"{r[name]['vs_sdpa']:.2f}x"])
        out += ["", f"Time of one forward, {t['shape']}, {t['blocks']} (ms, best and median of the rounds):", "",
                markdown_table(["tokens", "", "best ms", "median ms", "GFLOP/s", "time / SDPA's"], rows, "rlrrrr")]
    if "decode" in report:
        d = report["decode"]
        names = [n for n in d["rows"][0] if isinstance(d["rows"][0][n], dict)]
        rows = [[r["keys"], n, f"{r[n]['best'] * 1e3:.2f}", f"{r[n]['median'] * 1e3:.2f}",
                 f"{r[n]['speedup_best']:.2f}x / {r[n]['speedup_median']:.2f}x"] for r in d["rows"] for n in names]
        out += ["", f"One decode step's attention, {d['shape']} (ms; speed-up over the plain 1-thread path, best / "
                "median):", "", markdown_table(["keys", "", "best ms", "median ms", "speed-up"], rows,
                                                             "rlrrr")]
    if "gpu" in report and "rows" in report["gpu"]:
        g = report["gpu"]
        rows = [[r["dtype"], r["tokens"], f"{r['triton_tflops']:.1f}", f"{r['sdpa_tflops']:.1f}"] for r in g["rows"]]
        out += ["", f"GPU forward, {g['device']}, {g['shape']} (TFLOP/s):", "",
                markdown_table(["dtype", "tokens", "Triton (ours)", "SDPA"], rows, "lrrr")]
    return "\n".join(out)


def quality_bar(report: dict) -> list[tuple[str, bool]]:
    bars = []
    if "memory" in report:
        rows = {r["tokens"]: r for r in report["memory"]["rows"]}
        if 8192 in rows:
            bars.append((f"memory at 8,192: naive / ours = {rows[8192]['naive'] / rows[8192]['ours']:.0f}x >= 10x",
                         rows[8192]["naive"] >= 10 * rows[8192]["ours"]))
        lo, hi = min(rows), max(rows)
        growth = rows[hi]["ours"] / rows[lo]["ours"]
        bars.append((f"ours grows linearly: x{growth:.1f} from {lo} to {hi} tokens (x{hi / lo:.0f} the tokens; "
                     f"naive x{rows[hi]['naive'] / rows[lo]['naive']:.0f})", growth <= 1.5 * hi / lo))
    if "time" in report:
        for r in report["time"]["rows"]:
            if "ours compiled" in r:
                ratio = r["ours compiled"]["vs_sdpa"]
                bars.append((f"compiled at {r['tokens']:,}: {ratio:.2f}x SDPA's time <= 2x", ratio <= 2.0))
    if "decode" in report:
        rows = {r["keys"]: r for r in report["decode"]["rows"]}
        if 16384 in rows:
            w = report["decode"]["workers"]
            s = rows[16384][f"flash-decoding {w} workers"]
            bars.append((f"flash-decoding at 16K over the plain 1-thread path: {s['speedup_best']:.2f}x (best), "
                         f"{s['speedup_median']:.2f}x (median) >= 1.5x", s["speedup_median"] >= 1.5))
    return bars


def plots(report: dict, out: Path) -> None:
    if "memory" in report:
        rows = report["memory"]["rows"]
        xs = [r["tokens"] for r in rows]
        plot_curves(out / "memory.png", {n: (xs, [max(r[n], 1) / MiB for r in rows]) for n in ("naive", "ours", "sdpa")},
                    title="extra memory of one causal attention call", xlabel="tokens", ylabel="MiB (log)", logy=True)
    if "decode" in report:
        rows = report["decode"]["rows"]
        names = [n for n in rows[0] if isinstance(rows[0][n], dict)]
        xs = [r["keys"] for r in rows]
        plot_curves(out / "decode.png", {n: (xs, [r[n]["median"] * 1e3 for r in rows]) for n in names},
                    title="one decode step's attention", xlabel="cached keys", ylabel="ms (median)")


def build_parser() -> ArgumentParser:
    parser = ArgumentParser(description=__doc__)
    parser.add_argument("--quick", action="store_true", help="tiny sizes: a smoke run of every part, not the numbers")
    parser.add_argument("--check", action="store_true", help="also print the quality bar, met / MISSED")
    BenchConfig.add_args(parser, default_preset="cpu")
    return parser


def main(argv: list[str] | None = None) -> dict:
    args = build_parser().parse_args(argv)
    cfg = BenchConfig.from_args(args)
    if args.quick:
        cfg = BenchConfig.from_dict({**cfg.to_dict(), **QUICK}).validate_config()
    if cfg.device.startswith("cuda") and not torch.cuda.is_available():
        raise CourseError("--device cuda was asked for but no CUDA GPU is visible; use --device cpu")
    device = torch.device(cfg.device)
    set_seed(cfg.seed)
    before = torch.get_num_threads()
    torch.set_num_threads(cfg.threads)
    out = repo_path(cfg.out_dir)
    parts = [p.strip() for p in cfg.parts.split(",") if p.strip()]
    report = {"machine": machine_summary(), "threads": cfg.threads, "config": cfg.to_dict(), "quick": args.quick}
    t0 = time.perf_counter()
    try:
        for name in tqdm(parts, desc="parts"):
            report[name] = {"memory": part_memory, "time": part_time, "decode": part_decode, "gpu": part_gpu}[name](
                cfg, device)
    finally:
        torch.set_num_threads(before)
    report["seconds"] = time.perf_counter() - t0
    text = tables(report)
    bars = quality_bar(report)
    if bars:
        text += "\n\nQuality bar:\n" + "\n".join(f"- {'met' if ok else 'MISSED'}: {what}" for what, ok in bars)
    report["quality_bar"] = [{"what": w, "met": ok} for w, ok in bars]
    atomic_write(out / "benchmark.md", lambda f: f.write(text + "\n"), mode="w")
    atomic_write(out / "benchmark.json", lambda f: json.dump(report, f, indent=1), mode="w")
    plots(report, out)
    print(text if args.check else text.split("\n\nQuality bar:")[0])
    met = sum(ok for _, ok in bars)
    gpu = report.get("gpu", {}).get("skipped")
    print(f"summary: {', '.join(parts)} in {report['seconds']:.0f} s; quality bar {met}/{len(bars)} met"
          f"{f'; gpu part skipped ({gpu})' if gpu else ''}; wrote {out}/benchmark.md"
          + (" (quick: not the README's numbers)" if args.quick else ""))
    return report


if __name__ == "__main__":
    run_cli(main)
