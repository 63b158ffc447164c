"""Our harness beside lm-evaluation-harness (`lm-eval`, the peer) on the same model, questions and prompts.

    uv run python phase2_finetuning/project4_sft/compare_lm_eval.py                     # SmolLM2, 300 per task
    uv run python phase2_finetuning/project4_sft/compare_lm_eval.py --limit 0           # the full test sets

PAPER: Gao et al., lm-evaluation-harness; Biderman et al. 2024, "Lessons from the Trenches on Reproducible
Evaluation of Language Models": the same benchmark scored by two harnesses differs by points when the prompt,
the tokenization of the context/continuation boundary or the normalisation differ. So the comparison holds
all of those fixed and checks that what is left (the scoring code) agrees.
IMPLEMENTATION: our items (harness/tasks.py: ARC-Easy "Question: ...\\nAnswer:" + " choice", MMLU with its
subject header + " A".." D") are written as JSON lines and given to lm-eval as custom tasks (`dataset_path:
json`, the context and choices verbatim, no target delimiter), so both harnesses see identical strings. The model
is ours exported to a Hugging Face folder and loaded by `transformers`; the tokenizer is transformers' own
GGUF reader with SmolLM2's digit split added (transformers' GGUF converter leaves it out; the script checks
that its ids equal ours on every context and choice before it starts). Reported: accuracy of each harness with its
standard error, the share of questions where both pick the same choice, and questions per second of each, in
the same process, interleaved: each task's questions are cut in two halves, timed ours / lm-eval on the first and
lm-eval / ours on the second (so a drift of the machine's speed hits both alike). Both run `--batch_size` rows
(context + choice) per forward pass, longest first; lm-eval's time includes its per-call task set-up (about a
second, twice per task).
"""

from __future__ import annotations

import json
import tempfile
import time
from pathlib import Path

import torch

from course.checkpoint import atomic_write_text
from course.cli import ArgumentParser, nonneg_int, positive_int
from course.device import set_seed
from course.errors import CourseError, run_cli
from course.paths import repo_path
from phase1_foundation.project3_pretrain.hf_interop import export_hf
from phase1_foundation.project3_pretrain.loading import load_model, load_tokenizer_for
from phase2_finetuning.project4_sft.harness import tasks
from phase2_finetuning.project4_sft.harness.multiple_choice import (
    encode_context,
    encode_plain,
    evaluate_multiple_choice,
    mean_and_stderr,
)

SMOLLM2 = "data/smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"
TASK_YAML = """task: {name}
dataset_path: json
dataset_kwargs:
  data_files:
    test: {file}
test_split: test
output_type: multiple_choice
doc_to_text: context
doc_to_choice: choices
doc_to_target: label
target_delimiter: ""
metric_list:
  - metric: acc
  - metric: acc_norm
"""


def hf_tokenizer(gguf: Path):
    """transformers' tokenizer from the GGUF file, with SmolLM2's pre-tokenizer (digits split one by one)."""
    from tokenizers import pre_tokenizers
    from transformers import AutoTokenizer
    tok = AutoTokenizer.from_pretrained(str(gguf.parent), gguf_file=gguf.name)
    backend = tok.backend_tokenizer
    backend.pre_tokenizer = pre_tokenizers.Sequence([pre_tokenizers.Digits(individual_digits=True),
                                                     backend.pre_tokenizer])
    return tok


def check_same_ids(ours, theirs, items: list[tasks.MCItem]) -> None:
    for it in items:
        for text, mine in [(it.question, encode_context(ours, it.question))] + \
                          [(c, encode_plain(ours, c)) for c in it.choices]:
            got = theirs(text, add_special_tokens=False)["input_ids"]
            if got != mine:
                raise CourseError(f"the tokenizers disagree on {text[:60]!r} ({mine[:8]}... vs {got[:8]}...): "
                                  "the comparison would not be of the same inputs")


def run_lm_eval(hf_model, hf_tok, items: list[tasks.MCItem], name: str, work: Path, batch_size: int):
    from lm_eval import simple_evaluate
    from lm_eval.models.huggingface import HFLM
    from lm_eval.tasks import TaskManager
    work.mkdir(parents=True, exist_ok=True)
    data = work / f"{name}.jsonl"
    with open(data, "w", encoding="utf-8") as f:
        f.writelines(json.dumps({"id": k, "context": it.question, "choices": it.choices, "label": it.answer}) + "\n" for k, it in enumerate(items))
    (work / f"{name}.yaml").write_text(TASK_YAML.format(name=name, file=data), encoding="utf-8")
    lm = HFLM(pretrained=hf_model, tokenizer=hf_tok, batch_size=batch_size, device="cpu")
    t0 = time.perf_counter()
    out = simple_evaluate(model=lm, tasks=[name], task_manager=TaskManager(include_path=str(work)),
                          log_samples=True, verbosity="ERROR")
    seconds = time.perf_counter() - t0
    picks = {}
    for s in out["samples"][name]:
        lls = [r[0] for r in s["filtered_resps"]]
        picks[s["doc"]["id"]] = max(range(len(lls)), key=lambda k: lls[k])
    return [picks[k] for k in range(len(items))], seconds


def interleaved(model, tok, hf_model, hf_tok, items, name: str, work: Path, batch_size: int):
    """Ours and lm-eval on the same items, timed ABBA over two halves: (our picks, theirs, our s, their s)."""
    half = (len(items) + 1) // 2
    parts = [items[:half], items[half:]] if len(items) > 1 else [items]
    our_picks, their_picks, ours_s, theirs_s = [], [], 0.0, 0.0
    for k, part in enumerate(parts):
        steps = ["ours", "lm_eval"] if k % 2 == 0 else ["lm_eval", "ours"]
        for step in steps:
            if step == "ours":
                r = evaluate_multiple_choice(model, tok, part, name, batch_size=batch_size)
                our_picks += r.extra["picks"]
                ours_s += r.seconds
            else:
                picks, secs = run_lm_eval(hf_model, hf_tok, part, f"course_{name}_{k}", work / str(k), batch_size)
                their_picks += picks
                theirs_s += secs
    return our_picks, their_picks, ours_s, theirs_s


def main(argv: list[str] | None = None) -> None:
    p = ArgumentParser(description=__doc__)
    p.add_argument("--model", default=SMOLLM2, help="anything project 3's loader takes")
    p.add_argument("--tasks", default="arc_easy,mmlu", help="comma list of: arc_easy, mmlu (0-shot)")
    p.add_argument("--limit", type=nonneg_int, default=300, help="questions per task (0 = all; MMLU stratified)")
    p.add_argument("--batch_size", type=positive_int, default=16, help="rows (context + choice) per forward "
                   "pass, both harnesses")
    p.add_argument("--out", default="runs/project4/lm_eval_agreement", help="writes <out>.json and <out>.md")
    p.add_argument("--seed", type=int, default=1337)
    args = p.parse_args(argv)
    names = [t.strip() for t in args.tasks.split(",") if t.strip()]
    bad = [t for t in names if t not in ("arc_easy", "mmlu")]
    if bad or not names:
        raise CourseError(f"--tasks must be a comma list of arc_easy, mmlu; got {args.tasks!r}")
    path = repo_path(args.model)
    if path.suffix != ".gguf":
        raise CourseError(f"{args.model}: this comparison builds transformers' tokenizer from a .gguf file")
    set_seed(args.seed)
    torch.set_grad_enabled(False)
    loaded = load_model(str(path))
    model, tok = loaded.model.eval(), load_tokenizer_for(loaded)
    from transformers import LlamaForCausalLM
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        export_hf(model, work / "hf")
        hf_model = LlamaForCausalLM.from_pretrained(work / "hf", torch_dtype=torch.float32).eval()
        hf_tok = hf_tokenizer(path)
        for name in names:
            items = tasks.comparison_subset(name, args.limit, args.seed)
            check_same_ids(tok, hf_tok, items)
            mine, theirs, ours_s, theirs_s = interleaved(model, tok, hf_model, hf_tok, items, name, work,
                                                         args.batch_size)
            acc, se = mean_and_stderr([float(p == it.answer) for p, it in zip(mine, items)])
            acc_l, se_l = mean_and_stderr([float(p == it.answer) for p, it in zip(theirs, items)])
            same = sum(a == b for a, b in zip(mine, theirs)) / len(items)
            rows.append({"task": name, "n": len(items), "ours": acc, "ours_stderr": se,
                         "lm_eval": acc_l, "lm_eval_stderr": se_l, "same_pick": same,
                         "ours_qps": len(items) / ours_s, "lm_eval_qps": len(items) / theirs_s,
                         "batch_size": args.batch_size})
            r = rows[-1]
            print(f"{name}: ours {100 * r['ours']:.2f}% vs lm-eval {100 * r['lm_eval']:.2f}%, same pick "
                  f"{100 * same:.1f}%, {r['ours_qps']:.2f} vs {r['lm_eval_qps']:.2f} questions/s")
    md = ["| task | n | ours | lm-eval | same choice | ours (q/s) | lm-eval (q/s) |",
          "|---|---:|---:|---:|---:|---:|---:|"]
    for r in rows:
        md.append(f"| {r['task']} | {r['n']:,} | {100 * r['ours']:.2f} ± {100 * r['ours_stderr']:.2f} | "
                  f"{100 * r['lm_eval']:.2f} ± {100 * r['lm_eval_stderr']:.2f} | {100 * r['same_pick']:.1f}% | "
                  f"{r['ours_qps']:.2f} | {r['lm_eval_qps']:.2f} |")
    out = repo_path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_text(out.with_suffix(".json"), json.dumps({"model": args.model, "rows": rows}, indent=2))
    atomic_write_text(out.with_suffix(".md"), "\n".join(md) + "\n")
    print("\n".join(md))
    print("summary: " + ", ".join(f"{r['task']} ours {100 * r['ours']:.2f} vs lm-eval {100 * r['lm_eval']:.2f}"
                                  for r in rows))


if __name__ == "__main__":
    run_cli(main)
