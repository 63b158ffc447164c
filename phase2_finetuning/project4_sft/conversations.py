"""Instruction datasets as chats: every reader returns lists of `{"role": ..., "content": ...}` messages.

Papers:
    Training language models to follow instructions with human feedback   Ouyang et al., 2022 (InstructGPT)
        the SFT stage: human-written demonstrations, a prompt and the answer a labeller wrote for it
    Stanford Alpaca: an instruction-following LLaMA model                 Taori et al., 2023
        {instruction, input, output} records, the input an optional second part of the prompt
    OpenAssistant Conversations                                           Köpf et al., 2023 (oasst1)
        message trees: every reply names its parent, siblings are ranked by human preference
    LIMA: Less Is More for Alignment                                      Zhou et al., 2023
        a thousand careful examples are enough to teach the format; the knowledge comes from pretraining

One format for all of them (the one Hugging Face's `apply_chat_template` takes) means the masking, the
template and the trainer never need to know where a conversation came from.
"""

from __future__ import annotations

import gzip
import json
import random
import re
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

from course.errors import CourseError
from course.paths import repo_path

ROLES = ("system", "user", "assistant")
Chat = list[dict[str, str]]

ALPACA_PATH = "data/alpaca_subset/alpaca_5000.json"
RASBT_PATH = "data/rasbt_instruction/instruction-data.json"
OASST1_PATH = "data/oasst1/en-validation.jsonl"
GSM8K_TRAIN_PATH = "data/gsm8k/train.jsonl"
DOWNLOAD = "uv run python phase2_finetuning/project4_sft/download_data.py --dataset {}"


@dataclass
class Chats:
    """The chats read from one source, with a count of every row that was left out and why."""

    chats: list[Chat]
    source: str
    skipped: Counter = field(default_factory=Counter)

    def __len__(self) -> int:
        return len(self.chats)

    def summary(self) -> str:
        dropped = ", ".join(f"{n} {why}" for why, n in sorted(self.skipped.items())) or "none dropped"
        return f"{self.source}: {len(self.chats):,} chats ({dropped})"


# ---- file readers (a corrupt file is one clear line, naming the file and the row) ------------------
def _open_text(path: Path):
    return gzip.open(path, "rt", encoding="utf-8") if path.suffix == ".gz" else open(path, encoding="utf-8")


def _existing(path: str | Path, dataset: str) -> Path:
    p = repo_path(path)
    if not p.is_file():
        raise CourseError(f"{p} not found; fetch it with: {DOWNLOAD.format(dataset)}")
    return p


def read_json(path: str | Path, dataset: str) -> list:
    p = _existing(path, dataset)
    try:
        with _open_text(p) as f:
            data = json.load(f)
    except (json.JSONDecodeError, UnicodeDecodeError, OSError, EOFError) as e:
        raise CourseError(f"{p} is not valid JSON ({e}); the file is corrupt, fetch it again with --force") from None
    if not isinstance(data, list):
        raise CourseError(f"{p}: expected a JSON array of records, got {type(data).__name__}")
    return data


def read_jsonl(path: str | Path, dataset: str) -> list[dict]:
    p = _existing(path, dataset)
    rows = []
    try:
        with _open_text(p) as f:
            for n, line in enumerate(f, 1):
                if line.strip():
                    rows.append(json.loads(line))
    except json.JSONDecodeError as e:
        raise CourseError(f"{p} line {n} is not valid JSON ({e.msg}); the file is corrupt, fetch it again "
                          "with --force") from None
    except (UnicodeDecodeError, OSError, EOFError) as e:
        raise CourseError(f"{p} could not be read ({e}); the file is corrupt, fetch it again with --force") from None
    return rows


# ---- Alpaca and rasbt: one prompt, one answer ---------------------------------------------------------
def alpaca_chat(record: dict) -> Chat:
    """instruction (+ a blank line + input, when there is one) -> user; output -> assistant."""
    prompt = record["instruction"].strip()
    extra = (record.get("input") or "").strip()
    if extra:
        prompt = f"{prompt}\n\n{extra}"
    return [{"role": "user", "content": prompt}, {"role": "assistant", "content": record["output"].strip()}]


def read_alpaca(path: str | Path = ALPACA_PATH, dataset: str = "alpaca") -> Chats:
    """Alpaca-format records ({instruction, input, output}); empty instructions or outputs are dropped, counted."""
    out = Chats([], f"{dataset} ({Path(path).name})")
    for i, rec in enumerate(read_json(path, dataset)):
        if not isinstance(rec, dict) or not {"instruction", "output"} <= set(rec):
            raise CourseError(f"{path} record {i} is not an {{instruction, input, output}} record")
        if not str(rec["instruction"]).strip() or not str(rec["output"]).strip():
            out.skipped["empty instruction or output"] += 1
            continue
        out.chats.append(alpaca_chat(rec))
    return out


def read_rasbt(path: str | Path = RASBT_PATH) -> Chats:
    return read_alpaca(path, dataset="rasbt")


# ---- GSM8K: a worked solution ending in "#### answer" ------------------------------------------------
CALCULATOR = re.compile(r"<<[^>]*>>")


def read_gsm8k(path: str | Path = GSM8K_TRAIN_PATH, strip_calculator: bool = True) -> Chats:
    """question -> user, worked answer -> assistant. The `<<48/2=24>>` calculator annotations are removed by
    default (they are tool calls for a calculator we do not have); the final `#### 72` line is kept, since the
    harness reads the answer from it."""
    out = Chats([], f"gsm8k ({Path(path).name})")
    for i, row in enumerate(read_jsonl(path, "gsm8k")):
        if not {"question", "answer"} <= set(row):
            raise CourseError(f"{path} row {i + 1} lacks 'question' or 'answer'")
        answer = CALCULATOR.sub("", row["answer"]) if strip_calculator else row["answer"]
        out.chats.append([{"role": "user", "content": row["question"].strip()},
                          {"role": "assistant", "content": answer.strip()}])
    return out


# ---- oasst1: message trees rebuilt through parent_id ------------------------------------------------
def oasst_drop_reason(row: dict) -> str | None:
    """Why a row is dropped, or None. Same filter as the dataset's own export: deleted rows and rows that
    failed human review go."""
    if row.get("deleted"):
        return "deleted"
    if row.get("review_result") is False:
        return "failed review"
    if row.get("role") not in ("prompter", "assistant") or not str(row.get("text", "")).strip():
        return "unknown role or empty text"
    return None


def oasst_threads(rows: list[dict], mode: str = "top1") -> Chats:
    """Rebuild conversations from oasst1 rows.

    INTUITION: oasst1 is a forest. A root is a user prompt; its children are assistant replies (ranked by
    labellers, rank 0 = best); their children are the user's follow-ups, and so on. A conversation is a path
    from a root down the tree.
    IMPLEMENTATION: drop deleted / failed-review rows, and with them their whole subtree (a reply to a removed
    message has lost its context: counted as "orphaned"). Then
      mode="top1":   from each root follow the best-ranked child at every step (one chat per tree, the
                     usual "oasst top-1" SFT set);
      mode="leaves": every root-to-leaf path (more chats, sharing their prefixes).
    A path is cut after its last assistant message (a trailing user turn has nothing to learn from).
    """
    if mode not in ("top1", "leaves"):
        raise CourseError(f"oasst1 mode must be 'top1' or 'leaves', got {mode!r}")
    out = Chats([], f"oasst1 ({mode})")
    by_id, children = {}, {}
    for row in rows:
        why = oasst_drop_reason(row)
        if why:
            out.skipped[why] += 1
            continue
        by_id[row["message_id"]] = row
    for row in by_id.values():
        children.setdefault(row["parent_id"], []).append(row)
    # reachable from a root through kept rows only
    reachable: set[str] = set()
    stack = [r["message_id"] for r in children.get(None, [])]
    while stack:
        mid = stack.pop()
        reachable.add(mid)
        stack.extend(c["message_id"] for c in children.get(mid, []))
    orphans = len(by_id) - len(reachable)
    if orphans:
        out.skipped["orphaned (parent dropped or not in the file)"] += orphans

    def ranked(mid: str) -> list[dict]:
        kids = children.get(mid, [])
        return sorted(kids, key=lambda r: (r.get("rank") is None, r.get("rank") or 0, r.get("created_date", "")))

    def to_chat(path: list[dict]) -> Chat | None:
        while path and path[-1]["role"] != "assistant":
            path = path[:-1]
        if not path:
            return None
        roles = ["user" if r["role"] == "prompter" else "assistant" for r in path]
        if any(a == b for a, b in zip(roles, roles[1:])) or roles[0] != "user":
            return None  # not alternating: not a conversation the template can frame
        return [{"role": ro, "content": r["text"].strip()} for ro, r in zip(roles, path)]

    paths: list[list[dict]] = []
    for root in sorted(children.get(None, []), key=lambda r: r.get("created_date", "")):
        if root["role"] != "prompter":
            out.skipped["root is not a user prompt"] += 1
            continue
        if mode == "top1":
            path = [root]
            while ranked(path[-1]["message_id"]):
                path.append(ranked(path[-1]["message_id"])[0])
            paths.append(path)
        else:
            todo = [[root]]
            while todo:
                path = todo.pop()
                kids = ranked(path[-1]["message_id"])
                if not kids:
                    paths.append(path)
                todo.extend(path + [k] for k in reversed(kids))
    for path in paths:
        chat = to_chat(path)
        if chat is None:
            out.skipped["thread without an assistant reply"] += 1
        else:
            out.chats.append(chat)
    return out


def read_oasst1(path: str | Path = OASST1_PATH, mode: str = "top1") -> Chats:
    rows = read_jsonl(path, "oasst1")
    for i, row in enumerate(rows):
        if not {"message_id", "parent_id", "role", "text"} <= set(row):
            raise CourseError(f"{path} row {i + 1} is not an oasst1 message (needs message_id, parent_id, role, text)")
    return oasst_threads(rows, mode)


# ---- checks and held-out splits ----------------------------------------------------------------------
def check_chat(chat: Chat, where: str = "conversation") -> None:
    """One clear error for a chat the trainer cannot use: an unknown role, non-text content, no assistant turn."""
    if not isinstance(chat, list) or not chat:
        raise CourseError(f"{where}: a chat must be a non-empty list of {{'role', 'content'}} messages")
    for k, m in enumerate(chat):
        if not isinstance(m, dict) or "role" not in m or "content" not in m:
            raise CourseError(f"{where}: message {k} must be a dict with 'role' and 'content'")
        if m["role"] not in ROLES:
            raise CourseError(f"{where}: message {k} has unknown role {m['role']!r}; roles are {', '.join(ROLES)}")
        if not isinstance(m["content"], str):
            raise CourseError(f"{where}: message {k} content must be a string, got {type(m['content']).__name__}")
    if not any(m["role"] == "assistant" for m in chat):
        raise CourseError(f"{where}: no assistant turn, so nothing to train on; every chat needs an assistant reply")


def split_heldout(chats: list[Chat], heldout: int | float, seed: int = 1337) -> tuple[list[Chat], list[Chat]]:
    """(train, held out): a fixed random subset held out, chosen by `seed` alone.

    `heldout` is a count (int) or a fraction (float < 1). The same seed and the same data always hold out the
    same chats, so a before/after comparison never sees a training example.
    """
    n = len(chats)
    k = round(heldout * n) if isinstance(heldout, float) else int(heldout)
    if not 0 <= k <= n:
        raise CourseError(f"cannot hold out {heldout} of {n} chats")
    order = list(range(n))
    random.Random(seed).shuffle(order)
    held = set(order[:k])
    return [c for i, c in enumerate(chats) if i not in held], [c for i, c in enumerate(chats) if i in held]


READERS = {"alpaca": read_alpaca, "rasbt": read_rasbt, "oasst1": read_oasst1, "gsm8k": read_gsm8k}


def read_dataset(name: str, path: str | Path | None = None) -> Chats:
    """The chats of one named dataset (alpaca, rasbt, oasst1, gsm8k), from its default path under data/."""
    if name not in READERS:
        raise CourseError(f"unknown dataset '{name}'; choose from: {', '.join(READERS)}")
    return READERS[name]() if path is None else READERS[name](path)
