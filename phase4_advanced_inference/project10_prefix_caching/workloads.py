"""The request streams the benchmark serves: what real traffic that repeats itself looks like, from data/mmlu.

- `shared_prompt`: one system prompt (instructions + solved few-shot examples, about `tokens` tokens) in front
  of many different short questions: the chat-bot / agent pattern (the same system prompt for every user).
- `CHAT_TURNS`: ten user messages of one conversation; turn N's prompt is turns 1..N-1 (with the replies) + N.
- `subject_requests`: questions of several MMLU subjects, each behind its subject's 5-shot block, in round-robin or
  random order: several hot prefixes competing for a budget that may not hold them all.
Every prompt is a list of token ids from the model's own chat template or project 4's MMLU format.
"""

from __future__ import annotations

import random

from course.errors import CourseError
from phase1_foundation.project2_tokenizer.chat_template import render_chat
from phase2_finetuning.project4_sft.harness import tasks
from phase2_finetuning.project4_sft.harness.multiple_choice import encode_context

INSTRUCTIONS = ("You are a careful quiz assistant. Each question comes with four choices, A to D. Think about the "
                "question, then answer with the letter of the correct choice and a short reason. Here are solved "
                "examples of the format.\n\n")

CHAT_TURNS = [
    "Hi! I am planning a small vegetable garden. Where should I start?",
    "Which vegetables are easiest for a beginner?",
    "How often should I water tomatoes?",
    "What about in very hot weather?",
    "Should I use compost or fertilizer?",
    "How do I make compost at home?",
    "Which insects are good for a garden?",
    "How can I keep snails away without poison?",
    "When is the best time to harvest carrots?",
    "Thanks! Can you summarise your advice in three points?",
]


def chat_ids(tok, messages: list[dict]) -> list[int]:
    """The conversation as the model's chat template writes it, ending with the assistant's turn opened."""
    if not tok.chat_template:
        raise CourseError("the benchmark's chat workloads need a model with a chat template (SmolLM2-135M-Instruct)")
    text = render_chat(tok.chat_template, messages, bos_token=tok.bos_token, eos_token=tok.eos_token)
    return tok.encode(text, bos=False, allowed_special="all")


def _questions(data_dir: str, split: str, subject: str) -> list[str]:
    """A subject's questions in project 4's format ("question\nA. ..\nD. ..\nAnswer:"), without the header."""
    head = f"The following are multiple choice questions (with answers) about {subject.replace('_', ' ')}.\n\n"
    return [it.question[len(head):] for it in tasks.load_mmlu(split, 0, [subject], data_dir)]


def _solved(data_dir: str, subject: str, k: int) -> str:
    """The k-th dev question of a subject with its answer: a few-shot example."""
    item = tasks.load_mmlu("dev", 0, [subject], data_dir)[k]
    return _questions(data_dir, "dev", subject)[k] + item.choices[item.answer] + "\n\n"


def shared_prompt(tok, data_dir: str, tokens: int, n_questions: int, question_subject: str = "miscellaneous",
                  max_chars: int = 300) -> tuple[list[list[int]], int]:
    """(n_questions prompts, the system prompt's token count): one system message of at least `tokens` tokens
    (solved dev questions of every subject in turn), then one short test question each (<= max_chars)."""
    system, subjects = INSTRUCTIONS, tasks.mmlu_subjects(data_dir)
    for k in range(5):  # the k-th dev question of every subject, until the block is long enough
        for s in subjects:
            if len(tok.encode(system, bos=False)) >= tokens:
                break
            system += _solved(data_dir, s, k)
    short = [q for q in _questions(data_dir, "test", question_subject) if len(q) <= max_chars]
    if len(short) < n_questions:
        raise CourseError(f"only {len(short)} questions of {question_subject} are <= {max_chars} characters; ask "
                          f"for fewer (--questions {len(short)})")
    prompts = [chat_ids(tok, [{"role": "system", "content": system.strip()},
                              {"role": "user", "content": q[:-len("\nAnswer:")]}]) for q in short[:n_questions]]
    return prompts, len(chat_ids(tok, [{"role": "system", "content": system.strip()}]))


def subject_requests(tok, data_dir: str, subjects: list[str], n: int, order: str, seed: int = 0,
                     shots: int = 5) -> list[tuple[str, list[int]]]:
    """n (subject, prompt ids) requests: MMLU questions behind their subject's few-shot block, subjects taken in
    round-robin order or at random (uniformly, seeded); each subject's questions in file order."""
    if order not in ("round-robin", "random"):
        raise CourseError(f"order ({order!r}) must be round-robin or random")
    items = {s: tasks.load_mmlu("test", shots, [s], data_dir) for s in subjects}
    rng, taken, out = random.Random(seed), {s: 0 for s in subjects}, []
    for i in range(n):
        s = subjects[i % len(subjects)] if order == "round-robin" else rng.choice(subjects)
        if taken[s] >= len(items[s]):
            raise CourseError(f"{s} has only {len(items[s])} test questions; ask for fewer requests")
        out.append((s, encode_context(tok, items[s][taken[s]].question)))
        taken[s] += 1
    return out


def common_prefix(a: list[int], b: list[int]) -> int:
    n = 0
    for x, y in zip(a, b):
        if x != y:
            break
        n += 1
    return n
