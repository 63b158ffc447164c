"""Project 4's few-shot evaluation through the prefix cache: each subject's shots are computed once.

PAPERS
- Hendrycks et al. 2021, "Measuring Massive Multitask Language Understanding": MMLU 5-shot puts the same five
  solved dev questions of a subject in front of every test question of that subject (lm-evaluation-harness's
  format, which project 4's harness/tasks.py follows).
- Zheng et al. 2024 (SGLang): few-shot benchmarks are among the workloads RadixAttention speeds up most.

INTUITION
A 5-shot MMLU context is ~300-2,500 tokens, of which ~80-90% is the subject's header and shots, identical for
all of its questions. Project 4's harness computes them again for every question; through the prefix cache the
first question of a subject computes them and every later one prefills only its own question.

IMPLEMENTATION
Project 4's scorer runs unchanged (`evaluate_multiple_choice`, its rows, reads and picks); only the model it is
given differs: `PrefixCachedLM` answers `model(idx, logits_to_keep=k)` like project 3's Llama, every row through
a `PrefixCachingEngine.forward`. With `batch_size=1` each forward is one question (MMLU's one-token choices share
one row), so rows are never padded. Rows of a padded batch (ARC's choices, several questions) are run at their
padded length: the padding comes after every position read, so causal attention keeps the scores exact, but it
is computed and stored for nothing: use batch_size=1.
"""

from __future__ import annotations

import torch

from phase2_finetuning.project4_sft.harness.multiple_choice import (encode_context, encode_plain,
                                                                    evaluate_multiple_choice)
from phase2_finetuning.project4_sft.harness.report import TaskResult
from phase2_finetuning.project4_sft.harness.tasks import MCItem
from phase4_advanced_inference.project10_prefix_caching.kv_store import PrefixStore
from phase4_advanced_inference.project10_prefix_caching.prefix_engine import PrefixCachingEngine


class PrefixCachedLM:
    """Where project 4's harness expects a model: `self(idx, logits_to_keep=k) -> (logits, None)`, `config`,
    `parameters()`; each row of idx goes through the engine (and so through its prefix cache)."""

    def __init__(self, engine: PrefixCachingEngine):
        self.engine, self.config = engine, engine.model.config

    def parameters(self):
        return self.engine.model.parameters()

    def __call__(self, idx: torch.Tensor, targets=None, logits_to_keep: int = 0):
        T = idx.shape[1]
        rows = [self.engine.forward(row.tolist(), logits_to_keep or T) for row in idx]
        return torch.stack(rows), None


def longest_row(tok, items: list[MCItem]) -> int:
    """Tokens of the longest context + choice among the items (the engine's cache length)."""
    return max(len(encode_context(tok, it.question)) + max(len(encode_plain(tok, c)) for c in it.choices)
               for it in items)


def evaluate_multiple_choice_cached(model, tok, items: list[MCItem], task: str, store: PrefixStore,
                                    progress: bool = True) -> TaskResult:
    """Project 4's `evaluate_multiple_choice` with the model behind a prefix cache (one question per forward).
    The result's extra holds the store's counters (hit rate, bytes, evictions)."""
    max_len = min(model.config.block_size, longest_row(tok, items))
    engine = PrefixCachingEngine(model, store, max_len=max_len)
    result = evaluate_multiple_choice(PrefixCachedLM(engine), tok, items, task, progress=progress, batch_size=1)
    result.extra["prefix_cache"] = store.counters()
    return result
