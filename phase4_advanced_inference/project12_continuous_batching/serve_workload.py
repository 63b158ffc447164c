"""Serve a workload with the batching engine: many requests at once, each streamed, timed and checked.

    uv run python phase4_advanced_inference/project12_continuous_batching/serve_workload.py            # 64 requests
    uv run python phase4_advanced_inference/project12_continuous_batching/serve_workload.py --policy static
    uv run python phase4_advanced_inference/project12_continuous_batching/serve_workload.py --policy static --max_rows 1
    uv run python phase4_advanced_inference/project12_continuous_batching/serve_workload.py --rate none --requests 16 \\
        --show 2 --save_trace runs/project12/trace.jsonl
    uv run python phase4_advanced_inference/project12_continuous_batching/serve_workload.py --trace runs/project12/trace.jsonl
    uv run python phase4_advanced_inference/project12_continuous_batching/serve_workload.py \\
        --model data/stories260k/stories260K.bin --max_len 256 --max_prompt 32   # no Alpaca needed: BOS prompts

The workload (workload.py): --requests Alpaca instructions in the model's chat template, Poisson arrivals at
--rate per second (none: all at once), output lengths of mean --mean_output capped at --max_output, each with its
own seed; or --trace FILE. The engine (batch_engine.py) serves them in real time with --policy, --max_rows,
--max_batch_tokens, --chunked_prefill. Prints throughput and TTFT/TPOT p50/p99; --check also runs every request
alone through project 8's engine and compares (greedy: token for token); --show N prints N replies.
"""

from __future__ import annotations

import sys
import time

import torch
from tqdm import tqdm

from course.cli import ArgumentParser, nonneg_int
from course.device import get_device, set_seed
from course.errors import run_cli
from phase1_foundation.project3_pretrain.loading import load_model, load_tokenizer_for
from phase3_core_inference.project8_kv_cache.engine import Engine
from phase4_advanced_inference.project12_continuous_batching import metrics, workload
from phase4_advanced_inference.project12_continuous_batching.batch_engine import BatchEngine
from phase4_advanced_inference.project12_continuous_batching.config import BatchConfig


def build_parser() -> ArgumentParser:
    parser = ArgumentParser(description=__doc__)
    BatchConfig.add_args(parser, default_preset=None)
    parser.add_argument("--check", action="store_true", help="also run each request alone (project 8) and compare")
    parser.add_argument("--show", type=nonneg_int, default=0, help="print this many replies")
    parser.add_argument("--save_trace", default=None, help="write the workload as a JSONL trace first")
    return parser


def main(argv: list[str] | None = None) -> None:
    args = build_parser().parse_args(argv)
    cfg = BatchConfig.from_args(args)
    workload.require(cfg.model, "model")
    set_seed(cfg.seed)
    device = get_device(cfg.device)
    loaded = load_model(cfg.model, device, getattr(torch, cfg.dtype))
    tok = load_tokenizer_for(loaded, cfg.tokenizer)
    model = loaded.model
    max_len = min(cfg.max_len or model.config.block_size, model.config.block_size)
    reqs = workload.from_config(cfg, tok, loaded.kind, max_len)
    if args.save_trace:
        print(f"trace: {workload.save_trace(reqs, args.save_trace)}", file=sys.stderr)
    engine = BatchEngine(model, tok, cfg.max_rows, cfg.max_batch_tokens, cfg.chunked_prefill, cfg.policy, max_len,
                         cfg.packed)
    print(f"[{loaded.kind} model {loaded.path} ({model.num_params() / 1e6:.1f}M params) on {device}, {cfg.dtype}; "
          f"{len(reqs)} requests, {sum(len(r.prompt) for r in reqs):,} prompt tokens; {cfg.policy}, "
          f"max_rows {cfg.max_rows}, budget {cfg.max_batch_tokens}, chunked prefill {cfg.chunked_prefill}]",
          file=sys.stderr)
    with tqdm(total=len(reqs), desc="requests", unit="req", file=sys.stderr) as bar:
        done = engine.run(reqs, realtime=cfg.rate is not None or bool(cfg.trace), progress=bar.update)
    print(metrics.line(cfg.policy, metrics.summarize(done)))
    for r in done[:args.show]:
        print(f"--- {r.id} ({len(r.prompt)} prompt tokens, {len(r.tokens)} new, {r.finish_reason}):\n{r.text}")
    if args.check:
        solo = Engine(model, max_len)
        t0, same = time.perf_counter(), 0
        for r in tqdm(reqs, desc="solo", unit="req", file=sys.stderr):
            g = torch.Generator().manual_seed(r.seed)
            same += list(solo.generate(r.prompt, r.max_new_tokens, r.params, g, stop_ids=r.stop_ids)) == r.tokens
        print(f"check: {same}/{len(reqs)} requests identical to project 8's engine run alone "
              f"({time.perf_counter() - t0:.1f} s one by one)")
        if same < len(reqs) and cfg.temperature == 0:
            print("  (a difference in greedy decoding is a near-tie between two tokens: fp32 batched matrix "
                  "products round differently from batch-1 ones; see the README)", file=sys.stderr)


if __name__ == "__main__":
    run_cli(main)
