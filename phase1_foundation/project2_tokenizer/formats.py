"""Tokenizer files of the course and of OpenAI, each reader next to its writer; the inference interface.

- ours: the `.pkl` of a trained tokenizer (`save_tokenizer` / `load_tokenizer`, read without running code)
  and its readable vocabulary (`export_readable`: `id  "token"  = "left" + "right"`).
- tiktoken: mergeable ranks {token bytes: rank}, in memory (`from_ranks`, the inverse of `tok.to_ranks()`)
  and as a `.tiktoken` file, `base64(token) rank` per line (`save_ranks` / `load_ranks`).
- GPT-2: OpenAI's `encoder.json` + `vocab.bpe` (`load_gpt2`, `gpt2_bytes_to_unicode`), and `byte_level_bpe`,
  the builder every byte-level file of another ecosystem goes through (foreign_formats.py: HF, GGUF).
- `CourseTokenizer`: gives a project 2 tokenizer the interface an inference engine needs (below).

PAPERS
- Radford et al. 2019, "Language Models are Unsupervised Multitask Learners" (GPT-2): byte-level BPE
  and the reversible byte -> printable character map its files are written in.
- OpenAI tiktoken (2022-23): mergeable ranks (token bytes -> rank = id) as the exchange format.

An inference engine needs only: `encode(text, bos=...)`, `decode_bytes(ids)`, `piece_bytes(prev_id, id)`
(for streaming), `bos_id`, `eos_id`, `vocab_size`, and, for chat, `chat_template` + special token strings.
`CourseTokenizer` gives ours that interface; sentencepiece_bpe.SentencePieceBPE has it natively.
"""

from __future__ import annotations

import base64
import json
import os
import pickle
from pathlib import Path

import regex

from phase1_foundation.project2_tokenizer.bpe import recover_merges
from phase1_foundation.project2_tokenizer.patterns import pattern_name
from phase1_foundation.project2_tokenizer.tokenizer import ENDOFTEXT, BasicTokenizer, RegexTokenizer, TokenizerError


# --------------------------------------------------------------------------------------------------
# 1. Our own .pkl and the readable export
# --------------------------------------------------------------------------------------------------

_FORMAT = "course-bpe-tokenizer"
_FORMAT_VERSION = 1


def tokenizer_state(tok: BasicTokenizer) -> dict:
    """What the .pkl holds: plain dicts only (so loading it needs no class and runs no code)."""
    return {"format": _FORMAT, "version": _FORMAT_VERSION, "type": type(tok).__name__,
            "pattern": tok.pattern, "pattern_name": pattern_name(tok.pattern),
            "vocab": dict(tok.vocab), "inverse_vocab": dict(tok.inverse_vocab),
            "merges": dict(tok.merges), "special_tokens": dict(tok.special_tokens)}


def save_tokenizer(tok: BasicTokenizer, path: str | os.PathLike) -> Path:
    """Write `tok` as a .pkl (atomically: never a half-written file); `load_tokenizer` reads it back."""
    from course.checkpoint import atomic_write  # lazy: keeps `import formats` free of torch
    state = tokenizer_state(tok)
    return atomic_write(path, lambda f: pickle.dump(state, f, protocol=pickle.HIGHEST_PROTOCOL))


class _SafeUnpickler(pickle.Unpickler):
    """Our .pkl holds only dicts, tuples, bytes, str and ints; refuse anything else (no code runs)."""

    def find_class(self, module, name):
        raise pickle.UnpicklingError(f"refusing to load {module}.{name} (not a plain tokenizer file)")


_KINDS = {"BasicTokenizer": BasicTokenizer, "RegexTokenizer": RegexTokenizer}


def load_tokenizer(path: str | os.PathLike) -> BasicTokenizer:
    """Load any tokenizer written by save_tokenizer; a folder means folder/tokenizer.pkl."""
    path = Path(path)
    if path.is_dir():
        path = path / "tokenizer.pkl"
    if not path.is_file():
        raise TokenizerError(f"tokenizer not found: {path}; train one with: "
                             "uv run python phase1_foundation/project2_tokenizer/train_tokenizer.py")
    try:
        with open(path, "rb") as f:
            state = _SafeUnpickler(f).load()
    except Exception as e:  # any unpickling failure means the same thing to the user
        raise TokenizerError(f"could not read tokenizer {path} ({type(e).__name__}: {e}); the file is "
                             "corrupt or not a tokenizer, re-train or pick another file") from None
    if not isinstance(state, dict) or state.get("format") != _FORMAT or state.get("type") not in _KINDS:
        raise TokenizerError(f"{path} is not a course tokenizer file (missing or wrong 'format'/'type')")
    if state.get("version") != _FORMAT_VERSION:
        raise TokenizerError(f"{path} has tokenizer format version {state.get('version')}, expected {_FORMAT_VERSION}")
    try:
        vocab, merges, special = state["vocab"], state["merges"], state["special_tokens"]
        if not all(isinstance(i, int) and isinstance(b, bytes) for i, b in vocab.items()):
            raise ValueError("vocab must map int -> bytes")
        if any(bytes([b]) not in state["inverse_vocab"] for b in range(256)):
            raise ValueError("vocab lacks some of the 256 byte tokens")
        if {b: i for i, b in vocab.items()} != state["inverse_vocab"]:
            raise ValueError("vocab and inverse_vocab disagree")
        cls = _KINDS[state["type"]]
        tok = cls.__new__(cls)
        tok.__setstate__({"pattern": state["pattern"], "vocab": dict(vocab), "merges": dict(merges),
                          "special_tokens": dict(special)})
    except (KeyError, ValueError, TypeError, AttributeError, regex.error) as e:
        raise TokenizerError(f"{path} is a damaged tokenizer file ({type(e).__name__}: {e}); re-train it") from None
    return tok


def export_readable(tok: BasicTokenizer, path: str | os.PathLike) -> Path:
    """A human-readable vocabulary: one line per token, with the merge that made it."""
    from course.checkpoint import atomic_write_text

    def show(b: bytes) -> str:
        return json.dumps(b.decode("utf-8", errors="backslashreplace"), ensure_ascii=False)
    parents = {new: pair for pair, new in tok.merges.items()}
    lines = [f"# {type(tok).__name__}  vocab_size={tok.vocab_size}  pattern={pattern_name(tok.pattern)}",
             "# id  token  [= left + right]   (tokens as JSON strings; bytes that are not UTF-8 as \\xNN)"]
    for i in sorted(tok.vocab):
        line = f"{i}\t{show(tok.vocab[i])}"
        if i in parents:
            a, b = parents[i]
            line += f"\t= {show(tok.vocab[a])} + {show(tok.vocab[b])}"
        lines.append(line)
    for s, i in sorted(tok.special_tokens.items(), key=lambda kv: kv[1]):
        lines.append(f"{i}\t{json.dumps(s)}\t(special)")
    return atomic_write_text(path, "\n".join(lines) + "\n")


# --------------------------------------------------------------------------------------------------
# 2. tiktoken's ranks: in memory and as a .tiktoken file
# --------------------------------------------------------------------------------------------------

def from_ranks(mergeable_ranks: dict[bytes, int], pattern: str = "gpt2",
               special_tokens: dict[str, int] | None = None) -> RegexTokenizer:
    """A RegexTokenizer from tiktoken-style ranks {token bytes: rank}; id = rank (inverse of tok.to_ranks()).

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
    tok = RegexTokenizer(pattern=pattern)
    tok.vocab = {r: t for t, r in mergeable_ranks.items()}
    tok.merges = recover_merges(mergeable_ranks)
    tok.special_tokens = {}
    tok._rebuild()
    if special_tokens:
        tok.register_special_tokens(dict(special_tokens))
    return tok


def save_ranks(tok: BasicTokenizer, path: str | os.PathLike) -> Path:
    """Write the ranks in tiktoken's .tiktoken format: `base64(token) rank` per line."""
    from course.checkpoint import atomic_write_text
    lines = [f"{base64.b64encode(t).decode()} {r}" for t, r in sorted(tok.inverse_vocab.items(), key=lambda kv: kv[1])]
    return atomic_write_text(path, "\n".join(lines) + "\n")


def load_ranks(path: str | os.PathLike) -> dict[bytes, int]:
    """Read a tiktoken .tiktoken file (`base64(token) rank` per line) into {bytes: rank}."""
    path = Path(path)
    if not path.is_file():
        raise TokenizerError(f"ranks file not found: {path}")
    ranks = {}
    for n, line in enumerate(path.read_bytes().splitlines(), 1):
        if not line.strip():
            continue
        try:
            token, rank = line.split()
            ranks[base64.b64decode(token, validate=True)] = int(rank)
        except ValueError:
            raise TokenizerError(f"{path}:{n} is not a tiktoken ranks line (expected 'base64 rank')") from None
    return ranks


# --------------------------------------------------------------------------------------------------
# 3. GPT-2's encoder.json + vocab.bpe, and byte-level BPE from any token strings
# --------------------------------------------------------------------------------------------------

def gpt2_bytes_to_unicode() -> dict[int, str]:
    """GPT-2's reversible byte -> printable character map used in encoder.json and vocab.bpe.

    Printable Latin-1 bytes map to themselves; the other 68 (control chars, space, ...) map to
    chr(256 + n), so every token can be written as visible text (a space shows as "Ġ").
    """
    keep = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
    chars, n = {}, 0
    for b in range(256):
        if b in keep:
            chars[b] = chr(b)
        else:
            chars[b] = chr(256 + n)
            n += 1
    return chars


def load_gpt2(encoder_json_path: str | os.PathLike, vocab_bpe_path: str | os.PathLike) -> RegexTokenizer:
    """GPT-2's tokenizer from its two files; encode/decode equal tiktoken's "gpt2" exactly.

    encoder.json maps token text (bytes shown through gpt2_bytes_to_unicode) -> id; vocab.bpe
    lists the 50,000 merges in order. In GPT-2 the id of merge k is 256 + k, so the ids are the
    ranks; we check that the two files agree instead of trusting it.
    """
    hint = "get them with: uv run python phase1_foundation/project2_tokenizer/download_data.py --dataset gpt2_bpe"
    enc_path, bpe_path = Path(encoder_json_path), Path(vocab_bpe_path)
    for p in (enc_path, bpe_path):
        if not p.is_file():
            raise TokenizerError(f"GPT-2 tokenizer file not found: {p}; {hint}")
    byte_decoder = {c: b for b, c in gpt2_bytes_to_unicode().items()}

    def to_bytes(s: str) -> bytes:
        return bytes(byte_decoder[c] for c in s)

    try:
        encoder = json.loads(enc_path.read_text(encoding="utf-8"))
        lines = bpe_path.read_text(encoding="utf-8").split("\n")
        merge_lines = [ln.split() for ln in lines[1:] if ln.strip()]
        special = {s: encoder.pop(s) for s in (ENDOFTEXT,) if s in encoder}
        ranks = {to_bytes(s): i for s, i in encoder.items()}
        merges = {}
        for first, second in merge_lines:
            a, b = ranks[to_bytes(first)], ranks[to_bytes(second)]
            merges[(a, b)] = ranks[to_bytes(first) + to_bytes(second)]
    except (ValueError, KeyError, UnicodeDecodeError, AttributeError, TypeError) as e:
        raise TokenizerError(f"could not read GPT-2 tokenizer files {enc_path}, {bpe_path} "
                             f"({type(e).__name__}: {e}); they are corrupt, re-download them ({hint})") from None
    if sorted(merges.values()) != list(range(256, 256 + len(merges))) or len(ranks) != 256 + len(merges):
        raise TokenizerError(f"{enc_path} and {bpe_path} do not match (merge ids are not 256..); {hint}")
    tok = RegexTokenizer(pattern="gpt2")
    tok.vocab = {i: t for t, i in ranks.items()}
    tok.merges = merges
    tok.special_tokens = special
    tok._rebuild()
    return tok


def byte_level_bpe(tokens: list[str] | dict[str, int], merges: list[tuple[str, str]] | list[str], pattern: str,
                   special: dict[str, int] | None = None, source: str = "byte-level BPE") -> RegexTokenizer:
    """A RegexTokenizer from token strings written in GPT-2's byte-to-unicode form, their merges, a split
    pattern and special tokens: the shape of Hugging Face's `tokenizer.json` and of GGUF's `gpt2` tokenizer.

    tokens: a list (position = id) or a {token string: id} dict; a space byte shows as "Ġ", as in
    GPT-2's files. merges: ("a", "b") pairs or "a b" strings, in merge order. special: {string: id} of
    tokens that are never merged (they are left out of the ranks and registered as special tokens).

    WHY it can be expressed as tiktoken-style ranks: a merge list says "merge a+b before c+d"; ranks say
    "prefer the token with the smaller id". The two agree when each merge's result has a larger id than
    every earlier merge's, which every byte-level tokenizer we know satisfies; we check it, not assume it.
    """
    special = dict(special or {})
    ids = {s: i for i, s in enumerate(tokens)} if isinstance(tokens, list) else dict(tokens)
    dec = {c: b for b, c in gpt2_bytes_to_unicode().items()}
    ranks: dict[bytes, int] = {}
    for s, i in ids.items():
        if s in special:
            continue
        try:
            ranks[bytes(dec[c] for c in s)] = i
        except KeyError:
            raise TokenizerError(f"{source}: token {s!r} is not byte-level encoded; not a byte-level BPE "
                                 "vocabulary") from None
    last = -1
    for m in merges:
        a, b = m.split(" ", 1) if isinstance(m, str) else m
        i = ids.get(a + b)
        if i is None or i <= last:
            raise TokenizerError(f"{source}: merges are not in id order ({a!r} + {b!r}); cannot express them "
                                 "as ranks")
        last = i
    return from_ranks(ranks, pattern, special)


# --------------------------------------------------------------------------------------------------
# 4. The inference interface (what an engine calls; SentencePieceBPE has the same)
# --------------------------------------------------------------------------------------------------

class _TokenStrings:
    """bos_token / eos_token as strings ("" when the tokenizer has none): what a chat template inserts."""

    def _string_of(self, token_id: int | None) -> str:
        return next((s for s, i in self.special_tokens.items() if i == token_id), "") if token_id is not None else ""

    @property
    def bos_token(self) -> str:
        return self._string_of(self.bos_id)

    @property
    def eos_token(self) -> str:
        return self._string_of(self.eos_id)


class CourseTokenizer(_TokenStrings):
    """Adapter giving project 2's RegexTokenizer the engine's interface (bos/eos, piece_bytes)."""

    def __init__(self, tok, bos_id: int | None = None, eos_id: int | None = None, add_bos: bool = False,
                 chat_template: str | None = None, name: str = "course"):
        self.tok, self.bos_id, self.eos_id, self.add_bos = tok, bos_id, eos_id, add_bos
        self.chat_template, self.name = chat_template, name
        self.special_tokens = dict(getattr(tok, "special_tokens", {}) or {})
        self._special_ids = set(self.special_tokens.values())

    @property
    def vocab_size(self) -> int:
        return self.tok.vocab_size

    def encode(self, text: str, bos: bool | None = None, allowed_special: str = "all") -> list[int]:
        ids = list(self.tok.encode(text, allowed_special=allowed_special))
        if (self.add_bos if bos is None else bos) and self.bos_id is not None:
            ids = [self.bos_id] + ids
        return ids

    def piece_bytes(self, prev_id: int | None, token_id: int) -> bytes:
        if token_id in self._special_ids:
            return b""
        return self.tok.decode_bytes([token_id])

    def decode_bytes(self, ids: list[int]) -> bytes:
        return b"".join(self.piece_bytes(None, i) for i in ids)

    def decode(self, ids: list[int]) -> str:
        return self.decode_bytes(ids).decode("utf-8", errors="replace")
