"""The benchmark's fixed prompts, three kinds, each a user message in the model's chat template.

- grounded: the answer is mostly in the prompt (rewrite code with a change, fix the typos of a paragraph,
  summarise a given text, convert a list): what prompt lookup (Saxena 2023) was made for.
- chat: open questions; nothing to copy: where prompt lookup has nothing to propose and a drafter must predict.
- code: write a short function from a description: formulaic text (indentation, keywords, repeated names).
Written here (not read from data/) so the benchmark needs only the model, and every run sees the same prompts.
"""

from __future__ import annotations

from phase1_foundation.project2_tokenizer.chat_template import render_chat

GROUNDED = [
    "Rewrite this Python function so that the variable `total` is called `running_sum`. Return only the code.\n\n"
    "def mean_of_positive(values):\n    total = 0\n    count = 0\n    for value in values:\n        if value > 0:\n"
    "            total = total + value\n            count = count + 1\n    if count == 0:\n        return 0.0\n"
    "    return total / count\n",
    "Fix the spelling mistakes in this paragraph and return the corrected paragraph.\n\n"
    "The old lighthouse stood on the edge of the cliff for more then two hundred years. Every nigth the keeper "
    "climbed the narow stairs, lit the great lamp and watched the ships pass safely into the harbour. When the "
    "keeper retired, the town decided to keep the lamp burning, and volunteers still take turns climbing the "
    "stairs every evening.",
    "Add a docstring to this function and return the whole function.\n\n"
    "def count_words(text):\n    counts = {}\n    for word in text.lower().split():\n        word = word.strip('.,!?')\n"
    "        if word:\n            counts[word] = counts.get(word, 0) + 1\n    return counts\n",
    "Turn this list into a numbered list, keeping every item as it is.\n\n"
    "- buy fresh bread from the bakery on the corner\n- return the library books before Friday\n"
    "- call the plumber about the kitchen sink\n- water the tomatoes in the back garden\n"
    "- send the birthday card to grandmother\n- book the train tickets for the weekend trip\n",
]

CHAT = [
    "What are three good habits for staying healthy?",
    "Tell me a short story about a robot who learns to paint.",
    "Why is the sky blue? Explain it simply.",
    "Give me some ideas for a rainy weekend at home.",
]

CODE = [
    "Write a Python function that checks whether a string is a palindrome.",
    "Write a Python function that returns the n-th Fibonacci number.",
    "Write a Python function that reverses the words of a sentence.",
    "Write a Python function that merges two sorted lists into one sorted list.",
]

TASKS = {"grounded": GROUNDED, "chat": CHAT, "code": CODE}


def chat_ids(tok, text: str) -> list[int]:
    """One user message in the tokenizer's chat template, ready for the assistant's reply; plain text (with BOS)
    for a tokenizer without a template (the tiny test models)."""
    if not tok.chat_template:
        return tok.encode(text, bos=True)
    rendered = render_chat(tok.chat_template, [{"role": "user", "content": text}], bos_token=tok.bos_token,
                           eos_token=tok.eos_token)
    return tok.encode(rendered, bos=False, allowed_special="all")


def task_prompts(tok, tasks: list[str], per_task: int) -> dict[str, list[list[int]]]:
    return {t: [chat_ids(tok, text) for text in TASKS[t][:per_task]] for t in tasks}
