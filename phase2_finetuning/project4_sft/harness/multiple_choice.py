"""Multiple choice by log-likelihood: the model "answers" with the continuation it finds most probable.

PAPER: Brown et al., 2020 (GPT-3), section 2: "we compare the LM likelihood of each completion"; the
conventions (context + " continuation", length-normalised `acc_norm`, standard errors) are those of
lm-evaluation-harness (Gao et al.).
INTUITION: a base model cannot be asked to write "B"; but it assigns every string a probability. For each
choice c, log P(c | context) = sum over c's tokens of log p(token | everything before it). The highest sum wins.
Longer choices pay for every token, so `acc_norm` divides by the choice's length in bytes.
IMPLEMENTATION: the choices of one question go through the model as one batch of rows context + choice,
right-padded (causal attention: a token never sees the padding after it, so no mask is needed); only the
choice's positions are read.
WHY the standard error: n test questions estimate the accuracy p with error sqrt(p (1 - p) / (n - 1)); two
models whose accuracies differ by less than about two of those are not told apart by this test set.
"""

from __future__ import annotations

import math
import time

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


@torch.no_grad()
def continuation_logprobs(model, context: list[int], continuations: list[list[int]]) -> list[float]:
    """log P(continuation | context) for each continuation, summed over its tokens; one forward pass.

    Rows longer than the model's context keep their last block_size + 1 tokens (the context is cut from the left).
    When every continuation is one token (MMLU's " A" .. " D"), the rows would be the same context four times:
    one row is run and each choice's log-prob is read at its last position (causal attention: equal).
    """
    block = model.config.block_size
    device = next(model.parameters()).device
    if context and all(len(c) == 1 for c in continuations):
        ctx = context[-block:]
        logits = model(torch.tensor([ctx], device=device), logits_to_keep=1)[0][0, -1].float()
        logp = torch.log_softmax(logits, dim=-1)
        return [logp[c[0]].item() for c in continuations]
    rows = [(context + c)[-(block + 1):] for c in continuations]
    T = max(len(r) for r in rows) - 1
    idx = torch.zeros(len(rows), T, dtype=torch.long)
    for b, r in enumerate(rows):
        idx[b, :len(r) - 1] = torch.tensor(r[:-1])
    logits = model(idx.to(device))[0].float()
    logp = torch.log_softmax(logits, dim=-1)
    out = []
    for b, (r, c) in enumerate(zip(rows, continuations)):
        n = len(r) - 1
        pos = torch.arange(n - len(c), n, device=device)  # position t predicts token t + 1
        target = torch.tensor(r[-len(c):], device=device)
        out.append(logp[b, pos, target].sum().item())
    return out


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


def evaluate_multiple_choice(model, tok, items: list[MCItem], task: str, progress: bool = True) -> TaskResult:
    """Accuracy (and length-normalised accuracy) of picking the most likely choice of each item."""
    t0 = time.perf_counter()
    correct, correct_norm, per_subject, picks = [], [], {}, []
    for item in tqdm(items, desc=task, unit="q", disable=not progress, leave=False):
        ctx = encode_context(tok, item.question)
        conts = [encode_plain(tok, c) for c in item.choices]
        lls = continuation_logprobs(model, ctx, conts)
        pick = max(range(len(lls)), key=lambda k: lls[k])
        norm = [ll / max(1, len(c.encode("utf-8"))) for ll, c in zip(lls, item.choices)]
        pick_norm = max(range(len(norm)), key=lambda k: norm[k])
        picks.append(pick)
        correct.append(float(pick == item.answer))
        correct_norm.append(float(pick_norm == item.answer))
        if item.subject:
            per_subject.setdefault(item.subject, []).append(correct[-1])
    acc, se = mean_and_stderr(correct)
    acc_norm, se_norm = mean_and_stderr(correct_norm)
    extra = {"acc_norm": acc_norm, "acc_norm_stderr": se_norm, "picks": picks}
    if per_subject:
        extra["subjects"] = {s: sum(v) / len(v) for s, v in sorted(per_subject.items())}
    return TaskResult(task, len(items), acc, se, time.perf_counter() - t0, extra)
