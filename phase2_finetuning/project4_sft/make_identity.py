"""Write the course's identity conversations to JSONL files, to read them (train_sft.py generates the same
chats itself from the same seed with `--data identity,...`).

    uv run python phase2_finetuning/project4_sft/make_identity.py                 # 300 chats, seed 1337
    uv run python phase2_finetuning/project4_sft/make_identity.py --n 1000 --out_dir data/project4

Writes OUT_DIR/identity_train.jsonl (one chat per line: a JSON list of {"role", "content"}) and
OUT_DIR/identity_heldout.jsonl (the held-out questions, phrased with other words, with reference answers),
and prints a few of each. The identity, its phrasings and why they vary: identity.py.
"""

from __future__ import annotations

import json

from course.checkpoint import atomic_write_text
from course.cli import ArgumentParser, out_dir, positive_int
from course.errors import run_cli
from course.paths import repo_path
from phase2_finetuning.project4_sft.identity import COURSE, heldout_questions, identity_chats, identity_heldout_chats


def main(argv: list[str] | None = None) -> None:
    parser = ArgumentParser(description=__doc__)
    parser.add_argument("--n", type=positive_int, default=300, help="training chats (default: %(default)s)")
    parser.add_argument("--heldout", type=positive_int, default=50, help="held-out questions (default: %(default)s)")
    parser.add_argument("--seed", type=int, default=1337)
    parser.add_argument("--out_dir", type=out_dir, default="data/project4")
    args = parser.parse_args(argv)
    folder = repo_path(args.out_dir)
    train = identity_chats(args.n, args.seed)
    held = identity_heldout_chats(heldout_questions(args.heldout), args.seed)
    for name, chats in (("identity_train.jsonl", train), ("identity_heldout.jsonl", held)):
        atomic_write_text(folder / name, "".join(json.dumps(c, ensure_ascii=False) + "\n" for c in chats))
    print(f"identity: {COURSE.name}, made by {COURSE.maker}")
    for c in train[:3]:
        print("  train:   " + " | ".join(f"{m['role']}: {m['content']}" for m in c))
    for c in held[:3]:
        print("  held out: " + c[0]["content"])
    print(f"wrote {len(train)} chats to {folder / 'identity_train.jsonl'} and {len(held)} held-out questions to "
          f"{folder / 'identity_heldout.jsonl'}")


if __name__ == "__main__":
    run_cli(main)
