"""Measure the KV cache: speedup over recomputing, decode speed beside `transformers`, and the bandwidth floor.

    uv run python phase3_core_inference/project8_kv_cache/benchmark.py              # alone on the machine
    uv run python phase3_core_inference/project8_kv_cache/benchmark.py --quick     # a smoke run
    uv run python phase3_core_inference/project8_kv_cache/benchmark.py --check     # + the quality bar, met/MISSED

PAPER: Pope et al. 2022, "Efficiently Scaling Transformer Inference": at batch 1 a decode step reads every
weight once and does ~2 FLOPs per weight byte/4, far too little work to keep the cores busy, so its time is
set by memory bandwidth:  tokens/s <= bandwidth / (weight bytes read per token)  (the "bandwidth floor" on
time per token; plus the KV cache, negligible at these lengths). We measure the machine's read bandwidth in
the same run: the best of three streaming reductions (sum, amax, dot) over a 1 GiB tensor, sampled at the
start and again around every engine's timing, because on a shared VM it drifts (we saw 31-69 GB/s within
minutes, in phases of seconds). So ours is compared with the floor token by token: each decode step is timed
alone, between two bandwidth samples, and its floor is the higher of the two; the verdict takes the median
token. The results also give ours against the highest sample of the whole run, the strictest reading.
Timers, best-of, the bandwidth sampler and the tables are course/bench.py's.

Three measurements, all fp32, batch 1, 32-token prompt, greedy:
 1. project 3's `cpu` model (context stretched so 1,024 new tokens fit): tokens/s with the cache vs recomputing
    the whole sequence per token, at 128 / 512 / 1,024 new tokens (table + PNG), both sides eager, then both
    sides compiled (the engine with fast_decode's step; the recompute's forward compiled whole). The recompute asks for the last position's logits only (`logits_to_keep=1`), as any engine
    would: the classifier over every position was ~30% of its time, work that has nothing to do with caching.
 2. decode tokens/s of our engine vs `transformers` LlamaForCausalLM.generate() on the SAME weights (our state
    dict exported to HF names and assigned into the HF model without a copy), for the stories15M and
    TinyLlama-1.1B shapes with random weights; both produce the same tokens (checked).
 3. the bandwidth floor for each shape, from the measured bandwidth.
Decode tokens/s is (N - 1) / (time(N new tokens) - time(1 new token)) for both engines: prefill excluded.
"""

from __future__ import annotations

import argparse
import functools
import gc
import statistics
import time
from pathlib import Path

import torch

from course.bench import Bandwidth, best_of, timed
from course.checkpoint import atomic_write_json, atomic_write_text
from phase1_foundation.project3_pretrain.hf_interop import hf_model_sharing
from course.cli import ArgumentParser, nonneg_int, out_dir, positive_int
from course.device import machine_summary, set_seed
from course.errors import CourseError, run_cli
from course.paths import REPO_ROOT
from course.plots import plot_curves
from phase1_foundation.project3_pretrain.model import Llama, LlamaConfig
from phase3_core_inference.project8_kv_cache import fast_decode
from phase3_core_inference.project8_kv_cache.engine import Engine, generate_nocache

OUT = REPO_ROOT / "checkpoints" / "project8" / "bench"
SHAPES = {  # name: LlamaConfig overrides (vocab 32000 = the LLaMA-2 tokenizer)
    "stories15M": dict(n_embd=288, n_layer=6, n_head=6, n_kv_head=6, intermediate_size=768, vocab_size=32000,
                       tie_embeddings=True, block_size=256),
    "TinyLlama-1.1B": dict(n_embd=2048, n_layer=22, n_head=32, n_kv_head=4, intermediate_size=5632,
                           vocab_size=32000, tie_embeddings=False, block_size=2048),
}
QUICK_SHAPES = {"tiny": dict(n_embd=64, n_layer=2, n_head=4, n_kv_head=2, intermediate_size=128, vocab_size=512,
                             tie_embeddings=True, block_size=256)}


def decode_weights(model: Llama) -> list[torch.Tensor]:
    """Every weight a decode step reads: all matrices and norms; the embedding table is only indexed (one
    row), unless it is tied to lm_head, where it is read in full as the classifier."""
    seen, out = set(), []
    for name, p in model.named_parameters():
        if p.data_ptr() in seen or (name == "tok_emb.weight" and not model.config.tie_embeddings):
            continue
        seen.add(p.data_ptr())
        out.append(p.detach())
    return out


def weight_bytes_per_token(model: Llama) -> int:
    return sum(p.numel() * p.element_size() for p in decode_weights(model))


def build(shape: dict, seed: int = 0) -> Llama:
    set_seed(seed)
    with torch.no_grad():
        model = Llama(LlamaConfig(**shape))
    return model.eval()


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


def ours_runner(model: Llama, prompt: list[int], fast: bool | None = None):
    """Our engine; fast: the compiled step (fast_decode), None = as generate.py chooses (models >= 16 MiB)."""
    step = fast_decode.FastDecoder(model) if fast_decode.wanted(model, fast) else None
    eng = Engine(model, step=step)
    eng.kernels = "compiled" if step else "eager"

    def run(n):
        return list(eng.generate(prompt, n))
    run.engine = eng
    return run


def hf_runner(hf, prompt: list[int]):
    ids = torch.tensor([prompt])
    mask = torch.ones_like(ids)

    def run(n):
        with torch.inference_mode():
            return hf.generate(ids, attention_mask=mask, max_new_tokens=n, min_new_tokens=n, do_sample=False,
                               pad_token_id=0, eos_token_id=None)[0, len(prompt):].tolist()
    return run


def cache_speedup(new_tokens: list[int], prompt_len: int, quick: bool, seed: int = 0) -> list[dict]:
    """Tokens/s with the cache and without it, both sides run the same way: eager (this 14 MiB model's default)
    and, where torch.compile works, compiled (the engine's decode step; the no-cache forward with dynamic shapes).
    Eager, the cached step is a few hundred small operations whose fixed cost (1.4-2 ms per token here) is not the
    cache's to remove; compiled on both sides, the ratio is the cache's alone."""
    shape = dict(LlamaConfig.PRESETS["cpu"])
    if quick:
        shape.update(QUICK_SHAPES["tiny"])
    shape["block_size"] = prompt_len + max(new_tokens)  # the preset's 128 positions would not fit 1,024 tokens
    model = build(shape, seed)
    prompt = torch.randint(0, shape.get("vocab_size", 10_000), (1, prompt_len), generator=torch.Generator().manual_seed(seed))
    modes = ["eager"] + (["compiled"] if fast_decode.compile_works() else [])
    rows = []
    for mode in modes:
        eng = Engine(model, step=fast_decode.FastDecoder(model) if mode == "compiled" else None)
        nocache = model
        if mode == "compiled":  # the whole forward, one graph for every sequence length
            nocache = functools.partial(torch.compile(type(model).forward, dynamic=True,
                                                      options=fast_decode.COMPILE_OPTIONS), model)
        print(f"  both sides {mode}:", flush=True)
        list(eng.generate(prompt[0].tolist(), 4))  # warm-up (and compiles)
        generate_nocache(nocache, prompt, 4)
        for n in new_tokens:
            # best of 2 for both, so one-off hiccups of a shared machine do not decide the ratio
            t_cache, tokens = best_of(lambda: list(eng.generate(prompt[0].tolist(), n)), 2)
            t_none, full = best_of(lambda: generate_nocache(nocache, prompt, n), 2)
            rows.append({"mode": mode, "new_tokens": n, "cache_tok_s": n / t_cache, "nocache_tok_s": n / t_none,
                         "speedup": t_none / t_cache, "same_tokens": tokens == full[0, prompt_len:].tolist()})
            print(f"  {n:>5} new tokens: cache {n / t_cache:8.1f} tok/s, no cache {n / t_none:8.1f} tok/s, "
                  f"speedup {t_none / t_cache:5.1f}x", flush=True)
    return rows


def paired_floor_tokens(engine: Engine, prompt: list[int], wb: int, bw: Bandwidth, tokens: int) -> list[dict]:
    """Ours against the bandwidth floor, robust to a drifting machine: `tokens` decode steps, each timed alone
    and paired with the bandwidth sampled right before and right after it (the higher of the two is its
    floor). A step takes 0.1-0.2 s at TinyLlama's size, shorter than the VM's bandwidth phases, so the pair
    nearly always sees the same phase; the verdict uses the median token.
    Also timed in each pair, as a diagnostic: `sum()` over the very tensors a step reads, the rate a perfect
    decode step could reach with PyTorch's best streaming kernel (many tensors of 2-262 MB, not one of 1 GiB)."""
    weights = decode_weights(engine.model)
    steps = engine.generate(prompt, tokens + 1)
    next(steps)  # the first token comes from the prefill
    after, out = bw.sample(), []
    for _ in range(tokens):
        before = after
        rate = 1 / timed(lambda: next(steps))  # one decode step (and its argmax)
        weights_sum = wb / timed(lambda: [w.sum() for w in weights]) / 1e9
        after = bw.sample()
        at = max(before, after)
        out.append({"tok_s": rate, "streamed_GBps": rate * wb / 1e9, "bandwidth_GBps": at,
                    "floor_tok_s": at * 1e9 / wb, "of_floor": rate * wb / 1e9 / at,
                    "weights_sum_GBps": weights_sum, "of_weights_sum": rate * wb / 1e9 / weights_sum})
    steps.close()
    return out


def versus_transformers(shapes: dict, n: int, prompt_len: int, bw: Bandwidth, seed: int = 0,
                        floor_tokens: int = 24) -> list[dict]:
    rows = []
    for name, shape in shapes.items():
        t0 = time.perf_counter()
        model = build(shape, seed)
        build_s = time.perf_counter() - t0
        wb = weight_bytes_per_token(model)
        prompt = torch.randint(0, shape["vocab_size"], (prompt_len,), generator=torch.Generator().manual_seed(seed + 1)).tolist()
        reps = 1 if wb > 1e9 else 3  # the 1.1B shape: one timed run each (~30 s per engine)
        bw.sample()
        plain_rate, _ = decode_rate(ours_runner(model, prompt, fast=False), n, reps)  # the plain engine, eager
        t0 = time.perf_counter()
        runner = ours_runner(model, prompt)  # compiles the decode step for models >= 16 MiB (fast_decode.py)
        setup_s = time.perf_counter() - t0
        bw.sample()
        ours_rate, ours_out = decode_rate(runner, n, reps)
        bw.sample()
        hf = hf_model_sharing(model)
        hf_rate, hf_out = decode_rate(hf_runner(hf, prompt), n, reps)
        paired = paired_floor_tokens(runner.engine, prompt, wb, bw, floor_tokens)
        of_floor = statistics.median(r["of_floor"] for r in paired)
        row = {"shape": name, "params_M": model.num_params() / 1e6,
               "weight_MB_per_token": wb / 1e6, "ours_tok_s": ours_rate, "ours_default_kernels_tok_s": plain_rate,
               "hf_tok_s": hf_rate, "vs_hf": ours_rate / hf_rate, "floor_tokens": paired, "of_floor": of_floor,
               "ours_streamed_GBps": ours_rate * wb / 1e9, "hf_streamed_GBps": hf_rate * wb / 1e9,
               "same_tokens": ours_out == hf_out, "build_s": build_s, "engine_setup_s": setup_s,
               "kernels": runner.engine.kernels}
        rows.append(row)
        print(f"  {name}: ours {ours_rate:.1f} tok/s ({runner.engine.kernels} kernels; default kernels {plain_rate:.1f}), "
              f"transformers {hf_rate:.1f} tok/s ({ours_rate / hf_rate:.2f}x), same tokens: {ours_out == hf_out}; "
              f"{wb / 1e6:.0f} MB/token; ours/floor in {len(paired)} paired tokens: "
              + ", ".join(f"{100 * q['of_floor']:.0f}%" for q in paired) + f" (median {100 * of_floor:.0f}%)", flush=True)
        del model, hf
        gc.collect()
    return rows


def markdown(cache_rows, hf_rows, bw, args) -> str:
    lines = [f"Machine: {args.machine}; fp32, {torch.get_num_threads()} threads; read bandwidth sampled "
             f"{len(bw.samples)} times during the run: {min(bw.samples):.1f}-{bw.best:.1f} GB/s.", "",
             f"KV cache vs recompute, project 3 `cpu` model, batch 1, {args.prompt_len}-token prompt:", "",
             "| both sides | new tokens | with cache (tok/s) | without (tok/s) | speedup | same tokens |",
             "|---|---:|---:|---:|---:|---|"]
    lines += [f"| {r['mode']} | {r['new_tokens']} | {r['cache_tok_s']:.1f} | {r['nocache_tok_s']:.1f} | "
              f"{r['speedup']:.1f}x | {'yes' if r['same_tokens'] else 'NO'} |" for r in cache_rows]
    lines += ["", f"Decode beside `transformers` generate() on the same weights ({args.new_tokens_hf} new tokens, "
              "prefill excluded):", "",
              "| shape | params | weights read/token | ours (tok/s) | ours, default kernels | transformers (tok/s) | "
              "ours/transformers | same tokens |", "|---|---:|---:|---:|---:|---:|---:|---|"]
    lines += [f"| {r['shape']} | {r['params_M']:.1f}M | {r['weight_MB_per_token']:.0f} MB | {r['ours_tok_s']:.1f} | "
              f"{r['ours_default_kernels_tok_s']:.1f} | {r['hf_tok_s']:.1f} | {r['vs_hf']:.2f}x | "
              f"{'yes' if r['same_tokens'] else 'NO'} |" for r in hf_rows]
    lines += ["", "Ours against the bandwidth floor: decode steps timed one by one, each paired with the bandwidth "
              "sampled right before and after it (the higher of the two); median, then lowest-highest, over the tokens:",
              "", "| shape | tokens | ours streamed (GB/s) | bandwidth (GB/s) | ours/floor: median | lowest-highest | "
              "`sum()` over the same weights (GB/s) | ours/that |",
              "|---|---:|---:|---:|---:|---:|---:|---:|"]
    for r in hf_rows:
        q = r["floor_tokens"]
        med = {k: statistics.median(t[k] for t in q)
               for k in ("streamed_GBps", "bandwidth_GBps", "weights_sum_GBps", "of_weights_sum")}
        lines.append(f"| {r['shape']} | {len(q)} | {med['streamed_GBps']:.1f} | {med['bandwidth_GBps']:.1f} | "
                     f"**{100 * r['of_floor']:.0f}%** | {100 * min(t['of_floor'] for t in q):.0f}-"
                     f"{100 * max(t['of_floor'] for t in q):.0f}% | {med['weights_sum_GBps']:.1f} | "
                     f"{100 * med['of_weights_sum']:.0f}% |")
    if hf_rows:
        lines += ["", "Strictest reading, against the highest bandwidth sample of the whole run (" f"{bw.best:.1f} GB/s): "
                  + ", ".join(f"{r['shape']} {100 * r['ours_streamed_GBps'] / bw.best:.0f}%" for r in hf_rows) + "."]
    return "\n".join(lines) + "\n"


def comma_list(choices: tuple[str, ...]):
    """An argparse type: a comma list of names out of `choices` (one line naming the bad one otherwise)."""
    def parse(text: str) -> list[str]:
        names = [x.strip() for x in text.split(",") if x.strip()]
        bad = [x for x in names if x not in choices]
        if bad or not names:
            raise argparse.ArgumentTypeError(f"expected a comma list of {', '.join(choices)}, got '{text}'")
        return names
    return parse


def positive_ints(text: str) -> list[int]:
    """An argparse type: a comma list of integers > 0, e.g. 128,512,1024."""
    try:
        values = [int(x) for x in text.split(",")]
    except ValueError:
        values = []
    if not values or min(values) < 1:
        raise argparse.ArgumentTypeError(f"expected a comma list of integers > 0, got '{text}'")
    return values


def build_parser() -> ArgumentParser:
    parser = ArgumentParser(description=__doc__)
    parser.add_argument("--quick", action="store_true", help="tiny shapes and lengths: a smoke test, not the numbers")
    parser.add_argument("--parts", type=comma_list(("cache", "hf")), default=["cache", "hf"],
                        help="comma list of: cache, hf (default: both)")
    parser.add_argument("--shapes", type=comma_list(tuple(SHAPES)), default=list(SHAPES),
                        help=f"comma list of: {', '.join(SHAPES)} (default: all)")
    parser.add_argument("--new_tokens", type=positive_ints, default=[128, 512, 1024],
                        help="lengths for the cache speedup (default: 128,512,1024)")
    parser.add_argument("--new_tokens_hf", type=positive_int, default=128,
                        help="decode length beside transformers, >= 2 (default: %(default)s)")
    parser.add_argument("--prompt_len", type=positive_int, default=32, help="default: %(default)s")
    parser.add_argument("--floor_tokens", type=positive_int, default=24,
                        help="decode steps paired with bandwidth samples (default: %(default)s)")
    parser.add_argument("--threads", type=nonneg_int, default=0, help="torch threads (0 = torch's default)")
    parser.add_argument("--out_dir", type=out_dir, default=OUT, help="default: %(default)s")
    parser.add_argument("--machine", default=None, help="machine description for the table (default: detected)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--device", default="cpu", help="only cpu is measured here (the claims are CPU claims)")
    parser.add_argument("--check", action="store_true", help="also print the project's quality bar: met / MISSED")
    return parser


def main(argv: list[str] | None = None) -> None:
    args = build_parser().parse_args(argv)  # every flag checked before anything is built or timed
    if args.device != "cpu":
        raise CourseError("benchmark.py measures CPU decoding only; use --device cpu")
    if args.new_tokens_hf < 2:  # decode tok/s is (N - 1) / (t(N) - t(1))
        raise CourseError(f"--new_tokens_hf ({args.new_tokens_hf}) must be >= 2: decode speed is measured "
                          "over the tokens after the first")
    if args.threads:
        torch.set_num_threads(args.threads)
    parts = set(args.parts)
    new_tokens = args.new_tokens
    shapes = QUICK_SHAPES if args.quick else {s: SHAPES[s] for s in args.shapes}
    if args.quick:
        new_tokens, args.new_tokens_hf = [16, 32], 16
    out = Path(args.out_dir)
    args.machine = args.machine or machine_summary()
    print(f"{args.machine}, {torch.get_num_threads()} threads")
    bw = Bandwidth(0.25 if args.quick else 1.0)
    print(f"memory read bandwidth: {bw.sample():.1f} GB/s (sampled again around every timing)", flush=True)
    cache_rows, hf_rows = [], []
    if "cache" in parts:
        print("KV cache vs recompute (project 3 cpu model):")
        cache_rows = cache_speedup(new_tokens, args.prompt_len, args.quick, args.seed)
        curves = {}
        for mode in dict.fromkeys(r["mode"] for r in cache_rows):
            rows = [r for r in cache_rows if r["mode"] == mode]
            xs = [r["new_tokens"] for r in rows]
            curves[f"with KV cache, {mode}"] = (xs, [r["cache_tok_s"] for r in rows])
            curves[f"without (recompute), {mode}"] = (xs, [r["nocache_tok_s"] for r in rows])
        plot_curves(out / "kv_cache_speedup.png", curves,
                    title=f"Project 3 cpu model, batch 1, fp32, {torch.get_num_threads()} CPU threads",
                    xlabel="new tokens",
                    ylabel="tokens/s", logy=True)
    if "hf" in parts:
        print(f"decode vs transformers ({args.new_tokens_hf} new tokens):")
        hf_rows = versus_transformers(shapes, args.new_tokens_hf, args.prompt_len, bw, args.seed,
                                      floor_tokens=3 if args.quick else args.floor_tokens)
    md = markdown(cache_rows, hf_rows, bw, args)
    out.mkdir(parents=True, exist_ok=True)
    name = "benchmark_quick" if args.quick else "benchmark"
    atomic_write_text(out / f"{name}.md", md)  # temp file, then rename: never a half-written table
    atomic_write_json(out / f"{name}.json", {"bandwidth_samples_GBps": bw.samples, "cache": cache_rows, "hf": hf_rows})
    print(md)
    parts_summary = []
    parts_summary += [f"cache speedup at {r['new_tokens']} tokens {r['speedup']:.1f}x ({r['mode']})"
                      for r in cache_rows if r["new_tokens"] == max(new_tokens)]
    parts_summary += [f"{r['shape']} {r['ours_tok_s']:.1f} tok/s = {r['vs_hf']:.2f}x transformers, "
                      f"{100 * r['of_floor']:.0f}% of floor" for r in hf_rows]
    print("summary: " + "; ".join(parts_summary))
    if args.check:
        for line in verdicts(cache_rows, hf_rows, bw.best):
            print(line)


# The quality bar (issue 13; 2 CPU cores, fp32, batch 1, 32-token prompt, 128 new tokens), printed by --check.
TARGETS = {"compiled_cache_speedup_at_512": 17.0, "stories15M_vs_hf": 3.5, "TinyLlama-1.1B_vs_hf": 2.0,
           "TinyLlama-1.1B_of_weights_sum": 0.90}


def verdicts(cache_rows: list[dict], hf_rows: list[dict], best_bw: float | None = None) -> list[str]:
    """One 'target: met / MISSED' line per quality-bar target that this run measured."""
    out = []

    def say(name, value, target, unit=""):
        out.append(f"target {name}: {value:.2f}{unit} vs >= {target:.2f}{unit}: {'met' if value >= target else 'MISSED'}")
    for r in cache_rows:
        if r["new_tokens"] == 512 and r["mode"] == "compiled":
            say("KV-cache speedup at 512 new tokens, both sides compiled", r["speedup"],
                TARGETS["compiled_cache_speedup_at_512"], "x")
    for r in hf_rows:
        if r["shape"] == "stories15M":
            say("stories15M ours/transformers", r["vs_hf"], TARGETS["stories15M_vs_hf"], "x")
        if r["shape"] == "TinyLlama-1.1B":
            of_sum = statistics.median(t["of_weights_sum"] for t in r["floor_tokens"])
            say("TinyLlama-1.1B ours/`sum()` over its weights, timed in the same pairs", of_sum,
                TARGETS["TinyLlama-1.1B_of_weights_sum"])
            if best_bw:
                out.append(f"  (median of {len(r['floor_tokens'])} paired tokens; ours/floor {r['of_floor']:.2f}; "
                           f"at the run's highest bandwidth sample {best_bw:.1f} GB/s: "
                           f"{r['ours_streamed_GBps'] / best_bw:.2f})")
            say("TinyLlama-1.1B ours/transformers", r["vs_hf"], TARGETS["TinyLlama-1.1B_vs_hf"], "x")
    return out


if __name__ == "__main__":
    run_cli(main)
