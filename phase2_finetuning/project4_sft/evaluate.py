"""Evaluate a model on ARC-Easy, ARC-Challenge, MMLU, GSM8K and HumanEval from the files in data/, and on the
course's held-out identity questions (`--tasks identity`: the share of answers naming "Nano").

    uv run python phase2_finetuning/project4_sft/evaluate.py --preset cpu
    uv run python phase2_finetuning/project4_sft/evaluate.py --model data/smollm2/SmolLM2-135M-Instruct.Q4_1.gguf \\
        --tasks arc_easy,mmlu --limit 200 --shots 0 --out runs/project4/smollm2
    uv run python phase2_finetuning/project4_sft/evaluate.py --model checkpoints/project4/smollm2-identity \
        --tasks identity,arc_easy,mmlu --gen_limit 50 --out runs/project4/smollm2-identity

--model is anything project 3's loader takes (a checkpoint .pt, a Hugging Face folder, a llama2.c .bin, a .gguf,
a hub id). The methods are in harness/ (log-likelihood multiple choice, exact match, sandboxed pass@1); the
report is <out>.json (every number) and <out>.md (the table), written atomically.
"""

from __future__ import annotations

import argparse

import torch

from course.device import get_device, set_seed
from course.errors import run_cli
from course.paths import repo_path
from phase1_foundation.project3_pretrain.loading import load_model, load_tokenizer_for
from phase2_finetuning.project4_sft.config import EvalConfig
from phase2_finetuning.project4_sft.harness import tasks
from phase2_finetuning.project4_sft.harness.gsm8k import evaluate_gsm8k
from phase2_finetuning.project4_sft.harness.humaneval import evaluate_humaneval
from phase2_finetuning.project4_sft.harness.identity import identity_share
from phase2_finetuning.project4_sft.identity import heldout_questions
from phase2_finetuning.project4_sft.harness.multiple_choice import evaluate_multiple_choice
from phase2_finetuning.project4_sft.harness.report import markdown_table, write_report
from phase2_finetuning.project4_sft.sft import is_sft_dir, load_chat_model

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def run_task(name: str, model, tok, cfg: EvalConfig, fmt=None):
    d, lim = cfg.data_dir, cfg.limit
    gen_lim = cfg.gen_limit or cfg.limit
    if name in ("arc_easy", "arc_challenge"):
        kind = "Easy" if name == "arc_easy" else "Challenge"
        items = tasks.subset(tasks.load_arc(kind, "Test", d), lim, cfg.seed)
        if cfg.shots:
            items = tasks.with_shots(items, tasks.load_arc(kind, "Dev", d), cfg.shots)
        return evaluate_multiple_choice(model, tok, items, name, batch_size=cfg.batch_size)
    if name == "mmlu":
        items = tasks.subset(tasks.load_mmlu("test", cfg.shots, data_dir=d), lim, cfg.seed, key=lambda i: i.subject)
        return evaluate_multiple_choice(model, tok, items, name, batch_size=cfg.batch_size)
    if name == "gsm8k":
        rows = tasks.subset(tasks.load_gsm8k("test", d), gen_lim, cfg.seed)
        shots = tasks.load_gsm8k("train", d)[:cfg.shots] if cfg.shots else []
        return evaluate_gsm8k(model, tok, rows, shots, cfg.max_new_tokens)
    if name == "identity":  # held-out identity questions, asked with the model's chat template
        return identity_share(model, tok, fmt, heldout_questions(gen_lim or 50), min(cfg.max_new_tokens, 96))
    problems = tasks.subset(tasks.load_humaneval(d), gen_lim, cfg.seed)
    return evaluate_humaneval(model, tok, problems, cfg.max_new_tokens, cfg.timeout)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    EvalConfig.add_args(parser)
    cfg = EvalConfig.from_args(parser.parse_args())
    cfg.print_config()
    set_seed(cfg.seed)
    device = get_device(cfg.device)
    fmt = None
    if "identity" in cfg.task_list or is_sft_dir(repo_path(cfg.model)):  # the chat format: a fine-tuned
        # model's (train_sft.py's OUT_DIR), or the base's own
        cm = load_chat_model(cfg.model, device, cfg.tokenizer)
        model, tok, fmt = cm.model.to(dtype=DTYPES[cfg.dtype]).eval(), cm.tok, cm.fmt
    else:
        loaded = load_model(cfg.model, device=device, dtype=DTYPES[cfg.dtype])
        model = loaded.model.eval()
        tok = load_tokenizer_for(loaded, cfg.tokenizer)
    results = [run_task(name, model, tok, cfg, fmt) for name in cfg.task_list]
    meta = {"model": cfg.model, "shots": cfg.shots, "limit": cfg.limit, "dtype": cfg.dtype, "device": str(device)}
    js, md = write_report(results, cfg.out, meta)
    print(markdown_table(results, title=cfg.model))
    print(f"report: {js} and {md}")
    print("summary: " + ", ".join(f"{r.task} {100 * r.accuracy:.1f}% ± {100 * r.stderr:.1f} (n={r.n})"
                                  for r in results))


if __name__ == "__main__":
    run_cli(main)
