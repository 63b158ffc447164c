"""DPO vs IPO vs SimPO (and cDPO, hinge) on the same pairs, steps and seed: what each reaches on held-out
preferences, how it changes the length of the answers, and what it costs on ARC-Easy / MMLU.

    uv run python phase2_finetuning/project6_dpo/benchmark.py                          # the cpu preset, per loss
    uv run python phase2_finetuning/project6_dpo/benchmark.py --losses sigmoid,cdpo --max_iters 50
    uv run python phase2_finetuning/project6_dpo/benchmark.py --quick                  # a smoke run of every path

PAPERS: Rafailov et al., 2023 (DPO); Azar et al., 2023 (IPO); Mitchell, 2023 (cDPO); Meng et al., 2024 (SimPO).

Every loss trains through train_dpo.py in its own process, with the same DPOConfig apart from loss_type (its
usual beta unless --beta is given; "cdpo" is sigmoid with label_smoothing 0.1) into OUT_DIR/<loss>; its
results.json gives the held-out reward accuracy and margin of each dataset before and after, and the mean
length of greedy answers to held-out prompts. Then this script scores the untouched base and each trained
policy on the same ARC-Easy / MMLU questions with project 4's harness: the change, with its paired standard
error. A reward accuracy is each loss's own implicit reward (SimPO's is length-normalised and reference-free),
so the accuracies compare what each objective learned to rank, not one shared judge.
--reuse skips the training of a loss whose OUT_DIR/<loss> already holds a finished run of the same config and seed
(a benchmark stopped half-way, or runs started by hand in parallel), and only evaluates it; scores of the same
model on the same questions (kept in OUT_DIR/base_eval.json and OUT_DIR/<loss>/bench_eval.json) are read back. "train s" is the wall
time of the training loop (its mid-run held-out passes included).
Writes <out>.json (every number, the configs, the machine) and <out>.md (the table), atomically.
"""

from __future__ import annotations

import json
import os
import platform
import subprocess
import sys
import time
from pathlib import Path

import torch

from course.bench import markdown_table
from course.checkpoint import atomic_write_json, atomic_write_text
from course.cli import ArgumentParser, warn_if_gpu_preset_without_gpu
from course.config import parse_configs
from course.device import get_device, set_seed
from course.errors import CourseError, run_cli
from course.paths import REPO_ROOT, repo_path
from phase2_finetuning.project4_sft.harness import tasks
from phase2_finetuning.project4_sft.harness.multiple_choice import evaluate_multiple_choice, paired_change
from phase2_finetuning.project4_sft.sft import load_chat_model
from phase2_finetuning.project6_dpo.config import DPOBenchConfig, DPOConfig

TRAIN = "phase2_finetuning/project6_dpo/train_dpo.py"
CDPO_SMOOTHING = 0.1
# --quick: a few steps of a few short pairs and a few questions, every code path of the real run
QUICK = {"max_iters": 2, "batch_size": 2, "max_pairs": 8, "heldout": 4, "gen_samples": 2, "gen_budget": 8,
         "eval_interval": 1000, "log_interval": 1, "warmup_iters": 1}
QUICK_BENCH = {"eval_limit": 4}


def loss_fields(loss: str, cfg: DPOConfig) -> dict:
    """The DPOConfig fields one row changes: its loss type (and cDPO's label smoothing)."""
    if loss == "cdpo":
        return {"loss_type": "sigmoid", "label_smoothing": CDPO_SMOOTHING}
    return {"loss_type": loss, "label_smoothing": 0.0}


def finished_run(run_cfg: DPOConfig, seed: int) -> bool:
    """--reuse: OUT_DIR holds a finished train_dpo.py run of exactly this config and seed."""
    out = repo_path(run_cfg.out_dir)
    if not (out / "results.json").is_file() or not (out / "ckpt.pt").is_file():
        return False
    state = torch.load(out / "ckpt.pt", map_location="cpu", weights_only=False, mmap=True)
    return state.get("dpo_config") == run_cfg.to_dict() and state.get("seed") == seed \
        and state.get("iter") == run_cfg.max_iters


def train_seconds(run_cfg: DPOConfig) -> float:
    """Wall seconds of the training loop (its mid-run held-out passes and checkpoints included), from the last
    step's pairs/s in log.jsonl (train_dpo.py logs pairs since the loop started / seconds since then)."""
    recs = [json.loads(line) for line in open(repo_path(run_cfg.out_dir) / "log.jsonl") if line.strip()]
    last = [r for r in recs if r["kind"] == "train"][-1]
    return last["iter"] * run_cfg.batch_size * run_cfg.grad_accum / last["pairs_per_s"]


def train_one(loss: str, fields: dict, progress: bool) -> dict:
    """train_dpo.py in a fresh process with these fields; returns its results.json."""
    cmd = [sys.executable, TRAIN] + [f"--{k}={v}" for k, v in fields.items() if v is not None]
    if not progress:
        cmd.append("--no_progress")
    proc = subprocess.run(cmd, cwd=REPO_ROOT, check=False, stderr=subprocess.PIPE, text=True)
    if proc.returncode != 0:
        lines = [ln for ln in proc.stderr.splitlines() if ln.strip()]
        raise CourseError(f"the {loss} run failed (exit {proc.returncode}): {lines[-1] if lines else 'no output'}")
    return json.loads((repo_path(fields["out_dir"]) / "results.json").read_text())


def evaluate(model_spec: str, bench: DPOBenchConfig, seed: int, device, cache: Path) -> dict:
    """{task: {"accuracy", "picks", "answers"}} on the fixed subsets (project 4's harness and data).

    The scores are kept in `cache` with what they are of (model, its checkpoint's time stamp, tasks, limit, seed);
    --reuse reads them back instead of scoring the same model on the same questions again."""
    if not bench.task_list:
        return {}
    path = repo_path(model_spec)
    ckpt = path / "ckpt.pt" if path.is_dir() else path
    key = {"model": model_spec, "stamp": ckpt.stat().st_mtime_ns if ckpt.exists() else None,
           "tasks": bench.task_list, "limit": bench.eval_limit, "seed": seed}
    if bench.reuse and cache.is_file():
        held = json.loads(cache.read_text())
        if held.get("key") == key:
            print(f"  reusing the scores of {model_spec} in {cache}")
            return held["scores"]
    cm = load_chat_model(model_spec, device)
    model = cm.model.eval()
    out = {}
    for name in bench.task_list:
        items = tasks.comparison_subset(name, bench.eval_limit, seed)
        r = evaluate_multiple_choice(model, cm.tok, items, name, progress=False)
        out[name] = {"accuracy": r.accuracy, "picks": r.extra["picks"], "answers": [i.answer for i in items]}
    cache.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_json(cache, {"key": key, "scores": out})
    return out


def table(rows: list[dict], base_eval: dict, bench: DPOBenchConfig) -> str:
    names = sorted({n for r in rows for n, s in r["after"]["heldout"].items() if s})
    headers = ["loss", "beta"] + [f"{n} held-out accuracy" for n in names] + [f"{n} margin" for n in names] \
        + ["reply tokens (ended)"] + [f"{t} change" for t in bench.task_list] + ["train s"]
    body = []
    for r in rows:
        b, a = r["before"], r["after"]
        cells = [r["label"], f"{r['beta']:g}"]
        cells += [f"{100 * b['heldout'][n]['accuracy']:.1f}% -> {100 * a['heldout'][n]['accuracy']:.1f}%" for n in names]
        cells += [f"{a['heldout'][n]['margin']:+.3f}" for n in names]
        if a.get("reply_tokens") is not None:
            cells.append(f"{b['reply_tokens']:.1f} -> {a['reply_tokens']:.1f} ({100 * b['ended']:.0f}% -> "
                         f"{100 * a['ended']:.0f}%)")
        else:
            cells.append("-")
        for t in bench.task_list:
            _, _, change, se = paired_change(base_eval[t]["picks"], r["eval"][t]["picks"], r["eval"][t]["answers"])
            cells.append(f"{100 * change:+.2f} ± {100 * se:.2f} pts")
        cells.append(f"{r['seconds']:.0f}")
        body.append(cells)
    return markdown_table(headers, body, "l" + "r" * (len(headers) - 1))


def main(argv: list[str] | None = None) -> dict:
    parser = ArgumentParser(description=__doc__)
    parser.add_argument("--seed", type=int, default=1337, help="random seed (default: %(default)s)")
    parser.add_argument("--quick", action="store_true", help="a smoke run: 2 steps of 2 pairs, 4 questions per task")
    parser.add_argument("--no_progress", action="store_true", help="no tqdm bars")
    args, cfg, bench = parse_configs(parser, DPOConfig, DPOBenchConfig, argv=argv, default_preset="cpu")
    if args.quick:
        cfg = DPOConfig.from_dict({**cfg.to_dict(), **{k: v for k, v in QUICK.items() if k not in args.overrides}})
        bench = DPOBenchConfig.from_dict({**bench.to_dict(),
                                          **{k: v for k, v in QUICK_BENCH.items() if k not in args.overrides}})
        cfg.validate_config()
        bench.validate_config()
    out = repo_path(bench.out)
    if out.is_dir():
        raise CourseError(f"--out {out} is a folder; pass a path prefix (it writes <out>.json and <out>.md)")
    warn_if_gpu_preset_without_gpu(args.preset, cfg.device)
    cfg.print_config(f"DPOConfig (preset {args.preset}{', quick' if args.quick else ''}; loss_type per row)")
    bench.print_config()
    set_seed(args.seed)
    device = get_device(cfg.device)
    t0 = time.perf_counter()
    print(f"base: evaluating {cfg.base} on {bench.eval_tasks or 'nothing'}")
    base_eval = evaluate(cfg.base, bench, args.seed, device, repo_path(cfg.out_dir) / "base_eval.json")
    rows = []
    for loss in bench.loss_list:
        change = loss_fields(loss, cfg)
        beta = None if "beta" not in args.overrides else cfg.beta  # each loss's usual beta unless one is given
        run_cfg = DPOConfig.from_dict({**cfg.to_dict(), **change, "beta": beta,
                                       "out_dir": f"{cfg.out_dir.rstrip('/')}/{loss}"}).validate_config()
        if bench.reuse and finished_run(run_cfg, args.seed):
            print(f"{loss}: reusing the finished run in {run_cfg.out_dir} (same config and seed)")
            res = json.loads((repo_path(run_cfg.out_dir) / "results.json").read_text())
        else:
            print(f"{loss}: {run_cfg.max_iters} steps of {run_cfg.batch_size} pairs into {run_cfg.out_dir}")
            res = train_one(loss, {**run_cfg.to_dict(), "seed": args.seed}, not args.no_progress)
        res.update(seconds=train_seconds(run_cfg), label=loss if loss != "cdpo" else f"cdpo (smoothing {CDPO_SMOOTHING:g})", beta=run_cfg.beta_value,
                   eval=evaluate(run_cfg.out_dir, bench, args.seed, device,
                                 repo_path(run_cfg.out_dir) / "bench_eval.json"))
        rows.append(res)
    md = table(rows, base_eval, bench)
    base_line = ", ".join(f"{t} {100 * e['accuracy']:.1f}%" for t, e in base_eval.items())
    machine = f"{platform.machine()} {platform.processor() or ''}".strip() + f", {os.cpu_count()} CPUs, torch " \
        f"{torch.__version__}, {device}"
    text = "\n".join([md, "", f"base: {base_line or 'not evaluated'} (eval_limit {bench.eval_limit or 'all'})",
                      f"pairs: {rows[0]['train_pairs']:,} for training; skipped {rows[0]['skipped']}",
                      f"machine: {machine}"])
    atomic_write_text(out.with_suffix(".md"), text + "\n")
    atomic_write_json(out.with_suffix(".json"), {"machine": machine, "seed": args.seed, "quick": args.quick,
                                                 "dpo_config": cfg.to_dict(), "bench_config": bench.to_dict(),
                                                 "base_eval": base_eval, "rows": rows,
                                                 "seconds": time.perf_counter() - t0})
    print(text)
    print(f"wrote {out.with_suffix('.md')} and {out.with_suffix('.json')}")
    print("summary: " + "; ".join(
        f"{r['label']} " + ", ".join(f"{n} {100 * s['accuracy']:.1f}%" for n, s in r["after"]["heldout"].items() if s)
        for r in rows))
    return {"base_eval": base_eval, "rows": rows, "table": md}


if __name__ == "__main__":
    run_cli(main)
