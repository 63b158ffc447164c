"""Perplexity and bits per byte of a checkpoint on any text file (or on the prepared validation shard).

    uv run python phase1_foundation/project3_pretrain/evaluate.py --text_file data/wikitext2/wiki.test.raw
    uv run python phase1_foundation/project3_pretrain/evaluate.py --split val          # held-out Gutenberg books

The method (bits per byte: Radford et al., 2019; Gao et al., 2020; non-overlapping windows) is in perplexity.py.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from course.cli import ArgumentParser, existing_file, positive_int
from course.device import get_device
from course.errors import CourseError, run_cli
from course.paths import repo_path
from phase1_foundation.project3_pretrain.data import TokenData
from phase1_foundation.project3_pretrain.loading import DEFAULT_CKPT, load_any, load_matching_tokenizer
from phase1_foundation.project3_pretrain.perplexity import evaluate_ids, read_text


def main(argv: list[str] | None = None) -> None:
    p = ArgumentParser(description=__doc__)
    model_group = p.add_mutually_exclusive_group()
    model_group.add_argument("--ckpt", default=None,
                             help=f"train.py checkpoint (default {DEFAULT_CKPT.name} of the cpu run)")
    model_group.add_argument("--hf_dir", default=None, help="evaluate a Hugging Face LLaMA folder instead")
    p.add_argument("--tokenizer", type=existing_file, default=None,
                   help="tokenizer .pkl (default: the one the data was prepared with)")
    group = p.add_mutually_exclusive_group(required=True)
    group.add_argument("--text_file", type=Path,
                       help="any UTF-8 text file (.gz too); CRLF -> LF, Gutenberg boilerplate cut")
    group.add_argument("--split", choices=["train", "val"], help="a shard prepared by prepare_data.py")
    p.add_argument("--data_dir", default="data/project3", help="where prepare_data.py wrote the shards")
    p.add_argument("--batch_size", type=positive_int, default=16, help="windows per forward pass")
    p.add_argument("--max_tokens", type=positive_int, default=None,
                   help="score only the first N tokens (default: all)")
    p.add_argument("--seed", type=int, default=0, help="unused: evaluation is deterministic")
    p.add_argument("--device", default="auto")
    args = p.parse_args(argv)
    text = read_text(args.text_file) if args.text_file else None  # a bad file fails before the model loads
    dev = get_device(args.device)
    model, stored_tok = load_any(args.ckpt, args.hf_dir, dev)
    if args.split:
        data = TokenData(repo_path(args.data_dir), model.config.block_size)
        if data.vocab_size != model.config.vocab_size:
            raise CourseError(f"{args.data_dir}/meta.json has vocab {data.vocab_size}, the model {model.config.vocab_size}")
        ids, n_bytes, what = data.splits[args.split], data.meta["splits"][args.split]["bytes"], f"{args.split} shard"
    else:
        tok = load_matching_tokenizer(args.tokenizer, model, stored_tok)
        ids, n_bytes, what = np.asarray(tok.encode_ordinary(text)), len(text.encode("utf-8")), args.text_file
    r = evaluate_ids(model, ids, n_bytes, args.batch_size, args.max_tokens)
    print(f"{what}: {r['tokens']:,} tokens scored, {r['bytes']:,} bytes")
    print(f"done: loss={r['loss']:.4f} ppl={r['ppl']:.2f} bpb={r['bpb']:.4f}")


if __name__ == "__main__":
    run_cli(main)
