"""Multiple choice by log-likelihood: the model "answers" with the continuation it finds most probable.

PAPER: Brown et al., 2020 (GPT-3), section 2: "we compare the LM likelihood of each completion"; the
conventions (context + " continuation", length-normalised `acc_norm`, standard errors) are those of
lm-evaluation-harness (Gao et al.).
INTUITION: a base model cannot be asked to write "B"; but it assigns every string a probability. For each
choice c, log P(c | context) = sum over c's tokens of log p(token | everything before it). The highest sum wins.
Longer choices pay for every token, so `acc_norm` divides by the choice's length in bytes.
IMPLEMENTATION: each choice is a row context + choice; the rows of several questions (sorted by length) go
through the model as one right-padded batch (causal attention: a token never sees the padding after it, so no
mask is needed); the classifier runs only where a choice is read. One-token choices share one row.
WHY the standard error: n test questions estimate the accuracy p with error sqrt(p (1 - p) / (n - 1)); two
models whose accuracies differ by less than about two of those are not told apart by this test set.
"""

from __future__ import annotations

import math
import time
from typing import NamedTuple

import torch
from tqdm import tqdm

from phase2_finetuning.project4_sft.harness.report import TaskResult
from phase2_finetuning.project4_sft.harness.tasks import MCItem


def encode_plain(tok, text: str) -> list[int]:
    """Text -> ids with no BOS (a continuation is not the start of a document)."""
    try:
        return list(tok.encode(text, bos=False))
    except TypeError:  # project 2's tokenizers have no bos argument
        return list(tok.encode(text))


def encode_context(tok, text: str) -> list[int]:
    """The context: with the tokenizer's BOS if it adds one (that is how the model saw documents start)."""
    return list(tok.encode(text))


class Row(NamedTuple):
    """One row of a forward pass: its input ids, and the reads that score from it.

    A read (slot, start, targets) adds log p(targets[j] | ids[:start + j + 1]) over j to the score of `slot`.
    """
    ids: list[int]
    reads: list[tuple[int, int, list[int]]]


def plan_rows(context: list[int], continuations: list[list[int]], block: int, slot0: int = 0) -> list[Row]:
    """The rows that score each continuation of one question (slots slot0, slot0 + 1, ...).

    A row is context + continuation without its last token (position t predicts token t + 1); rows longer than
    the model's context keep their last block tokens (the context is cut from the left). When every
    continuation is one token (MMLU's " A" .. " D") the rows would be the same context four times: one row is
    run and each choice is read at its last position (causal attention: equal).
    """
    if context and all(len(c) == 1 for c in continuations):
        ids = context[-block:]
        return [Row(ids, [(slot0 + k, len(ids) - 1, c) for k, c in enumerate(continuations)])]
    rows = []
    for k, c in enumerate(continuations):
        seq = (context + c)[-(block + 1):]
        rows.append(Row(seq[:-1], [(slot0 + k, len(seq) - 1 - len(c), c)]))
    return rows


@torch.no_grad()
def score_rows(model, rows: list[Row]) -> dict[int, float]:
    """Run the rows as one right-padded batch and return {slot: summed log-prob} for every slot read.

    Causal attention: a token never sees the padding after it, so no mask is needed. The classifier (vocab x
    n_embd per position, the largest matrix of a small model) runs only from the earliest position any read
    needs (`logits_to_keep`), and the log-softmax only at the positions read.
    """
    device = next(model.parameters()).device
    T = max(len(r.ids) for r in rows)
    first = min(start for r in rows for _, start, _ in r.reads)
    idx = torch.zeros(len(rows), T, dtype=torch.long)
    for b, r in enumerate(rows):
        idx[b, :len(r.ids)] = torch.tensor(r.ids)
    logits = model(idx.to(device), logits_to_keep=T - first)[0]
    out: dict[int, float] = {}
    for b, r in enumerate(rows):
        for slot, start, targets in r.reads:
            logp = torch.log_softmax(logits[b, start - first:start - first + len(targets)].float(), dim=-1)
            picked = logp[torch.arange(len(targets)), torch.tensor(targets, device=device)]
            out[slot] = out.get(slot, 0.0) + picked.sum().item()
    return out


def continuation_logprobs(model, context: list[int], continuations: list[list[int]]) -> list[float]:
    """log P(continuation | context) for each continuation, summed over its tokens; one forward pass."""
    scores = score_rows(model, plan_rows(context, continuations, model.config.block_size))
    return [scores[k] for k in range(len(continuations))]


def mean_and_stderr(values: list[float]) -> tuple[float, float]:
    """Mean and its standard error with the sample (n - 1) variance, as lm-evaluation-harness reports."""
    n = len(values)
    if n == 0:
        return float("nan"), float("nan")
    m = sum(values) / n
    if n == 1:
        return m, float("nan")
    var = sum((v - m) ** 2 for v in values) / (n - 1)
    return m, math.sqrt(var / n)


def paired_change(before: list[int], after: list[int], truth: list[int]) -> tuple[float, float, float, float]:
    """(accuracy before, accuracy after, change, its paired standard error) of two models' picks on the same
    questions. WHY paired: most questions are right (or wrong) for both models; the error of the change is that of
    the per-question differences, far smaller than either accuracy's own error."""
    b = [float(p == t) for p, t in zip(before, truth)]
    a = [float(p == t) for p, t in zip(after, truth)]
    n = len(truth)
    d = [x - y for x, y in zip(a, b)]
    mean = sum(d) / n
    sd = math.sqrt(sum((x - mean) ** 2 for x in d) / (n - 1)) if n > 1 else float("nan")
    return sum(b) / n, sum(a) / n, mean, sd / math.sqrt(n)


def batches(questions: list[list[Row]], max_rows: int):
    """Group questions (each a list of rows) into forward passes of at most max_rows rows, longest first.

    Sorting by length keeps the padding of a batch small; a question's rows always stay in one batch.
    """
    order = sorted(range(len(questions)), key=lambda q: -max(len(r.ids) for r in questions[q]))
    batch, n = [], 0
    for q in order:
        if batch and n + len(questions[q]) > max_rows:
            yield batch
            batch, n = [], 0
        batch.append(q)
        n += len(questions[q])
    if batch:
        yield batch


def evaluate_multiple_choice(model, tok, items: list[MCItem], task: str, progress: bool = True,
                             batch_size: int = 16) -> TaskResult:
    """Accuracy (and length-normalised accuracy) of picking the most likely choice of each item.

    batch_size is the number of rows (context + choice) per forward pass: several questions' choices go
    through the model together, which on a CPU uses its cores better than four rows at a time.
    """
    t0 = time.perf_counter()
    block = model.config.block_size
    plans, offsets, lls = [], [], []
    for item in items:
        offsets.append(len(lls))
        ctx = encode_context(tok, item.question)
        conts = [encode_plain(tok, c) for c in item.choices]
        plans.append(plan_rows(ctx, conts, block, slot0=len(lls)))
        lls.extend([0.0] * len(conts))
    with tqdm(total=len(items), desc=task, unit="q", disable=not progress, leave=False) as bar:
        for batch in batches(plans, batch_size):
            rows = [r for q in batch for r in plans[q]]
            for slot, v in score_rows(model, rows).items():
                lls[slot] = v
            bar.update(len(batch))
    correct, correct_norm, per_subject, picks = [], [], {}, []
    for item, off in zip(items, offsets):
        ll = lls[off:off + len(item.choices)]
        pick = max(range(len(ll)), key=lambda k: ll[k])
        norm = [v / max(1, len(c.encode("utf-8"))) for v, c in zip(ll, item.choices)]
        pick_norm = max(range(len(norm)), key=lambda k: norm[k])
        picks.append(pick)
        correct.append(float(pick == item.answer))
        correct_norm.append(float(pick_norm == item.answer))
        if item.subject:
            per_subject.setdefault(item.subject, []).append(correct[-1])
    acc, se = mean_and_stderr(correct)
    acc_norm, se_norm = mean_and_stderr(correct_norm)
    extra = {"acc_norm": acc_norm, "acc_norm_stderr": se_norm, "picks": picks, "batch_size": batch_size}
    if per_subject:
        extra["subjects"] = {s: sum(v) / len(v) for s, v in sorted(per_subject.items())}
    return TaskResult(task, len(items), acc, se, time.perf_counter() - t0, extra)
