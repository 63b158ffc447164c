"""Train the course tokenizer: byte-level BPE, 10,000 ids including "<|endoftext|>", on Gutenberg.

    uv run python phase1_foundation/project2_tokenizer/download_data.py --dataset gutenberg
    uv run python phase1_foundation/project2_tokenizer/train_tokenizer.py            # --preset cpu
    uv run python phase1_foundation/project2_tokenizer/train_tokenizer.py --vocab_size=4096 --pattern=gpt2

Writes to checkpoints/project2/: tokenizer.pkl (load_tokenizer), tokenizer.vocab (readable),
tokenizer.tiktoken (tiktoken ranks), config.json, token_lengths.png, compression_vs_vocab.png.
Prints the training time, how the vocabulary grows, and bytes per token on held-out text
(held-out Gutenberg books, WikiText-2 test if downloaded) beside GPT-2's tokenizer if downloaded.

Training takes about 10-20 seconds on 2 CPU cores, so there is no resume: rerun it. Bad flags, a
missing or unreadable book and an --out_dir that is a file each end in one `error:` line.
"""

from __future__ import annotations

import resource
import time
from pathlib import Path

from course.cli import ArgumentParser, warn
from course.errors import CourseError, run_cli
from course.paths import repo_path
from phase1_foundation.project2_tokenizer.config import TokenizerConfig
from phase1_foundation.project2_tokenizer.data import GPT2_DIR, WIKITEXT2_DIR, read_gutenberg, read_wikitext2
from phase1_foundation.project2_tokenizer.formats import (export_readable, from_ranks, load_gpt2, save_ranks,
                                                          save_tokenizer)
from phase1_foundation.project2_tokenizer.tokenizer import BasicTokenizer, RegexTokenizer

EVAL_CHARS = 2_000_000  # held-out text used for the compression plot (per vocab size)


def bytes_per_token(tok: BasicTokenizer, texts: list[str]) -> float:
    n_bytes = sum(len(t.encode("utf-8")) for t in texts)
    n_tokens = sum(len(tok.encode_ordinary(t)) for t in texts)
    return n_bytes / max(n_tokens, 1)


def vocabulary_growth(tok: RegexTokenizer) -> str:
    """A few tokens along the merge order: early merges are letter pairs, late ones whole words."""
    n = len(tok.merges)
    steps = sorted({k for k in (1, 2, 3, 10, 100, 1000, 2000, 5000, n) if 1 <= k <= n})
    lines = ["vocabulary growth (merge k -> new token):"]
    for k in steps:
        lines.append(f"  merge {k:>6}: id {255 + k:>6} = {tok.vocab[255 + k].decode('utf-8', 'replace')!r}")
    return "\n".join(lines)


def plot_token_lengths(tok: RegexTokenizer, path: Path) -> Path:
    import course.plots  # noqa: F401  (first: it selects matplotlib's headless backend)
    import matplotlib.pyplot as plt

    from course.checkpoint import atomic_write
    lengths = [len(b) for b in tok.vocab.values()]
    fig, ax = plt.subplots(figsize=(7, 4.5), dpi=110)
    ax.hist(lengths, bins=range(1, max(lengths) + 2), align="left", rwidth=0.85)
    ax.set_xlabel("token length (bytes)")
    ax.set_ylabel("number of tokens")
    ax.set_title(f"token lengths, vocab {tok.vocab_size:,}")
    ax.grid(alpha=0.3)
    fig.tight_layout()
    try:
        return atomic_write(path, lambda f: fig.savefig(f, format="png"))
    finally:
        plt.close(fig)


DEVICES = ("auto", "cpu", "cuda", "mps")


def device_flag(text: str) -> str:
    """--device is accepted like every script's, but BPE is integer bookkeeping: it always runs on the CPU."""
    import argparse

    if text.split(":")[0] not in DEVICES:
        raise argparse.ArgumentTypeError(f"expected one of {', '.join(DEVICES)}, got '{text}'")
    return text


def main(argv: list[str] | None = None) -> dict:
    p = ArgumentParser(description=__doc__)
    TokenizerConfig.add_args(p, default_preset="cpu")
    p.add_argument("--seed", type=int, default=1337, help="recorded for completeness; BPE training is deterministic")
    p.add_argument("--device", type=device_flag, default="cpu",
                   help="accepted for uniformity; tokenizer training always runs on the CPU")
    args = p.parse_args(argv)
    cfg = TokenizerConfig.from_args(args)
    out = repo_path(cfg.out_dir)
    if out.exists() and not out.is_dir():
        raise CourseError(f"--out_dir {out} is an existing file, not a folder; pick another path")
    if args.device not in ("auto", "cpu"):
        warn(f"--device {args.device}: tokenizer training runs on the CPU (BPE is counting, not tensor math)")
    cfg.print_config()

    # ---- data -------------------------------------------------------------------------------
    train_books = read_gutenberg(cfg.data_dir, "train", cfg.heldout_every)
    held_books = read_gutenberg(cfg.data_dir, "heldout", cfg.heldout_every) if cfg.heldout_every else []
    if cfg.max_train_mb > 0:
        budget, kept = int(cfg.max_train_mb * 1e6), []  # in UTF-8 bytes, as train_mb below
        for b in train_books:
            if budget <= 0:
                break
            kept.append(b.encode("utf-8")[:budget].decode("utf-8", errors="ignore"))
            budget -= len(kept[-1].encode("utf-8"))
        train_books = kept
    train_mb = sum(len(b.encode("utf-8")) for b in train_books) / 1e6
    if train_mb == 0:
        raise CourseError(f"no training text in {cfg.data_dir} ({len(train_books)} training book(s), all empty or "
                          f"held out with heldout_every={cfg.heldout_every}); add books or pass --heldout_every=0")
    print(f"training text: {len(train_books)} books, {train_mb:.1f} MB; held out: {len(held_books)} books")
    # Imported only now: torch and matplotlib take seconds, and --help, a bad flag or a bad book answer at once.
    from course.checkpoint import atomic_write_json
    from course.device import set_seed
    from course.plots import plot_curves

    set_seed(args.seed)

    # ---- train ------------------------------------------------------------------------------
    tok = RegexTokenizer(cfg.pattern, special_tokens=cfg.special_token_list())
    t0 = time.perf_counter()
    tok.train(train_books, cfg.vocab_size, verbose=True, num_workers=cfg.num_workers, log_every=cfg.log_every,
              trainer=cfg.trainer)
    train_s = time.perf_counter() - t0
    peak_mb = (resource.getrusage(resource.RUSAGE_SELF).ru_maxrss + resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss) / 1024
    print(f"trained {len(tok.merges):,} merges in {train_s:.1f} s ({train_mb / train_s:.2f} MB/s), "
          f"peak memory ~{peak_mb:,.0f} MB (main + largest worker)")
    print(vocabulary_growth(tok))

    # ---- save -------------------------------------------------------------------------------
    save_tokenizer(tok, out / "tokenizer.pkl")
    export_readable(tok, out / "tokenizer.vocab")
    save_ranks(tok, out / "tokenizer.tiktoken")
    atomic_write_json(out / "config.json", cfg.to_dict())
    print(f"saved {out / 'tokenizer.pkl'} (+ tokenizer.vocab, tokenizer.tiktoken, config.json)")

    # ---- evaluate compression on held-out text ----------------------------------------------
    eval_sets = {}
    if held_books:
        eval_sets["held-out books"] = held_books
    if (WIKITEXT2_DIR / "wiki.test.raw").is_file():
        eval_sets["WikiText-2 test"] = [read_wikitext2("test")]
    gpt2 = None
    if (GPT2_DIR / "encoder.json").is_file() and (GPT2_DIR / "vocab.bpe").is_file():
        gpt2 = load_gpt2(GPT2_DIR / "encoder.json", GPT2_DIR / "vocab.bpe")
    results = {}
    if not eval_sets:
        print("no held-out text (heldout_every=0 and no WikiText-2): compression not measured")
    for name, texts in eval_sets.items():
        ours = bytes_per_token(tok, texts)
        theirs = bytes_per_token(gpt2, texts) if gpt2 else None
        results[name] = ours
        vs = f"  (GPT-2 50,257: {theirs:.2f})" if theirs else "  (GPT-2: files not downloaded)"
        print(f"bytes/token on {name}: {ours:.2f}{vs}")

    # ---- plots ------------------------------------------------------------------------------
    plot_token_lengths(tok, out / "token_lengths.png")
    sample = "".join(held_books or train_books)[:EVAL_CHARS]
    ranks = tok.to_ranks()
    sizes, bpts = [], []
    for size in cfg.plot_size_list():
        n_ids = size - len(tok.special_tokens) if size == cfg.vocab_size else size
        prefix = from_ranks({t: r for t, r in ranks.items() if r < n_ids}, tok.pattern)
        sizes.append(size)
        bpts.append(bytes_per_token(prefix, [sample]))
    plot_curves(out / "compression_vs_vocab.png", {"ours (held-out)": (sizes, bpts)},
                title="compression vs vocabulary size", xlabel="vocabulary size", ylabel="bytes per token")
    print("compression vs vocab: " + ", ".join(f"{s}: {b:.2f}" for s, b in zip(sizes, bpts)))
    print(f"saved plots to {out}/token_lengths.png and compression_vs_vocab.png")

    main_eval = results.get("held-out books") or next(iter(results.values()), float("nan"))
    summary = {"vocab_size": tok.vocab_size, "train_s": train_s, "train_mb": train_mb, "peak_mb": peak_mb,
               "bytes_per_token": main_eval}
    print(f"summary: vocab {tok.vocab_size:,} ({cfg.pattern}) trained on {train_mb:.1f} MB in {train_s:.1f} s, "
          f"{main_eval:.2f} bytes/token held out, peak memory ~{peak_mb:,.0f} MB")
    return summary


if __name__ == "__main__":
    run_cli(main)
