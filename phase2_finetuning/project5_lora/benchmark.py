"""Full fine-tuning vs LoRA vs QLoRA on the same steps: what each one trains, holds in memory, costs and learns.

    uv run python phase2_finetuning/project5_lora/benchmark.py                  # SmolLM2-135M-Instruct, cpu preset
    uv run python phase2_finetuning/project5_lora/benchmark.py --quick          # a smoke run: 3 steps, 4 questions
    uv run python phase2_finetuning/project5_lora/benchmark.py --methods lora,qlora --r 16 --target_modules all-linear

One row per method, all on project 4's identity task and data (LoRAConfig's data, rows, batch, steps and seed,
so every method sees the same rows in the same order), through the same loop (project 4's loop.sft_loop):
    trainable params     what the optimizer updates (full: every weight; LoRA: r * (in + out) per wrapped layer)
    peak RSS (training)  the process's peak resident memory from the moment the model is ready to the end of the
                         evaluation (Linux VmHWM, reset after loading: the load itself peaks alike for all three,
                         at the float base plus the file's tensors, and is in the JSON as load_peak_rss; so is
                         ready_rss, the RSS when training starts, of which importing torch alone is ~650 MB)
    optimizer state      bytes of AdamW's exp_avg / exp_avg_sq / step tensors after the run
    tokens/s             trained (assistant) tokens per second of forward + backward + step, no evals
    held-out identity    share of held-out identity questions answered as "Nano" (project 4's identity task)
    ARC-Easy / MMLU      change in accuracy (points) from the untouched base on the same questions, ± its paired
                         standard error (project 4's paired_change)
Each method runs in its own process (a fresh peak, no allocator memory left over from the previous method),
its output in <out>.rows/<method>.log (`tail -f` it to follow a run); --in_process runs them in this one
(faster; the peaks are then only approximate). Every row, the base's too, is kept in <out>.rows/<method>.json
with the configs and seed it was measured under; --reuse reads a row back when they match, so a stopped
benchmark continues where it stopped, and methods may run as separate commands (`--methods full --reuse`, then
`--methods full,lora,qlora --reuse` assembles the table). The QLoRA row also reports
its 4-bit base in bytes per weight, measured (bytes held by the Linear4bit buffers) and computed (nf4_bytes).
Writes <out>.json (every number, the configs, the machine) and <out>.md (the table), atomically.
"""

from __future__ import annotations

import dataclasses
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

from course.bench import markdown_table
from course.checkpoint import atomic_write_json, atomic_write_text
from course.cli import ArgumentParser, warn_if_gpu_preset_without_gpu
from course.config import parse_configs
from course.device import get_device, set_seed
from course.errors import ConfigError, CourseError, run_cli
from course.paths import REPO_ROOT, repo_path
from phase2_finetuning.project4_sft.harness import tasks
from phase2_finetuning.project4_sft.harness.multiple_choice import evaluate_multiple_choice, paired_change
from phase2_finetuning.project4_sft.loop import measure, precision, sft_loop
from phase2_finetuning.project4_sft.sft import RowSampler, prepare_base, training_rows
from phase2_finetuning.project5_lora.config import BenchConfig, LoRAConfig
from phase2_finetuning.project5_lora.finetune import (
    adapter_optimizer,
    current_rss_bytes,
    optimizer_state_bytes,
    peak_rss_bytes,
    prepare_adapters,
    release_memory,
    reset_peak_rss,
)
from phase2_finetuning.project5_lora.lora import count_trainable

# --quick: a few steps of tiny rows and a few questions, every code path of the real run (fields given on the
# command line win)
QUICK = {"max_iters": 3, "batch_size": 2, "block_size": 64, "max_chats": 6, "identity_chats": 6, "heldout": 2,
         "gen_samples": 2, "gen_budget": 4, "eval_interval": 1000, "log_interval": 1, "warmup_iters": 1}
QUICK_BENCH = {"eval_limit": 4}


def evaluate_tasks(model, tok, bench: BenchConfig, seed: int) -> tuple[dict, dict, list[str]]:
    """({task: accuracy}, {task: {"picks", "answers"}}) on the fixed subsets; a task whose data is missing is left
    out with a note. The picks give the change from the base with its paired standard error."""
    out, picks, notes = {}, {}, []
    for name in bench.task_list:
        try:
            items = tasks.comparison_subset(name, bench.eval_limit, seed, bench.eval_data_dir)
        except CourseError as e:
            notes.append(f"{name}: not evaluated ({e})")
            continue
        r = evaluate_multiple_choice(model, tok, items, name, progress=False)
        out[name] = r.accuracy
        picks[name] = {"picks": r.extra["picks"], "answers": [i.answer for i in items]}
    return out, picks, notes


def run_method(method: str, cfg: LoRAConfig, bench: BenchConfig, seed: int, progress: bool = False) -> dict:
    """One row: prepare the model, train cfg.max_iters steps, measure. method "base" only evaluates the base."""
    release_memory()
    reset_peak_rss()
    if cfg.threads is not None:
        torch.set_num_threads(cfg.threads)
    dev = get_device(cfg.device)
    set_seed(seed)
    t0 = time.perf_counter()
    cm = prepare_base(cfg.base, cfg.tokenizer, "cpu")
    row: dict = {"method": method, "notes": []}
    if method in ("lora", "qlora"):
        prep = prepare_adapters(dataclasses.replace(cfg, method=method), dev, cm=cm)
        row["notes"] += prep.notes
        if prep.memory is not None:
            row.update(nf4_layers=len(prep.quantized), nf4_weights=prep.memory.weights,
                       nf4_bytes=prep.memory.measured_bytes, nf4_bytes_computed=prep.memory.computed_bytes,
                       nf4_bytes_per_param=prep.memory.bytes_per_param)
        run_cfg = cfg
    else:
        cm.model.to(dev)
        run_cfg = dataclasses.replace(cfg, learning_rate=bench.full_learning_rate, min_lr=bench.full_min_lr)
    model = cm.model
    row["load_peak_rss"] = peak_rss_bytes()
    row["load_seconds"] = time.perf_counter() - t0
    release_memory()
    row["ready_rss"] = current_rss_bytes()  # torch alone is ~650 MB of it on this course's machine
    reset_peak_rss()  # the training peak starts here: the model is ready

    tr = training_rows(cm, cfg, seed, verbose=False)
    data, held_rows, pad, block = tr.data, tr.held_rows, tr.pad, tr.block
    autocast, scaler = precision(dev, cfg.dtype)
    if method != "base":
        rows, stats = tr.rows, tr.stats
        sampler = RowSampler(len(rows), seed)
        optimizer = adapter_optimizer(model, run_cfg, dev.type)
        res = sft_loop(model, optimizer, [p for g in optimizer.param_groups for p in g["params"]], rows, sampler,
                       run_cfg, pad=pad, block=block, device=dev, autocast=autocast, scaler=scaler, start_it=0,
                       held_rows=held_rows, record=lambda rec: None, save=lambda *a: None, saved_to="(nothing saved)",
                       resume_hint="(benchmark runs are not resumable: run it again)", progress=progress, desc=method)
        trainable, total = count_trainable(model)
        row.update(trainable_params=trainable, total_params=total, train_tokens=res.tokens,
                   train_seconds=res.train_seconds, tokens_per_s=res.tokens / res.train_seconds,
                   optimizer_state_bytes=optimizer_state_bytes(optimizer), train_rows=stats.rows,
                   last_train_loss=res.last_train, learning_rate=run_cfg.learning_rate)
        del optimizer
    else:
        row.update(trainable_params=0, total_params=count_trainable(model)[1])
    model.eval()
    with autocast, torch.no_grad():
        after = measure(cm, cfg, data, held_rows, pad, dev)
        scores, picks, notes = evaluate_tasks(model, cm.tok, bench, seed)
    row.update(heldout_loss=after["heldout_loss"], identity=after.get("identity"), end_of_turn=after.get("end_of_turn"),
               scores=scores, picks=picks, peak_rss=peak_rss_bytes())
    row["notes"] += notes
    return row


def _worker(method: str, spec_path: str, result_path: str) -> None:
    spec = json.loads(Path(spec_path).read_text())
    row = run_method(method, LoRAConfig.from_dict(spec["lora"]).validate_config(),
                     BenchConfig.from_dict(spec["bench"]).validate_config(), spec["seed"])
    atomic_write_json(result_path, row)


def run_in_subprocess(method: str, cfg: LoRAConfig, bench: BenchConfig, seed: int, log: Path) -> dict:
    with tempfile.TemporaryDirectory(prefix="p5bench-") as tmp:
        spec, result = Path(tmp) / "spec.json", Path(tmp) / "result.json"
        spec.write_text(json.dumps({"lora": cfg.to_dict(), "bench": bench.to_dict(), "seed": seed}))
        cmd = [sys.executable, "-m", "phase2_finetuning.project5_lora.benchmark", "--_worker", method, str(spec),
               str(result)]
        log.parent.mkdir(parents=True, exist_ok=True)
        with open(log, "w") as f:
            proc = subprocess.run(cmd, check=False, cwd=REPO_ROOT, stdout=f, stderr=subprocess.STDOUT, text=True,
                                  env={**os.environ, "PYTHONUNBUFFERED": "1"})
        if proc.returncode != 0 or not result.is_file():
            lines = [ln for ln in log.read_text(errors="replace").splitlines() if ln.strip()]
            raise CourseError(f"the {method} run failed (exit {proc.returncode}): {lines[-1] if lines else 'no output'}"
                              f" (the whole output: {log})")
        return json.loads(result.read_text())


def row_key(method: str, cfg: LoRAConfig, bench: BenchConfig, seed: int) -> dict:
    """What a row depends on: the configs (not which other methods run, nor where the table goes) and the seed."""
    b = {k: v for k, v in bench.to_dict().items() if k not in ("methods", "out", "reuse", "in_process")}
    return {"method": method, "lora": cfg.to_dict(), "bench": b, "seed": seed}


def cached_run(run, method: str, key: dict, rows_dir: Path, reuse: bool) -> dict:
    """run(method), or with reuse the row kept in rows_dir for the same key; a row just measured is kept there."""
    path = rows_dir / f"{method}.json"
    if reuse and path.is_file():
        kept = json.loads(path.read_text())
        if kept.get("key") == key:
            print(f"  {method}: reusing {path} (same configs and seed)")
            return kept["row"]
        print(f"  {method}: {path} was measured under other settings: measuring again")
    row = run(method)
    atomic_write_json(path, {"key": key, "row": row})
    return row


def _mib(b) -> str:
    if b is None:
        return "-"
    return f"{b / 2**20:,.1f} MiB" if b >= 2**20 else f"{b / 2**10:,.1f} KiB"


def _pct(x) -> str:
    return "-" if x is None else f"{100 * x:.1f}%"


def table(rows: list[dict], base: dict, bench: BenchConfig) -> str:
    headers = ["method", "trainable params", "peak RSS (training)", "optimizer state", "tokens/s",
               "held-out identity"] + [f"{t} change" for t in bench.task_list]
    body = []
    for r in rows:
        label = {"full": "full fine-tune (project 4's loop)", "lora": "LoRA", "qlora": "QLoRA (NF4 base + LoRA)"}
        cells = [label[r["method"]], f"{r['trainable_params']:,} ({100 * r['trainable_params'] / r['total_params']:.2f}%)",
                 _mib(r["peak_rss"]), _mib(r["optimizer_state_bytes"]), f"{r['tokens_per_s']:.1f}",
                 _pct(r["identity"])]
        for t in bench.task_list:
            a, b = r.get("picks", {}).get(t), base.get("picks", {}).get(t)
            if a is None or b is None:
                cells.append("n/a")
                continue
            _, _, change, se = paired_change(b["picks"], a["picks"], a["answers"])
            cells.append(f"{100 * change:+.2f} ± {100 * se:.2f} pts")
        body.append(cells)
    return markdown_table(headers, body, "l" + "r" * (len(headers) - 1))


def main(argv: list[str] | None = None) -> dict:
    if argv is None:
        argv = sys.argv[1:]
    if argv[:1] == ["--_worker"]:  # one method in a fresh process (run_in_subprocess)
        _worker(*argv[1:4])
        return {}
    parser = ArgumentParser(description=__doc__)
    parser.add_argument("--seed", type=int, default=1337, help="random seed (default: %(default)s)")
    parser.add_argument("--quick", action="store_true",
                        help="a smoke run: 3 steps of 64-token rows, 4 questions per task (given fields win)")
    parser.add_argument("--no_progress", action="store_true", help="no tqdm bars")
    args, cfg, bench = parse_configs(parser, LoRAConfig, BenchConfig, argv=argv, default_preset="cpu")
    if args.quick:
        cfg = LoRAConfig.from_dict({**cfg.to_dict(), **{k: v for k, v in QUICK.items() if k not in args.overrides}})
        bench = BenchConfig.from_dict({**bench.to_dict(),
                                       **{k: v for k, v in QUICK_BENCH.items() if k not in args.overrides}})
        cfg.validate_config()
        bench.validate_config()
    if cfg.method != "lora":
        raise ConfigError("benchmark.py runs every method itself: choose them with --methods, not --method")
    out = repo_path(bench.out)
    if out.is_dir():
        raise CourseError(f"--out {out} is a folder; pass a path prefix (it writes <out>.json and <out>.md)")
    warn_if_gpu_preset_without_gpu(args.preset, cfg.device)
    cfg.print_config(f"LoRAConfig (preset {args.preset}{', quick' if args.quick else ''})")
    bench.print_config()
    rows_dir = out.with_name(out.name + ".rows")
    measure_row = (lambda m: run_method(m, cfg, bench, args.seed, not args.no_progress)) if bench.in_process else \
        (lambda m: run_in_subprocess(m, cfg, bench, args.seed, rows_dir / f"{m}.log"))

    def run(m: str) -> dict:
        return cached_run(measure_row, m, row_key(m, cfg, bench, args.seed), rows_dir, bench.reuse)

    t0 = time.perf_counter()
    def where(m: str) -> str:
        return "" if bench.in_process else f" (output: {rows_dir / (m + '.log')})"

    print(f"base: evaluating the untouched model{where('base')}")
    base = run("base")
    rows = []
    for m in bench.method_list:
        print(f"{m}: {cfg.max_iters} steps of {cfg.batch_size} rows{where(m)}")
        rows.append(run(m))
        r = rows[-1]
        print(f"  {r['trainable_params']:,} trainable, peak RSS {_mib(r['peak_rss'])}, {r['tokens_per_s']:.1f} tokens/s, "
              f"identity {_pct(r['identity'])}")
    md = table(rows, base, bench)
    notes = sorted({n for r in [base, *rows] for n in r["notes"]})
    q = next((r for r in rows if r["method"] == "qlora"), None)
    extra = []
    if q is not None:
        extra.append(f"QLoRA base: {q['nf4_layers']} layers, {q['nf4_weights']:,} weights in {q['nf4_bytes']:,} bytes = "
                     f"{q['nf4_bytes_per_param']:.4f} bytes/weight measured (computed: {q['nf4_bytes_computed']:,} bytes)")
    base_scores = ", ".join(f"{t} {100 * a:.1f}%" for t, a in base["scores"].items())
    extra.append(f"base: identity {_pct(base['identity'])}" + (f", {base_scores}" if base_scores else "")
                 + f" (eval_limit {bench.eval_limit or 'all'})")
    machine = f"{platform.machine()} {platform.processor() or ''}".strip() + f", {os.cpu_count()} CPUs, torch " \
        f"{torch.__version__}, {get_device(cfg.device)}"
    text = "\n".join([md, "", *extra, *(f"note: {n}" for n in notes), f"machine: {machine}"])
    atomic_write_text(out.with_suffix(".md"), text + "\n")
    atomic_write_json(out.with_suffix(".json"), {"machine": machine, "seed": args.seed, "quick": args.quick,
                                                 "lora_config": cfg.to_dict(), "bench_config": bench.to_dict(),
                                                 "base": base, "rows": rows, "seconds": time.perf_counter() - t0})
    print(text)
    print(f"wrote {out.with_suffix('.md')} and {out.with_suffix('.json')}")
    return {"base": base, "rows": rows, "table": md}


if __name__ == "__main__":
    run_cli(main)
