"""Byte pair encoding, the plain algorithm: count pairs, merge the most frequent, repeat; encode by rank.

PAPERS
- Philip Gage, 1994, "A New Algorithm for Data Compression": byte pair encoding as compression,
  repeatedly replace the most frequent pair of adjacent symbols with a new symbol.
- Sennrich, Haddow, Birch, 2016, "Neural Machine Translation of Rare Words with Subword Units":
  BPE as a subword vocabulary; learn merges on word counts (not the running text), apply them in
  the learned order to encode. Rare words become sequences of known subwords: no unknown tokens.
- OpenAI tiktoken (2022-23): encoding by "mergeable ranks" (token bytes -> rank = id): merge the
  adjacent pair whose concatenation has the lowest rank, until none is a token.

This is the module to read first: every function is the definition, written out. `BasicTokenizer`
trains and encodes with it. `fast_bpe.py` computes exactly the same merges and ids much faster
(a heap, incremental counts, a chunk cache); the tests check that the two agree.
"""

from __future__ import annotations

from course.errors import CourseError

NO_RANK = float("inf")  # "this pair is not a token"


def get_pair_counts(ids: list[int], counts: dict | None = None, weight: int = 1) -> dict[tuple[int, int], int]:
    """Count adjacent pairs: [1, 2, 3, 1, 2] -> {(1, 2): 2, (2, 3): 1, (3, 1): 1}.

    counts / weight: add into an existing dict, each pair counted `weight` times (a chunk seen 5 times
    in the corpus counts its pairs 5 times).
    """
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


def train_bpe(chunk_counts: dict[bytes, int], num_merges: int) -> list[tuple[tuple[int, int], int]]:
    """Learn `num_merges` merges from {chunk bytes: count}. Returns [((a, b), count), ...].

    Merge i creates token id 256 + i from the pair (a, b); ids 0..255 are the raw bytes.

    PAPER: Sennrich et al. 2016, Algorithm 1: count every pair in the (weighted) word list, take the
    most frequent, replace it everywhere, repeat. GPT-2's byte-level variant uses the chunks of a
    regex split as the "words", and bytes as the starting symbols.

    INTUITION: the most frequent pair is the one whose merge shortens the corpus most; each merge
    is one new token. A chunk that occurs 1,000 times is stored once with weight 1,000.

    TIE-BREAKING: the highest count wins; among equal counts the smallest (a, b). This makes the
    result independent of dict order, and it is the rule `fast_bpe.train_merges` follows too.

    COST: every merge recounts and rewrites every chunk: O(merges x corpus). Fine for a page of text;
    for a book collection use `fast_bpe.train_merges` (same merges).
    """
    if num_merges < 0:
        raise CourseError(f"num_merges ({num_merges}) must be >= 0")
    words = [(list(chunk), count) for chunk, count in chunk_counts.items()]
    merges = []
    for step in range(num_merges):
        counts: dict[tuple[int, int], int] = {}
        for ids, weight in words:
            get_pair_counts(ids, counts, weight)
        if not counts:
            break  # every chunk is a single token: nothing left to merge
        pair = min(counts, key=lambda p: (-counts[p], p))
        merges.append((pair, counts[pair]))
        words = [(merge_pair(ids, pair, 256 + step), weight) for ids, weight in words]
    return merges


def encode_chunk(chunk: bytes, ranks: dict[bytes, int]) -> list[int]:
    """Encode the bytes of one chunk into ids with the rank table {token bytes: rank = id}.

    INTUITION: replay training on this chunk. Training created low ranks first, so among the
    adjacent parts whose concatenation is a token, merge the pair with the lowest rank (the leftmost
    one on ties), and repeat until no adjacent pair forms a token.

    WHY ranks of *concatenated bytes* rather than a (left id, right id) -> id table: this is
    tiktoken's definition, and following it to the letter (including its shortcut: a chunk that is
    itself a token is that token) makes our ids equal tiktoken's for any rank table, GPT-2's included.

    COST: each merge rescans all pairs, O(n^2) for n bytes; `fast_bpe.bpe_encode_chunk` gives the
    same ids with incremental updates, and O(n log n) for long chunks.
    """
    if chunk in ranks:
        return [ranks[chunk]]
    parts = [chunk[i:i + 1] for i in range(len(chunk))]
    while len(parts) > 1:
        pair_ranks = [ranks.get(parts[i] + parts[i + 1], NO_RANK) for i in range(len(parts) - 1)]
        best = min(pair_ranks)
        if best == NO_RANK:
            break
        i = pair_ranks.index(best)  # the leftmost of the lowest rank
        parts[i:i + 2] = [parts[i] + parts[i + 1]]
    return [ranks[p] for p in parts]


def recover_merges(ranks: dict[bytes, int]) -> dict[tuple[int, int], int]:
    """{(left id, right id): id} from a rank table alone, by replaying BPE on each token.

    A token of rank r was made, in training, from the two parts that BPE with only the ranks below r
    leaves; a token not reachable as exactly two parts (possible in hand-edited tables) gets no entry.
    Encoding does not need this table (it uses ranks); it is for display and for `merges`.
    """
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
