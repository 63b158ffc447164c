"""Perplexity and bits per byte of a checkpoint on any text file (or on the prepared validation shard).

    uv run python phase1_foundation/project3_pretrain/evaluate.py --text_file data/wikitext2/wiki.test.raw
    uv run python phase1_foundation/project3_pretrain/evaluate.py --split val          # held-out Gutenberg books

PAPER: bits per byte as in "Language Models are Unsupervised Multitask Learners" (Radford et al., 2019) and
The Pile (Gao et al., 2020): total negative log-likelihood in bits divided by the UTF-8 bytes of the text.
WHY bits per byte: perplexity per token depends on the tokenizer (a 10K-vocab token carries fewer bytes than a
50K one), so two models with different tokenizers - or a character model - can only be compared per byte.
IMPLEMENTATION: the token stream is cut into non-overlapping windows of block_size + 1 tokens; every token after
the first of its window is scored once, given the window's earlier tokens (on average block_size / 2 tokens of
context; a sliding window with overlap would score a little better and cost block_size / stride times more).
"""

from __future__ import annotations

import argparse
import gzip
import math
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from tqdm import tqdm

from course.device import get_device
from course.errors import CourseError, run_cli
from course.paths import repo_path
from phase1_foundation.project2_tokenizer.data import strip_gutenberg
from phase1_foundation.project3_pretrain.generate import DEFAULT_CKPT, DEFAULT_TOKENIZER, load_any, load_matching_tokenizer

LN2 = math.log(2)


@torch.inference_mode()
def evaluate_ids(model: torch.nn.Module, ids: np.ndarray, n_bytes: int, batch_size: int = 16,
                 max_tokens: int | None = None, progress: bool = True) -> dict:
    """Score a token stream; returns loss (nats/token), perplexity, bits per byte and the counts used."""
    T = model.config.block_size
    if max_tokens and len(ids) > max_tokens + 1:
        n_bytes = round(n_bytes * max_tokens / (len(ids) - 1))  # prorate: the same share of the text
        ids = ids[:max_tokens + 1]
    n_win = (len(ids) - 1) // T
    if n_win == 0:
        raise CourseError(f"the text has {len(ids)} tokens, fewer than one block of block_size+1 = {T + 1}")
    device = next(model.parameters()).device
    windows = torch.from_numpy(np.asarray(ids[:n_win * T + 1], dtype=np.int64))
    total_nll, count = 0.0, 0
    for b in tqdm(range(0, n_win, batch_size), desc="evaluate", unit="batch", disable=not progress):
        starts = range(b, min(b + batch_size, n_win))
        buf = torch.stack([windows[s * T:s * T + T + 1] for s in starts]).to(device)
        logits = model(buf[:, :-1])[0]
        total_nll += F.cross_entropy(logits.float().reshape(-1, logits.size(-1)), buf[:, 1:].reshape(-1),
                                     reduction="sum").item()
        count += buf[:, 1:].numel()
    # the scored tokens cover count/len(ids) of the text: prorate the bytes the same way
    scored_bytes = n_bytes * count / (len(ids) - 1)
    loss = total_nll / count
    return {"loss": loss, "ppl": math.exp(loss), "bpb": total_nll / LN2 / scored_bytes, "tokens": count,
            "bytes": round(scored_bytes)}


def read_text(path: Path) -> str:
    if not path.is_file():
        raise CourseError(f"text file not found: {path}")
    raw = path.read_bytes()
    if path.suffix == ".gz":
        raw = gzip.decompress(raw)
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as e:
        raise CourseError(f"{path} is not UTF-8 text ({e})") from None
    return strip_gutenberg(text) if "PROJECT GUTENBERG" in text[:5000].upper() else text.replace("\r\n", "\n")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--ckpt", default=None, help=f"train.py checkpoint (default {DEFAULT_CKPT.name} of the cpu run)")
    p.add_argument("--hf_dir", default=None, help="evaluate a Hugging Face LLaMA folder instead")
    p.add_argument("--tokenizer", default=None, help="tokenizer .pkl (default: the one the data was prepared with)")
    group = p.add_mutually_exclusive_group(required=True)
    group.add_argument("--text_file", help="any UTF-8 text file (.gz too); CRLF -> LF, Gutenberg boilerplate cut")
    group.add_argument("--split", choices=["train", "val"], help="a shard prepared by prepare_data.py")
    p.add_argument("--data_dir", default="data/project3", help="where prepare_data.py wrote the shards")
    p.add_argument("--batch_size", type=int, default=16)
    p.add_argument("--max_tokens", type=int, default=None, help="score only the first N tokens")
    p.add_argument("--seed", type=int, default=0, help="unused: evaluation is deterministic")
    p.add_argument("--device", default="auto")
    args = p.parse_args()
    dev = get_device(args.device)
    model, stored_tok = load_any(args.ckpt, args.hf_dir, dev)
    if args.split:
        from phase1_foundation.project3_pretrain.train import TokenData
        data = TokenData(repo_path(args.data_dir), model.config.block_size)
        if data.vocab_size != model.config.vocab_size:
            raise CourseError(f"{args.data_dir}/meta.json has vocab {data.vocab_size}, the model {model.config.vocab_size}")
        ids, n_bytes, what = data.splits[args.split], data.meta["splits"][args.split]["bytes"], f"{args.split} shard"
    else:
        tok = load_matching_tokenizer(Path(args.tokenizer) if args.tokenizer else (stored_tok or DEFAULT_TOKENIZER),
                                      model)
        text = read_text(Path(args.text_file))
        ids, n_bytes, what = np.asarray(tok.encode_ordinary(text)), len(text.encode("utf-8")), args.text_file
    r = evaluate_ids(model, ids, n_bytes, args.batch_size, args.max_tokens)
    print(f"{what}: {r['tokens']:,} tokens scored, {r['bytes']:,} bytes")
    print(f"done: loss={r['loss']:.4f} ppl={r['ppl']:.2f} bpb={r['bpb']:.4f}")


if __name__ == "__main__":
    run_cli(main)
