"""The plain BPE (bpe.py) against the fast one (fast_bpe.py): the same merges and the same ids, on random
and real text; and which one the tokenizer classes run.

Run: uv run pytest -q phase1_foundation/project2_tokenizer/test_bpe.py
"""

from __future__ import annotations

import random
from collections import Counter
from pathlib import Path

import pytest
import regex

from course.paths import REPO_ROOT
from phase1_foundation.project2_tokenizer import bpe, fast_bpe
from phase1_foundation.project2_tokenizer.patterns import GPT4_SPLIT_PATTERN
from phase1_foundation.project2_tokenizer.tokenizer import (
    PLAIN_WORK_LIMIT, BasicTokenizer, RegexTokenizer, TokenizerError, choose_trainer)

HERE = Path(__file__).resolve().parent
WIKI = REPO_ROOT / "data" / "wikitext2" / "wiki.valid.raw"


def real_text(n: int, start: int = 0) -> str:
    """WikiText-2 valid if downloaded, else this project's own source (always present)."""
    text = WIKI.read_text(encoding="utf-8") if WIKI.is_file() else \
        "\n".join(p.read_text(encoding="utf-8") for p in sorted(HERE.glob("*.py")))
    return text[start:start + n]


def random_corpus(rng: random.Random) -> dict[bytes, int]:
    alphabet = rng.choice(["ab", "abc", "ab c", "aaab", "xyz\u00e9\u4e2d", "\x00\xff "])
    return {"".join(rng.choice(alphabet) for _ in range(rng.randint(1, 14))).encode(): rng.randint(1, 6)
            for _ in range(rng.randint(1, 40))}


def test_pair_counts_and_merge_by_hand():
    assert bpe.get_pair_counts([1, 2, 3, 1, 2]) == {(1, 2): 2, (2, 3): 1, (3, 1): 1}
    assert bpe.get_pair_counts([1, 1, 1], {(1, 1): 5}, weight=2) == {(1, 1): 9}
    assert bpe.merge_pair([7, 7, 7], (7, 7), 300) == [300, 7]
    assert bpe.merge_pair([1, 2, 1, 2, 2], (1, 2), 9) == [9, 9, 2]
    # Wikipedia's example: aa -> 256, then ab (ties with "256 a" at 2; the smaller pair wins), then 256 257
    assert bpe.train_bpe({b"aaabdaaabac": 1}, 3) == [((97, 97), 4), ((97, 98), 2), ((256, 257), 2)]


@pytest.mark.parametrize("seed", range(30))
def test_plain_trainer_equals_fast_trainer_random(seed):
    rng = random.Random(seed)
    corpus = random_corpus(rng)
    n = rng.randint(0, 40)
    assert bpe.train_bpe(corpus, n) == fast_bpe.train_merges(corpus, n)


def test_plain_trainer_equals_fast_trainer_real_text():
    text = real_text(30_000, start=12_345)
    counts = Counter(regex.findall(GPT4_SPLIT_PATTERN, text))
    chunk_counts = {s.encode(): c for s, c in counts.items()}
    plain = bpe.train_bpe(chunk_counts, 80)
    assert len(plain) == 80 and plain == fast_bpe.train_merges(chunk_counts, 80)


def test_plain_and_fast_training_give_the_same_tokenizer():
    text = real_text(20_000, start=999)
    for cls in (BasicTokenizer, RegexTokenizer):
        doc = text[:2_000] if cls is BasicTokenizer else text  # Basic: one chunk per document
        plain = cls().train(doc, 256 + 60, trainer="plain")
        fast = cls().train(doc, 256 + 60, trainer="fast")
        assert plain.merges == fast.merges and plain.vocab == fast.vocab and len(plain.merges) == 60
        sample = real_text(3_000, start=50_000)
        assert plain.encode(sample) == fast.encode(sample)


def test_plain_encoder_equals_fast_encoder():
    rng = random.Random(3)
    tok = RegexTokenizer("gpt4").train(real_text(100_000), 256 + 400, trainer="fast")
    ranks = tok.to_ranks()
    words = [t for t in ranks if 1 <= len(t) <= 5]
    chunks = [c.encode() for c in regex.findall(GPT4_SPLIT_PATTERN, real_text(20_000, start=100_000))]
    chunks += [b"".join(rng.choice(words) for _ in range(rng.randint(1, 60))) for _ in range(200)]
    chunks += [bytes(rng.randrange(256) for _ in range(rng.randint(1, 300))) for _ in range(50)]
    chunks += [b"7" * 500, b" " * 300]  # over LONG_CHUNK: the heap encoder
    merged = 0
    for chunk in chunks:
        plain = bpe.encode_chunk(chunk, ranks)
        assert plain == fast_bpe.bpe_encode_chunk(chunk, ranks), chunk[:40]
        assert b"".join(tok.vocab[i] for i in plain) == chunk
        merged += len(plain) < len(chunk)
    assert merged > len(chunks) // 2  # the table really merges: not a trivial comparison


def test_basic_tokenizer_runs_the_plain_path(monkeypatch):
    """BasicTokenizer on a small text trains with bpe.train_bpe and encodes with bpe.encode_chunk."""
    from phase1_foundation.project2_tokenizer import tokenizer as T

    calls = Counter()

    def spy(name, fn):
        def wrapped(*a, **k):
            calls[name] += 1
            return fn(*a, **k)
        monkeypatch.setattr(T, name, wrapped)
    for name in ("train_bpe", "train_merges", "encode_chunk", "bpe_encode_chunk"):
        spy(name, getattr(T, name))
    tok = BasicTokenizer().train("the cat sat on the mat, the cat sat.", 256 + 10)
    assert tok.decode(tok.encode("the cat")) == "the cat"
    assert calls == {"train_bpe": 1, "encode_chunk": 1}
    tok.encode("x" * (fast_bpe.LONG_CHUNK + 1))  # a long text takes the O(n log n) encoder
    assert calls["bpe_encode_chunk"] == 1


def test_choose_trainer():
    small = {b"hello": 3, b" world": 2}
    assert choose_trainer(None, small, 10) == "plain"
    big = {bytes([i % 256]) * 100 + bytes([i // 256]): 1 for i in range(2_000)}
    assert choose_trainer(None, big, PLAIN_WORK_LIMIT // (101 * 2_000) + 1) == "fast"
    assert choose_trainer("plain", big, 10_000) == "plain" and choose_trainer("fast", small, 1) == "fast"
    with pytest.raises(TokenizerError, match="trainer must be one of"):
        choose_trainer("heap", small, 1)
    with pytest.raises(TokenizerError, match="trainer must be one of"):
        RegexTokenizer().train("some text", 300, trainer="quick")


# ---- run as a script: validation examples ----------------------------------------------------------------
def _demo() -> None:
    import time

    text = real_text(30_000, start=12_345)
    chunk_counts = {s.encode(): c for s, c in Counter(regex.findall(GPT4_SPLIT_PATTERN, text)).items()}
    print(f"30 KB of text, {len(chunk_counts):,} distinct chunks (GPT-4 split), 100 merges:")
    results = {}
    for name, train in (("plain bpe.train_bpe", bpe.train_bpe), ("fast fast_bpe.train_merges", fast_bpe.train_merges)):
        t0 = time.perf_counter()
        results[name] = train(chunk_counts, 100)
        print(f"   {name:<28} {time.perf_counter() - t0:.3f} s")
    plain, fast = results.values()
    print(f"   same merges: {plain == fast}; first five: "
          f"{[bytes(p).decode('utf-8', 'replace') if max(p) < 256 else p for p, _ in plain[:5]]}")
    tok = RegexTokenizer().train(text, 256 + 100)
    ranks = tok.to_ranks()
    chunks = list(chunk_counts)[:2_000]
    same = all(bpe.encode_chunk(c, ranks) == fast_bpe.bpe_encode_chunk(c, ranks) for c in chunks)
    print(f"   same ids from bpe.encode_chunk and fast_bpe.bpe_encode_chunk on {len(chunks):,} chunks: {same}")


if __name__ == "__main__":
    from course.cli import run_demo

    run_demo(_demo, __doc__)
