"""Tests for the byte-level BPE tokenizer; run as a script for an interactive tokenizer viewer.

    uv run --frozen pytest -q phase1_foundation/project2_tokenizer
    uv run python phase1_foundation/project2_tokenizer/test_tokenizer.py --interactive [--tokenizer PATH|gpt2]

References: tiktoken (OpenAI's Rust BPE) built from the same rank tables and patterns, and a naive
BPE trainer written here from the definition. GPT-2 tests need data/gpt2_bpe/ (download_data.py
--dataset gpt2_bpe) and skip with that reason when it is absent.
"""

from __future__ import annotations

import pickle
import random
from collections import Counter
from pathlib import Path

import pytest
import regex

from course.errors import ConfigError, CourseError
from course.paths import REPO_ROOT, repo_path
from phase1_foundation.project2_tokenizer.config import TokenizerConfig
from phase1_foundation.project2_tokenizer.formats import (
    export_readable, from_ranks, load_gpt2, load_ranks, load_tokenizer, save_ranks, save_tokenizer, tokenizer_state)
from phase1_foundation.project2_tokenizer.patterns import GPT2_SPLIT_PATTERN, GPT4_SPLIT_PATTERN, SPLIT_PATTERNS
from phase1_foundation.project2_tokenizer.tokenizer import (
    ENDOFTEXT, BasicTokenizer, DisallowedSpecialTokenError, RegexTokenizer, TokenizerError)
from phase1_foundation.project2_tokenizer.fast_bpe import train_merges

HERE = Path(__file__).resolve().parent
GPT2_DIR = REPO_ROOT / "data" / "gpt2_bpe"
WIKI_DIR = REPO_ROOT / "data" / "wikitext2"

# Texts that break tokenizers: unicode scripts, emoji (ZWJ sequences, flags), CJK, code, long
# whitespace runs, numbers, contractions, CRLF, things that look like special tokens.
HARD_TEXTS = [
    "", " ", "a", "Hello world", "hello world!!! How's it going?",
    "I'm you're he'll we've they'd it's DON'T I'M She'S", "'s 's' ''s",
    "   leading spaces", "trailing spaces   ", "tabs\t\tand\r\nCRLF\r\nlines\r\n",
    " " * 1000, "\n" * 500, "a" + " " * 300 + "b", "\t \n" * 100, "x\n\n\n   \n  y", "  \n\n  ",
    "1234567890 3.14159 1,000,000 -42 0x1F 12345678901234567890 ١٢٣ ½ ²",
    "naïve café résumé Zürich e\u0301 ﬁ", "Ελληνικά русский текст עברית العربية हिन्दी ไทย",
    "你好，世界！こんにちは 안녕하세요 中文字符測試",
    "👋🌍 👨‍👩‍👧‍👦 🏳️‍🌈 🇫🇷🇯🇵 ❤️ 🤖🤖🤖",
    "def f(x):\n    return x**2  # square\n\nclass A:\n\tpass\n",
    'if (a && b) { x += 1; } else { y = "str\\n"; }  // C\n{"key": [1, 2.5e-3, null]}',
    "<|endoftext|> is just text here", "<|endoftext", "end<|endoftext|>start",
    "\u0000\u0001\u007f\u0080\u00ff\ufffd\ufeff\u200b", "Ǆǅǆ ǈ ΐ ſ K Å",
    "The quick brown fox jumps over the lazy dog. " * 20,
]


def _wiki(split: str) -> str | None:
    p = WIKI_DIR / f"wiki.{split}.raw"
    return p.read_text(encoding="utf-8") if p.is_file() else None


def _fallback_corpus() -> str:
    """Training text when WikiText-2 is not downloaded: this project's own source and docs."""
    return "\n".join(p.read_text(encoding="utf-8") for p in sorted(HERE.glob("*.py")) + sorted(HERE.glob("*.md")))


# ------------------------------------------------------------------------------------------------
# Naive reference trainer, written from the definition (no code shared with tokenizer.py)
# ------------------------------------------------------------------------------------------------

def naive_train(chunk_counts: dict[bytes, int], num_merges: int) -> list[tuple[tuple[int, int], int]]:
    """Every step: count all pairs in all chunks (weighted), take the most frequent (ties: smallest
    pair), replace it everywhere left to right. O(merges x corpus), obviously right."""
    words = [(list(chunk), c) for chunk, c in chunk_counts.items()]
    merges = []
    for step in range(num_merges):
        stats: Counter = Counter()
        for w, c in words:
            for i in range(len(w) - 1):
                stats[(w[i], w[i + 1])] += c
        if not stats:
            break
        best = min(stats, key=lambda p: (-stats[p], p))
        merges.append((best, stats[best]))
        new_words = []
        for w, c in words:
            out, i = [], 0
            while i < len(w):
                if i + 1 < len(w) and (w[i], w[i + 1]) == best:
                    out.append(256 + step)
                    i += 2
                else:
                    out.append(w[i])
                    i += 1
            new_words.append((out, c))
        words = new_words
    return merges


def random_corpus(rng: random.Random) -> dict[bytes, int]:
    alphabet = rng.choice(["ab", "abc", "ab c", "aaab", "xyz\u00e9\u4e2d"])
    chunks = {}
    for _ in range(rng.randint(1, 40)):
        s = "".join(rng.choice(alphabet) for _ in range(rng.randint(1, 12)))
        chunks[s.encode()] = rng.randint(1, 5)
    return chunks


# ------------------------------------------------------------------------------------------------
# Training: hand-checked example, fast == naive
# ------------------------------------------------------------------------------------------------

def test_classic_aaabdaaabac():
    # Wikipedia's BPE example: aa -> Z, ab -> Y, ZY -> X. "aa" occurs 4 times (left to right in
    # "aaab": aa, then a). Then Za and ab tie at 2: the smaller pair (97, 98) = "ab" wins.
    tok = BasicTokenizer()
    tok.train("aaabdaaabac", vocab_size=259)
    assert tok.merges == {(97, 97): 256, (97, 98): 257, (256, 257): 258}
    assert tok.vocab[258] == b"aaab"
    assert tok.encode("aaabdaaabac") == [258, 100, 258, 97, 99]
    assert tok.decode(tok.encode("aaabdaaabac")) == "aaabdaaabac"


def test_train_merges_counts_and_overlaps():
    # "aaaa" holds 3 overlapping (a,a) pairs; merging left to right leaves [aa, aa].
    merges = train_merges({b"aaaa": 2, b"ab": 1}, 3)
    assert merges == [((97, 97), 6), ((256, 256), 2), ((97, 98), 1)]


@pytest.mark.parametrize("seed", range(40))
def test_fast_trainer_equals_naive(seed):
    rng = random.Random(seed)
    corpus = random_corpus(rng)
    n = rng.randint(1, 30)
    assert train_merges(corpus, n) == naive_train(corpus, n)


def test_regex_trainer_equals_naive_on_real_text():
    text = (_wiki("valid") or _fallback_corpus())[:60_000]
    tok = RegexTokenizer("gpt4")
    tok.train(text, vocab_size=256 + 120)
    counts = Counter(regex.findall(GPT4_SPLIT_PATTERN, text))
    expected = naive_train({s.encode(): c for s, c in counts.items()}, 120)
    assert list(tok.merges) == [pair for pair, _ in expected]


def test_parallel_pretokenization_gives_same_merges():
    docs = [(_wiki("valid") or _fallback_corpus())[i:300_000:3] for i in range(3)]  # 3 different docs
    one = RegexTokenizer("gpt2").train(docs, 400, num_workers=1)
    two = RegexTokenizer("gpt2").train(docs, 400, num_workers=2)
    assert one.merges == two.merges


@pytest.mark.parametrize("pattern", ["gpt2", "gpt4"])
def test_split_for_workers_keeps_chunk_counts_exact(pattern):
    """Counting the pieces separately must equal counting the whole text, including the whitespace runs
    that a cut after a newline would change ("\n\nHello" is "\n", "\n" as GPT-2 splits the whole text)."""
    from phase1_foundation.project2_tokenizer.fast_bpe import _split_for_workers

    rng = random.Random(7)
    words = ["Hello", "world", "it's", "  ", "\n\n", "\n", " \n", "12345", "!!", "\t", "Ünïcode", "日本"]
    text = "".join(rng.choice(words) + rng.choice([" ", "", "\n\n", "  \n"]) for _ in range(3000))
    pieces = _split_for_workers(text, 200)
    assert len(pieces) > 20 and "".join(pieces) == text
    whole = Counter(regex.findall(SPLIT_PATTERNS[pattern], text))
    split = Counter(c for piece in pieces for c in regex.findall(SPLIT_PATTERNS[pattern], piece))
    assert split == whole


def test_special_tokens_are_not_learned_and_get_last_ids():
    tok = RegexTokenizer("gpt4", special_tokens=[ENDOFTEXT])
    text = (_wiki("valid") or _fallback_corpus())[:50_000]
    tok.train([text[:25_000] + ENDOFTEXT + text[25_000:], ENDOFTEXT * 20], vocab_size=300)
    assert tok.vocab_size == 300 and tok.eot_token == 299
    assert not any(b"endoftext" in t or b"<|" in t for t in tok.vocab.values())
    assert tok.encode("hi" + ENDOFTEXT, allowed_special="all")[-1] == 299


# ------------------------------------------------------------------------------------------------
# Exact parity with tiktoken
# ------------------------------------------------------------------------------------------------

try:  # only the parity tests need tiktoken: without it they skip, every other test still runs
    import tiktoken
except ImportError:
    tiktoken = None


def _need_tiktoken():
    if tiktoken is None:
        pytest.skip("tiktoken (dev dependency group) is needed for parity tests: uv sync --group dev")


def _gpt2_paths():
    enc, bpe = GPT2_DIR / "encoder.json", GPT2_DIR / "vocab.bpe"
    if not (enc.is_file() and bpe.is_file()):
        pytest.skip("GPT-2 files absent from data/gpt2_bpe/; run: uv run python "
                    "phase1_foundation/project2_tokenizer/download_data.py --dataset gpt2_bpe")
    return enc, bpe


@pytest.fixture(scope="module")
def gpt2_pair(tmp_path_factory):
    """(our GPT-2 tokenizer, tiktoken Encoding built by tiktoken's own loader from the same files)."""
    _need_tiktoken()
    enc_path, bpe_path = _gpt2_paths()
    from tiktoken.load import data_gym_to_mergeable_bpe_ranks
    mp = pytest.MonkeyPatch()
    mp.setenv("TIKTOKEN_CACHE_DIR", "")  # read the local files directly, no cache, no network
    ranks = data_gym_to_mergeable_bpe_ranks(vocab_bpe_file=str(bpe_path), encoder_json_file=str(enc_path))
    mp.undo()
    theirs = tiktoken.Encoding("gpt2_local", pat_str=GPT2_SPLIT_PATTERN, mergeable_ranks=ranks,
                               special_tokens={ENDOFTEXT: 50256})
    return load_gpt2(enc_path, bpe_path), theirs


@pytest.fixture(scope="module")
def trained():
    """A 1,024-token tokenizer per pattern, trained on WikiText-2 valid (or this project's source)."""
    text = _wiki("valid") or _fallback_corpus()
    return {name: RegexTokenizer(name, special_tokens=[ENDOFTEXT]).train(text, 1024) for name in SPLIT_PATTERNS}


def _as_tiktoken(tok: RegexTokenizer):
    _need_tiktoken()
    return tiktoken.Encoding(f"ours_{len(tok.vocab)}", pat_str=tok.pattern, mergeable_ranks=tok.to_ranks(),
                             special_tokens=tok.special_tokens)


def test_gpt2_known_ids(gpt2_pair):
    ours, _ = gpt2_pair
    assert ours.encode("Hello world") == [15496, 995]
    assert ours.vocab_size == 50257 and ours.eot_token == 50256
    assert len(ours.merges) == 50000 and ours.merges[(220, 83)] == 256  # first merge: "Ġ t" = " t"


@pytest.mark.parametrize("text", HARD_TEXTS)
def test_gpt2_parity_hard_texts(gpt2_pair, text):
    ours, theirs = gpt2_pair
    assert ours.encode(text, disallowed_special=()) == theirs.encode(text, disallowed_special=())
    assert ours.encode(text, allowed_special="all") == theirs.encode(text, allowed_special="all")
    assert ours.decode(ours.encode_ordinary(text)) == text


def test_gpt2_parity_wikitext(gpt2_pair):
    ours, theirs = gpt2_pair
    text = _wiki("test")
    if text is None:
        pytest.skip("data/wikitext2/wiki.test.raw absent; run download_data.py --dataset wikitext2")
    assert ours.encode_ordinary(text) == theirs.encode_ordinary(text)


def test_gpt2_lone_surrogate_like_tiktoken(gpt2_pair):
    ours, theirs = gpt2_pair
    text = "a\ud800b \udfff"
    assert ours.encode(text) == theirs.encode(text)


@pytest.mark.parametrize("name", list(SPLIT_PATTERNS))
def test_trained_parity_with_tiktoken(trained, name):
    ours = trained[name]
    theirs = _as_tiktoken(ours)
    held_out = (_wiki("test") or "")[:400_000]
    for text in HARD_TEXTS + [held_out]:
        assert ours.encode(text, allowed_special="all") == theirs.encode(text, allowed_special="all"), text[:60]
    assert ours.encode_batch(HARD_TEXTS, disallowed_special=()) == theirs.encode_batch(HARD_TEXTS, disallowed_special=())


try:
    from hypothesis import HealthCheck, given, settings
    from hypothesis import strategies as st
    HAVE_HYPOTHESIS = True
except ImportError:  # pragma: no cover - hypothesis is a dev dependency
    HAVE_HYPOTHESIS = False

needs_hypothesis = pytest.mark.skipif(not HAVE_HYPOTHESIS, reason="hypothesis (dev dependency) not installed")
if HAVE_HYPOTHESIS:
    # Text mixing ASCII, whitespace runs, digits and arbitrary unicode (surrogates excluded: not valid text).
    texts = st.one_of(
        st.text(max_size=200),
        st.text(alphabet=st.sampled_from(list(" \t\n\r aA1'.,!é中👋\u0301")), max_size=200),
        st.lists(st.sampled_from(HARD_TEXTS), max_size=4).map("".join),
    )
    fuzz = settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
else:
    texts, fuzz = None, (lambda f: f)

    def given(*a, **k):  # noqa: D103
        return lambda f: f


@needs_hypothesis
@fuzz
@given(text=texts)
def test_roundtrip_property(trained, text):
    for tok in trained.values():
        assert tok.decode(tok.encode_ordinary(text)) == text
        assert tok.decode_bytes(tok.encode_ordinary(text)) == text.encode("utf-8")


@needs_hypothesis
@fuzz
@given(text=texts)
def test_trained_parity_property(trained, text):
    ours = trained["gpt4"]
    assert ours.encode_ordinary(text) == _as_tiktoken(ours).encode_ordinary(text)


@needs_hypothesis
@fuzz
@given(text=texts)
def test_gpt2_parity_property(gpt2_pair, text):
    ours, theirs = gpt2_pair
    ids = ours.encode_ordinary(text)
    assert ids == theirs.encode_ordinary(text)
    assert ours.decode(ids) == text


@needs_hypothesis
@settings(max_examples=60, deadline=None)
@given(text=st.text(max_size=40))
def test_basic_roundtrip_property(text):
    tok = BasicTokenizer().train("the cat sat on the mat; 🐈 ünïcödé", 280)
    assert tok.decode(tok.encode(text)) == text


LONG_TEXTS = ["7" * 5000, " " * 4000 + "x", "ab" * 2000, "the" * 1500, "\n" * 3000, "é" * 1000 + "中" * 500]


def test_long_chunks_parity(gpt2_pair, trained):
    """Chunks over 128 bytes take the O(n log n) heap path; it must give the same ids."""
    pairs = [gpt2_pair] + [(t, _as_tiktoken(t)) for t in trained.values()]
    for ours, theirs in pairs:
        for text in LONG_TEXTS:
            assert ours.encode_ordinary(text) == theirs.encode_ordinary(text)


@pytest.mark.parametrize("seed", range(20))
def test_long_chunk_encoder_equals_scan(trained, seed):
    from phase1_foundation.project2_tokenizer import fast_bpe as T
    rng = random.Random(seed)
    ranks = trained["gpt2"].to_ranks()
    words = [t for t in ranks if 1 <= len(t) <= 4]
    chunk = b"".join(rng.choice(words) for _ in range(rng.randint(2, 200)))
    scan, T.LONG_CHUNK = T.LONG_CHUNK, 10**9
    try:
        expected = T.bpe_encode_chunk(chunk, ranks)
    finally:
        T.LONG_CHUNK = scan
    assert T._bpe_encode_long(chunk, ranks) == expected


# ------------------------------------------------------------------------------------------------
# Special tokens (tiktoken's contract)
# ------------------------------------------------------------------------------------------------

def test_special_tokens_contract(gpt2_pair):
    ours, theirs = gpt2_pair
    text = "a<|endoftext|>b"
    for tok in (ours, theirs):
        with pytest.raises(ValueError):
            tok.encode(text)  # disallowed by default
    with pytest.raises(DisallowedSpecialTokenError, match="allowed_special"):
        ours.encode(text)
    assert ours.encode(text, allowed_special={ENDOFTEXT}) == theirs.encode(text, allowed_special={ENDOFTEXT})
    assert ours.encode(text, allowed_special={ENDOFTEXT})[1] == 50256
    assert ours.encode(text, disallowed_special=()) == theirs.encode(text, disallowed_special=())
    assert 50256 not in ours.encode(text, disallowed_special=())
    assert ours.decode(ours.encode(text, allowed_special="all")) == text


def test_unknown_special_token_raises(trained):
    with pytest.raises(TokenizerError, match="unknown special token"):
        trained["gpt4"].encode("x", allowed_special={"<|im_start|>"})


def test_register_special_tokens_validation():
    tok = RegexTokenizer()
    tok.register_special_tokens({"<|a|>": 300, "<|b|>": 301})
    assert tok.encode("<|a|><|b|>", allowed_special="all") == [300, 301]
    with pytest.raises(TokenizerError, match="already used"):
        tok.register_special_tokens({"<|c|>": 65})  # 65 is the byte "A"
    with pytest.raises(TokenizerError):
        tok.register_special_tokens("<|d|>")


# ------------------------------------------------------------------------------------------------
# Save / load / interop
# ------------------------------------------------------------------------------------------------

def test_save_load_roundtrip(trained, tmp_path):
    tok = trained["gpt4"]
    path = save_tokenizer(tok, tmp_path / "tok.pkl")
    with open(path, "rb") as f:
        state = pickle.load(f)
    assert {"vocab", "inverse_vocab", "merges", "pattern", "special_tokens"} <= set(state)
    save_tokenizer(tok, tmp_path / "tokenizer.pkl")
    # load_tokenizer(file) and load_tokenizer(folder): the same tokenizer, of the same class
    for loaded in (load_tokenizer(path), load_tokenizer(tmp_path)):
        assert type(loaded) is RegexTokenizer
        assert loaded.vocab == tok.vocab and loaded.merges == tok.merges and loaded.pattern == tok.pattern
        assert loaded.special_tokens == tok.special_tokens and loaded.vocab_size == 1024
        for text in HARD_TEXTS[:12]:
            assert loaded.encode(text, allowed_special="all") == tok.encode(text, allowed_special="all")
    basic = BasicTokenizer().train("aaabdaaabac", 259)
    loaded = load_tokenizer(save_tokenizer(basic, tmp_path / "basic.pkl"))
    assert type(loaded) is BasicTokenizer and loaded.merges == basic.merges and loaded.pattern is None


def test_readable_export(trained, tmp_path):
    path = export_readable(trained["gpt2"], tmp_path / "tok.vocab")
    lines = path.read_text(encoding="utf-8").splitlines()
    assert len(lines) == 2 + 1024 and lines[-1].endswith("(special)")
    assert lines[2 + 256].startswith("256\t") and "=" in lines[2 + 256]


def test_ranks_roundtrip_and_tiktoken_file(trained, tmp_path):
    tok = trained["gpt2"]
    back = from_ranks(tok.to_ranks(), tok.pattern, tok.special_tokens)
    assert back.merges == tok.merges and back.vocab == tok.vocab
    path = save_ranks(tok, tmp_path / "ours.tiktoken")
    assert load_ranks(path) == tok.to_ranks()
    _need_tiktoken()
    from tiktoken.load import load_tiktoken_bpe
    assert load_tiktoken_bpe(str(path)) == tok.to_ranks()  # tiktoken reads our file


def test_from_ranks_arbitrary_table():
    # A non-GPT-2 table: single bytes in a shuffled order, a few merges, a custom pattern.
    order = list(range(256))
    random.Random(0).shuffle(order)
    ranks = {bytes([b]): r for r, b in enumerate(order)}
    for tok in [b"ab", b"abc", b"  ", b"abcab"]:
        ranks[tok] = len(ranks)
    tok = from_ranks(ranks, r"\S+|\s+", {"<s>": 1000})
    _need_tiktoken()
    theirs = tiktoken.Encoding("custom", pat_str=r"\S+|\s+", mergeable_ranks=ranks, special_tokens={"<s>": 1000})
    for text in ["abcab abc  ab", "xabcabx", "<s>abc", "   "]:
        assert tok.encode(text, allowed_special="all") == theirs.encode(text, allowed_special="all")
    assert tok.merges[(ranks[b"ab"], ranks[b"c"])] == ranks[b"abc"]


def test_gpt2_ranks_match_tiktoken_loader(gpt2_pair):
    ours, theirs = gpt2_pair
    assert ours.to_ranks() == theirs._mergeable_ranks


def test_from_ranks_gpt2_recovers_vocab_bpe_merges(gpt2_pair):
    ours, _ = gpt2_pair
    rebuilt = from_ranks(ours.to_ranks(), "gpt2", ours.special_tokens)
    assert rebuilt.merges == ours.merges


# ------------------------------------------------------------------------------------------------
# Bad inputs get clear errors
# ------------------------------------------------------------------------------------------------

def test_bad_inputs(trained, tmp_path):
    tok = trained["gpt4"]
    with pytest.raises(TokenizerError, match="expects a str"):
        tok.encode(b"bytes")
    with pytest.raises(TokenizerError, match="expects a str"):
        tok.encode(None)
    with pytest.raises(TokenizerError, match="vocab_size"):
        RegexTokenizer(special_tokens=[ENDOFTEXT]).train("some text", 257)
    with pytest.raises(TokenizerError, match="iterable of str"):
        RegexTokenizer().train(["ok", 3], 300)
    with pytest.raises(TokenizerError, match="cannot decode token id"):
        tok.decode([1, 99_999])
    with pytest.raises(TokenizerError, match="split pattern"):
        RegexTokenizer(pattern="(unclosed")
    with pytest.raises(TokenizerError, match="single bytes"):
        from_ranks({b"a": 0}, "gpt2")


def test_corrupt_and_missing_files(tmp_path):
    bad = tmp_path / "bad.pkl"
    bad.write_bytes(b"this is not a pickle")
    with pytest.raises(CourseError, match="corrupt"):
        load_tokenizer(bad)
    evil = tmp_path / "evil.pkl"
    evil.write_bytes(pickle.dumps(Path("x")))  # would need find_class: refused, never executed
    with pytest.raises(CourseError, match="corrupt"):
        load_tokenizer(evil)
    other = tmp_path / "other.pkl"
    other.write_bytes(pickle.dumps({"vocab": {}}))
    with pytest.raises(CourseError, match="not a course tokenizer"):
        load_tokenizer(other)
    tok = RegexTokenizer().train("hello hello world", 260)
    state = tokenizer_state(tok)
    state["inverse_vocab"] = {}
    damaged = tmp_path / "damaged.pkl"
    damaged.write_bytes(pickle.dumps(state))
    with pytest.raises(CourseError, match="damaged"):
        load_tokenizer(damaged)
    with pytest.raises(CourseError, match="train_tokenizer.py"):
        load_tokenizer(tmp_path / "missing.pkl")
    with pytest.raises(CourseError, match="download_data.py"):
        load_gpt2(tmp_path / "encoder.json", tmp_path / "vocab.bpe")
    (tmp_path / "encoder.json").write_text("{not json")
    (tmp_path / "vocab.bpe").write_text("#version: 0.2\n")
    with pytest.raises(CourseError, match="corrupt"):
        load_gpt2(tmp_path / "encoder.json", tmp_path / "vocab.bpe")


def test_decode_replacement_and_bytes(gpt2_pair):
    ours, _ = gpt2_pair
    ids = ours.encode("é")  # one token holding two bytes? check via bytes
    raw = ours.decode_bytes(ids)
    assert raw == "é".encode()
    byte_ids = [ours.inverse_vocab[bytes([b])] for b in "中".encode()]
    assert ours.decode(byte_ids[:2]) == "\ufffd"  # cut UTF-8 -> replacement character
    assert ours.decode_bytes(byte_ids[:2]) == "中".encode()[:2]


def test_encode_batch_workers(trained):
    tok = trained["gpt4"]
    batch = HARD_TEXTS * 3
    expected = [tok.encode(t, allowed_special="all") for t in batch]
    assert tok.encode_batch(batch, allowed_special="all") == expected
    assert tok.encode_batch(batch, num_workers=2, allowed_special="all") == expected


@pytest.mark.slow
def test_course_tokenizer_parity_on_real_text():
    """The trained course tokenizer (checkpoints/project2) vs tiktoken on held-out books and WikiText-2."""
    ckpt = REPO_ROOT / "checkpoints" / "project2" / "tokenizer.pkl"
    if not ckpt.is_file():
        pytest.skip("no checkpoints/project2/tokenizer.pkl; run train_tokenizer.py first")
    from phase1_foundation.project2_tokenizer.data import read_gutenberg
    tok = load_tokenizer(ckpt)
    assert tok.vocab_size == 10_000 and tok.eot_token == 9_999
    texts = [t for t in [_wiki("test"), _wiki("valid")] if t]
    if (REPO_ROOT / "data" / "gutenberg").is_dir():
        texts += read_gutenberg(REPO_ROOT / "data" / "gutenberg", "heldout")
    if not texts:
        pytest.skip("no held-out text in data/")
    theirs = _as_tiktoken(tok)
    for text in texts:
        assert tok.encode_ordinary(text) == theirs.encode_ordinary(text)


# ------------------------------------------------------------------------------------------------
# Config and scripts
# ------------------------------------------------------------------------------------------------

def test_config_presets_and_validation():
    for preset in TokenizerConfig.PRESETS:
        cfg = TokenizerConfig.from_preset(preset).validate_config()
        assert cfg.vocab_size == 10_000 and cfg.special_token_list() == [ENDOFTEXT]
    with pytest.raises(ConfigError, match="vocab_size"):
        TokenizerConfig(vocab_size=257).validate_config()
    with pytest.raises(ConfigError, match="pattern"):
        TokenizerConfig(pattern="gpt5").validate_config()
    with pytest.raises(ConfigError, match="special_tokens"):
        TokenizerConfig(special_tokens="<|a|>,<|a|>").validate_config()
    with pytest.raises(ConfigError, match="plot_sizes"):
        TokenizerConfig(plot_sizes="100,512").validate_config()
    # a smaller vocabulary plots up to itself (the README's --vocab_size=4096 command), a larger one includes itself
    assert TokenizerConfig(vocab_size=4096).validate_config().plot_size_list() == [256, 512, 1000, 2000, 4096]
    assert TokenizerConfig(vocab_size=32_000).plot_size_list()[-2:] == [10_000, 32_000]


def test_train_script_end_to_end(tmp_path):
    """The training script on a tiny corpus: checkpoint, readable export, plots, summary line."""
    import gzip
    books = tmp_path / "gutenberg"
    books.mkdir()
    body = (_wiki("valid") or _fallback_corpus())[:200_000]
    for k in range(4):
        text = f"header\r\n*** START OF THE PROJECT GUTENBERG EBOOK {k} ***\r\n{body[k::4]}\r\n*** END OF IT ***\r\nfooter"
        (books / f"book{k}.txt.gz").write_bytes(gzip.compress(text.encode()))
    from phase1_foundation.project2_tokenizer import train_tokenizer
    out = tmp_path / "out"
    summary = train_tokenizer.main(["--vocab_size=400", f"--data_dir={books}", f"--out_dir={out}",
                                    "--heldout_every=4", "--num_workers=1", "--plot_sizes=300,400"])
    tok = load_tokenizer(out / "tokenizer.pkl")
    assert tok.vocab_size == 400 and tok.eot_token == 399
    for name in ["tokenizer.vocab", "tokenizer.tiktoken", "token_lengths.png", "compression_vs_vocab.png"]:
        assert (out / name).is_file(), name
    assert summary["bytes_per_token"] > 1.2


# ------------------------------------------------------------------------------------------------
# Run as a script: validation examples, or an interactive viewer of how text becomes tokens
# ------------------------------------------------------------------------------------------------

DEFAULT_TOKENIZER = "checkpoints/project2/tokenizer.pkl"
COLORS = ["48;5;153", "48;5;223", "48;5;194", "48;5;217"]  # token backgrounds, in turn


def show_tokens(tok, text: str, color: bool | None = None) -> str:
    """Token boundaries (alternating colours on a terminal, `|` between tokens otherwise), ids, compression."""
    from course.cli import use_color

    color = use_color() if color is None else color
    ids = tok.encode(text, allowed_special="all") if isinstance(tok, RegexTokenizer) else tok.encode(text)
    pieces = []
    for k, i in enumerate(ids):
        # A token that holds part of a multi-byte character shows its bytes: \xf0
        s = tok.decode_bytes([i]).decode("utf-8", errors="backslashreplace").replace("\n", "\\n").replace("\t", "\\t")
        pieces.append(f"\033[{COLORS[k % len(COLORS)]};30m{s}\033[0m" if color else s)
    n_bytes = len(text.encode("utf-8"))
    ratio = n_bytes / max(len(ids), 1)
    return (f"{''.join(pieces) if color else '|'.join(pieces)}\nids: {ids}\n{len(ids)} tokens, {n_bytes} bytes, "
            f"{ratio:.2f} bytes/token, compression {ratio:.2f}x vs raw bytes")


def open_tokenizer(spec: str):
    """'gpt2' (data/gpt2_bpe/), or a saved .pkl / its folder; relative paths work from any directory."""
    from phase1_foundation.project2_tokenizer.data import gpt2_files

    if spec == "gpt2":
        return load_gpt2(*gpt2_files())
    return load_tokenizer(repo_path(spec))


def interactive_session(tok) -> None:
    """The course's one session behaviour (course/interactive.py): a bad line is reported and the prompt
    comes back; an empty line does nothing; Ctrl-C twice, Ctrl-D or /quit quits. `\\n` types a newline."""
    from course.interactive import run_session

    def answer(line: str, out) -> None:
        out.write(show_tokens(tok, line.replace("\\n", "\n")) + "\n")

    run_session(answer, banner=f"{tok}\nType text to see its tokens (\\n for a newline; /quit or Ctrl-D quits).")


def _demo(tok, source: str) -> None:
    print("1. BPE by hand on Wikipedia's example 'aaabdaaabac' (3 merges):")
    basic = BasicTokenizer().train("aaabdaaabac", vocab_size=259)
    for (a, b), new in basic.merges.items():
        print(f"   merge {basic.vocab[a].decode()!r} + {basic.vocab[b].decode()!r} -> id {new} "
              f"{basic.vocab[new].decode()!r}")
    print(f"   'aaabdaaabac' -> {basic.encode('aaabdaaabac')}\n")
    print(f"2. {source}: {tok}")
    for text in ["Hello world! It's 2024.", "naïve café 你好 👋", "def f(x):\n    return x**2"]:
        print(show_tokens(tok, text), "\n")
    if tiktoken is None or tok.pattern is None:
        print("3. (no parity check: tiktoken is not installed or the tokenizer has no split pattern)")
        return
    theirs = tiktoken.Encoding("check", pat_str=tok.pattern, mergeable_ranks=tok.to_ranks(),
                               special_tokens=tok.special_tokens)
    same = sum(tok.encode(t, disallowed_special=()) == theirs.encode(t, disallowed_special=()) for t in HARD_TEXTS)
    print(f"3. ids identical to tiktoken built from the same ranks: {same}/{len(HARD_TEXTS)} hard texts")


def main(argv: list[str] | None = None) -> None:
    from course.cli import ArgumentParser

    p = ArgumentParser(description=__doc__, epilog="Without --interactive: validation examples. "
                                                   "The tests run with pytest.")
    p.add_argument("--interactive", action="store_true", help="type text, see its tokens")
    p.add_argument("--tokenizer", default=None,
                   help=f"a saved tokenizer .pkl (or its folder), or 'gpt2' for GPT-2's (data/gpt2_bpe/); "
                        f"default {DEFAULT_TOKENIZER}")
    args = p.parse_args(argv)
    if args.tokenizer is None and not args.interactive and not repo_path(DEFAULT_TOKENIZER).is_file():
        # the examples run before anything is trained: a small tokenizer trained here on this project's files
        tok, source = RegexTokenizer("gpt4", [ENDOFTEXT]).train(_fallback_corpus(), 600), \
            f"no {DEFAULT_TOKENIZER} yet (run train_tokenizer.py); a 600-id tokenizer trained on this project's files"
    else:
        spec = args.tokenizer or DEFAULT_TOKENIZER
        tok, source = open_tokenizer(spec), spec
    if args.interactive:
        interactive_session(tok)
    else:
        _demo(tok, source)


if __name__ == "__main__":
    from course.errors import run_cli

    run_cli(main)
