"""Fast BPE: the same merges and ids as `bpe.py`, computed in seconds on a book collection.

PAPERS
- Sennrich, Haddow, Birch, 2016, "Neural Machine Translation of Rare Words with Subword Units":
  learn merges from a frequency dictionary of words (here: regex chunks), not the running text.
- Radford et al. 2019 (GPT-2): byte-level BPE on regex chunks, so chunks repeat and can be counted once.
- OpenAI tiktoken (2022-23): the rank-based encoding rule reproduced here exactly.

What is here, and what it replaces in the plain algorithm (`bpe.py`):
  * `train_merges`: the merges of `bpe.train_bpe`, updated incrementally (pair counts by local
    difference, a max-heap for the best pair) instead of recounting the corpus at every merge.
  * `count_chunks`: pre-tokenization (regex split + counting), in worker processes for a big corpus.
  * `bpe_encode_chunk`: the ids of `bpe.encode_chunk`, with only the two changed pair ranks updated
    per merge, and an O(n log n) heap for chunks over 128 bytes.
  * `ChunkCache`: str chunk -> ids, so BPE runs once per distinct chunk.
The tests check each against its plain version (same merges, same ids) on random and real text.
"""

from __future__ import annotations

import heapq
import sys
from collections import Counter, defaultdict
from typing import Iterable

import regex
from tqdm import tqdm

from course.errors import CourseError


# --------------------------------------------------------------------------------------------------
# Training: the same merges, incrementally
# --------------------------------------------------------------------------------------------------

def train_merges(chunk_counts: dict[bytes, int], num_merges: int, progress: bool = False,
                 log_every: int = 0) -> list[tuple[tuple[int, int], int]]:
    """Learn `num_merges` BPE merges from {chunk bytes: count}. Returns [((a, b), count), ...].

    Merge i creates token id 256 + i from the pair (a, b). Ids 0..255 are the raw bytes.

    PAPER: Sennrich et al. 2016 learn merges from a word-frequency dictionary; GPT-2's byte-level
    variant does the same with regex chunks of bytes.

    INTUITION: the plain loop (`bpe.train_bpe`: `get_pair_counts` over the whole corpus, pick the best
    pair, `merge_pair` over the whole corpus, repeat) costs O(merges x corpus): 10,000 merges x 76 MB is
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
        raise CourseError(f"num_merges ({num_merges}) must be >= 0")
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
# Encoding one chunk: tiktoken's rule, incrementally; long chunks by heap
# --------------------------------------------------------------------------------------------------

_NO_RANK = sys.maxsize


def bpe_encode_chunk(chunk: bytes, ranks: dict[bytes, int]) -> list[int]:
    """`bpe.encode_chunk` (tiktoken's rule: merge the lowest-ranked adjacent pair, leftmost on ties,
    a chunk that is itself a token is that token), computed incrementally. Same ids, always.

    IMPLEMENTATION: parts are the current token bytes, pr[i] the rank of parts[i] + parts[i+1].
    After a merge at i only pr[i-1] and pr[i] change, so each step is one C-level min() + index()
    over a short list; chunks are words, so this is fast, and a cache makes repeats free. That is
    O(n^2) for an n-byte chunk, so chunks over LONG_CHUNK bytes (long digit or space runs, or a long
    text in BasicTokenizer) take the O(n log n) heap version below, which makes the same choices.
    """
    token = ranks.get(chunk)
    if token is not None:
        return [token]
    if len(chunk) > LONG_CHUNK:
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


LONG_CHUNK = 128


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


# --------------------------------------------------------------------------------------------------
# The chunk cache
# --------------------------------------------------------------------------------------------------

class ChunkCache(dict):
    """str chunk -> tuple of ids; a miss runs BPE once. Natural text repeats its chunks constantly."""

    __slots__ = ("ranks",)

    def __init__(self, ranks: dict[bytes, int]):
        super().__init__()
        self.ranks = ranks

    def __missing__(self, chunk: str) -> tuple[int, ...]:
        ids = tuple(bpe_encode_chunk(chunk.encode("utf-8"), self.ranks))
        self[chunk] = ids
        return ids


CACHE_LIMIT = 1_000_000  # distinct chunks kept; beyond that the cache is cleared (bounded memory)


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
