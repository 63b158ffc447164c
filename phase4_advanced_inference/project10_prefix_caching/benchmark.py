"""Benchmark the prefix cache on SmolLM2-135M-Instruct: time to first token, prefill time, MMLU wall time, budget.

    uv run python phase4_advanced_inference/project10_prefix_caching/benchmark.py --check   # ~6 min on 2 cores
    uv run python phase4_advanced_inference/project10_prefix_caching/benchmark.py --quick   # a smoke run

Parts (--parts), every peer in the same process, interleaved request by request (the order rotates):
 shared  a ~1,000-token system prompt + few-shot block, then --questions different short questions. Peers: no
         prefix cache, the radix tree, the block-hash store; every request a new sequence (the engine's own cache
         reset first, so what is reused comes from the store). TTFT median and p90, hit rate, same outputs.
 chat    a --turns-turn conversation (the model's chat template, greedy replies of <= --reply_tokens tokens).
         Peers: prefill everything each turn; project 8's engine keeping the last sequence; the radix tree with
         a new request per turn (a server does not pin a conversation between turns). Prefill time summed.
 mmlu    MMLU 5-shot on --mmlu_subjects: project 4's harness (batch --mmlu_batch) vs the same scorer through the
         radix tree (few_shot.py), ABBA over two halves of the questions; accuracy and picks compared.
 budget  questions of 4 subjects, each behind its own 5-shot block, round-robin and random, through the radix
         tree at budgets below and above the working set (the 4 blocks): hit rate and median TTFT per budget
         (PNG), beside project 8's last-sequence reuse.
Writes <out_dir>/benchmark.md, benchmark.json and the PNGs (atomically). The machine is shared with other jobs
here: the ratios are what to read; the peers of a part ran side by side, the absolute times drift.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path

import torch

from course.bench import markdown_table
from course.checkpoint import atomic_write_text
from course.cli import ArgumentParser, float_in, out_dir, positive_int
from course.device import machine_summary, set_seed
from course.errors import CourseError, run_cli
from course.plots import plot_curves
from phase1_foundation.project3_pretrain.loading import load_model, load_tokenizer_for
from phase2_finetuning.project4_sft.harness import tasks
from phase2_finetuning.project4_sft.harness.multiple_choice import evaluate_multiple_choice
from phase3_core_inference.project8_kv_cache.engine import Engine
from phase4_advanced_inference.project10_prefix_caching import workloads
from phase4_advanced_inference.project10_prefix_caching.block_hash import BlockHashCache
from phase4_advanced_inference.project10_prefix_caching.few_shot import evaluate_multiple_choice_cached
from phase4_advanced_inference.project10_prefix_caching.prefix_engine import PrefixCachingEngine
from phase4_advanced_inference.project10_prefix_caching.radix_cache import RadixCache

MODEL = "data/smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"
OUT = "checkpoints/project10/bench"
PARTS = ("shared", "chat", "mmlu", "budget")
MMLU = "high_school_statistics,college_computer_science,machine_learning"
SWEEP = "world_religions,management,conceptual_physics,human_aging"
TARGETS = {"ttft_median": 5.0, "ttft_p90": 5.0}  # issue 20: with the cache >= 5x faster (median and p90)


def comma_list(text: str) -> list[str]:
    return [t.strip() for t in text.split(",") if t.strip()]


def parts_list(text: str) -> list[str]:
    parts = comma_list(text)
    if not parts or any(p not in PARTS for p in parts):
        raise argparse.ArgumentTypeError(f"expected a comma-separated list of {','.join(PARTS)}, got '{text}'")
    return parts


def positive_floats(text: str) -> list[float]:
    try:
        xs = [float(x) for x in comma_list(text)]
    except ValueError:
        xs = []
    if not xs or any(not (0 < x < float("inf")) for x in xs):
        raise argparse.ArgumentTypeError(f"expected comma-separated numbers > 0, got '{text}'")
    return xs


def warm_up(engine: Engine, tok, stop: set[int], reuse: bool) -> None:
    """One short request that shares nothing with the workloads (first calls allocate); counters zeroed."""
    request(engine, tok.encode("Warm up the allocator, please.", bos=False), 2, stop, reuse, True)
    engine.reset()
    if isinstance(engine, PrefixCachingEngine):
        engine.store.hit_tokens = engine.store.miss_tokens = 0


def p90(xs: list[float]) -> float:
    return statistics.quantiles(xs, n=10, method="inclusive")[-1] if len(xs) > 1 else xs[0]


def request(engine: Engine, ids: list[int], n: int, stop: set[int], reuse: bool, fresh: bool) -> dict:
    """One request: TTFT (call -> first token), all its tokens, prefilled tokens, prefill and total seconds."""
    if fresh:
        engine.reset()
    t0 = time.perf_counter()
    gen = engine.generate(ids, n, stop_ids=stop, reuse_cache=reuse)
    first = next(gen)
    ttft = time.perf_counter() - t0
    toks = [first] + list(gen)  # exhausting the generator also inserts into the prefix cache
    s = engine.stats
    return {"ttft": ttft, "total": time.perf_counter() - t0, "tokens": toks, "prefill_s": s.prefill_s,
            "prefilled": s.prompt_tokens - s.reused_tokens, "prompt": s.prompt_tokens}


def rotate(names: list[str], i: int) -> list[str]:
    """Peer order for round i: every peer goes first as often as the others (drift hits all alike)."""
    k = i % len(names)
    return names[k:] + names[:k]


# ---- shared system prompt ------------------------------------------------------------------------------------
def shared_part(model, tok, args, stop) -> dict:
    prompts, sys_len = workloads.shared_prompt(tok, args.data_dir, args.prefix_tokens, args.questions)
    max_len = max(map(len, prompts)) + args.new_tokens + 1
    mb = args.prefix_cache_mb
    peers = {"no prefix cache": (Engine(model, max_len), False),
             "radix tree": (PrefixCachingEngine(model, RadixCache.for_model(model, mb), max_len), True),
             f"block hash ({args.block_size})": (PrefixCachingEngine(
                 model, BlockHashCache.for_model(model, mb, block_size=args.block_size), max_len), True)}
    names = list(peers)
    for engine, reuse in peers.values():
        warm_up(engine, tok, stop, reuse)
    runs = {n: [] for n in names}
    for i, ids in enumerate(prompts):
        print(f"  request {i + 1}/{len(prompts)} ({len(ids)} tokens)", end="\r", flush=True)
        for name in rotate(names, i):
            engine, reuse = peers[name]
            runs[name].append(request(engine, ids, args.new_tokens, stop, reuse, fresh=True))
    print()
    base = runs[names[0]]
    rows = []
    for name in names:
        r, engine = runs[name], peers[name][0]
        ttft = [x["ttft"] for x in r]
        row = {"peer": name, "requests": len(r), "ttft_median": statistics.median(ttft), "ttft_p90": p90(ttft),
               "prefilled_per_request": statistics.mean(x["prefilled"] for x in r),
               "same_outputs": sum(x["tokens"] == b["tokens"] for x, b in zip(r, base)),
               "hit_rate": engine.store.hit_rate if isinstance(engine, PrefixCachingEngine) else 0.0,
               "store": engine.store.counters() if isinstance(engine, PrefixCachingEngine) else None}
        rows.append(row)
    for row in rows:
        row["speedup_median"] = rows[0]["ttft_median"] / row["ttft_median"]
        row["speedup_p90"] = rows[0]["ttft_p90"] / row["ttft_p90"]
    return {"system_tokens": sys_len, "prompt_tokens": [len(p) for p in prompts], "rows": rows}


# ---- multi-turn chat -------------------------------------------------------------------------------------------
def chat_part(model, tok, args, stop) -> dict:
    turns = workloads.CHAT_TURNS[:args.turns]
    max_len = min(4096, model.config.block_size)
    peers = {"prefill everything": (Engine(model, max_len), False, True),
             "project 8 (keeps the last sequence)": (Engine(model, max_len), True, False),
             "radix tree (a new request per turn)": (
                 PrefixCachingEngine(model, RadixCache.for_model(model, args.prefix_cache_mb), max_len), True, True)}
    names = list(peers)
    for engine, reuse, _ in peers.values():
        warm_up(engine, tok, stop, reuse)
    msgs = {n: [] for n in names}
    runs = {n: [] for n in names}
    for t, text in enumerate(turns):
        print(f"  turn {t + 1}/{len(turns)}", end="\r", flush=True)
        for name in rotate(names, t):
            engine, reuse, fresh = peers[name]
            msgs[name].append({"role": "user", "content": text})
            r = request(engine, workloads.chat_ids(tok, msgs[name]), args.reply_tokens, stop, reuse, fresh)
            reply = tok.decode([x for x in r["tokens"] if x not in stop])
            msgs[name].append({"role": "assistant", "content": reply.strip()})
            runs[name].append(r)
    print()
    base = runs[names[0]]
    rows = [{"peer": n, "turns": len(turns), "prefill_s": sum(x["prefill_s"] for x in runs[n]),
             "ttft_s": sum(x["ttft"] for x in runs[n]), "prefilled": sum(x["prefilled"] for x in runs[n]),
             "last_turn_prefilled": runs[n][-1]["prefilled"], "last_prompt": runs[n][-1]["prompt"],
             "same_outputs": sum(x["tokens"] == b["tokens"] for x, b in zip(runs[n], base))} for n in names]
    for row in rows:
        row["speedup"] = rows[0]["prefill_s"] / row["prefill_s"]
    return {"rows": rows}


# ---- MMLU 5-shot -----------------------------------------------------------------------------------------------
def mmlu_part(model, tok, args) -> dict:
    items = tasks.subset(tasks.load_mmlu("test", 5, args.mmlu_subjects, args.data_dir), args.mmlu_limit, args.seed,
                         key=lambda it: it.subject)
    halves = [items[0::2], items[1::2]]
    plain = lambda half: evaluate_multiple_choice(model, tok, half, "mmlu", progress=False,  # noqa: E731
                                                  batch_size=args.mmlu_batch)
    store = {}

    def cached(half):
        store["s"] = RadixCache.for_model(model, args.prefix_cache_mb)
        return evaluate_multiple_choice_cached(model, tok, half, "mmlu", store["s"], progress=False)
    res = {"harness": [], "cached": []}
    hits = []
    for order in (("harness", "cached"), ("cached", "harness")):  # ABBA: A B on one half, B A on the other
        half = halves[len(res["harness"])]
        for side in order:
            res[side].append(plain(half) if side == "harness" else cached(half))
            if side == "cached":
                hits.append(store["s"].counters())
    picks = {side: [p for r in rs for p in r.extra["picks"]] for side, rs in res.items()}
    truth = [it.answer for half in halves for it in half]
    acc = {side: sum(p == t for p, t in zip(ps, truth)) / len(truth) for side, ps in picks.items()}
    secs = {side: sum(r.seconds for r in rs) for side, rs in res.items()}
    hit = sum(h["hit_tokens"] for h in hits) / sum(h["hit_tokens"] + h["miss_tokens"] for h in hits)
    return {"questions": len(items), "subjects": args.mmlu_subjects, "accuracy": acc, "seconds": secs,
            "picks_differ": sum(a != b for a, b in zip(picks["harness"], picks["cached"])),
            "speedup": secs["harness"] / secs["cached"], "hit_rate": hit, "batch_size": args.mmlu_batch}


# ---- budget sweep ----------------------------------------------------------------------------------------------
def budget_part(model, tok, args, stop) -> dict:
    subjects = args.sweep_subjects
    per_token = RadixCache.for_model(model, 1).spec.bytes_per_token()
    orders = {o: workloads.subject_requests(tok, args.data_dir, subjects, args.sweep_requests, o, args.seed)
              for o in ("round-robin", "random")}
    heads = {}
    for s, ids in orders["round-robin"]:
        heads[s] = ids if s not in heads else ids[:workloads.common_prefix(heads[s], ids)]
    working_mb = sum(map(len, heads.values())) * per_token / 2**20
    budgets = [round(f * working_mb, 1) for f in args.budget_fractions]
    max_len = max(len(ids) for reqs in orders.values() for _, ids in reqs) + 2
    out = {"subjects": subjects, "prefix_tokens": {s: len(h) for s, h in heads.items()}, "working_set_mb": working_mb,
           "budgets_mb": budgets, "orders": {}}
    for order, reqs in orders.items():
        rows = []
        last = Engine(model, max_len)  # project 8: reuse only what the previous request left in its cache
        engines = [PrefixCachingEngine(model, RadixCache.for_model(model, mb), max_len) for mb in budgets]
        for engine in [last, *engines]:
            warm_up(engine, tok, stop, True)
        runs = {k: [] for k in range(len(budgets) + 1)}
        for i, (_, ids) in enumerate(reqs):  # every budget and the baseline take each request in turn
            print(f"  {order}: request {i + 1}/{len(reqs)}", end="\r", flush=True)
            for k in rotate(list(runs), i):
                engine = last if k == len(budgets) else engines[k]
                runs[k].append(request(engine, ids, 1, stop, True, fresh=engine is not last))
        print()
        for k, mb in enumerate(budgets):
            st = engines[k].store
            rows.append({"budget_mb": mb, "hit_rate": st.hit_rate, "evictions": st.evictions,
                         "ttft_median": statistics.median(x["ttft"] for x in runs[k])})
        base = runs[len(budgets)]
        out["orders"][order] = {"rows": rows, "last_sequence": {
            "hit_rate": 1 - sum(x["prefilled"] for x in base) / sum(x["prompt"] for x in base),
            "ttft_median": statistics.median(x["ttft"] for x in base)}}
    return out


# ---- report ----------------------------------------------------------------------------------------------------
def markdown(res: dict, args) -> str:
    lines = [f"Machine: {args.machine}; {torch.get_num_threads()} thread(s), fp32, batch 1, greedy. Shared with other "
             "jobs: compare the peers of a table (interleaved in one run), not absolute times across tables.", ""]
    if "shared" in res:
        s = res["shared"]
        lines += [f"**Shared system prompt** ({s['system_tokens']} tokens) + {len(s['prompt_tokens'])} different "
                  f"questions (prompts {min(s['prompt_tokens'])}-{max(s['prompt_tokens'])} tokens), "
                  f"{args.new_tokens} new tokens each:", "",
                  markdown_table(["peer", "TTFT median (s)", "TTFT p90 (s)", "speed-up median", "speed-up p90",
                                  "prefilled / request", "hit rate", "same outputs"],
                                 [[r["peer"], f"{r['ttft_median']:.3f}", f"{r['ttft_p90']:.3f}",
                                   f"{r['speedup_median']:.1f}x", f"{r['speedup_p90']:.1f}x",
                                   f"{r['prefilled_per_request']:.0f}", f"{100 * r['hit_rate']:.1f}%",
                                   f"{r['same_outputs']}/{r['requests']}"] for r in s["rows"]], "lrrrrrrr"), ""]
    if "chat" in res:
        lines += [f"**{res['chat']['rows'][0]['turns']}-turn chat** (<= {args.reply_tokens}-token replies):", "",
                  markdown_table(["peer", "prefill total (s)", "speed-up", "tokens prefilled", "last turn prefilled",
                                  "same outputs"],
                                 [[r["peer"], f"{r['prefill_s']:.2f}", f"{r['speedup']:.1f}x", r["prefilled"],
                                   f"{r['last_turn_prefilled']} of {r['last_prompt']}",
                                   f"{r['same_outputs']}/{r['turns']}"] for r in res["chat"]["rows"]], "lrrrrr"), ""]
    if "mmlu" in res:
        m = res["mmlu"]
        lines += [f"**MMLU 5-shot**, {m['questions']} questions of {', '.join(m['subjects'])} (ABBA over two halves):",
                  "", markdown_table(["scorer", "wall time (s)", "accuracy", "speed-up"],
                                     [[f"project 4's harness (batch {m['batch_size']})",
                                       f"{m['seconds']['harness']:.1f}", f"{100 * m['accuracy']['harness']:.2f}%",
                                       "1.0x"],
                                      [f"the same through the radix tree (hit rate {100 * m['hit_rate']:.1f}%)",
                                       f"{m['seconds']['cached']:.1f}", f"{100 * m['accuracy']['cached']:.2f}%",
                                       f"{m['speedup']:.1f}x"]], "lrrr"),
                  f"", f"Picks that differ: {m['picks_differ']} of {m['questions']}.", ""]
    if "budget" in res:
        b = res["budget"]
        lines += [f"**Budget sweep**: {len(b['subjects'])} subjects' 5-shot blocks ({b['prefix_tokens']} tokens; "
                  f"working set {b['working_set_mb']:.1f} MiB), {args.sweep_requests} requests per order:", ""]
        rows = []
        for order, o in b["orders"].items():
            rows += [[order, f"{r['budget_mb']:.1f}", f"{100 * r['hit_rate']:.1f}%", r["evictions"],
                      f"{r['ttft_median']:.3f}"] for r in o["rows"]]
            rows.append([order, "project 8, last sequence", f"{100 * o['last_sequence']['hit_rate']:.1f}%", "-",
                         f"{o['last_sequence']['ttft_median']:.3f}"])
        lines += [markdown_table(["order", "budget (MiB)", "hit rate", "evictions", "TTFT median (s)"], rows, "lrrrr"),
                  ""]
    return "\n".join(lines)


def plots(budget: dict, out: Path) -> None:
    xs = budget["budgets_mb"]
    for key, ylabel, name, scale in (("hit_rate", "hit rate (% of prompt tokens)", "budget_hit_rate.png", 100),
                                     ("ttft_median", "median time to first token (s)", "budget_ttft.png", 1)):
        curves = {}
        for order, o in budget["orders"].items():
            curves[f"radix tree, {order}"] = (xs, [scale * r[key] for r in o["rows"]])
            curves[f"project 8 (last sequence), {order}"] = (xs, [scale * o["last_sequence"][key]] * len(xs))
        plot_curves(out / name, curves, title=f"working set {budget['working_set_mb']:.0f} MiB "
                    f"({len(budget['subjects'])} 5-shot blocks)", xlabel="prefix cache budget (MiB)", ylabel=ylabel)


def verdicts(res: dict) -> list[str]:
    out = []
    if "shared" in res:
        radix = next(r for r in res["shared"]["rows"] if r["peer"] == "radix tree")
        for key in ("ttft_median", "ttft_p90"):
            v = radix[f"speedup_{key[5:]}"]
            out.append(f"target TTFT {key[5:]} speed-up: {v:.1f}x vs >= {TARGETS[key]:.1f}x: "
                       f"{'met' if v >= TARGETS[key] else 'MISSED'}")
        out.append(f"target same outputs: {radix['same_outputs']}/{radix['requests']}: "
                   f"{'met' if radix['same_outputs'] == radix['requests'] else 'MISSED'}")
    if "mmlu" in res:
        m = res["mmlu"]
        same = m["accuracy"]["harness"] == m["accuracy"]["cached"]
        out.append(f"target MMLU accuracy identical: {100 * m['accuracy']['harness']:.2f}% vs "
                   f"{100 * m['accuracy']['cached']:.2f}%: {'met' if same else 'MISSED'}")
    return out


def build_parser() -> ArgumentParser:
    p = ArgumentParser(description=__doc__)
    p.add_argument("--model", default=MODEL, help="default: %(default)s")
    p.add_argument("--parts", type=parts_list, default=list(PARTS),
                   help=f"comma-separated, of {','.join(PARTS)} (default: all)")
    p.add_argument("--questions", type=positive_int, default=50)
    p.add_argument("--prefix_tokens", type=positive_int, default=1000, help="system prompt length (default 1000)")
    p.add_argument("--new_tokens", type=positive_int, default=8, help="new tokens per question (default 8)")
    p.add_argument("--turns", type=positive_int, default=10, help="chat turns (1-10, default 10)")
    p.add_argument("--reply_tokens", type=positive_int, default=16)
    p.add_argument("--mmlu_subjects", type=comma_list, default=comma_list(MMLU))
    p.add_argument("--mmlu_limit", type=positive_int, default=60)
    p.add_argument("--mmlu_batch", type=positive_int, default=16, help="project 4's harness rows per forward")
    p.add_argument("--sweep_subjects", type=comma_list, default=comma_list(SWEEP))
    p.add_argument("--sweep_requests", type=positive_int, default=16)
    p.add_argument("--budget_fractions", type=positive_floats,
                   default=[0.3, 0.6, 0.9, 1.2, 2.0], help="budgets as fractions of the sweep's working set")
    p.add_argument("--prefix_cache_mb", type=float_in(0, float("inf"), lo_open=True), default=512.0)
    p.add_argument("--block_size", type=positive_int, default=16, help="tokens per block of the block-hash store")
    p.add_argument("--data_dir", default="data")
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
    if args.turns > len(workloads.CHAT_TURNS):
        raise CourseError(f"--turns ({args.turns}) must be at most {len(workloads.CHAT_TURNS)}")
    if args.quick:
        args.questions, args.prefix_tokens, args.turns, args.reply_tokens = 4, 200, 3, 6
        args.mmlu_limit, args.sweep_requests, args.budget_fractions = 6, 8, [0.5, 2.0]
    set_seed(args.seed)
    args.machine = args.machine or machine_summary()
    print(f"{args.machine}, {torch.get_num_threads()} thread(s)")
    loaded = load_model(args.model, "cpu", torch.float32)
    model, tok = loaded.model, load_tokenizer_for(loaded)
    stop = {tok.eos_id} if tok.eos_id is not None else set()
    res, t0 = {}, time.perf_counter()
    for part in PARTS:
        if part in args.parts:
            print(f"{part}:", flush=True)
            fn = {"shared": shared_part, "chat": chat_part, "budget": budget_part}.get(part)
            res[part] = mmlu_part(model, tok, args) if part == "mmlu" else fn(model, tok, args, stop)
    res["seconds"] = time.perf_counter() - t0
    out = Path(args.out_dir)
    name = "benchmark_quick" if args.quick else "benchmark"
    md = markdown(res, args)
    atomic_write_text(out / f"{name}.md", md)
    atomic_write_text(out / f"{name}.json", json.dumps({"machine": args.machine, "args": {
        k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()}, **res}, indent=2, default=str))
    if "budget" in res:
        plots(res["budget"], out)
    print(md)
    said = [f"ran {res['seconds']:.0f} s"]
    if "shared" in res:
        r = res["shared"]["rows"][1]
        said.append(f"TTFT {r['speedup_median']:.1f}x median / {r['speedup_p90']:.1f}x p90 with the radix tree "
                    f"(hit rate {100 * r['hit_rate']:.1f}%)")
    if "chat" in res:
        said.append(f"chat prefill {res['chat']['rows'][2]['speedup']:.1f}x")
    if "mmlu" in res:
        said.append(f"MMLU {res['mmlu']['speedup']:.1f}x, {res['mmlu']['picks_differ']} picks differ")
    print("summary: " + "; ".join(said) + f"; written to {out}")
    if args.check:
        for line in verdicts(res):
            print(line)


if __name__ == "__main__":
    run_cli(main)
