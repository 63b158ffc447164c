"""GSM8K: generate a worked answer, compare its final number with the reference, exactly.

PAPER: Cobbe et al., 2021 (Training Verifiers to Solve Math Word Problems). The reference solution ends in
"#### 72"; a model's answer is judged by its final number alone (lm-evaluation-harness's "flexible extract":
the number after "####" if the model wrote one, else the last number in its text).
"""

from __future__ import annotations

import re
import time

from tqdm import tqdm

from phase2_finetuning.project4_sft.harness.greedy import greedy_complete
from phase2_finetuning.project4_sft.harness.multiple_choice import mean_and_stderr
from phase2_finetuning.project4_sft.harness.report import TaskResult
from phase2_finetuning.project4_sft.harness.tasks import gsm8k_prompt

NUMBER = re.compile(r"-?[\d,]*\.?\d+")
STOP = ("\n\n", "Question:")


def normalize_number(text: str) -> str | None:
    """'1,234.50' -> '1234.5', '$18.' -> '18'; None if there is no number."""
    text = text.replace(",", "").replace("$", "").strip().rstrip(".")
    try:
        value = float(text)
    except ValueError:
        return None
    return str(int(value)) if value == int(value) else repr(value)


def extract_answer(text: str) -> str | None:
    """The final number of a solution: after '####' when present, else the last number in the text."""
    if "####" in text:
        m = NUMBER.search(text.split("####")[-1])
        return normalize_number(m.group()) if m else None
    found = NUMBER.findall(text)
    return normalize_number(found[-1]) if found else None


def evaluate_gsm8k(model, tok, rows: list[dict], examples: list[dict] = (), max_new_tokens: int = 256,
                   progress: bool = True, generate=greedy_complete) -> TaskResult:
    """Exact match of the final number over `rows`, each prompted with the same few-shot `examples`."""
    t0 = time.perf_counter()
    hits, samples = [], []
    for row in tqdm(rows, desc="gsm8k", unit="q", disable=not progress, leave=False):
        text = generate(model, tok, gsm8k_prompt(row["question"], examples), max_new_tokens, STOP)
        got, want = extract_answer(text), extract_answer(row["answer"])
        hits.append(float(got is not None and got == want))
        if len(samples) < 3:
            samples.append({"question": row["question"][:80], "output": text[:200], "got": got, "want": want})
    acc, se = mean_and_stderr(hits)
    return TaskResult("gsm8k", len(rows), acc, se, time.perf_counter() - t0, {"samples": samples})
