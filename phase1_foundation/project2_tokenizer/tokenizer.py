"""Byte-level BPE tokenizer from scratch: train, encode, decode; exact tiktoken parity.

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

This file holds the classes a user holds: `BasicTokenizer` (BPE on raw bytes) and `RegexTokenizer`
(regex pre-tokenization with patterns.py's GPT-2/GPT-4 splits, a chunk cache, special tokens). The plain
algorithm is bpe.py, its fast twin fast_bpe.py; files (reading and writing) are formats.py. The README
lists every module in reading order.

WHICH TRAINER RUNS: `train(..., trainer=None)` picks the plain loop (`bpe.train_bpe`) when its work is
small (distinct chunk bytes x merges <= PLAIN_WORK_LIMIT, about a second: a page of text, the examples
and most tests) and the heap trainer (`fast_bpe.train_merges`) otherwise; `trainer="plain"` or "fast"
forces one. Both give the same merges (tested). train_tokenizer.py has `--trainer` (default fast).
"""

from __future__ import annotations

import functools
from itertools import chain
from typing import AbstractSet, Collection, Iterable, Literal

import regex

from course.errors import CourseError
from phase1_foundation.project2_tokenizer.bpe import encode_chunk, train_bpe
from phase1_foundation.project2_tokenizer.fast_bpe import (
    CACHE_LIMIT, LONG_CHUNK, ChunkCache, bpe_encode_chunk, count_chunks, train_merges)
from phase1_foundation.project2_tokenizer.patterns import GPT4_SPLIT_PATTERN, SPLIT_PATTERNS, pattern_name

# --------------------------------------------------------------------------------------------------
# Errors, patterns by name, the trainer choice
# --------------------------------------------------------------------------------------------------

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


def _fix_surrogates(text: str) -> str:
    """Lone surrogates cannot be UTF-8 encoded; replace them with U+FFFD as tiktoken does."""
    return text.encode("utf-16", "surrogatepass").decode("utf-16", "replace")


TRAINERS = ("plain", "fast")
PLAIN_WORK_LIMIT = 2_000_000  # distinct chunk bytes x merges the plain loop does in about a second


def choose_trainer(trainer: str | None, chunk_counts: dict[bytes, int], num_merges: int) -> str:
    """"plain" (bpe.train_bpe) or "fast" (fast_bpe.train_merges); None = the plain loop when it is cheap.

    WHY a size rule: the plain loop is the definition and the one to step through, but it recounts the
    whole corpus at every merge; past ~PLAIN_WORK_LIMIT byte-merges it takes minutes where the heap
    trainer takes seconds. Both give the same merges (tested), so the choice never changes the result.
    """
    if trainer is None:
        work = num_merges * sum(len(chunk) for chunk in chunk_counts)
        return "plain" if work <= PLAIN_WORK_LIMIT else "fast"
    if trainer not in TRAINERS:
        raise TokenizerError(f"trainer must be one of {', '.join(TRAINERS)} or None (choose by size), got {trainer!r}")
    return trainer


def _check_text(text: object) -> str:
    if not isinstance(text, str):
        raise TokenizerError(f"encode expects a str, got {type(text).__name__}; "
                             "decode bytes first (bytes.decode('utf-8')) or pass a string")
    return text


# --------------------------------------------------------------------------------------------------
# BasicTokenizer: byte-level BPE on raw bytes
# --------------------------------------------------------------------------------------------------

class BasicTokenizer:
    """Byte-level BPE with no pre-tokenization: the whole text is one sequence of bytes.

    This is the algorithm in its plainest form, and it runs bpe.py's plain functions: `train_bpe`
    (chosen by size, see `choose_trainer`) and `encode_chunk` (texts over fast_bpe.LONG_CHUNK bytes take
    the O(n log n) encoder, same ids). Merges can cross word boundaries ("e t" in "the time"), which
    wastes vocabulary; RegexTokenizer below fixes that. Training on one long sequence is
    O(length x merges) (there are no repeated chunks to share work), so train it on small texts only.

    State (what formats.save_tokenizer writes):
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
        self._cache = ChunkCache(self.inverse_vocab)
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
              num_workers: int = 1, log_every: int = 0, trainer: str | None = None) -> "BasicTokenizer":
        """Learn vocab_size - 256 - len(special_tokens) merges; special tokens get the last ids.

        text_or_iterable: one string, or an iterable of documents (a merge never spans two).
        num_workers > 1 pre-tokenizes in that many processes (RegexTokenizer only).
        trainer: "plain" (bpe.train_bpe), "fast" (fast_bpe.train_merges; verbose shows progress and
        log_every sample merges), or None: plain when the corpus is small (`choose_trainer`).
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
        if choose_trainer(trainer, chunk_counts, num_merges) == "fast":
            merges = train_merges(chunk_counts, num_merges, progress=verbose, log_every=log_every)
        else:
            merges = train_bpe(chunk_counts, num_merges)
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
        if self._split is None:  # Basic: the whole text is one chunk
            data = text.encode("utf-8")
            return encode_chunk(data, self.inverse_vocab) if len(data) <= LONG_CHUNK else \
                bpe_encode_chunk(data, self.inverse_vocab)
        if len(self._cache) > CACHE_LIMIT:
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

    # ---- tiktoken-style ranks --------------------------------------------------------------
    def to_ranks(self) -> dict[bytes, int]:
        """tiktoken's mergeable_ranks: {token bytes: rank}; here rank == id."""
        return dict(self.inverse_vocab)

    def __repr__(self) -> str:
        return (f"{type(self).__name__}(vocab_size={self.vocab_size}, pattern={pattern_name(self.pattern)}, "
                f"special_tokens={self.special_tokens})")


def _encode_one(tok: BasicTokenizer, kwargs: dict, text: str) -> list[int]:
    return tok.encode(text, **kwargs)


# --------------------------------------------------------------------------------------------------
# RegexTokenizer: pre-tokenization + special tokens
# --------------------------------------------------------------------------------------------------

class RegexTokenizer(BasicTokenizer):
    """Byte-level BPE as in GPT-2/GPT-4: split with a regex first, merge only inside chunks.

    PAPER: Radford et al. 2019 (GPT-2), section 2.2: without the split, BPE wastes merges on
    "dog." "dog!" "dog?"; splitting by character category keeps words, numbers, punctuation and
    whitespace apart. The GPT-4 pattern (tiktoken cl100k) also caps number chunks at 3 digits.

    WHY it is faster too: chunks repeat, so training counts distinct chunks once and encoding
    caches chunk -> ids; a 10K-vocab tokenizer sees ~0.2 M distinct chunks in 76 MB of books. A cache
    miss runs fast_bpe.bpe_encode_chunk, which gives bpe.encode_chunk's ids (tested) faster.

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
