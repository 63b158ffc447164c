"""Pre-tokenization: the split regexes that cut text into chunks before BPE runs inside each chunk.

PAPER: Radford et al. 2019, "Language Models are Unsupervised Multitask Learners" (GPT-2), section 2.2:
without a split, BPE spends merges on "dog." "dog!" "dog?"; splitting by character category first keeps
letters, numbers, punctuation and whitespace apart, so a merge never crosses those boundaries.
OpenAI tiktoken (2022-23): the cl100k ("GPT-4") pattern, which also caps numbers at 3 digits.

INTUITION: each pattern is an alternation tried left to right at every position; the first branch that
matches takes the longest run it can. `\\p{L}` is any letter, `\\p{N}` any number, `\\s` whitespace.
`\\s+(?!\\S)` takes a whitespace run except its last character, so that " word" keeps its space.

WHY several: a tokenizer file is only read right with the split it was trained with. Ours use GPT2/GPT4;
Hugging Face's ByteLevel pre-tokenizer and SmolLM's Digits+ByteLevel are what foreign_formats.py reads.
"""

from __future__ import annotations

# GPT-2 (r50k), as tiktoken writes it: contractions, optional space + letters, optional space +
# numbers, optional space + punctuation, whitespace. The possessive `++` forms are equivalent to
# GPT-2's original `'s|'t|...| ?\p{L}+|...|\s+(?!\S)|\s+` and a little faster (no backtracking).
GPT2_SPLIT_PATTERN = r"""'(?:[sdmt]|ll|ve|re)| ?\p{L}++| ?\p{N}++| ?[^\s\p{L}\p{N}]++|\s++$|\s+(?!\S)|\s"""
# GPT-4 (cl100k): case-insensitive contractions, a letter run may take one leading non-letter
# (" word", "_word"), numbers split into groups of at most 3 digits, newlines grouped.
GPT4_SPLIT_PATTERN = (r"""'(?i:[sdmt]|ll|ve|re)|[^\r\n\p{L}\p{N}]?+\p{L}++|\p{N}{1,3}+| ?[^\s\p{L}\p{N}]++[\r\n]*+"""
                      r"""|\s++$|\s*[\r\n]|\s+(?!\S)|\s""")
SPLIT_PATTERNS = {"gpt2": GPT2_SPLIT_PATTERN, "gpt4": GPT4_SPLIT_PATTERN}

# Hugging Face's ByteLevel pre-tokenizer regex (GPT-2's original, without tiktoken's possessive forms).
HF_BYTELEVEL_PATTERN = r"""'(?:[sdmt]|ll|ve|re)| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+"""
# SmolLM / StarCoder (HF: Digits(individual_digits) then ByteLevel; llama.cpp pre-tokenizer "smollm"): every
# digit is a piece of its own, then GPT-2's split runs on the rest. As one regex: a digit ends a piece the way
# the end of the text does, so `\s+(?!\S)` becomes `\s+(?![^\s\p{N}])`, and ` ?\p{N}+` becomes `\p{N}`.
SMOLLM_PATTERN = r"""\p{N}|'(?:[sdmt]|ll|ve|re)| ?\p{L}+| ?[^\s\p{L}\p{N}]+|\s+(?![^\s\p{N}])|\s+"""


def pattern_name(pattern: str | None) -> str:
    """"gpt2" / "gpt4" for our named patterns, "none" for no split, else "custom" (shown in files and reprs)."""
    for name, pat in SPLIT_PATTERNS.items():
        if pattern == pat:
            return name
    return "none" if pattern is None else "custom"
