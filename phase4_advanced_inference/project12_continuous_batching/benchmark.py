"""Benchmark continuous batching on SmolLM2-135M-Instruct: against static batching, sequential serving, and
transformers' own continuous batching, on one seeded workload.

    uv run python phase4_advanced_inference/project12_continuous_batching/benchmark.py --threads 1   # the README's
    uv run python phase4_advanced_inference/project12_continuous_batching/benchmark.py --quick       # a smoke run

Every part serves the same seeded workload (BatchConfig's: --requests Alpaca prompts in the chat template, output
lengths of mean --mean_output, one seed each; greedy), all with the same --max_rows:
  methods   sequential (static, 1 row), static (groups of max_rows, each until its longest finishes) and
            continuous, Poisson arrivals at --rate, in turns (--rounds, the order rotating): output tokens/s,
            TTFT and TPOT p50/p99, and whether every reply equals the sequential one
  sweep     static and continuous at each of --rates: throughput and p50 latencies against the arrival rate (PNG)
  chunked   --long requests given a --long_prompt_tokens prompt; continuous with chunked prefill on and off: the
            other requests' TPOT p50/p99 and their time between tokens (TBT: every gap, p99 and max; what a long
            prefill makes them wait) and the long ones' TTFT
  packed    all requests at time 0: a mixed step as one packed forward (ragged.py) or one forward per chunk
  hf        all requests at time 0: ours beside transformers' continuous batching (generate_batch's manager) with
            the same row limit and budget on the same weights; replies compared token for token
Writes <out_dir>/benchmark.md, benchmark.json and rate_sweep.png (atomically).
"""

from __future__ import annotations

import dataclasses
import json
import sys
import time
from pathlib import Path

import torch

from course.bench import markdown_table
from course.checkpoint import atomic_write_text
from course.cli import ArgumentParser, out_dir, positive_int
from course.device import machine_summary, set_seed
from course.errors import CourseError, run_cli
from course.plots import plot_curves
from phase1_foundation.project3_pretrain.loading import load_model, load_tokenizer_for
from phase4_advanced_inference.project12_continuous_batching import metrics, workload
from phase4_advanced_inference.project12_continuous_batching.batch_engine import BatchEngine
from phase4_advanced_inference.project12_continuous_batching.config import BatchConfig
from phase4_advanced_inference.project12_continuous_batching.request import Request

PARTS = ("methods", "sweep", "chunked", "packed", "hf")
BARS = {"static": 3.0, "sequential": 5.0, "hf": 1.5}  # issue 22: continuous >= 3x static, >= 5x sequential, 1.5x HF


def fresh(reqs: list[Request]) -> list[Request]:
    """New, unserved copies of the requests (same prompts, lengths, seeds, arrivals, ids)."""
    return [Request(list(r.prompt), r.max_new_tokens, r.params, r.seed, r.stop_ids, r.stop, r.arrival, r.id)
            for r in reqs]


def serve(model, tok, cfg: BatchConfig, reqs, realtime=True, **engine) -> tuple[dict, list[Request]]:
    settings = dict(max_rows=cfg.max_rows, max_batch_tokens=cfg.max_batch_tokens, chunked_prefill=cfg.chunked_prefill,
                    policy="continuous", packed=cfg.packed) | engine
    reqs = fresh(reqs)
    eng = BatchEngine(model, tok, max_len=cfg.max_len, **settings)
    t0 = time.perf_counter()
    eng.run(reqs, realtime=realtime)
    s = metrics.summarize(reqs, None if realtime else time.perf_counter() - t0)
    return s, reqs


METHODS = {"sequential": dict(policy="static", max_rows=1, max_batch_tokens=None, chunked_prefill=False),
           "static": dict(policy="static", max_batch_tokens=None, chunked_prefill=False),
           "continuous": dict()}


def ms(x) -> str:
    return "-" if x is None else f"{1000 * x:,.0f}"


def latency_row(name: str, s: dict, *extra) -> list:
    return [name, f"{s['tok_s']:.1f}", ms(s["ttft_p50"]), ms(s["ttft_p99"]), ms(s["tpot_p50"]), ms(s["tpot_p99"]),
            *extra]


LAT = ["tok/s", "TTFT p50 ms", "TTFT p99 ms", "TPOT p50 ms", "TPOT p99 ms"]


def part_methods(model, tok, cfg, reqs, rounds: int, say) -> tuple[str, dict]:
    runs: dict[str, list[dict]] = {m: [] for m in METHODS}
    same = {}
    for i in range(rounds):
        names = list(METHODS)[i % 3:] + list(METHODS)[:i % 3]
        for name in names:
            s, served = serve(model, tok, cfg, reqs, **METHODS[name])
            runs[name].append(s)
            same.setdefault(name, {r.id: r.tokens for r in served})
            say(metrics.line(f"round {i + 1} {name}", s))
    ref = same["sequential"]
    best = {m: max(rs, key=lambda s: s["tok_s"]) for m, rs in runs.items()}
    cont = best["continuous"]["tok_s"]
    rows = []
    for m, s in best.items():
        spread = ", ".join(f"{x['tok_s']:.1f}" for x in runs[m])
        ident = sum(same[m][k] == ref[k] for k in ref)
        rows.append(latency_row(m, s, spread, f"{cont / s['tok_s']:.2f}x", f"{ident}/{len(ref)}"))
    table = markdown_table(["method", *LAT, "tok/s each round", "continuous is", "replies = sequential"], rows)
    result = {"runs": runs, "speedup": {m: cont / best[m]["tok_s"] for m in ("static", "sequential")}}
    return table, result


def part_sweep(model, tok, kind, cfg, rates, n, say, out: Path) -> tuple[str, dict]:
    import random

    res = {m: [] for m in ("static", "continuous")}
    rows = []
    for rate in rates:
        reqs = workload.from_config(dataclasses.replace(cfg, rate=rate, requests=n), tok, kind, cfg.max_len)
        for m in res if random.Random(rate).random() < 0.5 else reversed(list(res)):
            s, _ = serve(model, tok, cfg, reqs, **METHODS[m])
            res[m].append((rate, s))
            say(metrics.line(f"rate {rate}/s {m}", s))
    for m, pts in res.items():
        for rate, s in sorted(pts, key=lambda p: p[0]):
            rows.append(latency_row(f"{m} @ {rate}/s", s))
    curves = {f"{m} tok/s": ([r for r, _ in sorted(p, key=lambda q: q[0])], [s["tok_s"] for _, s in sorted(p, key=lambda q: q[0])])
              for m, p in res.items()}
    curves |= {f"{m} TPOT p50 (ms)": ([r for r, _ in sorted(p, key=lambda q: q[0])],
                                       [1000 * (s["tpot_p50"] or 0) for _, s in sorted(p, key=lambda q: q[0])])
               for m, p in res.items()}
    plot_curves(out / "rate_sweep.png", curves, title="throughput and TPOT against the arrival rate",
                xlabel="arrival rate (requests/s)", ylabel="output tok/s | ms")
    return markdown_table(["method @ rate", *LAT], rows), {m: [(r, s) for r, s in p] for m, p in res.items()}


def part_chunked(model, tok, kind, cfg, n_long, long_tokens, say) -> tuple[str, dict]:
    c = dataclasses.replace(cfg, long_prompts=n_long, long_prompt_tokens=long_tokens)
    reqs = workload.from_config(c, tok, kind, cfg.max_len)
    long_len = max(len(r.prompt) for r in reqs)
    rows, res = [], {}
    for chunked in (True, False):
        s, served = serve(model, tok, cfg, reqs, chunked_prefill=chunked)
        short = [r for r in served if len(r.prompt) < long_len]
        longs = [r for r in served if len(r.prompt) == long_len]
        ss = metrics.summarize(short)
        res[chunked] = {"all": s, "short": ss, "long_ttft_p50": metrics.percentile([r.ttft for r in longs], 50)}
        say(metrics.line(f"chunked prefill {chunked}", s))
        rows.append([f"chunked prefill {'on' if chunked else 'off'}", f"{s['tok_s']:.1f}", ms(ss["tpot_p50"]),
                     ms(ss["tpot_p99"]), ms(ss["tbt_p99"]), ms(ss["tbt_max"]), ms(ss["ttft_p99"]),
                     ms(res[chunked]["long_ttft_p50"])])
    head = ["", "tok/s", "others' TPOT p50 ms", "others' TPOT p99 ms", "others' TBT p99 ms", "others' TBT max ms",
            "others' TTFT p99 ms",
            f"long prompts' ({long_len} tokens) TTFT p50 ms"]
    return markdown_table(head, rows), res


def part_offline(model, tok, cfg, reqs, with_hf: bool, with_packed: bool, say) -> tuple[str, dict]:
    rows, res = [], {}
    ours, served = serve(model, tok, cfg, reqs, realtime=False)
    mine = {r.id: r.tokens for r in served}
    rows.append(["ours, continuous (packed mixed steps)", f"{ours['tok_s']:.1f}", f"{ours['seconds']:.1f}", "-"])
    res["ours"] = ours
    say(metrics.line("offline ours", ours))
    if with_packed:
        split, served = serve(model, tok, cfg, reqs, realtime=False, packed=False)
        same = sum(r.tokens == mine[r.id] for r in served)
        rows.append(["ours, continuous (one forward per chunk)", f"{split['tok_s']:.1f}", f"{split['seconds']:.1f}",
                     f"{same}/{len(reqs)}"])
        res["split"] = split
        say(metrics.line("offline ours split", split))
    if with_hf:
        from phase4_advanced_inference.project12_continuous_batching.hf_peer import hf_serve

        eos = sorted(reqs[0].stop_ids)
        theirs, seconds = hf_serve(model, fresh(reqs), cfg.max_rows, cfg.max_batch_tokens or 256, cfg.max_len, eos)
        tokens = sum(len(t) for t in theirs.values())
        same = sum(theirs[k] == v for k, v in mine.items())
        res["hf"] = {"tok_s": tokens / seconds, "seconds": seconds, "output_tokens": tokens, "identical": same}
        rows.append(["transformers continuous batching", f"{tokens / seconds:.1f}", f"{seconds:.1f}",
                     f"{same}/{len(reqs)}"])
        say(f"offline transformers: {tokens} tokens in {seconds:.1f} s = {tokens / seconds:.1f} tok/s; {same}/{len(reqs)} identical")
    return markdown_table(["offline, every request at time 0", "tok/s", "seconds", "replies = ours"], rows), res


def build_parser() -> ArgumentParser:
    parser = ArgumentParser(description=__doc__)
    BatchConfig.add_args(parser, default_preset="cpu")
    parser.add_argument("--parts", default=",".join(PARTS), help=f"comma-separated, of {','.join(PARTS)}")
    parser.add_argument("--rounds", type=positive_int, default=1, help="methods part: rounds in turns")
    parser.add_argument("--rates", default="0.5,1,2,4", help="sweep part: arrival rates (requests/s)")
    parser.add_argument("--sweep_requests", type=positive_int, default=32, help="sweep part: requests per rate")
    parser.add_argument("--long", type=positive_int, default=4, help="chunked part: requests with a long prompt")
    parser.add_argument("--threads", type=positive_int, default=None, help="torch threads (default: torch's)")
    parser.add_argument("--quick", action="store_true", help="a smoke run: 6 requests, short replies")
    parser.add_argument("--out_dir", type=out_dir, default=Path("checkpoints/project12/bench"))
    return parser


def main(argv: list[str] | None = None) -> None:
    args = build_parser().parse_args(argv)
    cfg = BatchConfig.from_args(args)
    parts = [p.strip() for p in args.parts.split(",") if p.strip()]
    if not parts or any(p not in PARTS for p in parts):
        raise CourseError(f"--parts must be a comma-separated list of {','.join(PARTS)}, got {args.parts!r}")
    try:
        rates = [float(x) for x in args.rates.split(",") if x.strip()]
    except ValueError:
        rates = []
    if not rates or any(r <= 0 for r in rates):
        raise CourseError(f"--rates must be comma-separated rates > 0, got {args.rates!r}")
    if args.quick:
        cfg = dataclasses.replace(cfg, requests=6, mean_output=6, max_output=12, max_prompt=96)
        rates, args.sweep_requests, args.rounds = rates[:2], 4, 1
    workload.require(cfg.model, "model")
    if args.threads:
        torch.set_num_threads(args.threads)
    set_seed(cfg.seed)
    loaded = load_model(cfg.model, "cpu" if cfg.device == "auto" else cfg.device, getattr(torch, cfg.dtype))
    tok = load_tokenizer_for(loaded, cfg.tokenizer)
    model = loaded.model
    cfg = dataclasses.replace(cfg, max_len=min(cfg.max_len or model.config.block_size, model.config.block_size))
    reqs = workload.from_config(cfg, tok, loaded.kind, cfg.max_len)
    lines = []

    def say(text: str) -> None:
        print(text, file=sys.stderr, flush=True)
        lines.append(text)

    t0 = time.perf_counter()
    md, out = [], {"machine": machine_summary(), "threads": torch.get_num_threads(), "config": cfg.to_dict(),
                   "parts": parts, "quick": args.quick}
    head = (f"{cfg.requests} requests, {sum(len(r.prompt) for r in reqs):,} prompt tokens, max_new_tokens "
            f"{sum(r.max_new_tokens for r in reqs):,} in all; max_rows {cfg.max_rows}, budget {cfg.max_batch_tokens}")
    say(head)
    if "methods" in parts:
        table, out["methods"] = part_methods(model, tok, cfg, reqs, args.rounds, say)
        md += [f"### Methods at {cfg.rate} requests/s ({head})", table]
    if "sweep" in parts:
        table, out["sweep"] = part_sweep(model, tok, loaded.kind, cfg, rates, args.sweep_requests, say, args.out_dir)
        md += [f"### Arrival-rate sweep ({args.sweep_requests} requests per rate)", table]
    if "chunked" in parts:
        table, out["chunked"] = part_chunked(model, tok, loaded.kind, cfg, args.long, cfg.long_prompt_tokens, say)
        md += [f"### Chunked prefill, {args.long} long prompts in the mix", table]
    if "packed" in parts or "hf" in parts:
        table, out["offline"] = part_offline(model, tok, cfg, reqs, "hf" in parts, "packed" in parts, say)
        md += ["### Offline (every request at time 0)", table]
    out["seconds"] = time.perf_counter() - t0
    out["log"] = lines
    md.append(f"machine: {out['machine']}, {out['threads']} torch threads; {out['seconds']:.0f} s")
    atomic_write_text(args.out_dir / "benchmark.md", "\n\n".join(md) + "\n")
    atomic_write_text(args.out_dir / "benchmark.json", json.dumps(out, indent=1, default=str))
    print("\n\n".join(md))
    print(f"wrote {args.out_dir}/benchmark.md, benchmark.json", file=sys.stderr)


if __name__ == "__main__":
    run_cli(main)
