"""Benchmark speculative decoding on SmolLM2-135M-Instruct: speed-up, acceptance, k, and transformers beside it.

    uv run python phase4_advanced_inference/project11_speculative/benchmark.py --check   # ~15 min on 2 cores
    uv run python phase4_advanced_inference/project11_speculative/benchmark.py --quick   # a smoke run

Three prompt sets (workloads.py: input-grounded, open chat, code), each prompt a chat turn, --new_tokens each.
Part 1, every prompt through every peer in turn (the order rotates from prompt to prompt, so a slow phase of a
shared machine hits all alike), greedy and at each of --temperatures:
  plain          project 8's Engine (eager): one target forward per token
  lookup         prompt lookup, k = --k; and lookup with adaptive k
  self           the target's layers --draft_layers as the draft (default: the first third)
  hf plain / hf lookup / hf assisted   (greedy only) transformers' generate() on the same weights: plain,
                 prompt_lookup_num_tokens = k, and assistant_model = the same early-exit draft as ours, k per round
Speed-up = a peer's tokens/s over its own plain peer's (ours over project 8's engine, HF's over HF's generate()),
tokens/s = new tokens over wall time including the prefill. Greedy outputs are compared with plain decoding.
Part 2 (--sweep_k): speed-up against k for lookup and self on the grounded prompts, greedy (a PNG).
Writes <out_dir>/benchmark.md, benchmark.json and speedup_vs_k.png (atomically).
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch

from course.bench import markdown_table
from course.checkpoint import atomic_write_text
from course.cli import ArgumentParser, nonneg_float, out_dir, positive_int
from course.device import machine_summary, set_seed
from course.errors import CourseError, run_cli
from course.plots import plot_curves
from phase1_foundation.project3_pretrain.loading import load_model, load_tokenizer_for
from phase3_core_inference.project8_kv_cache.engine import Engine
from phase3_core_inference.project8_kv_cache.sampling import SamplingParams
from phase4_advanced_inference.project11_speculative import hf_peers, workloads
from phase4_advanced_inference.project11_speculative.drafters import build_drafter, default_layers
from phase4_advanced_inference.project11_speculative.speculative import SpeculativeEngine

MODEL = "data/smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"
OUT = "checkpoints/project11/bench"
TARGET_LOOKUP = 2.0  # issue 21: prompt lookup >= 2x plain decoding on the input-grounded set, greedy


def comma_list(kind):
    def parse(text: str):
        try:
            xs = [kind(t) for t in text.split(",") if t.strip()]
        except ValueError:
            xs = []
        if not xs:
            raise argparse.ArgumentTypeError(f"expected a comma-separated list, got '{text}'")
        return xs
    return parse


def task_list(text: str) -> list[str]:
    tasks = [t.strip() for t in text.split(",") if t.strip()]
    if not tasks or any(t not in workloads.TASKS for t in tasks):
        raise argparse.ArgumentTypeError(f"expected a comma-separated list of {','.join(workloads.TASKS)}, got '{text}'")
    return tasks


def positive_ints(text: str) -> list[int]:
    xs = comma_list(int)(text)
    if any(x <= 0 for x in xs):
        raise argparse.ArgumentTypeError(f"expected comma-separated integers > 0, got '{text}'")
    return xs


def rotate(names: list[str], i: int) -> list[str]:
    k = i % len(names)
    return names[k:] + names[:k]


class Peer:
    """One way of decoding: run(prompt, params, seed) -> (tokens, seconds, stats or None)."""

    def __init__(self, name: str, base: str, run):
        self.name, self.base, self.run = name, base, run


def our_peer(name: str, engine: Engine, n: int, stop: set[int]) -> Peer:
    def run(prompt, params, seed):
        gen = torch.Generator().manual_seed(seed)
        t0 = time.perf_counter()
        toks = list(engine.generate(prompt, n, params, gen, stop_ids=stop))
        s = engine.stats
        stats = (s.drafted, s.accepted, s.target_forwards) if isinstance(engine, SpeculativeEngine) else None
        return toks, time.perf_counter() - t0, stats
    return Peer(name, "plain", run)


def hf_peer(name: str, hf, n: int, stop: set[int], **kw) -> Peer:
    def run(prompt, params, seed):
        t0 = time.perf_counter()
        toks = hf_peers.hf_generate(hf, prompt, n, stop, **kw)
        return toks, time.perf_counter() - t0, None
    return Peer(name, "hf plain", run)


def measure(peers: list[Peer], prompts: list[list[int]], params: SamplingParams, seed: int, label: str) -> list[dict]:
    """Every prompt through every peer (order rotating); one row of totals per peer."""
    runs = {p.name: [] for p in peers}
    by_name = {p.name: p for p in peers}
    for i, prompt in enumerate(prompts):
        print(f"  {label}: prompt {i + 1}/{len(prompts)} ({len(prompt)} tokens)", end="\r", flush=True)
        for name in rotate(list(runs), i):
            runs[name].append(by_name[name].run(prompt, params, seed + i))
    print()
    rows = []
    for p in peers:
        r = runs[p.name]
        toks, secs = sum(len(x[0]) for x in r), sum(x[1] for x in r)
        row = {"peer": p.name, "tokens": toks, "seconds": secs, "tok_s": toks / secs, "outputs": [x[0] for x in r]}
        st = [x[2] for x in r if x[2] is not None]
        if st:
            drafted, accepted, forwards = (sum(s[j] for s in st) for j in range(3))
            row.update(acceptance=accepted / max(drafted, 1), mean_accepted=accepted / max(forwards, 1),
                       tokens_per_forward=(toks - len(r)) / max(forwards, 1))
        rows.append(row)
    for row, p in zip(rows, peers):
        base = next(x for x in rows if x["peer"] == p.base)
        row["speedup"] = row["tok_s"] / base["tok_s"]
        if params.greedy:
            row["same_outputs"] = sum(a == b for a, b in zip(row["outputs"], base["outputs"]))
            row["same_as_ours"] = sum(a == b for a, b in zip(row["outputs"], rows[0]["outputs"]))
    for row in rows:
        del row["outputs"]
    return rows


def main_part(model, prompts, args, stop, hf) -> dict:
    max_len = max(len(p) for ps in prompts.values() for p in ps) + args.new_tokens + 1
    layers = args.draft_layers or default_layers(model.config.n_layer)
    n = args.new_tokens
    ours = [our_peer("plain", Engine(model, max_len), n, stop),
            our_peer(f"lookup k={args.k}", SpeculativeEngine(model, build_drafter("lookup", model, max_len), args.k,
                                                             max_len), n, stop),
            our_peer(f"lookup adaptive k={args.k}..{2 * args.k}", SpeculativeEngine(
                model, build_drafter("lookup", model, max_len), args.k, max_len, adaptive=True), n, stop),
            our_peer(f"self {layers} k={args.k}", SpeculativeEngine(
                model, build_drafter("self", model, max_len, layers=layers), args.k, max_len), n, stop)]
    theirs = []
    if hf is not None:
        draft = build_drafter("self", model, max_len, layers=layers).model
        theirs = [hf_peer("hf plain", hf, n, stop), hf_peer(f"hf lookup k={args.k}", hf, n, stop, lookup_k=args.k),
                  hf_peer(f"hf assisted (self {layers}) k={args.k}", hf, n, stop,
                          assistant=hf_peers.hf_sharing(draft), assistant_k=args.k)]
    out = {}
    for t in args.temperatures:
        params = SamplingParams(temperature=t)
        for task, ps in prompts.items():
            peers = ours + (theirs if params.greedy else [])
            out[f"{task} T={t:g}"] = measure(peers, ps, params, args.seed, f"{task}, temperature {t:g}")
    return {"layers": layers, "tables": out}


def sweep_part(model, prompts, args, stop) -> dict:
    max_len = max(len(p) for p in prompts) + args.new_tokens + 1
    layers = args.draft_layers or default_layers(model.config.n_layer)
    peers = [our_peer("plain", Engine(model, max_len), args.new_tokens, stop)]
    for kind in ("lookup", "self"):
        for k in args.sweep_k:
            drafter = build_drafter(kind, model, max_len, layers=layers)
            peers.append(our_peer(f"{kind} k={k}", SpeculativeEngine(model, drafter, k, max_len), args.new_tokens, stop))
    rows = measure(peers, prompts, SamplingParams(temperature=0.0), args.seed, "k sweep, grounded, greedy")
    return {"k": args.sweep_k, "layers": layers, "rows": rows}


def markdown(res: dict, args) -> str:
    lines = [f"Machine: {args.machine}; {torch.get_num_threads()} thread(s), fp32, batch 1; {args.new_tokens} new "
             f"tokens per prompt (or up to EOS), {args.per_task} prompts per set; load average at start "
             f"{res['load_start']}, at end {res['load_end']}.", ""]
    for name, rows in res["main"]["tables"].items():
        lines += [f"**{name}**", "", markdown_table(
            ["peer", "tok/s", "speed-up", "acceptance", "mean accepted", "tokens / target forward", "same greedy output"],
            [[r["peer"], f"{r['tok_s']:.1f}", f"{r['speedup']:.2f}x",
              f"{100 * r['acceptance']:.1f}%" if "acceptance" in r else "-",
              f"{r['mean_accepted']:.2f}" if "mean_accepted" in r else "-",
              f"{r['tokens_per_forward']:.2f}" if "tokens_per_forward" in r else "-",
              f"{r['same_outputs']}/{args.per_task}" if "same_outputs" in r else "-"] for r in rows], "lrrrrrr"), ""]
    if "sweep" in res:
        rows = res["sweep"]["rows"]
        lines += ["**Speed-up against k** (grounded, greedy)", "", markdown_table(
            ["peer", "tok/s", "speed-up", "acceptance", "tokens / target forward"],
            [[r["peer"], f"{r['tok_s']:.1f}", f"{r['speedup']:.2f}x",
              f"{100 * r['acceptance']:.1f}%" if "acceptance" in r else "-",
              f"{r['tokens_per_forward']:.2f}" if "tokens_per_forward" in r else "-"] for r in rows], "lrrrr"), ""]
    return "\n".join(lines)


def verdicts(res: dict, args) -> list[str]:
    out = []
    table = res["main"]["tables"].get("grounded T=0")
    if table:
        look = next(r for r in table if r["peer"].startswith("lookup k="))
        out.append(f"target lookup >= {TARGET_LOOKUP:.1f}x on grounded, greedy: {look['speedup']:.2f}x: "
                   f"{'met' if look['speedup'] >= TARGET_LOOKUP else 'MISSED'}")
        out.append(f"target identical greedy output: {look['same_outputs']}/{args.per_task}: "
                   f"{'met' if look['same_outputs'] == args.per_task else 'MISSED'}")
        hf = next((r for r in table if r["peer"].startswith("hf lookup")), None)
        if hf:
            out.append(f"target ours >= transformers' speed-up (prompt lookup, grounded): {look['speedup']:.2f}x vs "
                       f"{hf['speedup']:.2f}x: {'met' if look['speedup'] >= hf['speedup'] else 'MISSED'}")
    return out


def load_average() -> str:
    try:
        return " ".join(Path("/proc/loadavg").read_text().split()[:3])
    except OSError:
        return "unknown"


def build_parser() -> ArgumentParser:
    p = ArgumentParser(description=__doc__)
    p.add_argument("--model", default=MODEL, help="default: %(default)s")
    p.add_argument("--tasks", type=task_list, default=list(workloads.TASKS), help="default: all three sets")
    p.add_argument("--per_task", type=positive_int, default=3, help="prompts per set (1-4, default 3)")
    p.add_argument("--new_tokens", type=positive_int, default=96)
    p.add_argument("--k", type=positive_int, default=4, help="tokens drafted per target forward (default 4)")
    p.add_argument("--draft_layers", default=None, help="self-speculation's layers (default: the first third)")
    p.add_argument("--temperatures", type=comma_list(nonneg_float), default=[0.0, 0.7])
    p.add_argument("--sweep_k", type=positive_ints, default=[1, 2, 3, 4, 6, 8])
    p.add_argument("--sweep_prompts", type=positive_int, default=2, help="grounded prompts in the k sweep")
    p.add_argument("--no_sweep", action="store_true", help="skip the k sweep")
    p.add_argument("--no_hf", action="store_true", help="skip transformers' peers")
    p.add_argument("--threads", type=positive_int, default=None, help="torch threads (default: torch's)")
    p.add_argument("--out_dir", type=out_dir, default=Path(OUT))
    p.add_argument("--machine", default=None, help="machine description for the table (default: detected)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--device", default="cpu", help="only cpu is measured here")
    p.add_argument("--quick", action="store_true", help="small counts: a smoke test, not the numbers")
    p.add_argument("--check", action="store_true", help="also print the quality bar: met / MISSED")
    return p


def main(argv: list[str] | None = None) -> None:
    args = build_parser().parse_args(argv)
    if args.device != "cpu":
        raise CourseError("benchmark.py measures the CPU only; use --device cpu")
    if args.per_task > 4:
        raise CourseError(f"--per_task ({args.per_task}) must be at most 4 (the prompts of a set)")
    if args.quick:
        args.per_task, args.new_tokens, args.sweep_k, args.sweep_prompts = 1, 12, [1, 4], 1
    if args.threads:
        torch.set_num_threads(args.threads)
    set_seed(args.seed)
    args.machine = args.machine or machine_summary()
    print(f"{args.machine}, {torch.get_num_threads()} thread(s)")
    loaded = load_model(args.model, "cpu", torch.float32)
    model, tok = loaded.model, load_tokenizer_for(loaded)
    if args.draft_layers:
        from phase4_advanced_inference.project11_speculative.drafters import parse_layers
        parse_layers(args.draft_layers, model.config.n_layer)  # one line before anything runs
    stop = {tok.eos_id} if tok.eos_id is not None else set()
    prompts = workloads.task_prompts(tok, args.tasks, args.per_task)
    hf = None if args.no_hf else hf_peers.hf_sharing(model)
    res, t0 = {"load_start": load_average()}, time.perf_counter()
    res["main"] = main_part(model, prompts, args, stop, hf)
    if not args.no_sweep:
        grounded = workloads.task_prompts(tok, ["grounded"], args.sweep_prompts)["grounded"]
        res["sweep"] = sweep_part(model, grounded, args, stop)
    res["seconds"], res["load_end"] = time.perf_counter() - t0, load_average()
    out = Path(args.out_dir)
    name = "benchmark_quick" if args.quick else "benchmark"
    md = markdown(res, args)
    atomic_write_text(out / f"{name}.md", md)
    atomic_write_text(out / f"{name}.json", json.dumps({"machine": args.machine, "threads": torch.get_num_threads(),
                                                        "args": {k: (str(v) if isinstance(v, Path) else v)
                                                                 for k, v in vars(args).items()}, **res}, indent=2))
    if "sweep" in res:
        rows = {r["peer"]: r["speedup"] for r in res["sweep"]["rows"]}
        ks = res["sweep"]["k"]
        curves = {f"{kind}": (ks, [rows[f"{kind} k={k}"] for k in ks]) for kind in ("lookup", "self")}
        curves["plain"] = (ks, [1.0] * len(ks))
        plot_curves(out / ("speedup_vs_k_quick.png" if args.quick else "speedup_vs_k.png"), curves,
                    title=f"speculative decoding, grounded prompts, greedy ({res['sweep']['layers']} for self)",
                    xlabel="k (tokens drafted per target forward)", ylabel="speed-up over plain decoding")
    print(md)
    print(f"summary: ran {res['seconds']:.0f} s; written to {out}")
    if args.check:
        for line in verdicts(res, args):
            print(line)


if __name__ == "__main__":
    run_cli(main)
