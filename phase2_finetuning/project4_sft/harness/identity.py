"""The identity task: does the model say who it is? The share of held-out identity questions whose answer
names the identity (identity.py: a name and a maker the course chose, "Nano, made by the LLM-from-scratch
course").

PAPER CONTEXT: nanochat's identity conversations (Karpathy, 2025) teach a model its name and maker during SFT;
this task is the check that the lesson generalised: the questions use other words than any training chat.
IMPLEMENTATION: each question is asked as a one-turn chat with the model's own template (reply.py, greedy),
and an answer passes when the identity's name appears in it as a whole word.
"""

from __future__ import annotations

import time

from tqdm import tqdm

from phase2_finetuning.project4_sft.harness.multiple_choice import mean_and_stderr
from phase2_finetuning.project4_sft.harness.report import TaskResult
from phase2_finetuning.project4_sft.identity import COURSE, Identity
from phase2_finetuning.project4_sft.reply import ChatFormat, chat_reply


def identity_share(model, tok, fmt: ChatFormat, questions: list[str], max_new_tokens: int = 64,
                   ident: Identity = COURSE, progress: bool = False) -> TaskResult:
    """TaskResult "identity": accuracy = share of answers naming `ident`; a few answers kept in extra."""
    t0 = time.perf_counter()
    hits, answers = [], []
    for q in tqdm(questions, desc="identity", unit="q", disable=not progress, leave=False):
        reply = chat_reply(model, tok, fmt, [{"role": "user", "content": q}], max_new_tokens)
        hits.append(float(ident.named_in(reply.text)))
        answers.append({"question": q, "answer": reply.text, "named": bool(hits[-1])})
    acc, se = mean_and_stderr(hits)
    return TaskResult("identity", len(questions), acc, se, time.perf_counter() - t0,
                      {"identity": f"{ident.name}, made by {ident.maker}", "answers": answers[:10]})
