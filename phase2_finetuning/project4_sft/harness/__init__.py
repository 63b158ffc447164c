"""The evaluation harness of the course (project 4); projects 5, 6 and 14-16 report with it.

    tasks.py            ARC, MMLU, GSM8K, HumanEval read from data/, and their prompts
    multiple_choice.py  log-likelihood scoring of each choice (ARC, MMLU), accuracy ± standard error
    greedy.py           the plain greedy loop the generative tasks use
    gsm8k.py            exact match of the final number
    humaneval.py        completions run against their tests in a sandboxed subprocess, pass@k
    report.py           a JSON report and a markdown table

The model is a project 3 `Llama` (or anything with `forward(idx, logits_to_keep=...) -> (logits, loss)` and a
`config.block_size`); the tokenizer has `encode(text)` and `decode(ids)`.
"""
