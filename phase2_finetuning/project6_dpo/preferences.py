"""Preference data: every reader returns pairs (a prompt chat, a chosen reply, a rejected reply).

Papers:
    Training language models to follow instructions with human feedback   Ouyang et al., 2022 (InstructGPT)
        labellers rank several replies to one prompt; the ranking trains a reward model, here it trains the policy
    Training a Helpful and Harmless Assistant with RLHF                   Bai et al., 2022 (Anthropic HH-RLHF)
        crowdworkers chat with a model and pick the better of two replies at each step
    OpenAssistant Conversations                                           Köpf et al., 2023 (oasst1)
        message trees whose sibling replies are ranked by human preference (rank 0 = best)
    Build a Large Language Model (From Scratch), ch. 7                    Raschka, 2024
        1,100 instruction records, each with a polite (chosen) and an impolite (rejected) answer

INTUITION: a preference pair says nothing absolute ("this answer is good"), only relative ("this one is
better than that one, for this prompt"). DPO learns from exactly that: it raises the chosen reply's
log-probability relative to the rejected one's, both measured against a frozen reference.

One format for all sources:
    Pair(prompt=[{"role": "user", "content": ...}, ...], chosen="...", rejected="...")
the prompt is a chat that ends with a user message (multi-turn for HH-RLHF and oasst1), the replies are the
assistant's next turn. A row the trainer cannot use is never silently lost: it is dropped and counted under
its reason (chosen equal to rejected, an empty reply, turns that do not alternate, ...), and the summary line
says how many.
"""

from __future__ import annotations

import itertools
import random
import re
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

from course.errors import CourseError
from phase2_finetuning.project4_sft.conversations import (
    Chat,
    alpaca_chat,
    oasst_drop_reason,
    read_json,
    read_jsonl,
    split_heldout,
)

RASBT_PATH = "data/rasbt_instruction/instruction-data-with-preference.json"
HH_HELPFUL_PATH = "data/hh_rlhf/helpful-base/test.jsonl.gz"
HH_HARMLESS_PATH = "data/hh_rlhf/harmless-base/test.jsonl.gz"
OASST1_PATH = "data/oasst1/en-validation.jsonl"


@dataclass
class Pair:
    prompt: Chat      # ends with a user message
    chosen: str       # the preferred assistant reply
    rejected: str     # the other one


@dataclass
class Pairs:
    """The pairs read from one source, with a count of every row that was left out and why."""

    pairs: list[Pair]
    source: str
    skipped: Counter = field(default_factory=Counter)

    def __len__(self) -> int:
        return len(self.pairs)

    def add(self, prompt: Chat, chosen: str, rejected: str) -> None:
        """Keep the pair, or count why not: an empty reply teaches nothing, and chosen == rejected gives a
        loss whose gradient is exactly zero (the two log-ratios cancel), so it only wastes a batch slot."""
        chosen, rejected = chosen.strip(), rejected.strip()
        if not chosen or not rejected:
            self.skipped["empty response"] += 1
        elif chosen == rejected:
            self.skipped["chosen equals rejected"] += 1
        elif not prompt or prompt[-1]["role"] != "user" or not any(m["content"].strip() for m in prompt):
            self.skipped["empty prompt"] += 1
        else:
            self.pairs.append(Pair(prompt, chosen, rejected))

    def summary(self) -> str:
        dropped = ", ".join(f"{n} {why}" for why, n in sorted(self.skipped.items())) or "none dropped"
        return f"{self.source}: {len(self.pairs):,} pairs ({dropped})"


# ---- rasbt: one instruction, a polite and an impolite answer ------------------------------------------------
def read_rasbt(path: str | Path = RASBT_PATH) -> Pairs:
    """{instruction, input, output, chosen, rejected} records; the prompt is project 4's Alpaca prompt."""
    out = Pairs([], f"rasbt ({Path(path).name})")
    for i, rec in enumerate(read_json(path, "rasbt")):
        if not isinstance(rec, dict) or not {"instruction", "chosen", "rejected"} <= set(rec):
            raise CourseError(f"{path} record {i} is not a preference record (needs instruction, chosen, rejected)")
        if not str(rec["instruction"]).strip():
            out.skipped["empty prompt"] += 1
            continue
        prompt = alpaca_chat({**rec, "output": ""})[:1]
        out.add(prompt, str(rec["chosen"]), str(rec["rejected"]))
    return out


# ---- Anthropic HH-RLHF: two transcripts that share everything but the last reply --------------------------
TURN = re.compile(r"\n\n(Human|Assistant):")
ROLE = {"Human": "user", "Assistant": "assistant"}


def parse_transcript(text: str) -> Chat | None:
    """'\\n\\nHuman: hi\\n\\nAssistant: hello' -> [{"role": "user", "content": "hi"}, {"role": "assistant", ...}].

    None when the text is not a conversation a chat template can frame: text before the first turn, turns
    that do not alternate (a few HH transcripts have two Assistant turns in a row), or a first turn that is
    not the human's.
    """
    parts = TURN.split(text)
    if parts[0].strip() or len(parts) < 3:
        return None
    roles = [ROLE[r] for r in parts[1::2]]
    if roles[0] != "user" or any(a == b for a, b in itertools.pairwise(roles)):
        return None
    return [{"role": r, "content": c.strip()} for r, c in zip(roles, parts[2::2])]


def hh_pair(row: dict) -> tuple[Chat, str, str] | str:
    """(prompt, chosen, rejected) of one HH-RLHF row, or the reason it cannot be used."""
    chosen, rejected = parse_transcript(row["chosen"]), parse_transcript(row["rejected"])
    if chosen is None or rejected is None:
        return "turns do not alternate"
    if chosen[-1]["role"] != "assistant" or rejected[-1]["role"] != "assistant":
        return "transcript does not end with an assistant reply"
    if chosen[:-1] != rejected[:-1]:
        return "chosen and rejected prompts differ"
    return chosen[:-1], chosen[-1]["content"], rejected[-1]["content"]


def read_hh(path: str | Path, dataset: str) -> Pairs:
    """HH-RLHF {chosen, rejected} transcripts as multi-turn prompts and the two final replies."""
    out = Pairs([], f"{dataset} ({Path(path).parent.name}/{Path(path).name})")
    for i, row in enumerate(read_jsonl(path, dataset)):
        if not isinstance(row, dict) or not isinstance(row.get("chosen"), str) \
                or not isinstance(row.get("rejected"), str):
            raise CourseError(f"{path} row {i + 1} is not an HH-RLHF row (needs string 'chosen' and 'rejected')")
        got = hh_pair(row)
        if isinstance(got, str):
            out.skipped[got] += 1
        else:
            out.add(*got)
    return out


def read_hh_helpful(path: str | Path = HH_HELPFUL_PATH) -> Pairs:
    return read_hh(path, "hh_helpful")


def read_hh_harmless(path: str | Path = HH_HARMLESS_PATH) -> Pairs:
    return read_hh(path, "hh_harmless")


# ---- oasst1: ranked sibling replies -----------------------------------------------------------------------
def oasst_pairs(rows: list[dict]) -> Pairs:
    """Preference pairs from oasst1's ranked siblings.

    INTUITION: every user message in an oasst1 tree may have several assistant replies, ranked by labellers
    (rank 0 = best). The thread from the root down to that user message is the prompt; the best-ranked reply
    is chosen, and each lower-ranked sibling gives one pair with it (k ranked replies -> k - 1 pairs, so a
    prompt with many replies does not outweigh the others quadratically).
    IMPLEMENTATION: rows are filtered as project 4 filters them (deleted, failed review, empty: dropped and
    counted); a prompt whose thread passes through a dropped or missing message is counted as orphaned; a
    reply without a rank (unranked by labellers) is left out of the ranking.
    """
    out = Pairs([], "oasst1 (ranked siblings)")
    by_id, dropped = {}, set()
    for row in rows:
        why = oasst_drop_reason(row)
        if why:
            out.skipped[f"message {why}"] += 1
            dropped.add(row.get("message_id"))
            continue
        by_id[row["message_id"]] = row
    children: dict[str, list[dict]] = {}
    for row in by_id.values():
        children.setdefault(row["parent_id"], []).append(row)

    def thread(mid: str) -> Chat | None:
        path = []
        while mid is not None:
            row = by_id.get(mid)
            if row is None:
                return None
            path.append(row)
            mid = row["parent_id"]
        path.reverse()
        roles = ["user" if r["role"] == "prompter" else "assistant" for r in path]
        if roles[0] != "user" or any(a == b for a, b in itertools.pairwise(roles)):
            return None
        return [{"role": ro, "content": r["text"].strip()} for ro, r in zip(roles, path)]

    for row in sorted(by_id.values(), key=lambda r: (r.get("created_date") or "", r["message_id"])):
        if row["role"] != "prompter":
            continue
        ranked = sorted((c for c in children.get(row["message_id"], [])
                         if c["role"] == "assistant" and c.get("rank") is not None), key=lambda c: c["rank"])
        if len(ranked) < 2:
            continue
        prompt = thread(row["message_id"])
        if prompt is None:
            out.skipped["orphaned or non-alternating thread"] += len(ranked) - 1
            continue
        best = ranked[0]
        for other in ranked[1:]:
            if other["rank"] == best["rank"]:
                out.skipped["tied rank"] += 1
                continue
            out.add(prompt, best["text"], other["text"])
    return out


def read_oasst1(path: str | Path = OASST1_PATH) -> Pairs:
    rows = read_jsonl(path, "oasst1")
    for i, row in enumerate(rows):
        if not isinstance(row, dict) or not {"message_id", "parent_id", "role", "text"} <= set(row):
            raise CourseError(f"{path} row {i + 1} is not an oasst1 message (needs message_id, parent_id, role, text)")
    return oasst_pairs(rows)


# ---- by name, and held-out splits ------------------------------------------------------------------------
READERS = {"rasbt": read_rasbt, "hh_helpful": read_hh_helpful, "hh_harmless": read_hh_harmless,
           "oasst1": read_oasst1}


def read_pairs(name: str, path: str | Path | None = None) -> Pairs:
    """The pairs of one named dataset (rasbt, hh_helpful, hh_harmless, oasst1), from its path under data/."""
    if name not in READERS:
        raise CourseError(f"unknown preference dataset '{name}'; choose from: {', '.join(READERS)}")
    return READERS[name]() if path is None else READERS[name](path)


def split_pairs(pairs: list[Pair], heldout: int, seed: int) -> tuple[list[Pair], list[Pair]]:
    """(train, held out): project 4's split (a fixed random subset, chosen by the seed alone), for pairs.

    HH-RLHF ships only its test splits here: this split is what turns them into our train and held-out sets,
    and the same seed always holds out the same pairs, so no before/after number is measured on a pair that
    was trained on.
    """
    return split_heldout(pairs, heldout, seed)


@dataclass
class PreferenceData:
    train: list[Pair]
    heldout: dict[str, list[Pair]]                  # per dataset: pairs never trained on
    lines: list[str] = field(default_factory=list)  # one summary line per dataset


def load_preference_data(datasets: list[tuple[str, str | None]], heldout: int, seed: int,
                         max_pairs: int | None = None) -> PreferenceData:
    """The training mix and each dataset's held-out pairs (at most a fifth of it). A dataset's split depends on
    the seed and that dataset alone, so adding a dataset to the mix never moves another's held-out pairs into
    training; `max_pairs` subsamples each dataset's training share after the split."""
    train, held, lines = [], {}, []
    for name, path in datasets:
        source = read_pairs(name, path)
        k = min(heldout, len(source.pairs) // 5)
        rest, out = split_pairs(source.pairs, k, seed)
        if max_pairs and len(rest) > max_pairs:
            rest = random.Random(seed).sample(rest, max_pairs)
        held[name] = out
        train += rest
        lines.append(f"{source.summary()}; {len(rest):,} for training, {len(out)} held out")
    random.Random(seed).shuffle(train)
    return PreferenceData(train, held, lines)
