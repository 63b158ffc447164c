"""Measure the quality bar of project 2 in one run and print a table.

    flock -x /tmp/cpu.lock uv run python phase1_foundation/project2_tokenizer/benchmark.py

On the whole Gutenberg corpus (154 books, headers stripped, CRLF -> LF):
  * training time of a 10,000-id byte-level BPE (GPT-2 pattern, as HF's ByteLevel uses) for ours
    (2 pre-tokenization workers) and Hugging Face `tokenizers` (Rust, its default threads),
    and ours with the GPT-4 pattern; peak memory of our training
  * single-process encoding throughput (MB/s, cold cache) of ours, tiktoken and HF `tokenizers`,
    with our trained ranks and with GPT-2's, and exact id parity with tiktoken on the whole corpus
  * bytes per token on WikiText-2 test (not in the training text) for each tokenizer
  * the plain algorithm (bpe.py) against the fast one (fast_bpe.py) on a slice both can do: training
    time (same merges) and encoding time of the slice's distinct chunks (same ids), no cache
Writes the numbers to checkpoints/project2/benchmark.json as well.
"""

from __future__ import annotations

import argparse
import os
from pathlib import Path
import platform
import resource
import time

import regex

from course.cli import ArgumentParser, nonneg_int, positive_int
from course.errors import CourseError, run_cli
from course.paths import repo_path
from phase1_foundation.project2_tokenizer.bpe import encode_chunk, train_bpe
from phase1_foundation.project2_tokenizer.data import GPT2_DIR, read_gutenberg, read_wikitext2
from phase1_foundation.project2_tokenizer.fast_bpe import bpe_encode_chunk, count_chunks, train_merges
from phase1_foundation.project2_tokenizer.formats import from_ranks, load_gpt2
from phase1_foundation.project2_tokenizer.config import MAX_WORKERS
from phase1_foundation.project2_tokenizer.tokenizer import ENDOFTEXT, RegexTokenizer


def _rss_mb(who: int) -> float:
    return resource.getrusage(who).ru_maxrss / 1024  # Linux: KiB


def _mb(texts: list[str]) -> float:
    return sum(len(t.encode("utf-8")) for t in texts) / 1e6


def timed(fn):
    t0 = time.perf_counter()
    out = fn()
    return out, time.perf_counter() - t0


def vocab_size_flag(text: str) -> int:
    """256 byte tokens + <|endoftext|> + at least one merge."""
    value = positive_int(text)
    if value < 258:
        raise argparse.ArgumentTypeError(f"expected an integer >= 258 (256 bytes + <|endoftext|> + a merge), "
                                         f"got '{text}'")
    return value


def workers_flag(text: str) -> int:
    value = positive_int(text)
    if value > MAX_WORKERS:
        raise argparse.ArgumentTypeError(f"expected an integer in [1, {MAX_WORKERS}], got '{text}'")
    return value


def json_out(text: str) -> Path:
    """--out: the JSON file to write (its folder is created); not an existing folder."""
    path = repo_path(text)
    if path.is_dir():
        raise argparse.ArgumentTypeError(f"{path} is a folder; give the .json file to write")
    return path


def cpu_only(text: str) -> str:
    if text not in ("cpu", "auto"):
        raise argparse.ArgumentTypeError(f"benchmark.py measures tokenizers on the CPU; pass cpu (got '{text}')")
    return text


def vocab_label(n: int) -> str:
    """10000 -> "10K", 4096 -> "4,096": the row labels name the vocabulary actually trained."""
    return f"{n // 1000}K" if n % 1000 == 0 else f"{n:,}"


def main(argv: list[str] | None = None) -> dict:
    p = ArgumentParser(description=__doc__)
    p.add_argument("--data_dir", default="data/gutenberg", help="the *.txt.gz books (default: %(default)s)")
    p.add_argument("--vocab_size", type=vocab_size_flag, default=10_000, help="ids to train, >= 258")
    p.add_argument("--num_workers", type=workers_flag, default=2, help="our pre-tokenization processes")
    p.add_argument("--max_books", type=nonneg_int, default=0, help="use only the first N books (0 = all; for a quick try)")
    p.add_argument("--skip_references", action="store_true", help="do not run HF tokenizers / tiktoken")
    p.add_argument("--plain_kb", type=positive_int, default=200, help="text slice (KB) for the plain vs fast comparison")
    p.add_argument("--plain_merges", type=positive_int, default=200, help="merges for the plain vs fast comparison")
    p.add_argument("--out", type=json_out, default="checkpoints/project2/benchmark.json")
    p.add_argument("--seed", type=int, default=0, help="unused: everything measured here is deterministic")
    p.add_argument("--device", type=cpu_only, default="cpu", help="cpu only: tokenizers run on the CPU")
    args = p.parse_args(argv)
    V = vocab_label(args.vocab_size)

    base_rss = _rss_mb(resource.RUSAGE_SELF)
    books = read_gutenberg(args.data_dir, "all")
    if args.max_books:
        books = books[:args.max_books]
    corpus_mb = _mb(books)
    print(f"corpus: {len(books)} books, {corpus_mb:.1f} MB of UTF-8 text; {os.cpu_count()} CPUs; "
          f"{platform.processor() or platform.machine()}")
    r: dict = {"corpus_mb": corpus_mb, "n_books": len(books), "vocab_size": args.vocab_size,
               "rss_before_corpus_mb": base_rss, "rss_with_corpus_mb": _rss_mb(resource.RUSAGE_SELF)}

    # ---- training -----------------------------------------------------------------------------
    # Ours first, so the peak RSS of this process is our training's (plus the corpus in memory).
    ours, t = timed(lambda: RegexTokenizer("gpt2", [ENDOFTEXT]).train(books, args.vocab_size, num_workers=args.num_workers,
                                                                         trainer="fast"))
    r["train_ours_gpt2_s"] = t
    r["train_peak_rss_main_mb"] = _rss_mb(resource.RUSAGE_SELF)
    r["train_peak_rss_worker_mb"] = _rss_mb(resource.RUSAGE_CHILDREN)
    print(f"ours (gpt2 pattern): trained {len(ours.merges)} merges in {t:.1f} s; peak RSS main "
          f"{r['train_peak_rss_main_mb']:.0f} MB (of which {r['rss_with_corpus_mb']:.0f} MB before training: "
          f"interpreter + corpus), largest worker {r['train_peak_rss_worker_mb']:.0f} MB")
    ours4, t = timed(lambda: RegexTokenizer("gpt4", [ENDOFTEXT]).train(books, args.vocab_size, num_workers=args.num_workers,
                                                                          trainer="fast"))
    r["train_ours_gpt4_s"] = t
    print(f"ours (gpt4 pattern): trained in {t:.1f} s")

    hf = tiktoken = None
    if not args.skip_references:
        try:
            import tiktoken
            from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
        except ImportError as e:
            raise CourseError(f"{e.name} is missing: install the dev group (uv sync) or pass --skip_references") from None
        hf = Tokenizer(models.BPE())
        hf.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)  # GPT-2's regex + byte map
        hf.decoder = decoders.ByteLevel()
        trainer = trainers.BpeTrainer(vocab_size=args.vocab_size, special_tokens=[ENDOFTEXT], show_progress=False,
                                      initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
        _, t = timed(lambda: hf.train_from_iterator(books, trainer, length=len(books)))
        r["train_hf_s"] = t
        r["train_ratio_ours_vs_hf"] = r["train_ours_gpt2_s"] / t
        print(f"HF tokenizers: trained {hf.get_vocab_size()} ids in {t:.1f} s; ours/HF = {r['train_ratio_ours_vs_hf']:.2f}x")

    # ---- encoding throughput and parity ---------------------------------------------------------
    def enc_speed(name: str, encode) -> list[list[int]]:
        ids, t = timed(lambda: [encode(b) for b in books])
        r[f"encode_{name}_mbps"] = corpus_mb / t
        print(f"encode {name}: {corpus_mb / t:.2f} MB/s ({sum(map(len, ids)):,} tokens)")
        return ids

    fresh = from_ranks(ours.to_ranks(), ours.pattern, ours.special_tokens)  # cold cache
    ids_ours = enc_speed("ours", fresh.encode_ordinary)
    gpt2 = None
    if (GPT2_DIR / "encoder.json").is_file():
        gpt2 = load_gpt2(GPT2_DIR / "encoder.json", GPT2_DIR / "vocab.bpe")
        ids_ours_gpt2 = enc_speed("ours_gpt2", gpt2.encode_ordinary)
    if tiktoken is not None:
        tt = tiktoken.Encoding(f"ours{args.vocab_size}", pat_str=ours.pattern, mergeable_ranks=ours.to_ranks(), special_tokens=ours.special_tokens)
        r["parity_ours"] = enc_speed("tiktoken_ours", tt.encode_ordinary) == ids_ours
        if gpt2 is not None:
            tt2 = tiktoken.Encoding("gpt2local", pat_str=gpt2.pattern, mergeable_ranks=gpt2.to_ranks(), special_tokens=gpt2.special_tokens)
            r["parity_ours_gpt2"] = enc_speed("tiktoken_gpt2", tt2.encode_ordinary) == ids_ours_gpt2
        enc_speed("hf", lambda b: hf.encode(b).ids)
        print(f"exact parity with tiktoken on the whole corpus: trained {V} {r['parity_ours']}, "
              f"GPT-2 {r.get('parity_ours_gpt2', 'n/a')}")

    # ---- compression on text none of them trained on ----------------------------------------------
    try:
        wiki = read_wikitext2("test")
        wiki_mb = len(wiki.encode("utf-8"))
        r["bpt_ours_gpt2"] = wiki_mb / len(ours.encode_ordinary(wiki))
        r["bpt_ours_gpt4"] = wiki_mb / len(ours4.encode_ordinary(wiki))
        if hf is not None:
            r["bpt_hf"] = wiki_mb / len(hf.encode(wiki).ids)
        if gpt2 is not None:
            r["bpt_gpt2_50k"] = wiki_mb / len(gpt2.encode_ordinary(wiki))
            if tiktoken is not None:  # measured by tiktoken itself, not copied from ours
                r["bpt_tiktoken_gpt2_50k"] = wiki_mb / len(tt2.encode_ordinary(wiki))
    except CourseError as e:
        print(f"skipping compression on WikiText-2: {e}")

    # ---- the plain algorithm against the fast one, on a slice the plain loop can do -------------------
    piece = "".join(books)[:args.plain_kb * 1000]
    counts = count_chunks([piece], ours.pattern, [ENDOFTEXT])
    chunk_counts = {c.encode("utf-8", "surrogatepass"): n for c, n in counts.items()}
    plain, r["train_slice_plain_s"] = timed(lambda: train_bpe(chunk_counts, args.plain_merges))
    fast, r["train_slice_fast_s"] = timed(lambda: train_merges(chunk_counts, args.plain_merges))
    ranks = ours.to_ranks()
    distinct = list(dict.fromkeys(c.encode("utf-8", "surrogatepass") for c in regex.findall(ours.pattern, piece)))
    ids_plain, r["encode_slice_plain_s"] = timed(lambda: [encode_chunk(c, ranks) for c in distinct])
    ids_fast, r["encode_slice_fast_s"] = timed(lambda: [bpe_encode_chunk(c, ranks) for c in distinct])
    r["slice_equal"] = plain == fast and ids_plain == ids_fast
    print(f"plain vs fast on {args.plain_kb} KB: train {args.plain_merges} merges {r['train_slice_plain_s']:.2f} s "
          f"vs {r['train_slice_fast_s']:.2f} s; encode {len(distinct):,} distinct chunks {r['encode_slice_plain_s']:.2f} s "
          f"vs {r['encode_slice_fast_s']:.2f} s; identical: {r['slice_equal']}")

    # ---- table --------------------------------------------------------------------------------
    def g(key, fmt="{:.2f}"):
        return fmt.format(r[key]) if key in r else "n/a"
    rows = [
        (f"train {V} vocab, gpt2 pattern (s)", g("train_ours_gpt2_s", "{:.1f}"), g("train_hf_s", "{:.1f}"), "-"),
        (f"train {V} vocab, gpt4 pattern (s)", g("train_ours_gpt4_s", "{:.1f}"), "-", "-"),
        ("training peak RSS, main / worker (MB)",
         f"{g('train_peak_rss_main_mb', '{:.0f}')} / {g('train_peak_rss_worker_mb', '{:.0f}')}", "-", "-"),
        (f"encode, our {V} ranks (MB/s, 1 process)", g("encode_ours_mbps"), g("encode_hf_mbps"), g("encode_tiktoken_ours_mbps")),
        ("encode, GPT-2 ranks (MB/s, 1 process)", g("encode_ours_gpt2_mbps"), "-", g("encode_tiktoken_gpt2_mbps")),
        (f"ids identical to tiktoken ({V} / GPT-2)", f"{r.get('parity_ours', 'n/a')} / {r.get('parity_ours_gpt2', 'n/a')}", "-", "-"),
        (f"bytes/token WikiText-2 test, {V} gpt2 pattern", g("bpt_ours_gpt2"), g("bpt_hf"), "-"),
        (f"bytes/token WikiText-2 test, {V} gpt4 pattern", g("bpt_ours_gpt4"), "-", "-"),
        ("bytes/token WikiText-2 test, GPT-2 50,257", g("bpt_gpt2_50k"), "-", g("bpt_tiktoken_gpt2_50k")),
        (f"slice {args.plain_kb} KB, {args.plain_merges} merges: train plain / fast (s)",
         f"{g('train_slice_plain_s')} / {g('train_slice_fast_s')}", "-", "-"),
        ("slice, encode distinct chunks plain / fast (s)",
         f"{g('encode_slice_plain_s')} / {g('encode_slice_fast_s')}", "-", "-"),
        ("slice: plain and fast identical (merges, ids)", f"{r['slice_equal']}", "-", "-"),
    ]
    print(f"\n| measure ({r['corpus_mb']:.1f} MB Gutenberg) | ours | HF tokenizers | tiktoken |")
    print("|---|---|---|---|")
    for row in rows:
        print("| " + " | ".join(row) + " |")
    if "train_ratio_ours_vs_hf" in r:
        print(f"\ntraining time ours / HF tokenizers = {r['train_ratio_ours_vs_hf']:.2f}x (target <= 2x); "
              f"encode {r['encode_ours_mbps']:.1f} MB/s (target >= 3)")
    from course.checkpoint import atomic_write_json  # imports torch: only now, after the RSS measurement
    atomic_write_json(repo_path(args.out), r)
    print(f"wrote {args.out}")
    return r


if __name__ == "__main__":
    run_cli(main)
