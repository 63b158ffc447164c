"""Benchmark the paged KV cache on SmolLM2-135M-Instruct against project 8's contiguous cache, with project 12's
engine and workload.

    uv run python phase4_advanced_inference/project13_paged_attention/benchmark.py --threads 1   # the README's
    uv run python phase4_advanced_inference/project13_paged_attention/benchmark.py --quick       # a smoke run

Parts (each side by side in one run):
  waste     the workload served by project 12's engine on each cache; after every step, KV memory waste =
            (allocated - filled) / allocated: contiguous allocates max_len per row up front, paged whole blocks
  budget    the same KV bytes for both (--kv_budget_tokens): contiguous fits budget / max_len rows, paged admits
            by free blocks (claim) up to --paged_rows; mean rows running, output tokens/s, replies compared
  parallel  --n_samples continuations of the workload's longest prompt (temperature 0.8): KV blocks with fork (shared prompt) and
            without (each row its own copy), against one continuation
  speed     decode tokens/s through the block tables vs the contiguous cache, batch 1 and batch 16 (interleaved)
Writes <out_dir>/benchmark.md and benchmark.json (atomically).
"""

from __future__ import annotations

import dataclasses
import json
import sys
import time
from pathlib import Path

import torch

from course.bench import interleaved, markdown_table
from course.checkpoint import atomic_write_text
from course.cli import ArgumentParser, out_dir, positive_int
from course.device import machine_summary, set_seed
from course.errors import run_cli
from phase1_foundation.project3_pretrain.loading import load_model, load_tokenizer_for
from phase3_core_inference.project8_kv_cache.kv_cache import KVCache
from phase3_core_inference.project8_kv_cache.sampling import SamplingParams, sample_token
from phase4_advanced_inference.project12_continuous_batching import metrics, workload
from phase4_advanced_inference.project12_continuous_batching.batch_engine import BatchEngine
from phase4_advanced_inference.project12_continuous_batching.request import Request
from phase4_advanced_inference.project13_paged_attention.config import PagedConfig
from phase4_advanced_inference.project13_paged_attention.paged_cache import PagedCache


def fresh(reqs):
    return [Request(list(r.prompt), r.max_new_tokens, r.params, r.seed, r.stop_ids, r.stop, r.arrival, r.id)
            for r in reqs]


def contiguous_usage(cache: KVCache) -> dict:
    allocated, filled = cache.batch * cache.max_len, sum(cache.lengths)
    return {"allocated_tokens": allocated, "filled_tokens": filled, "waste": 1 - filled / allocated}


def serve(model, cfg, reqs, cache, rows: int) -> dict:
    """Serve reqs (all at time 0) step by step, sampling the cache's usage and the running rows after each step."""
    eng = BatchEngine(model, max_rows=rows, max_batch_tokens=cfg.max_batch_tokens, max_len=cfg.max_len, cache=cache)
    reqs = fresh(reqs)
    t0 = time.perf_counter()
    for r in reqs:
        r.arrival = 0.0
        eng.submit(r)
    wastes, running = [], []
    while eng.scheduler.has_work:
        eng.step()
        u = cache.usage() if isinstance(cache, PagedCache) else contiguous_usage(cache)
        if u["filled_tokens"]:
            wastes.append(u["waste"])
        running.append(len(eng.scheduler.running))
    s = metrics.summarize(reqs, time.perf_counter() - t0)
    return {"summary": s, "waste_mean": sum(wastes) / len(wastes), "waste_max": max(wastes),
            "rows_mean": sum(running) / len(running), "rows_max": max(running), "tokens": {r.id: r.tokens for r in reqs}}


def part_waste(model, cfg, reqs, say) -> tuple[str, dict]:
    rows = cfg.kv_budget_tokens // cfg.max_len
    res = {"contiguous": serve(model, cfg, reqs, KVCache.for_model(model.config, rows, cfg.max_len), rows),
           "paged": serve(model, cfg, reqs, PagedCache.for_model(model.config, rows, cfg.max_len, cfg.block_size),
                          rows)}
    out = []
    for name, r in res.items():
        say(f"waste {name}: mean {100 * r['waste_mean']:.1f}%, max {100 * r['waste_max']:.1f}%")
        out.append([name, f"{100 * r['waste_mean']:.1f}%", f"{100 * r['waste_max']:.1f}%"])
    return markdown_table(["cache", "KV waste, mean over steps", "max"], out), res


def part_budget(model, cfg, reqs, say) -> tuple[str, dict]:
    rows = cfg.kv_budget_tokens // cfg.max_len
    blocks = cfg.kv_budget_tokens // cfg.block_size
    res = {"contiguous": serve(model, cfg, reqs, KVCache.for_model(model.config, rows, cfg.max_len), rows),
           "paged": serve(model, cfg, reqs, PagedCache.for_model(model.config, cfg.paged_rows, cfg.max_len,
                                                                 cfg.block_size, num_blocks=blocks), cfg.paged_rows)}
    ref = res["contiguous"]["tokens"]
    out = []
    for name, r in res.items():
        s = r["summary"]
        same = sum(r["tokens"][k] == v for k, v in ref.items())
        say(metrics.line(f"budget {name}", s) + f"; rows mean {r['rows_mean']:.1f} max {r['rows_max']}")
        out.append([name, f"{r['rows_mean']:.1f}", r["rows_max"], f"{s['tok_s']:.1f}", f"{s['seconds']:.1f}",
                    f"{same}/{len(ref)}"])
    ratio = res["paged"]["summary"]["tok_s"] / res["contiguous"]["summary"]["tok_s"]
    res["speedup"] = ratio
    head = ["cache", "rows running (mean)", "max", "tok/s", "seconds", "replies = contiguous"]
    return markdown_table(head, out) + f"\n\npaged / contiguous throughput: {ratio:.2f}x", res


@torch.inference_mode()
def part_parallel(model, prompt, cfg, say) -> tuple[str, dict]:
    n, steps = cfg.n_samples, 32
    params = SamplingParams(temperature=0.8)

    def run(rows: int, share: bool) -> int:
        cache = PagedCache.for_model(model.config, rows, cfg.max_len, cfg.block_size)
        if share:
            logits = model(torch.tensor([prompt]), kv_cache=cache.rows([0]), logits_to_keep=1)[0][:, -1]
            for b in range(1, rows):
                cache.fork(0, b)
            logits = logits.expand(rows, -1)
        else:
            logits = torch.cat([model(torch.tensor([prompt]), kv_cache=cache.rows([b]), logits_to_keep=1)[0][:, -1]
                                for b in range(rows)])
        gens = [torch.Generator().manual_seed(cfg.seed + b) for b in range(rows)]
        for _ in range(steps):
            nxt = torch.cat([sample_token(logits[b:b + 1], params, None, gens[b]) for b in range(rows)])
            logits = model(nxt, kv_cache=cache, logits_to_keep=1)[0][:, -1]
        return cache.usage()["bytes"]

    one, shared, copies = run(1, True), run(n, True), run(n, False)
    say(f"parallel: n=1 {one / 2**20:.2f} MiB, n={n} shared {shared / 2**20:.2f} MiB, copies {copies / 2**20:.2f} MiB")
    rows = [["n = 1", f"{one / 2**20:.2f}", "1.00x"], [f"n = {n}, fork (shared prompt)", f"{shared / 2**20:.2f}",
            f"{shared / one:.2f}x"], [f"n = {n}, separate copies", f"{copies / 2**20:.2f}", f"{copies / one:.2f}x"]]
    return (markdown_table(["parallel sampling", "KV MiB", "of n = 1"], rows) +
            f"\n\nprompt {len(prompt)} tokens, {steps} sampled tokens per continuation, block size {cfg.block_size}",
            {"prompt": len(prompt), "one": one, "shared": shared, "copies": copies})


@torch.inference_mode()
def part_speed(model, cfg, rounds: int, say) -> tuple[str, dict]:
    steps, ctx, out, res = 16, min(200, cfg.max_len // 2), [], {}
    for batch in (1, 16):
        caches = {"contiguous": KVCache.for_model(model.config, batch, cfg.max_len),
                  "paged": PagedCache.for_model(model.config, batch, cfg.max_len, cfg.block_size)}
        x = torch.randint(0, model.config.vocab_size, (batch, ctx))
        for c in caches.values():
            model(x, kv_cache=c, logits_to_keep=1)

        def decode(c):
            tok = torch.zeros(batch, 1, dtype=torch.long)
            for _ in range(steps):
                model(tok, kv_cache=c, logits_to_keep=1)
            c.crop(ctx)
        t = interleaved({name: (lambda c=c: decode(c)) for name, c in caches.items()}, rounds=rounds)
        tps = {name: batch * steps / r["median"] for name, r in t.items()}
        res[batch] = tps
        say(f"speed batch {batch}: " + ", ".join(f"{k} {v:.1f} tok/s" for k, v in tps.items()))
        out.append([batch, f"{tps['contiguous']:.1f}", f"{tps['paged']:.1f}",
                    f"{100 * (tps['paged'] / tps['contiguous'] - 1):+.1f}%"])
    return markdown_table(["batch", "contiguous tok/s", "paged tok/s", "paged vs contiguous"], out) + \
        f"\n\n{steps} decode steps after a {ctx}-token context, median of {rounds} interleaved rounds", res


def build_parser() -> ArgumentParser:
    parser = ArgumentParser(description=__doc__)
    PagedConfig.add_args(parser, default_preset="cpu")
    parser.add_argument("--rounds", type=positive_int, default=5, help="speed part: interleaved rounds")
    parser.add_argument("--threads", type=positive_int, default=None, help="torch threads (default: torch's)")
    parser.add_argument("--quick", action="store_true", help="a smoke run: 6 short requests, 2 rounds")
    parser.add_argument("--out_dir", type=out_dir, default=Path("checkpoints/project13/bench"))
    return parser


def main(argv: list[str] | None = None) -> None:
    args = build_parser().parse_args(argv)
    cfg = PagedConfig.from_args(args)
    if args.quick:
        cfg = dataclasses.replace(cfg, requests=6, mean_output=6, max_output=12, max_prompt=96)
        args.rounds = 2
    workload.require(cfg.model, "model")
    if args.threads:
        torch.set_num_threads(args.threads)
    set_seed(cfg.seed)
    loaded = load_model(cfg.model, "cpu", getattr(torch, cfg.dtype))
    tok = load_tokenizer_for(loaded, cfg.tokenizer)
    model = loaded.model
    cfg = dataclasses.replace(cfg, max_len=min(cfg.max_len or model.config.block_size, model.config.block_size))
    reqs = workload.from_config(cfg, tok, loaded.kind, cfg.max_len)
    log = []

    def say(text):
        print(text, file=sys.stderr, flush=True)
        log.append(text)

    t0 = time.perf_counter()
    md, out = [], {"machine": machine_summary(), "threads": torch.get_num_threads(), "config": cfg.to_dict()}
    rows = cfg.kv_budget_tokens // cfg.max_len
    for title, fn in (
            (f"KV memory waste ({cfg.requests} requests, {rows} rows, max_len {cfg.max_len}, block {cfg.block_size})",
             lambda: part_waste(model, cfg, reqs, say)),
            (f"A fixed KV budget of {cfg.kv_budget_tokens:,} tokens", lambda: part_budget(model, cfg, reqs, say)),
            ("Parallel sampling", lambda: part_parallel(model, max((r.prompt for r in reqs), key=len), cfg, say)),
            ("Reading through block tables", lambda: part_speed(model, cfg, args.rounds, say))):
        table, res = fn()
        md += [f"### {title}", table]
        out[title.split(" (")[0]] = {k: v for k, v in res.items() if k != "tokens"} if isinstance(res, dict) else res
    for part in out.values():  # the per-request tokens are for the comparison only
        if isinstance(part, dict):
            for v in part.values():
                if isinstance(v, dict):
                    v.pop("tokens", None)
    out["seconds"] = time.perf_counter() - t0
    out["log"] = log
    md.append(f"machine: {out['machine']}, {out['threads']} torch threads; {out['seconds']:.0f} s")
    atomic_write_text(args.out_dir / "benchmark.md", "\n\n".join(md) + "\n")
    atomic_write_text(args.out_dir / "benchmark.json", json.dumps(out, indent=1, default=str))
    print("\n\n".join(md))


if __name__ == "__main__":
    run_cli(main)
