"""The evaluation sets as plain Python records, and the prompts the harness shows the model.

Papers:
    Think you have Solved Question Answering? Try ARC         Clark et al., 2018   ARC-Easy / ARC-Challenge
    Measuring Massive Multitask Language Understanding        Hendrycks et al., 2021   MMLU, 57 subjects
    Training Verifiers to Solve Math Word Problems            Cobbe et al., 2021   GSM8K
    Evaluating Large Language Models Trained on Code          Chen et al., 2021    HumanEval, pass@k
    A framework for few-shot language model evaluation        Gao et al. (lm-evaluation-harness)
        the prompt formats below are that harness's defaults, so our numbers can be compared with theirs

Prompt formats (lm-evaluation-harness):
    ARC    "Question: {stem}\\nAnswer:"  scored continuations " {choice text}"
    MMLU   "The following are multiple choice questions (with answers) about {subject}.\\n\\n"
           "{question}\\nA. ...\\nB. ...\\nC. ...\\nD. ...\\nAnswer:"  scored continuations " A" .. " D"
    GSM8K  "Question: {question}\\nAnswer:"  generated until a blank line; the final number is compared
Few-shot examples are solved examples of the same format, separated by a blank line, taken from the dev split
(ARC, MMLU; the same subject for MMLU) or from train (GSM8K has no dev split); never from the test set.
"""

from __future__ import annotations

import csv
import gzip
import json
import random
from dataclasses import dataclass
from pathlib import Path

from course.errors import CourseError
from course.paths import repo_path

DATA = "data"
FETCH = "uv run python phase2_finetuning/project4_sft/download_data.py --dataset {}"


@dataclass
class MCItem:
    """One multiple-choice question: the context shown and the candidate continuations, `answer` the right one."""

    id: str
    question: str
    choices: list[str]
    answer: int
    subject: str = ""


def _need(path: Path, dataset: str) -> Path:
    if not path.is_file():
        raise CourseError(f"{path} not found; fetch it with: {FETCH.format(dataset)}")
    return path


def _jsonl(path: Path, dataset: str) -> list[dict]:
    rows = []
    opener = gzip.open if path.suffix == ".gz" else open
    try:
        with opener(_need(path, dataset), "rt", encoding="utf-8") as f:
            for n, line in enumerate(f, 1):
                if line.strip():
                    rows.append(json.loads(line))
    except json.JSONDecodeError as e:
        raise CourseError(f"{path} line {n} is not valid JSON ({e.msg}); fetch it again with --force") from None
    except (OSError, EOFError, UnicodeDecodeError) as e:
        raise CourseError(f"{path} could not be read ({e}); fetch it again with --force") from None
    return rows


# ---- ARC -----------------------------------------------------------------------------------------------------
def load_arc(kind: str = "Easy", split: str = "Test", data_dir: str = DATA) -> list[MCItem]:
    """ARC-Easy or ARC-Challenge. Some answer keys are digits ('1'..'4'), as in the original release."""
    if kind not in ("Easy", "Challenge") or split not in ("Train", "Dev", "Test"):
        raise CourseError(f"ARC kind must be Easy/Challenge and split Train/Dev/Test, got {kind}/{split}")
    path = repo_path(data_dir) / "arc" / f"ARC-{kind}" / f"ARC-{kind}-{split}.jsonl"
    items = []
    for row in _jsonl(path, "arc"):
        try:
            labels = [c["label"] for c in row["question"]["choices"]]
            items.append(MCItem(row["id"], f"Question: {row['question']['stem']}\nAnswer:",
                                [" " + c["text"] for c in row["question"]["choices"]], labels.index(row["answerKey"])))
        except (KeyError, ValueError, TypeError):
            raise CourseError(f"{path}: row {row.get('id', '?')} is not an ARC question with its answer key") from None
    return items


# ---- MMLU ----------------------------------------------------------------------------------------------------
LETTERS = "ABCD"


def mmlu_subjects(data_dir: str = DATA) -> list[str]:
    folder = repo_path(data_dir) / "mmlu" / "test"
    if not folder.is_dir():
        raise CourseError(f"{folder} not found; fetch it with: {FETCH.format('mmlu')}")
    return sorted(p.name[:-len("_test.csv")] for p in folder.glob("*_test.csv"))


def _mmlu_rows(path: Path) -> list[list[str]]:
    try:
        with open(_need(path, "mmlu"), newline="", encoding="utf-8") as f:
            rows = list(csv.reader(f))
    except (OSError, UnicodeDecodeError, csv.Error) as e:
        raise CourseError(f"{path} could not be read ({e}); fetch it again with --force") from None
    for k, r in enumerate(rows):
        if len(r) != 6 or r[5] not in LETTERS:
            raise CourseError(f"{path} row {k + 1} is not question,A,B,C,D,answer; fetch it again with --force")
    return rows


def mmlu_question(row: list[str], with_answer: bool = False) -> str:
    text = row[0].strip() + "".join(f"\n{L}. {c}" for L, c in zip(LETTERS, row[1:5])) + "\nAnswer:"
    return text + f" {row[5]}\n\n" if with_answer else text


def load_mmlu(split: str = "test", shots: int = 0, subjects: list[str] | None = None,
              data_dir: str = DATA) -> list[MCItem]:
    """MMLU questions; with shots > 0 the first `shots` dev questions of the same subject come first, answered."""
    if split not in ("dev", "val", "test"):
        raise CourseError(f"MMLU split must be dev, val or test, got {split}")
    if not 0 <= shots <= 5:
        raise CourseError(f"MMLU has 5 dev questions per subject: shots must be 0..5, got {shots}")
    root = repo_path(data_dir) / "mmlu"
    items = []
    for subject in subjects or mmlu_subjects(data_dir):
        head = f"The following are multiple choice questions (with answers) about {subject.replace('_', ' ')}.\n\n"
        dev = _mmlu_rows(root / "dev" / f"{subject}_dev.csv")[:shots] if shots else []
        head += "".join(mmlu_question(r, with_answer=True) for r in dev)
        for k, row in enumerate(_mmlu_rows(root / split / f"{subject}_{split}.csv")):
            items.append(MCItem(f"{subject}/{k}", head + mmlu_question(row), [f" {L}" for L in LETTERS],
                                LETTERS.index(row[5]), subject))
    return items


def with_shots(items: list[MCItem], examples: list[MCItem], shots: int) -> list[MCItem]:
    """Prefix each item's question with `shots` solved examples (ARC): "question answer" blocks."""
    if shots > len(examples):
        raise CourseError(f"asked for {shots} shots but only {len(examples)} examples are available")
    head = "".join(f"{e.question}{e.choices[e.answer]}\n\n" for e in examples[:shots])
    return [MCItem(i.id, head + i.question, i.choices, i.answer, i.subject) for i in items]


# ---- GSM8K and HumanEval ---------------------------------------------------------------------------------------
def load_gsm8k(split: str = "test", data_dir: str = DATA) -> list[dict]:
    """{question, answer} rows; the reference number is after '####' in the answer."""
    rows = _jsonl(repo_path(data_dir) / "gsm8k" / f"{split}.jsonl", "gsm8k")
    if not all({"question", "answer"} <= set(r) for r in rows):
        raise CourseError(f"data/gsm8k/{split}.jsonl: every row needs 'question' and 'answer'")
    return rows


def gsm8k_prompt(question: str, examples: list[dict] = ()) -> str:
    head = "".join(f"Question: {e['question']}\nAnswer: {e['answer']}\n\n" for e in examples)
    return f"{head}Question: {question}\nAnswer:"


def load_humaneval(data_dir: str = DATA) -> list[dict]:
    rows = _jsonl(repo_path(data_dir) / "humaneval" / "HumanEval.jsonl.gz", "humaneval")
    need = {"task_id", "prompt", "canonical_solution", "test", "entry_point"}
    if len(rows) != 164 or not all(need <= set(r) for r in rows):
        raise CourseError("data/humaneval/HumanEval.jsonl.gz is not the 164-problem HumanEval file; fetch it again")
    return rows


def subset(items: list, limit: int | None, seed: int = 1337, key=None) -> list:
    """A fixed subset of at most `limit` items (all of them, in order, when limit is None, 0 or covers them).

    With `key` (e.g. the MMLU subject) the subset is stratified: items are drawn round-robin from each group,
    each group shuffled by `seed`, so 2,000 MMLU questions still cover all 57 subjects evenly.
    """
    if not limit or limit <= 0 or limit >= len(items):
        return list(items)
    rng = random.Random(seed)
    groups: dict = {}
    for it in items:
        groups.setdefault(key(it) if key else 0, []).append(it)
    for g in groups.values():
        rng.shuffle(g)
    picked, k = [], 0
    while len(picked) < limit:
        for g in groups.values():
            if k < len(g) and len(picked) < limit:
                picked.append(g[k])
        k += 1
    return picked


def comparison_subset(task: str, limit: int | None, seed: int = 1337, data_dir: str = DATA) -> list[MCItem]:
    """The 0-shot test questions a before/after comparison scores: ARC-Easy's seeded subset, or MMLU's
    subject-stratified one (all of them when limit is None or 0). The same arguments give the same questions."""
    if task == "arc_easy":
        return subset(load_arc("Easy", "Test", data_dir), limit, seed)
    if task == "mmlu":
        return subset(load_mmlu("test", 0, data_dir=data_dir), limit, seed, key=lambda i: i.subject)
    raise CourseError(f"task must be arc_easy or mmlu, got {task!r}")
