"""Benchmark SmolLM2-135M-Instruct from its GGUF file: ours (project 3's gguf_io + project 8's engine) beside
transformers (its GGUF loader + generate()), in one run, on the same file.

    uv run python phase3_core_inference/project8_kv_cache/benchmark_gguf.py            # alone on the machine
    uv run python phase3_core_inference/project8_kv_cache/benchmark_gguf.py --quick    # a smoke run

Measured (fp32 weights after de-quantization, batch 1, 2 threads, greedy):
 1. load time: file -> model in eval mode, ours (load_model) vs transformers (from_pretrained(gguf_file=...)),
    interleaved, best of --rounds; each also in a fresh process for its peak RSS (VmHWM, load + a short
    generation), so one side's memory does not count against the other.
 2. decode tokens/s after a chat prompt (the file's template): ours plain (Engine's eager step), ours fast
    (fast_decode's compiled step), transformers generate(); decode tok/s = (N - 1) / (time(N new tokens) -
    time(1 new token)) for all three (prefill excluded), best of --rounds, interleaved; the three must produce
    the same N tokens (checked, printed).
 3. perplexity and bits per byte on WikiText-2 test (data/wikitext2/wiki.test.raw), through project 3's
    evaluator (perplexity.evaluate_ids) for both models: the same token ids (our tokenizer), the same
    non-overlapping windows of --window tokens.
Goals (issue 14): ours >= 2x transformers decode, load >= 5x faster.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import resource
import subprocess
import sys
import time
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import torch

from course.bench import markdown_table, timed
from course.cli import ArgumentParser, nonneg_int, positive_int
from course.errors import CourseError, run_cli
from course.paths import REPO_ROOT
from phase1_foundation.project2_tokenizer.chat_template import render_chat
from phase1_foundation.project3_pretrain.gguf_io import GGUFFile, read_gguf
from phase1_foundation.project3_pretrain.hf_interop import model_from_tensors
from phase1_foundation.project3_pretrain.loading import load_model, load_tokenizer_for
from phase1_foundation.project3_pretrain.perplexity import evaluate_ids, read_text
from phase3_core_inference.project8_kv_cache import fast_decode
from phase3_core_inference.project8_kv_cache.engine import Engine

DEFAULT_MODEL = REPO_ROOT / "data" / "smollm2" / "SmolLM2-135M-Instruct.Q4_1.gguf"
WIKITEXT = REPO_ROOT / "data" / "wikitext2" / "wiki.test.raw"
PROMPT = "Write a short story about a robot who learns to paint."
IMPORT_HINT = ("import it first: uv run python phase3_core_inference/project8_kv_cache/download_model.py "
               "--source ../shared/data/smollm2/SmolLM2-135M-Instruct.Q4_1.gguf")


def load_transformers(path: Path):
    try:
        from transformers import AutoModelForCausalLM
    except ImportError:
        raise CourseError("the benchmark compares with transformers: uv sync --group dev") from None
    return AutoModelForCausalLM.from_pretrained(str(path.parent), gguf_file=path.name, dtype=torch.float32).eval()


# ---- decode -------------------------------------------------------------------------------------------
def ours_run(model, step, ids: list[int], n: int, max_len: int | None = None) -> tuple[float, list[int]]:
    """(seconds for prefill + n new tokens, the tokens) with a fresh engine (the fast step reused; its cache
    length must be the one the step was compiled for)."""
    engine = Engine(model, max_len=max_len or len(ids) + n + 1, step=step)
    t = time.perf_counter()
    out = list(engine.generate(ids, n))
    return time.perf_counter() - t, out


def hf_run(ref, ids: list[int], n: int) -> tuple[float, list[int]]:
    x = torch.tensor([ids])
    t = time.perf_counter()
    with torch.inference_mode():
        out = ref.generate(x, max_new_tokens=n, min_new_tokens=n, do_sample=False, eos_token_id=None,
                           pad_token_id=0)
    return time.perf_counter() - t, out[0, len(ids):].tolist()


def decode_bench(model, ref, ids: list[int], n: int, rounds: int) -> tuple[dict, dict]:
    max_len = len(ids) + n + 1
    fast = fast_decode.FastDecoder(model, max_len) if fast_decode.wanted(model, True) else None
    note("fast decode step " + (f"compiled in {fast.compile_s:.1f} s" if fast else "unavailable (no compiler)"))
    runs = {"ours plain": lambda k: ours_run(model, None, ids, k, max_len),
            "transformers": lambda k: hf_run(ref, ids, k)}
    if fast is not None:
        runs["ours fast"] = lambda k: ours_run(model, fast, ids, k, max_len)
    for run in runs.values():  # warm up each path once
        run(4)
    best = {name: [float("inf"), float("inf")] for name in runs}
    tokens = {}
    for _ in range(rounds):  # interleaved: every candidate sees the same machine drift
        for name, run in runs.items():
            t1, _ = run(1)
            tn, toks = run(n)
            best[name] = [min(best[name][0], t1), min(best[name][1], tn)]
            tokens[name] = toks
    rates = {name: (n - 1) / max(tn - t1, 1e-9) for name, (t1, tn) in best.items()}
    return rates, tokens


# ---- perplexity ----------------------------------------------------------------------------------------
class _HFScorer(torch.nn.Module):
    """transformers' model behind the interface evaluate_ids uses: config.block_size, forward -> (logits,)."""

    def __init__(self, ref, block_size: int):
        super().__init__()
        self.ref, self.config = ref, SimpleNamespace(block_size=block_size)

    def forward(self, x):
        return (self.ref(x).logits,)


def perplexity_bench(path: Path, ref, tok, window: int, max_tokens: int | None, batch: int) -> dict:
    text = read_text(WIKITEXT)
    if max_tokens:  # ~4 characters a token: a prefix long enough, so a short run does not tokenize it all
        text = text[:max_tokens * 8]
    ids = np.array(tok.encode(text, bos=False), dtype=np.int64)
    n_bytes = len(text.encode("utf-8"))
    cfg, tensors, _ = read_gguf(GGUFFile(path))
    # the same weights, with a context of `window` positions: the evaluator's window is config.block_size
    ours = model_from_tensors(dataclasses.replace(cfg, block_size=window), tensors, str(path))
    return {"ours": evaluate_ids(ours, ids, n_bytes, batch, max_tokens),
            "transformers": evaluate_ids(_HFScorer(ref, window), ids, n_bytes, batch, max_tokens)}


# ---- peak memory, each side in its own process ---------------------------------------------------------
def rss_child(which: str, path: Path) -> None:
    """Load one side and generate 16 tokens; print its peak RSS (MiB) as JSON on the last line."""
    torch.set_num_threads(2)
    if which == "ours":
        loaded = load_model(str(path))
        ours_run(loaded.model, None, [1, 2, 3, 4], 16)
    else:
        hf_run(load_transformers(path), [1, 2, 3, 4], 16)
    print(json.dumps({"rss_mib": high_water_mib()}))


def high_water_mib() -> float:
    """This process's peak RSS. Linux's VmHWM starts afresh at exec; ru_maxrss does not (a child started from a
    2 GB parent reports >= 2 GB), so it is only the fallback where /proc is missing."""
    status = Path("/proc/self/status")
    if status.is_file():
        for line in status.read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def peak_rss(which: str, path: Path) -> float:
    out = subprocess.run([sys.executable, __file__, "--rss_child", which, "--model", str(path)],
                         capture_output=True, text=True, check=False)
    if out.returncode != 0:
        raise CourseError(f"the {which} memory probe failed: {(out.stderr.strip().splitlines() or ['?'])[-1]}")
    return json.loads(out.stdout.strip().splitlines()[-1])["rss_mib"]


T0 = time.perf_counter()


def note(what: str) -> None:
    print(f"[{time.perf_counter() - T0:6.1f} s] {what}", file=sys.stderr, flush=True)


def main(argv: list[str] | None = None) -> None:
    p = ArgumentParser(description=__doc__)
    p.add_argument("--model", default=str(DEFAULT_MODEL), help="the GGUF file")
    p.add_argument("--new_tokens", type=positive_int, default=128, help="decode length after the chat prompt")
    p.add_argument("--rounds", type=positive_int, default=3, help="best of this many interleaved rounds")
    p.add_argument("--window", type=positive_int, default=1024, help="perplexity window (tokens of context)")
    p.add_argument("--ppl_tokens", type=nonneg_int, default=0, help="score only the first N tokens (0 = all)")
    p.add_argument("--ppl_batch", type=positive_int, default=2, help="windows per forward in the perplexity pass")
    p.add_argument("--skip_ppl", action="store_true", help="no perplexity pass")
    p.add_argument("--threads", type=positive_int, default=2, help="torch threads (the course machine has 2 cores)")
    p.add_argument("--quick", action="store_true", help="smoke run: 4 new tokens, 1 round, 4 windows of 128")
    p.add_argument("--rss_child", choices=("ours", "transformers"), help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    path = Path(args.model)
    if not path.is_file():
        raise CourseError(f"{path} not found; {IMPORT_HINT}")
    if args.rss_child:
        return rss_child(args.rss_child, path)
    if args.quick:
        args.new_tokens, args.rounds, args.window, args.ppl_tokens = 4, 1, 128, 512
    if args.new_tokens < 2 or args.rounds < 1:
        raise CourseError("--new_tokens must be >= 2 and --rounds >= 1")
    torch.set_num_threads(args.threads)
    import transformers  # noqa: F401  (imported before any timing: its import is not its load time)

    # 1. load time, interleaved
    note("load time: ours vs transformers")
    t_ours, t_hf = [], []
    for _ in range(args.rounds):
        t_ours.append(timed(lambda: load_model(str(path))))
        t_hf.append(timed(lambda: load_transformers(path)))
    loaded, ref = load_model(str(path)), load_transformers(path)
    tok = load_tokenizer_for(loaded)
    model = loaded.model
    note("peak RSS, each side in a fresh process")
    rss = {"ours": peak_rss("ours", path), "transformers": peak_rss("transformers", path)}

    # 2. decode
    if not tok.chat_template:
        raise CourseError(f"{path} has no chat template in its metadata")
    chat = render_chat(tok.chat_template, [{"role": "user", "content": PROMPT}], bos_token=tok.bos_token,
                       eos_token=tok.eos_token)
    ids = tok.encode(chat, bos=False)
    note(f"decode: {args.new_tokens} new tokens after a {len(ids)}-token chat prompt")
    rates, tokens = decode_bench(model, ref, ids, args.new_tokens, args.rounds)
    same = len({tuple(t) for t in tokens.values()}) == 1

    # 3. perplexity
    note("perplexity on WikiText-2 test" if not args.skip_ppl else "perplexity skipped")
    ppl = None if args.skip_ppl else perplexity_bench(path, ref, tok, args.window, args.ppl_tokens or None,
                                                      args.ppl_batch)

    hf_rate = rates["transformers"]
    rows = [[name, f"{r:.1f}", f"{r / hf_rate:.2f}x"] for name, r in rates.items()]
    print(f"\nSmolLM2-135M-Instruct ({path.name}), fp32, batch 1, {args.threads} threads, {len(ids)}-token chat "
          f"prompt, {args.new_tokens} new tokens, best of {args.rounds}; tokens identical: {same}\n")
    print(markdown_table(["decode", "tokens/s", "vs transformers"], rows))
    print()
    print(markdown_table(["load (best)", "seconds", "peak RSS MiB"],
                         [["ours", f"{min(t_ours):.2f}", f"{rss['ours']:.0f}"],
                          ["transformers", f"{min(t_hf):.2f}", f"{rss['transformers']:.0f}"]]))
    if ppl:
        print()
        print(markdown_table(["WikiText-2 test", "tokens scored", "perplexity", "bits/byte"],
                             [[name, f"{r['tokens']:,}", f"{r['ppl']:.3f}", f"{r['bpb']:.4f}"]
                              for name, r in ppl.items()]))
    fast = rates.get("ours fast", rates["ours plain"])
    print(f"\ndone: decode ours_fast/transformers={fast / hf_rate:.2f}x (goal >= 2) plain="
          f"{rates['ours plain'] / hf_rate:.2f}x; load transformers/ours={min(t_hf) / min(t_ours):.1f}x (goal >= 5); "
          f"tokens_identical={same}" + (f"; ppl ours={ppl['ours']['ppl']:.3f} transformers="
                                         f"{ppl['transformers']['ppl']:.3f}" if ppl else ""))
    if not same:
        for name, t in tokens.items():
            print(f"  {name}: {tok.decode(t)!r}", file=sys.stderr)
        raise CourseError("the engines produced different tokens")


if __name__ == "__main__":
    run_cli(main)
