"""Measure the KV cache: speedup over recomputing, decode speed beside `transformers`, and the bandwidth floor.

    flock -x /tmp/cpu.lock uv run --frozen python phase3_core_inference/project8_kv_cache/benchmark.py
    uv run python phase3_core_inference/project8_kv_cache/benchmark.py --quick     # a 20-second smoke run

PAPER: Pope et al. 2022, "Efficiently Scaling Transformer Inference": at batch 1 a decode step reads every
weight once and does ~2 FLOPs per weight byte/4, far too little work to keep the cores busy, so its time is
set by memory bandwidth:  tokens/s <= bandwidth / (weight bytes read per token)  (the "bandwidth floor" on
time per token; plus the KV cache, negligible at these lengths). We measure the machine's read bandwidth in
the same run (a sum over a 1 GiB tensor, best of several) and report each model's achieved fraction of it.

Three measurements, all fp32, batch 1, 32-token prompt, greedy:
 1. project 3's `cpu` model (context stretched so 1,024 new tokens fit): tokens/s with the cache vs recomputing
    the whole sequence per token, at 128 / 512 / 1,024 new tokens (table + PNG).
 2. decode tokens/s of our engine vs `transformers` LlamaForCausalLM.generate() on the SAME weights (our state
    dict exported to HF names and assigned into the HF model without a copy), for the stories15M and
    TinyLlama-1.1B shapes with random weights; both produce the same tokens (checked).
 3. the bandwidth floor for each shape, from the measured bandwidth.
Decode tokens/s is (N - 1) / (time(N new tokens) - time(1 new token)) for both engines: prefill excluded.
"""

from __future__ import annotations

import argparse
import gc
import json
import platform
import time
from pathlib import Path

import torch

from course.device import set_seed
from course.errors import CourseError, run_cli
from course.plots import plot_curves
from phase1_foundation.project3_pretrain.model import Llama, LlamaConfig
from phase3_core_inference.project8_kv_cache.engine import Engine, generate_nocache

OUT = Path(__file__).resolve().parent / "results"
SHAPES = {  # name: LlamaConfig overrides (vocab 32000 = the LLaMA-2 tokenizer)
    "stories15M": dict(n_embd=288, n_layer=6, n_head=6, n_kv_head=6, intermediate_size=768, vocab_size=32000,
                       tie_embeddings=True, block_size=256),
    "TinyLlama-1.1B": dict(n_embd=2048, n_layer=22, n_head=32, n_kv_head=4, intermediate_size=5632,
                           vocab_size=32000, tie_embeddings=False, block_size=2048),
}
QUICK_SHAPES = {"tiny": dict(n_embd=64, n_layer=2, n_head=4, n_kv_head=2, intermediate_size=128, vocab_size=512,
                             tie_embeddings=True, block_size=256)}


def measure_bandwidth(gib: float = 1.0, repeats: int = 5) -> dict[str, float]:
    """Read bandwidth (sum over a big tensor) and copy bandwidth (read + write), GB/s, best of `repeats`."""
    n = int(gib * 2**30 / 4)
    x = torch.ones(n, dtype=torch.float32)
    y = torch.empty_like(x)
    read, copy = 0.0, 0.0
    for _ in range(repeats):
        t = time.perf_counter()
        x.sum()
        read = max(read, x.numel() * 4 / (time.perf_counter() - t) / 1e9)
        t = time.perf_counter()
        y.copy_(x)
        copy = max(copy, 2 * x.numel() * 4 / (time.perf_counter() - t) / 1e9)
    del x, y
    gc.collect()
    return {"read_GBps": read, "copy_GBps": copy}


def weight_bytes_per_token(model: Llama) -> int:
    """Bytes of every weight a decode step reads: all matrices and norms; the embedding table is only
    indexed (one row), unless it is tied to lm_head, where it is read in full as the classifier."""
    seen, total = set(), 0
    for name, p in model.named_parameters():
        if p.data_ptr() in seen:
            continue
        seen.add(p.data_ptr())
        if name == "tok_emb.weight" and not model.config.tie_embeddings:
            continue
        total += p.numel() * p.element_size()
    return total


def build(shape: dict, seed: int = 0) -> Llama:
    set_seed(seed)
    with torch.no_grad():
        model = Llama(LlamaConfig(**shape))
    return model.eval()


def timed(fn) -> float:
    t = time.perf_counter()
    fn()
    return time.perf_counter() - t


def decode_rate(run, n: int, repeats: int = 2) -> tuple[float, object]:
    """(N - 1) / (t(N) - t(1)): decode tokens/s with prefill excluded; best of `repeats`."""
    run(2)  # warm-up (first-call allocations, kernel selection)
    best = float("inf")
    out = None
    for _ in range(repeats):
        t1 = timed(lambda: run(1))
        t = time.perf_counter()
        out = run(n)
        tn = time.perf_counter() - t
        best = min(best, tn - t1)
    return (n - 1) / best, out


def ours_runner(model: Llama, prompt: list[int], onednn: bool = True):
    eng = Engine(model, onednn=onednn)
    return lambda n: list(eng.generate(prompt, n))


def hf_model_sharing(model: Llama):
    """A transformers LlamaForCausalLM whose parameters ARE our tensors (no copy): same weights, same memory."""
    import transformers
    from phase1_foundation.project3_pretrain.hf_interop import _name_map, hf_config_from_llama

    cfg = transformers.LlamaConfig(**hf_config_from_llama(model.config))
    with torch.device("meta"):
        hf = transformers.LlamaForCausalLM(cfg)
    ours = model.state_dict()
    state = {theirs: ours[mine] for mine, theirs in _name_map(model.config).items()}
    if model.config.tie_embeddings:
        state["lm_head.weight"] = ours["tok_emb.weight"]
    hf.load_state_dict(state, strict=True, assign=True)
    hf.model.rotary_emb = type(hf.model.rotary_emb)(config=cfg)  # non-persistent buffer: build it for real
    return hf.eval()


def hf_runner(hf, prompt: list[int]):
    ids = torch.tensor([prompt])
    mask = torch.ones_like(ids)

    def run(n):
        with torch.inference_mode():
            return hf.generate(ids, attention_mask=mask, max_new_tokens=n, min_new_tokens=n, do_sample=False,
                               pad_token_id=0, eos_token_id=None)[0, len(prompt):].tolist()
    return run


def cache_speedup(new_tokens: list[int], prompt_len: int, quick: bool) -> list[dict]:
    shape = dict(LlamaConfig.PRESETS["cpu"])
    if quick:
        shape.update(QUICK_SHAPES["tiny"])
    shape["block_size"] = prompt_len + max(new_tokens)  # the preset's 128 positions would not fit 1,024 tokens
    model = build(shape)
    prompt = torch.randint(0, shape.get("vocab_size", 10_000), (1, prompt_len), generator=torch.Generator().manual_seed(0))
    eng = Engine(model)
    rows = []
    for n in new_tokens:
        list(eng.generate(prompt[0].tolist(), 4))  # warm-up
        t_cache = timed(lambda: list(eng.generate(prompt[0].tolist(), n)))
        t_none = timed(lambda: generate_nocache(model, prompt, n))
        rows.append({"new_tokens": n, "cache_tok_s": n / t_cache, "nocache_tok_s": n / t_none,
                     "speedup": t_none / t_cache})
        print(f"  {n:>5} new tokens: cache {n / t_cache:8.1f} tok/s, no cache {n / t_none:8.1f} tok/s, "
              f"speedup {t_none / t_cache:5.1f}x", flush=True)
    return rows


def versus_transformers(shapes: dict, n: int, prompt_len: int, bw: float) -> list[dict]:
    rows = []
    for name, shape in shapes.items():
        t0 = time.perf_counter()
        model = build(shape)
        build_s = time.perf_counter() - t0
        wb = weight_bytes_per_token(model)
        prompt = torch.randint(0, shape["vocab_size"], (prompt_len,), generator=torch.Generator().manual_seed(1)).tolist()
        reps = 1 if wb > 1e9 else 3  # the 1.1B shape: one timed run each (~30 s per engine)
        plain_rate, _ = decode_rate(ours_runner(model, prompt, onednn=False), n, reps)  # our loop, default kernels
        ours_rate, ours_out = decode_rate(ours_runner(model, prompt), n, reps)
        hf = hf_model_sharing(model)
        hf_rate, hf_out = decode_rate(hf_runner(hf, prompt), n, reps)
        floor = bw * 1e9 / wb
        row = {"shape": name, "params_M": sum(p.numel() for p in model.parameters()) / 1e6,
               "weight_MB_per_token": wb / 1e6, "ours_tok_s": ours_rate, "ours_default_kernels_tok_s": plain_rate, "hf_tok_s": hf_rate,
               "vs_hf": ours_rate / hf_rate, "floor_tok_s": floor, "of_floor": ours_rate / floor,
               "hf_of_floor": hf_rate / floor, "same_tokens": ours_out == hf_out, "build_s": build_s}
        rows.append(row)
        print(f"  {name}: ours {ours_rate:.1f} tok/s (default kernels {plain_rate:.1f}), transformers {hf_rate:.1f} tok/s ({ours_rate / hf_rate:.2f}x); "
              f"floor {floor:.1f} tok/s ({wb / 1e6:.0f} MB/token), ours at {100 * ours_rate / floor:.0f}% of it; "
              f"same tokens: {ours_out == hf_out}", flush=True)
        del model, hf
        gc.collect()
    return rows


def markdown(cache_rows, hf_rows, bw, args) -> str:
    lines = [f"Machine: {args.machine}; PyTorch {torch.__version__}, fp32, {torch.get_num_threads()} threads; "
             f"measured read bandwidth {bw['read_GBps']:.1f} GB/s (copy {bw['copy_GBps']:.1f} GB/s).", "",
             f"KV cache vs recompute, project 3 `cpu` model, batch 1, {args.prompt_len}-token prompt:", "",
             "| new tokens | with cache (tok/s) | without (tok/s) | speedup |", "|---:|---:|---:|---:|"]
    lines += [f"| {r['new_tokens']} | {r['cache_tok_s']:.1f} | {r['nocache_tok_s']:.1f} | {r['speedup']:.1f}x |"
              for r in cache_rows]
    lines += ["", f"Decode beside `transformers` generate() on the same weights ({args.new_tokens_hf} new tokens, "
              "prefill excluded):", "",
              "| shape | params | weights read/token | ours (tok/s) | ours, default kernels | transformers (tok/s) | "
              "ours/transformers | bandwidth floor (tok/s) | ours/floor | same tokens |",
              "|---|---:|---:|---:|---:|---:|---:|---:|---:|---|"]
    lines += [f"| {r['shape']} | {r['params_M']:.1f}M | {r['weight_MB_per_token']:.0f} MB | {r['ours_tok_s']:.1f} | "
              f"{r['ours_default_kernels_tok_s']:.1f} | "
              f"{r['hf_tok_s']:.1f} | {r['vs_hf']:.2f}x | {r['floor_tok_s']:.1f} | {100 * r['of_floor']:.0f}% | "
              f"{'yes' if r['same_tokens'] else 'NO'} |" for r in hf_rows]
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="tiny shapes and lengths: a smoke test, not the numbers")
    parser.add_argument("--parts", default="cache,hf", help="comma list of: cache, hf")
    parser.add_argument("--shapes", default=",".join(SHAPES), help=f"comma list of: {', '.join(SHAPES)}")
    parser.add_argument("--new_tokens", default="128,512,1024", help="lengths for the cache speedup")
    parser.add_argument("--new_tokens_hf", type=int, default=128)
    parser.add_argument("--prompt_len", type=int, default=32)
    parser.add_argument("--threads", type=int, default=0, help="torch threads (0 = default)")
    parser.add_argument("--out_dir", default=str(OUT))
    parser.add_argument("--machine", default="2-core AMD EPYC CPU (x86-64, 24 GB RAM)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--device", default="cpu", help="only cpu is measured here (the claims are CPU claims)")
    args = parser.parse_args()
    if args.device != "cpu":
        raise CourseError("benchmark.py measures CPU decoding only; use --device cpu")
    if args.threads:
        torch.set_num_threads(args.threads)
    parts = set(args.parts.split(","))
    if parts - {"cache", "hf"}:
        raise CourseError(f"unknown --parts {sorted(parts - {'cache', 'hf'})}; use cache and/or hf")
    new_tokens = [int(x) for x in args.new_tokens.split(",")]
    shapes = QUICK_SHAPES if args.quick else {}
    if not args.quick:
        for s in args.shapes.split(","):
            if s not in SHAPES:
                raise CourseError(f"unknown shape '{s}'; choose from {', '.join(SHAPES)}")
            shapes[s] = SHAPES[s]
    if args.quick:
        new_tokens, args.new_tokens_hf = [16, 32], 16
    out = Path(args.out_dir)
    print(f"{platform.processor() or platform.machine()}, torch {torch.__version__}, {torch.get_num_threads()} threads")
    bw = measure_bandwidth(0.25 if args.quick else 1.0)
    print(f"memory bandwidth: read {bw['read_GBps']:.1f} GB/s, copy {bw['copy_GBps']:.1f} GB/s", flush=True)
    cache_rows, hf_rows = [], []
    if "cache" in parts:
        print("KV cache vs recompute (project 3 cpu model):")
        cache_rows = cache_speedup(new_tokens, args.prompt_len, args.quick)
        xs = [r["new_tokens"] for r in cache_rows]
        plot_curves(out / "kv_cache_speedup.png",
                    {"with KV cache": (xs, [r["cache_tok_s"] for r in cache_rows]),
                     "without (recompute)": (xs, [r["nocache_tok_s"] for r in cache_rows])},
                    title="Project 3 cpu model, batch 1, fp32, 2 CPU cores", xlabel="new tokens",
                    ylabel="tokens/s", logy=True)
    if "hf" in parts:
        print(f"decode vs transformers ({args.new_tokens_hf} new tokens):")
        hf_rows = versus_transformers(shapes, args.new_tokens_hf, args.prompt_len, bw["read_GBps"])
    md = markdown(cache_rows, hf_rows, bw, args)
    out.mkdir(parents=True, exist_ok=True)
    name = "benchmark_quick" if args.quick else "benchmark"
    (out / f"{name}.md").write_text(md)
    (out / f"{name}.json").write_text(json.dumps({"bandwidth": bw, "cache": cache_rows, "hf": hf_rows}, indent=2))
    print(md)
    parts_summary = []
    if cache_rows:
        parts_summary.append(f"cache speedup at {cache_rows[-1]['new_tokens']} tokens {cache_rows[-1]['speedup']:.1f}x")
    parts_summary += [f"{r['shape']} {r['ours_tok_s']:.1f} tok/s = {r['vs_hf']:.2f}x transformers, "
                      f"{100 * r['of_floor']:.0f}% of floor" for r in hf_rows]
    print("summary: " + "; ".join(parts_summary))


if __name__ == "__main__":
    run_cli(main)
