"""Byte-level BPE tokenizer from scratch: train, encode, decode, save, load; exact tiktoken parity.

PAPERS
- Philip Gage, 1994, "A New Algorithm for Data Compression": byte pair encoding as compression,
  repeatedly replace the most frequent pair of adjacent symbols with a new symbol.
- Sennrich, Haddow, Birch, 2016, "Neural Machine Translation of Rare Words with Subword Units":
  BPE as a subword vocabulary; learn merges on word counts (not the running text), apply them in
  the learned order to encode. Rare words become sequences of known subwords: no unknown tokens.
- Radford, Wu, Child, Luan, Amodei, Sutskever, 2019, "Language Models are Unsupervised Multitask
  Learners" (GPT-2): byte-level BPE (the 256 byte values are the base alphabet, so any string
  encodes) and a regex that splits text into chunks first, so merges never cross a letter/number/
  punctuation/space boundary ("dog." "dog!" "dog?" share the token "dog").
- OpenAI tiktoken (2022-23): the cl100k ("GPT-4") split pattern, mergeable ranks (token bytes -> rank
  = id) as the exchange format, and the special-token contract (allowed_special / disallowed_special).

The file is built in layers, each adding one idea:
  1. the naive algorithm on a list of ids (`get_pair_counts`, `merge_pair`): what BPE *is*
  2. the fast trainer (`train_merges`): the same merges, computed on unique chunks incrementally
  3. encoding one chunk by rank (`bpe_encode_chunk`): exactly tiktoken's merge rule
  4. `BasicTokenizer`: train/encode/decode on raw bytes, save/load
  5. `RegexTokenizer`: regex pre-tokenization (GPT-2 / GPT-4 patterns), a chunk cache, special tokens
  6. interop: GPT-2's encoder.json + vocab.bpe, tiktoken mergeable ranks, `load_tokenizer`
"""

from __future__ import annotations

import base64
import functools
import heapq
import json
import os
import pickle
import sys
from collections import Counter, defaultdict
from itertools import chain
from pathlib import Path
from typing import AbstractSet, Collection, Iterable, Literal

import regex
from tqdm import tqdm

from course.errors import CourseError

# --------------------------------------------------------------------------------------------------
# Split patterns and errors
# --------------------------------------------------------------------------------------------------

# GPT-2 (r50k), as tiktoken writes it: contractions, optional space + letters, optional space +
# numbers, optional space + punctuation, whitespace. The possessive `++` forms are equivalent to
# GPT-2's original `'s|'t|...| ?\p{L}+|...|\s+(?!\S)|\s+` and a little faster (no backtracking).
GPT2_SPLIT_PATTERN = r"""'(?:[sdmt]|ll|ve|re)| ?\p{L}++| ?\p{N}++| ?[^\s\p{L}\p{N}]++|\s++$|\s+(?!\S)|\s"""
# GPT-4 (cl100k): case-insensitive contractions, a letter run may take one leading non-letter
# (" word", "_word"), numbers split into groups of at most 3 digits, newlines grouped.
GPT4_SPLIT_PATTERN = (r"""'(?i:[sdmt]|ll|ve|re)|[^\r\n\p{L}\p{N}]?+\p{L}++|\p{N}{1,3}+| ?[^\s\p{L}\p{N}]++[\r\n]*+"""
                      r"""|\s++$|\s*[\r\n]|\s+(?!\S)|\s""")
SPLIT_PATTERNS = {"gpt2": GPT2_SPLIT_PATTERN, "gpt4": GPT4_SPLIT_PATTERN}
ENDOFTEXT = "<|endoftext|>"


class TokenizerError(CourseError, ValueError):
    """Bad input to a tokenizer (wrong type, unknown id, bad file); the message says what to do."""


class DisallowedSpecialTokenError(TokenizerError):
    """The text contains a special token that the caller did not allow (tiktoken's contract)."""


def resolve_pattern(pattern: str | None) -> str | None:
    """A pattern name ("gpt2", "gpt4") or a regex string -> the regex string (None = no split)."""
    if pattern is None:
        return None
    if not isinstance(pattern, str) or not pattern:
        raise TokenizerError(f"pattern must be one of {', '.join(SPLIT_PATTERNS)} or a regex string, got {pattern!r}")
    if pattern in SPLIT_PATTERNS:
        return SPLIT_PATTERNS[pattern]
    try:
        regex.compile(pattern)
    except regex.error as e:
        raise TokenizerError(f"split pattern is neither a known name ({', '.join(SPLIT_PATTERNS)}) "
                             f"nor a valid regex: {e}") from None
    return pattern


def pattern_name(pattern: str | None) -> str:
    for name, pat in SPLIT_PATTERNS.items():
        if pattern == pat:
            return name
    return "none" if pattern is None else "custom"


# --------------------------------------------------------------------------------------------------
# 1. The naive algorithm: what BPE is
# --------------------------------------------------------------------------------------------------

def get_pair_counts(ids: list[int], counts: dict | None = None, weight: int = 1) -> dict[tuple[int, int], int]:
    """Count adjacent pairs: [1, 2, 3, 1, 2] -> {(1, 2): 2, (2, 3): 1, (3, 1): 1}."""
    counts = {} if counts is None else counts
    for pair in zip(ids, ids[1:]):
        counts[pair] = counts.get(pair, 0) + weight
    return counts


def merge_pair(ids: list[int], pair: tuple[int, int], new_id: int) -> list[int]:
    """Replace every occurrence of `pair`, scanning left to right: ([a,a,a], (a,a), X) -> [X, a]."""
    out, i, n = [], 0, len(ids)
    while i < n:
        if i + 1 < n and ids[i] == pair[0] and ids[i + 1] == pair[1]:
            out.append(new_id)
            i += 2
        else:
            out.append(ids[i])
            i += 1
    return out


# --------------------------------------------------------------------------------------------------
# 2. Fast training: the same merges, incrementally
# --------------------------------------------------------------------------------------------------

def train_merges(chunk_counts: dict[bytes, int], num_merges: int, progress: bool = False,
                 log_every: int = 0) -> list[tuple[tuple[int, int], int]]:
    """Learn `num_merges` BPE merges from {chunk bytes: count}. Returns [((a, b), count), ...].

    Merge i creates token id 256 + i from the pair (a, b). Ids 0..255 are the raw bytes.

    PAPER: Sennrich et al. 2016 learn merges from a word-frequency dictionary; GPT-2's byte-level
    variant does the same with regex chunks of bytes.

    INTUITION: the naive loop (`get_pair_counts` over the whole corpus, pick the best pair,
    `merge_pair` over the whole corpus, repeat) costs O(merges x corpus): 10,000 merges x 76 MB is
    ~10^12 steps. Two observations make it cheap:
      * the corpus is mostly repeats: 76 MB of English is ~15 M regex chunks but only ~0.2 M
        *distinct* chunks. Count them once and work on (chunk, count) pairs, weighting by count.
      * a merge of (a, b) only changes chunks that contain (a, b). Keep, for every pair, the set
        of chunk indices where it occurs, touch only those chunks, and update the pair counts by
        the local difference (pairs around each occurrence) instead of recounting.
    The best pair is then found with a max-heap of (count, pair) instead of a scan over all pairs.
    Total work is proportional to the number of (chunk, merge) applications, not merges x corpus.

    IMPLEMENTATION:
      * words[i] is the i-th distinct chunk as a list of token ids, counts[i] its frequency.
      * pair_counts[p] is the exact total count of pair p; where[p] is a superset of the chunks
        that contain p (chunks are added when p appears, never removed: a stale index is just
        skipped when the chunk no longer contains p; this is cheaper than keeping sets exact).
      * the heap holds (-count, a, b) entries and is lazily invalidated: when a count changes we
        push a new entry; a popped entry whose count differs from pair_counts is stale and dropped.

    TIE-BREAKING (deterministic, independent of dict order or worker count): the pair with the
    highest count wins; among equal counts, the smallest (a, b) - the lowest first id, then the
    lowest second id. The heap key (-count, a, b) encodes exactly that rule.
    """
    if num_merges < 0:
        raise TokenizerError(f"num_merges ({num_merges}) must be >= 0")
    words = [list(chunk) for chunk in chunk_counts]
    counts = list(chunk_counts.values())
    pair_counts: dict[tuple[int, int], int] = defaultdict(int)
    where: dict[tuple[int, int], set[int]] = defaultdict(set)
    for i, (w, c) in enumerate(zip(words, counts)):
        for pair in zip(w, w[1:]):
            pair_counts[pair] += c
            where[pair].add(i)
    heap = [(-c, a, b) for (a, b), c in pair_counts.items()]
    heapq.heapify(heap)

    merges: list[tuple[tuple[int, int], int]] = []
    token_bytes = [bytes([i]) for i in range(256)]  # only for the log lines
    bar = tqdm(total=num_merges, desc="merges", unit="merge", disable=not progress, mininterval=0.5)
    for step in range(num_merges):
        # Pop until the top entry is current (lazy deletion).
        while heap:
            neg, a, b = heapq.heappop(heap)
            if pair_counts.get((a, b), 0) == -neg:
                break
        else:
            break  # no pair left: every chunk is a single token
        pair, count, new_id = (a, b), -neg, 256 + step
        merges.append((pair, count))

        delta: dict[tuple[int, int], int] = defaultdict(int)
        for i in where.pop(pair):
            w = words[i]
            if a not in w:
                continue  # stale index
            c = counts[i]
            out: list[int] = []
            j, n = 0, len(w)
            while j < n:
                if w[j] == a and j + 1 < n and w[j + 1] == b:
                    # Local update around this occurrence: (prev, a) -> (prev, X), (b, next) -> (X, next).
                    # With back-to-back occurrences "a b a b", prev is the X just written, and the
                    # (X, a) added by the first occurrence is removed again here: the net result is exact.
                    if out:
                        prev = out[-1]
                        delta[(prev, a)] -= c
                        delta[(prev, new_id)] += c
                        where[(prev, new_id)].add(i)
                    if j + 2 < n:
                        nxt = w[j + 2]
                        delta[(b, nxt)] -= c
                        delta[(new_id, nxt)] += c
                        where[(new_id, nxt)].add(i)
                    delta[pair] -= c
                    out.append(new_id)
                    j += 2
                else:
                    out.append(w[j])
                    j += 1
            words[i] = out
        for p, d in delta.items():
            if d:
                new = pair_counts[p] + d
                if new > 0:
                    pair_counts[p] = new
                    heapq.heappush(heap, (-new, p[0], p[1]))
                else:
                    del pair_counts[p]
        pair_counts.pop(pair, None)
        bar.update(1)
        token_bytes.append(token_bytes[a] + token_bytes[b])
        if log_every and (step + 1) % log_every == 0:
            bar.write(f"  merge {step + 1:>6}: {token_bytes[a]!r} + {token_bytes[b]!r} -> id {new_id} "
                      f"(count {count:,})")
    bar.close()
    return merges


# --------------------------------------------------------------------------------------------------
# 3. Encoding one chunk: merge the lowest-ranked pair first (tiktoken's rule)
# --------------------------------------------------------------------------------------------------

_NO_RANK = sys.maxsize


def bpe_encode_chunk(chunk: bytes, ranks: dict[bytes, int]) -> list[int]:
    """Encode the bytes of one chunk into ids with the rank table {token bytes: rank = id}.

    INTUITION: replay training on this chunk. Training created low ranks first, so among the
    adjacent pairs whose concatenation is a token, merge the one with the lowest rank (the leftmost
    one on ties), and repeat until no adjacent pair forms a token.

    WHY ranks of *concatenated bytes* rather than a (left id, right id) -> id table: this is
    tiktoken's definition (it also shortcuts a chunk that is itself a token), and following it to
    the letter is what makes our ids equal tiktoken's for any rank table, GPT-2's included.

    IMPLEMENTATION: parts are the current token bytes, pr[i] the rank of parts[i] + parts[i+1].
    After a merge at i only pr[i-1] and pr[i] change, so each step is one C-level min() + index()
    over a short list; chunks are words, so this is fast, and a cache makes repeats free. That is
    O(n^2) for an n-byte chunk, so chunks over 128 bytes (long digit or space runs, or a whole text
    in BasicTokenizer) take the O(n log n) heap version below, which makes the same choices.
    """
    token = ranks.get(chunk)
    if token is not None:
        return [token]
    if len(chunk) > _LONG_CHUNK:
        return _bpe_encode_long(chunk, ranks)
    parts = [chunk[i:i + 1] for i in range(len(chunk))]
    get = ranks.get
    pr = [get(parts[i] + parts[i + 1], _NO_RANK) for i in range(len(parts) - 1)]
    while pr:
        best = min(pr)
        if best == _NO_RANK:
            break
        i = pr.index(best)
        parts[i] += parts[i + 1]
        del parts[i + 1]
        del pr[i]
        if i > 0:
            pr[i - 1] = get(parts[i - 1] + parts[i], _NO_RANK)
        if i < len(pr):
            pr[i] = get(parts[i] + parts[i + 1], _NO_RANK)
    return [ranks[p] for p in parts]


_LONG_CHUNK = 128


def _bpe_encode_long(chunk: bytes, ranks: dict[bytes, int]) -> list[int]:
    """The same merges as bpe_encode_chunk in O(n log n), for long chunks (a 100 KB digit run).

    The scan above is O(n) per merge, so O(n^2) per chunk. Here the parts form a linked list and
    the candidate pairs sit in a heap keyed (rank, start position): the smallest key is the lowest
    rank and, on ties, the leftmost pair - the same choice as the scan. Entries carry the versions
    of both parts; an entry whose parts changed since it was pushed is stale and skipped.
    """
    n = len(chunk)
    parts: list[bytes | None] = [chunk[i:i + 1] for i in range(n)]
    nxt = list(range(1, n + 1))  # n = end of list
    prv = list(range(-1, n - 1))
    ver = [0] * n
    get = ranks.get
    heap = [(r, i, i + 1, 0, 0) for i in range(n - 1) if (r := get(parts[i] + parts[i + 1])) is not None]
    heapq.heapify(heap)
    while heap:
        _, i, j, vi, vj = heapq.heappop(heap)
        if ver[i] != vi or ver[j] != vj or nxt[i] != j or parts[i] is None or parts[j] is None:
            continue  # stale
        parts[i] += parts[j]
        parts[j] = None
        ver[i] += 1
        k = nxt[i] = nxt[j]
        if k < n:
            prv[k] = i
            r = get(parts[i] + parts[k])
            if r is not None:
                heapq.heappush(heap, (r, i, k, ver[i], ver[k]))
        p = prv[i]
        if p >= 0:
            r = get(parts[p] + parts[i])
            if r is not None:
                heapq.heappush(heap, (r, p, i, ver[p], ver[i]))
    out, i = [], 0
    while i < n:
        out.append(ranks[parts[i]])
        i = nxt[i]
    return out


class _ChunkCache(dict):
    """str chunk -> tuple of ids; a miss runs BPE once. Natural text repeats its chunks constantly."""

    __slots__ = ("ranks",)

    def __init__(self, ranks: dict[bytes, int]):
        super().__init__()
        self.ranks = ranks

    def __missing__(self, chunk: str) -> tuple[int, ...]:
        ids = tuple(bpe_encode_chunk(chunk.encode("utf-8"), self.ranks))
        self[chunk] = ids
        return ids


_CACHE_LIMIT = 1_000_000  # distinct chunks kept; beyond that the cache is cleared (bounded memory)


def _fix_surrogates(text: str) -> str:
    """Lone surrogates cannot be UTF-8 encoded; replace them with U+FFFD as tiktoken does."""
    return text.encode("utf-16", "surrogatepass").decode("utf-16", "replace")


def _check_text(text: object) -> str:
    if not isinstance(text, str):
        raise TokenizerError(f"encode expects a str, got {type(text).__name__}; "
                             "decode bytes first (bytes.decode('utf-8')) or pass a string")
    return text


# --------------------------------------------------------------------------------------------------
# Pre-tokenization for training: count chunks, optionally in worker processes
# --------------------------------------------------------------------------------------------------

def _count_chunks(args: tuple[str | None, str | None, str]) -> Counter:
    """Worker: split one piece of text on special tokens, then with the pattern; count the chunks."""
    pattern, special_pattern, text = args
    pieces = regex.split(special_pattern, text) if special_pattern else [text]
    counter: Counter = Counter()
    if pattern is None:
        counter.update(p for p in pieces if p)
    else:
        findall = regex.compile(pattern).findall
        for piece in pieces:
            counter.update(findall(piece))
    return counter


def _split_for_workers(text: str, piece_chars: int) -> list[str]:
    r"""Cut a long text into ~piece_chars pieces, each cut between a letter and a following " " + letter.

    WHY there: counting the pieces separately must give exactly the counts of the whole text. In both
    built-in patterns a letter run ends at the space, and " " + letters starts the next chunk; the only
    alternatives that look ahead (`\s+(?!\S)`, `\s++$`) match whitespace, and the piece before the cut
    ends in a letter. (A cut after a newline is NOT safe: with the GPT-2 pattern "\n\nHello" splits as
    "\n", "\n" in the whole text but as "\n\n" at the end of a piece.)
    """
    if len(text) <= piece_chars:
        return [text]
    pieces, start = [], 0
    boundary = regex.compile(r"(?<=\p{L})(?= \p{L})")
    while start < len(text):
        m = boundary.search(text, start + piece_chars) if start + piece_chars < len(text) else None
        end = m.start() if m else len(text)
        pieces.append(text[start:end])
        start = end
    return pieces


def count_chunks(texts: Iterable[str], pattern: str | None, special_tokens: Iterable[str] = (),
                 num_workers: int = 1, progress: bool = False) -> Counter:
    """{chunk str: count} over all texts. Special tokens are cut out (they are never merged)."""
    specials = sorted(special_tokens, key=len, reverse=True)
    special_pattern = "|".join(regex.escape(s) for s in specials) if specials else None
    if pattern is None:
        # Basic: every document is one chunk, nothing to parallelize.
        total = Counter()
        for t in texts:
            total.update(_count_chunks((None, special_pattern, t)))
        return total
    jobs = [(pattern, special_pattern, piece) for t in texts for piece in _split_for_workers(t, 2_000_000)]
    total: Counter = Counter()
    bar = tqdm(total=len(jobs), desc="pre-tokenizing", unit="piece", disable=not progress, leave=False)
    if num_workers > 1 and len(jobs) > 1:
        import multiprocessing as mp
        with mp.Pool(num_workers) as pool:
            for c in pool.imap_unordered(_count_chunks, jobs, chunksize=1):
                total.update(c)
                bar.update(1)
    else:
        for job in jobs:
            total.update(_count_chunks(job))
            bar.update(1)
    bar.close()
    return total


# --------------------------------------------------------------------------------------------------
# 4. BasicTokenizer: byte-level BPE on raw bytes
# --------------------------------------------------------------------------------------------------

_FORMAT = "course-bpe-tokenizer"
_FORMAT_VERSION = 1


class _ClassOrInstance:
    """`load` works as `Tok.load(path)` (new tokenizer) and as `tok.load(path)` (fills tok in place)."""

    def __init__(self, fn):
        self.fn = fn
        functools.update_wrapper(self, fn)

    def __get__(self, obj, cls):
        return functools.partial(self.fn, cls, obj)


class BasicTokenizer:
    """Byte-level BPE with no pre-tokenization: the whole text is one sequence of bytes.

    This is the algorithm in its plainest form. Merges can cross word boundaries ("e t" in
    "the time"), which wastes vocabulary; RegexTokenizer below fixes that. Training on one long
    sequence is the naive O(length x merges) (every merge rewrites the whole sequence: there are no
    repeated chunks to share work), so train it on small texts only.

    State (what save() writes):
      vocab          {id: token bytes} for the mergeable tokens (ids 0..255 are the raw bytes)
      inverse_vocab  {token bytes: id} - the tiktoken "mergeable ranks" (rank = id = merge order)
      merges         {(left id, right id): new id}, in merge order
      special_tokens {str: id}
    """

    default_pattern: str | None = None

    def __init__(self, special_tokens: Iterable[str] | dict[str, int] | None = None):
        self.pattern: str | None = self.default_pattern
        self.vocab: dict[int, bytes] = {i: bytes([i]) for i in range(256)}
        self.merges: dict[tuple[int, int], int] = {}
        self.special_tokens: dict[str, int] = {}
        self._rebuild()
        if special_tokens:
            self.register_special_tokens(special_tokens)

    # ---- derived tables --------------------------------------------------------------------
    def _rebuild(self) -> None:
        """Recompute everything derived from vocab / special_tokens / pattern (call after changes)."""
        self.inverse_vocab = {b: i for i, b in self.vocab.items()}
        self._decoder = dict(self.vocab)
        for s, i in self.special_tokens.items():
            self._decoder[i] = s.encode("utf-8")
        self._cache = _ChunkCache(self.inverse_vocab)
        self._split = regex.compile(self.pattern).findall if self.pattern is not None else None
        self._special_regex_cache: dict[frozenset, regex.Pattern] = {}

    def __getstate__(self):  # pickling (multiprocessing): drop compiled regexes and the cache
        return {k: getattr(self, k) for k in ("pattern", "vocab", "merges", "special_tokens")}

    def __setstate__(self, state):
        self.__dict__.update(state)
        self._rebuild()

    @property
    def vocab_size(self) -> int:
        """Number of ids: mergeable tokens + special tokens (ids are 0..vocab_size-1 when trained here)."""
        return len(self.vocab) + len(self.special_tokens)

    @property
    def n_vocab(self) -> int:  # tiktoken's name: the embedding table needs max id + 1 rows
        return max(chain(self.vocab, self.special_tokens.values())) + 1

    @property
    def eot_token(self) -> int | None:
        """Id of "<|endoftext|>" if registered, else None."""
        return self.special_tokens.get(ENDOFTEXT)

    def register_special_tokens(self, special_tokens: Iterable[str] | dict[str, int]) -> None:
        """Add special tokens: a dict {str: id}, or names that get the next free ids in order."""
        if isinstance(special_tokens, str):
            raise TokenizerError("special_tokens must be a list of strings or a {str: id} dict, not one string")
        if not isinstance(special_tokens, dict):
            names = list(special_tokens)
            start = max(chain(self.vocab, self.special_tokens.values()), default=-1) + 1
            special_tokens = {s: start + k for k, s in enumerate(n for n in names if n not in self.special_tokens)}
        for s, i in special_tokens.items():
            if not isinstance(s, str) or not s:
                raise TokenizerError(f"special token must be a non-empty str, got {s!r}")
            if not isinstance(i, int) or i < 0:
                raise TokenizerError(f"special token {s!r} needs a non-negative int id, got {i!r}")
            if i in self.vocab or (i in self.special_tokens.values() and self.special_tokens.get(s) != i):
                raise TokenizerError(f"special token {s!r} id {i} is already used by another token")
        self.special_tokens.update(special_tokens)
        self._rebuild()

    # ---- training --------------------------------------------------------------------------
    def train(self, text_or_iterable: str | Iterable[str], vocab_size: int, verbose: bool = False,
              num_workers: int = 1, log_every: int = 0) -> "BasicTokenizer":
        """Learn vocab_size - 256 - len(special_tokens) merges; special tokens get the last ids.

        text_or_iterable: one string, or an iterable of documents (a merge never spans two).
        num_workers > 1 pre-tokenizes in that many processes (RegexTokenizer only).
        """
        texts = [text_or_iterable] if isinstance(text_or_iterable, str) else list(text_or_iterable)
        for t in texts:
            if not isinstance(t, str):
                raise TokenizerError(f"train expects a str or an iterable of str, got an item of type {type(t).__name__}")
        specials = list(self.special_tokens)
        min_size = 256 + len(specials) + 1
        if not isinstance(vocab_size, int) or isinstance(vocab_size, bool) or vocab_size < min_size:
            raise TokenizerError(f"vocab_size ({vocab_size!r}) must be an int >= {min_size} "
                                 f"(256 byte tokens + {len(specials)} special token(s) + at least one merge)")
        num_merges = vocab_size - 256 - len(specials)
        # Basic (pattern None): each document is one chunk; Regex: the pattern's chunks.
        counts = count_chunks(texts, self.pattern, specials, num_workers=num_workers, progress=verbose)
        chunk_counts = {s.encode("utf-8", "surrogatepass"): c for s, c in counts.items()}
        merges = train_merges(chunk_counts, num_merges, progress=verbose, log_every=log_every)
        self.vocab = {i: bytes([i]) for i in range(256)}
        self.merges = {}
        for k, ((a, b), _count) in enumerate(merges):
            self.merges[(a, b)] = 256 + k
            self.vocab[256 + k] = self.vocab[a] + self.vocab[b]
        # Special tokens move to the ids right after the last merge, in their registration order.
        self.special_tokens = {s: len(self.vocab) + k for k, s in enumerate(specials)}
        self._rebuild()
        if verbose and len(merges) < num_merges:
            print(f"note: the corpus ran out of pairs after {len(merges)} merges; vocab_size is {self.vocab_size}")
        return self

    # ---- encoding / decoding ---------------------------------------------------------------
    def encode_ordinary(self, text: str) -> list[int]:
        """Encode text with no special-token handling (special strings are plain text)."""
        _check_text(text)
        try:
            return self._encode_ordinary(text)
        except UnicodeEncodeError:
            return self._encode_ordinary(_fix_surrogates(text))

    def _encode_ordinary(self, text: str) -> list[int]:
        if self._split is None:
            return bpe_encode_chunk(text.encode("utf-8"), self.inverse_vocab) if text else []
        if len(self._cache) > _CACHE_LIMIT:
            self._cache.clear()
        # One C-level pass: regex split, cache lookup per chunk (BPE only on a miss), concatenation.
        return list(chain.from_iterable(map(self._cache.__getitem__, self._split(text))))

    def encode(self, text: str) -> list[int]:
        return self.encode_ordinary(text)

    def encode_batch(self, texts: Iterable[str], num_workers: int = 1, **kwargs) -> list[list[int]]:
        """Encode many texts; num_workers > 1 uses processes (worth it for large batches only)."""
        texts = list(texts)
        if num_workers > 1 and len(texts) > 1:
            import multiprocessing as mp
            with mp.Pool(num_workers) as pool:
                return pool.map(functools.partial(_encode_one, self, kwargs), texts,
                                chunksize=max(1, len(texts) // (4 * num_workers)))
        return [self.encode(t, **kwargs) for t in texts]

    def decode_bytes(self, ids: Iterable[int]) -> bytes:
        """Ids -> the exact bytes (may end inside a multi-byte UTF-8 character)."""
        try:
            return b"".join(map(self._decoder.__getitem__, ids))
        except (KeyError, TypeError) as e:
            raise TokenizerError(f"cannot decode token id {e.args[0] if e.args else '?'!r}: valid ids are "
                                 f"0..{self.n_vocab - 1} for this tokenizer") from None

    def decode(self, ids: Iterable[int]) -> str:
        """Ids -> text; invalid UTF-8 (e.g. a cut multi-byte character) becomes U+FFFD."""
        return self.decode_bytes(ids).decode("utf-8", errors="replace")

    def token_bytes(self, token_id: int) -> bytes:
        return self.decode_bytes([token_id])

    # ---- save / load -----------------------------------------------------------------------
    def state_dict(self) -> dict:
        return {"format": _FORMAT, "version": _FORMAT_VERSION, "type": type(self).__name__,
                "pattern": self.pattern, "pattern_name": pattern_name(self.pattern),
                "vocab": dict(self.vocab), "inverse_vocab": dict(self.inverse_vocab),
                "merges": dict(self.merges), "special_tokens": dict(self.special_tokens)}

    def save(self, path: str | os.PathLike) -> Path:
        """Write the tokenizer as a .pkl (atomically: never a half-written file)."""
        from course.checkpoint import atomic_write  # lazy: keeps `import tokenizer` free of torch
        state = self.state_dict()
        return atomic_write(path, lambda f: pickle.dump(state, f, protocol=pickle.HIGHEST_PROTOCOL))

    @_ClassOrInstance
    def load(cls, obj, path: str | os.PathLike) -> "BasicTokenizer":
        """`Tok.load(path)` returns a new tokenizer; `tok.load(path)` replaces tok's state and returns tok."""
        from phase1_foundation.project2_tokenizer.formats import load_tokenizer  # formats builds on this module
        tok = load_tokenizer(path)
        if obj is None:
            if not isinstance(tok, cls):
                raise TokenizerError(f"{path} holds a {type(tok).__name__}, not a {cls.__name__}; "
                                     "use load_tokenizer(path) to load any kind")
            return tok
        if type(tok) is not type(obj):
            raise TokenizerError(f"{path} holds a {type(tok).__name__}, cannot load it into a {type(obj).__name__}")
        obj.__setstate__(tok.__getstate__())
        return obj

    def export_readable(self, path: str | os.PathLike) -> Path:
        """A human-readable vocabulary: one line per token, with the merge that made it."""
        from course.checkpoint import atomic_write_text

        def show(b: bytes) -> str:
            return json.dumps(b.decode("utf-8", errors="backslashreplace"), ensure_ascii=False)
        parents = {new: pair for pair, new in self.merges.items()}
        lines = [f"# {type(self).__name__}  vocab_size={self.vocab_size}  pattern={pattern_name(self.pattern)}",
                 "# id  token  [= left + right]   (tokens as JSON strings; bytes that are not UTF-8 as \\xNN)"]
        for i in sorted(self.vocab):
            line = f"{i}\t{show(self.vocab[i])}"
            if i in parents:
                a, b = parents[i]
                line += f"\t= {show(self.vocab[a])} + {show(self.vocab[b])}"
            lines.append(line)
        for s, i in sorted(self.special_tokens.items(), key=lambda kv: kv[1]):
            lines.append(f"{i}\t{json.dumps(s)}\t(special)")
        return atomic_write_text(path, "\n".join(lines) + "\n")

    # ---- tiktoken-style ranks --------------------------------------------------------------
    def to_ranks(self) -> dict[bytes, int]:
        """tiktoken's mergeable_ranks: {token bytes: rank}; here rank == id."""
        return dict(self.inverse_vocab)

    def save_ranks(self, path: str | os.PathLike) -> Path:
        """Write the ranks in tiktoken's .tiktoken format: `base64(token) rank` per line."""
        from course.checkpoint import atomic_write_text
        lines = [f"{base64.b64encode(t).decode()} {r}" for t, r in sorted(self.inverse_vocab.items(), key=lambda kv: kv[1])]
        return atomic_write_text(path, "\n".join(lines) + "\n")

    def __repr__(self) -> str:
        return (f"{type(self).__name__}(vocab_size={self.vocab_size}, pattern={pattern_name(self.pattern)}, "
                f"special_tokens={self.special_tokens})")


def _encode_one(tok: BasicTokenizer, kwargs: dict, text: str) -> list[int]:
    return tok.encode(text, **kwargs)


# --------------------------------------------------------------------------------------------------
# 5. RegexTokenizer: pre-tokenization + special tokens
# --------------------------------------------------------------------------------------------------

class RegexTokenizer(BasicTokenizer):
    """Byte-level BPE as in GPT-2/GPT-4: split with a regex first, merge only inside chunks.

    PAPER: Radford et al. 2019 (GPT-2), section 2.2: without the split, BPE wastes merges on
    "dog." "dog!" "dog?"; splitting by character category keeps words, numbers, punctuation and
    whitespace apart. The GPT-4 pattern (tiktoken cl100k) also caps number chunks at 3 digits.

    WHY it is faster too: chunks repeat, so training counts distinct chunks once and encoding
    caches chunk -> ids; a 10K-vocab tokenizer sees ~0.2 M distinct chunks in 76 MB of books.

    Special tokens follow tiktoken's contract: `encode(text)` raises DisallowedSpecialTokenError if
    the text contains a registered special token, because treating user text as a control token
    (an injected "<|endoftext|>") is a silent bug; say what you mean with allowed_special={...}
    (encode it as the special id) or disallowed_special=() (encode it as plain text).
    """

    default_pattern = GPT4_SPLIT_PATTERN

    def __init__(self, pattern: str = "gpt4", special_tokens: Iterable[str] | dict[str, int] | None = None):
        super().__init__()
        if pattern is None:
            raise TokenizerError("RegexTokenizer needs a split pattern ('gpt2', 'gpt4' or a regex); "
                                 "use BasicTokenizer for no pre-tokenization")
        self.pattern = resolve_pattern(pattern)
        self._rebuild()
        if special_tokens:
            self.register_special_tokens(special_tokens)

    def _special_regex(self, tokens: AbstractSet[str]) -> regex.Pattern:
        key = frozenset(tokens)
        pat = self._special_regex_cache.get(key)
        if pat is None:
            # Longest first, so "<|a|>" wins over a registered prefix "<|a".
            pat = regex.compile("|".join(regex.escape(t) for t in sorted(key, key=len, reverse=True)))
            self._special_regex_cache[key] = pat
        return pat

    def encode(self, text: str, allowed_special: Literal["all", "none"] | AbstractSet[str] = frozenset(),
               disallowed_special: Literal["all"] | Collection[str] = "all") -> list[int]:
        """Text -> ids. allowed_special: special tokens encoded as their id ("all" for every one).
        disallowed_special: special tokens whose presence raises ("all" = every one not allowed;
        () = none, so they are encoded as ordinary text). Same defaults as tiktoken."""
        _check_text(text)
        # "none" is the same as the empty set (minbpe's spelling); a special token then still raises
        # unless disallowed_special=() says to treat it as ordinary text.
        if allowed_special == "all":
            allowed = set(self.special_tokens)
        elif allowed_special == "none" or not allowed_special:
            allowed = set()
        else:
            if isinstance(allowed_special, str):
                raise TokenizerError("allowed_special must be 'all', 'none' or a set of special-token strings")
            allowed = set(allowed_special)
            unknown = allowed - set(self.special_tokens)
            if unknown:
                raise TokenizerError(f"unknown special token(s) in allowed_special: {sorted(unknown)}; "
                                     f"this tokenizer has {sorted(self.special_tokens) or 'none'}")
        if disallowed_special == "all":
            disallowed = set(self.special_tokens) - allowed
        else:
            if isinstance(disallowed_special, str):
                raise TokenizerError("disallowed_special must be 'all' or a collection of special-token strings")
            disallowed = set(disallowed_special)
        if disallowed:
            m = self._special_regex(disallowed).search(text)
            if m:
                raise DisallowedSpecialTokenError(
                    f"the text contains the special token {m.group()!r}, which is not allowed; pass "
                    f"allowed_special={{{m.group()!r}}} (or 'all') to encode it as a special token, or "
                    "disallowed_special=() to encode it as ordinary text")
        if not allowed:
            return self.encode_ordinary(text)
        ids: list[int] = []
        start = 0
        for m in self._special_regex(allowed).finditer(text):
            ids.extend(self.encode_ordinary(text[start:m.start()]))
            ids.append(self.special_tokens[m.group()])
            start = m.end()
        ids.extend(self.encode_ordinary(text[start:]))
        return ids

    def encode_batch(self, texts: Iterable[str], num_workers: int = 1,
                     allowed_special: Literal["all", "none"] | AbstractSet[str] = frozenset(),
                     disallowed_special: Literal["all"] | Collection[str] = "all") -> list[list[int]]:
        return super().encode_batch(texts, num_workers=num_workers, allowed_special=allowed_special,
                                    disallowed_special=disallowed_special)

    # ---- interop ---------------------------------------------------------------------------
    @classmethod
    def from_ranks(cls, mergeable_ranks: dict[bytes, int], pattern: str = "gpt2",
                   special_tokens: dict[str, int] | None = None) -> "RegexTokenizer":
        """Build a tokenizer from tiktoken-style ranks {token bytes: rank}; id = rank.

        Accepts any byte-level table (GPT-2's, a converted Hugging Face tokenizer.json, a prefix of
        our own): every one of the 256 single bytes must have a rank, and ranks must be unique.
        `merges` is recovered for display by replaying BPE on each token with only the lower ranks
        (the split that training must have used); a token not reachable as exactly two parts (possible
        in hand-edited tables) simply has no merge entry - encoding uses ranks and does not need it.
        """
        if not isinstance(mergeable_ranks, dict) or not mergeable_ranks:
            raise TokenizerError("mergeable_ranks must be a non-empty {bytes: int} dict")
        for t, r in mergeable_ranks.items():
            if not isinstance(t, bytes) or not t or not isinstance(r, int) or r < 0:
                raise TokenizerError(f"bad mergeable_ranks entry {t!r}: {r!r} (expected non-empty bytes -> int >= 0)")
        missing = [b for b in range(256) if bytes([b]) not in mergeable_ranks]
        if missing:
            raise TokenizerError(f"mergeable_ranks lacks {len(missing)} of the 256 single bytes (e.g. {bytes([missing[0]])!r}); "
                                 "a byte-level BPE needs all of them")
        if len(set(mergeable_ranks.values())) != len(mergeable_ranks):
            raise TokenizerError("mergeable_ranks has duplicate ranks; each token needs its own rank")
        tok = cls(pattern=pattern)
        tok.vocab = {r: t for t, r in mergeable_ranks.items()}
        tok.merges = _recover_merges(mergeable_ranks)
        tok.special_tokens = {}
        tok._rebuild()
        if special_tokens:
            tok.register_special_tokens(dict(special_tokens))
        return tok


def _recover_merges(ranks: dict[bytes, int]) -> dict[tuple[int, int], int]:
    merges = {}
    for token, rank in sorted(ranks.items(), key=lambda kv: kv[1]):
        if len(token) < 2:
            continue
        parts = [token[i:i + 1] for i in range(len(token))]
        while len(parts) > 2:
            best = None
            for i in range(len(parts) - 1):
                r = ranks.get(parts[i] + parts[i + 1])
                if r is not None and r < rank and (best is None or r < best[0]):
                    best = (r, i)
            if best is None:
                break
            i = best[1]
            parts[i:i + 2] = [parts[i] + parts[i + 1]]
        if len(parts) == 2:
            merges[(ranks[parts[0]], ranks[parts[1]])] = rank
    return dict(sorted(merges.items(), key=lambda kv: kv[1]))
