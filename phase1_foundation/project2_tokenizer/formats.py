"""Tokenizer files: every format a checkpoint's tokenizer comes in, read into one small interface.

- ours: the `.pkl` that `BasicTokenizer.save` writes (`load_tokenizer`), read without running code.
- tiktoken: a `.tiktoken` rank file, `base64(token) rank` per line (`load_ranks`).
- GPT-2: OpenAI's `encoder.json` + `vocab.bpe` (`load_gpt2`, `gpt2_bytes_to_unicode`).
- Hugging Face `tokenizer.json`, byte-level BPE (GPT-2, SmolLM, Qwen, LLaMA 3 style): turned into
  tiktoken-style ranks by `byte_level_bpe` (shared with the GGUF reader) and loaded into `RegexTokenizer`.
- GGUF (llama.cpp's model files): the tokenizer in the metadata (`load_gguf_tokenizer`), byte-level BPE
  through `byte_level_bpe` again, or SentencePiece.
- SentencePiece-style BPE (`SentencePieceBPE`): llama2.c's tokenizer `.bin` (pieces with scores; merges
  chosen by score) and Hugging Face `tokenizer.json` files converted from SentencePiece (LLaMA 2,
  TinyLlama: "▁" for spaces, `<0xNN>` byte-fallback tokens; merges chosen by rank).

PAPERS
- Radford et al. 2019, "Language Models are Unsupervised Multitask Learners" (GPT-2): byte-level BPE
  and the reversible byte -> printable character map its files are written in.
- Sennrich, Haddow, Birch 2016, "Neural Machine Translation of Rare Words with Subword Units": BPE.
- Kudo & Richardson 2018, "SentencePiece: A simple and language independent subword tokenizer": spaces
  as a visible symbol ("▁"), a dummy prefix space, and (LLaMA) byte fallback for unknown characters.

An inference engine needs only: `encode(text, bos=...)`, `decode_bytes(ids)`, `piece_bytes(prev_id, id)`
(for streaming), `bos_id`, `eos_id`, `vocab_size`, and, for chat, `chat_template` + special token strings.
`SentencePieceBPE` has them; `CourseTokenizer` gives a project 2 tokenizer the same interface.
"""

from __future__ import annotations

import base64
import json
import os
import pickle
import re
import struct
from pathlib import Path

import regex

from phase1_foundation.project2_tokenizer.tokenizer import (
    _FORMAT, _FORMAT_VERSION, ENDOFTEXT, BasicTokenizer, RegexTokenizer, TokenizerError)

# Hugging Face's ByteLevel pre-tokenizer regex (GPT-2's original, without tiktoken's possessive forms).
HF_BYTELEVEL_PATTERN = r"""'(?:[sdmt]|ll|ve|re)| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+"""
# SmolLM / StarCoder (HF: Digits(individual_digits) then ByteLevel; llama.cpp pre-tokenizer "smollm"): every
# digit is a piece of its own, then GPT-2's split runs on the rest. As one regex: a digit ends a piece the way
# the end of the text does, so `\s+(?!\S)` becomes `\s+(?![^\s\p{N}])`, and ` ?\p{N}+` becomes `\p{N}`.
SMOLLM_PATTERN = r"""\p{N}|'(?:[sdmt]|ll|ve|re)| ?\p{L}+| ?[^\s\p{L}\p{N}]+|\s+(?![^\s\p{N}])|\s+"""


# --------------------------------------------------------------------------------------------------
# 1. Our own .pkl (BasicTokenizer.save), read without running code
# --------------------------------------------------------------------------------------------------

class _SafeUnpickler(pickle.Unpickler):
    """Our .pkl holds only dicts, tuples, bytes, str and ints; refuse anything else (no code runs)."""

    def find_class(self, module, name):
        raise pickle.UnpicklingError(f"refusing to load {module}.{name} (not a plain tokenizer file)")


_KINDS = {"BasicTokenizer": BasicTokenizer, "RegexTokenizer": RegexTokenizer}


def load_tokenizer(path: str | os.PathLike) -> BasicTokenizer:
    """Load any tokenizer saved with save(); a folder means folder/tokenizer.pkl."""
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


# --------------------------------------------------------------------------------------------------
# 2. tiktoken's rank file
# --------------------------------------------------------------------------------------------------

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
    return RegexTokenizer.from_ranks(ranks, pattern, special)


# --------------------------------------------------------------------------------------------------
# 4. SentencePiece-style BPE (llama2.c .bin, and HF tokenizer.json converted from SentencePiece)
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


class SentencePieceBPE(_TokenStrings):
    """BPE over UTF-8 characters with byte fallback, as llama2.c's run.c `encode` does it.

    INTUITION: start from one token per character (unknown characters become their UTF-8 bytes, tokens
    `<0xNN>`), then repeatedly merge the adjacent pair with the best priority until no pair merges.
    IMPLEMENTATION: llama2.c's `.bin` gives each piece a score, and the best pair is the one whose merged
    piece has the highest score; HF `tokenizer.json` gives an ordered merge list, and the best pair is the
    one with the lowest rank. A space in the text is a normal character here (the "▁" of SentencePiece is
    mapped to " " on load), and a dummy space is put before the text, as SentencePiece does.
    """

    def __init__(self, pieces: list[bytes], scores: list[float] | None = None,
                 merge_ranks: dict[tuple[bytes, bytes], int] | None = None, bos_id: int | None = 1,
                 eos_id: int | None = 2, special_tokens: dict[str, int] | None = None,
                 chat_template: str | None = None, add_bos: bool = True, name: str = "sentencepiece"):
        self.pieces = pieces
        self.scores = scores
        self.merge_ranks = merge_ranks
        self.lookup = {p: i for i, p in enumerate(pieces)}
        self.byte_ids = [self.lookup.get(f"<0x{b:02X}>".encode()) for b in range(256)]
        self.bos_id, self.eos_id, self.add_bos = bos_id, eos_id, add_bos
        self.special_tokens = dict(special_tokens or {})
        self.chat_template = chat_template
        self.name = name
        self._special_ids = set(self.special_tokens.values()) | {i for i in (bos_id, eos_id) if i is not None}
        self._special_re = (re.compile("(" + "|".join(re.escape(s) for s in sorted(self.special_tokens, key=len,
                                                                                    reverse=True)) + ")")
                            if self.special_tokens else None)

    @property
    def vocab_size(self) -> int:
        return len(self.pieces)

    def _priority(self, a: bytes, b: bytes) -> float | None:
        if self.merge_ranks is not None:
            r = self.merge_ranks.get((a, b))
            return None if r is None else -r
        i = self.lookup.get(a + b)
        return None if i is None else self.scores[i]

    def _encode_chunk(self, text: str) -> list[int]:
        ids: list[int] = []
        for ch in " " + text:  # the SentencePiece dummy prefix
            i = self.lookup.get(ch.encode())
            if i is not None:
                ids.append(i)
            else:  # byte fallback: one token per UTF-8 byte
                for b in ch.encode():
                    if self.byte_ids[b] is None:
                        raise TokenizerError(f"character {ch!r} is not in the vocabulary and it has no byte fallback")
                    ids.append(self.byte_ids[b])
        while len(ids) > 1:
            best, best_i = None, -1
            for i in range(len(ids) - 1):
                p = self._priority(self.pieces[ids[i]], self.pieces[ids[i + 1]])
                if p is not None and (best is None or p > best):
                    best, best_i = p, i
            if best is None:
                break
            ids[best_i:best_i + 2] = [self.lookup[self.pieces[ids[best_i]] + self.pieces[ids[best_i + 1]]]]
        return ids

    def encode(self, text: str, bos: bool | None = None, allowed_special: str = "all") -> list[int]:
        """Token ids of text; special-token strings (e.g. "<s>") become their ids when allowed."""
        ids = [self.bos_id] if (self.add_bos if bos is None else bos) and self.bos_id is not None else []
        parts = self._special_re.split(text) if (self._special_re and allowed_special == "all") else [text]
        for part in parts:
            if part in self.special_tokens:
                ids.append(self.special_tokens[part])
            elif part:
                ids.extend(self._encode_chunk(part))
        return ids

    def piece_bytes(self, prev_id: int | None, token_id: int) -> bytes:
        """The bytes one token adds to the text, given the token before it (run.c's `decode`)."""
        if token_id in self._special_ids:
            return b""
        piece = self.pieces[token_id]
        if len(piece) == 6 and piece.startswith(b"<0x") and piece.endswith(b">"):
            return bytes([int(piece[3:5], 16)])
        if (prev_id is None or prev_id == self.bos_id) and piece.startswith(b" "):
            piece = piece[1:]  # the dummy prefix space is not part of the text
        return piece

    def decode_bytes(self, ids: list[int]) -> bytes:
        out, prev = [], None
        for i in ids:
            out.append(self.piece_bytes(prev, i))
            prev = i
        return b"".join(out)

    def decode(self, ids: list[int]) -> str:
        return self.decode_bytes(ids).decode("utf-8", errors="replace")


def load_llama2c_tokenizer(path: str | Path, vocab_size: int | None = None) -> SentencePieceBPE:
    """Read llama2.c's tokenizer .bin: int32 max_token_length, then per token float32 score, int32 len, bytes."""
    path = Path(path)
    if not path.is_file():
        raise TokenizerError(f"tokenizer file not found: {path}")
    data = path.read_bytes()
    pieces, scores, off = [], [], 4
    try:
        (max_len,) = struct.unpack_from("<i", data, 0)
        while off < len(data) and (vocab_size is None or len(pieces) < vocab_size):
            score, n = struct.unpack_from("<fi", data, off)
            off += 8
            if n < 0 or n > max_len or off + n > len(data):
                raise ValueError
            pieces.append(data[off:off + n])
            scores.append(score)
            off += n
    except (struct.error, ValueError):
        raise TokenizerError(f"{path} is not a llama2.c tokenizer .bin (bad record at byte {off})") from None
    if vocab_size is not None and len(pieces) != vocab_size:
        raise TokenizerError(f"{path} has {len(pieces)} tokens but the model's vocab_size is {vocab_size}; "
                             "pass the tokenizer that belongs to this model with --tokenizer")
    return SentencePieceBPE(pieces, scores=scores, bos_id=1, eos_id=2, name=f"llama2.c {path.name}")


# --------------------------------------------------------------------------------------------------
# 5. Hugging Face tokenizer.json
# --------------------------------------------------------------------------------------------------

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


def _hf_pattern(pre: dict | None, path: Path) -> str:
    """The pre-tokenizer regex of a byte-level tokenizer.json, or a clear error if it is not one we support."""
    if pre is None:
        raise TokenizerError(f"{path}: byte-level BPE without a pre-tokenizer is not supported")
    if pre.get("type") == "ByteLevel":
        if pre.get("add_prefix_space"):
            raise TokenizerError(f"{path}: ByteLevel add_prefix_space=true is not supported")
        return HF_BYTELEVEL_PATTERN
    if pre.get("type") == "Sequence":
        steps = pre.get("pretokenizers", [])
        if ([st.get("type") for st in steps] == ["Digits", "ByteLevel"] and steps[0].get("individual_digits")
                and steps[1].get("use_regex", True) and not steps[1].get("add_prefix_space")):
            return SMOLLM_PATTERN  # SmolLM2's tokenizer.json
        if (len(steps) == 2 and steps[0].get("type") == "Split" and "Regex" in steps[0].get("pattern", {})
                and steps[0].get("behavior") == "Isolated" and steps[1].get("type") == "ByteLevel"
                and not steps[1].get("use_regex", True) and not steps[1].get("add_prefix_space")):
            return steps[0]["pattern"]["Regex"]
    raise TokenizerError(f"{path}: pre-tokenizer {json.dumps(pre)[:120]} is not supported "
                         "(supported: ByteLevel, or Split(regex) + ByteLevel(use_regex=false))")


def _token_str(tok) -> str | None:
    if isinstance(tok, dict):
        return tok.get("content")
    return tok


def load_hf_tokenizer(folder: str | Path):
    """Load <folder>/tokenizer.json (+ tokenizer_config.json for BOS/EOS and the chat template)."""
    folder = Path(folder)
    path = folder / "tokenizer.json"
    if not path.is_file():
        raise TokenizerError(f"no tokenizer.json in {folder}; pass one with --tokenizer")
    try:
        spec = json.loads(path.read_text(encoding="utf-8"))
        cfg_path = folder / "tokenizer_config.json"
        tcfg = json.loads(cfg_path.read_text(encoding="utf-8")) if cfg_path.is_file() else {}
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise TokenizerError(f"could not parse the tokenizer files in {folder} ({e})") from None
    model = spec.get("model") or {}
    if model.get("type") != "BPE":
        raise TokenizerError(f"{path}: tokenizer model {model.get('type')!r} is not supported (only BPE)")
    vocab: dict[str, int] = model["vocab"]
    merges = [tuple(m.split(" ", 1)) if isinstance(m, str) else tuple(m) for m in model.get("merges", [])]
    added = {t["content"]: t["id"] for t in spec.get("added_tokens", [])}
    special = {t["content"]: t["id"] for t in spec.get("added_tokens", []) if t.get("special", True)}
    bos_str, eos_str = _token_str(tcfg.get("bos_token")), _token_str(tcfg.get("eos_token"))
    bos_id = added.get(bos_str, vocab.get(bos_str)) if bos_str else None
    eos_id = added.get(eos_str, vocab.get(eos_str)) if eos_str else None
    template = tcfg.get("chat_template")
    if isinstance(template, list):  # a list of named templates: take "default"
        template = next((t["template"] for t in template if t.get("name") == "default"), None)
    if template is None and (folder / "chat_template.jinja").is_file():
        template = (folder / "chat_template.jinja").read_text(encoding="utf-8")

    if model.get("byte_fallback") or "▁" in "".join(list(vocab)[:2000]):
        # SentencePiece converted to tokenizer.json (LLaMA 2, TinyLlama): "▁" = space, <0xNN> byte tokens.
        size = max(max(vocab.values()), max(added.values(), default=-1)) + 1
        pieces = [b""] * size
        for s, i in vocab.items():
            pieces[i] = s.replace("▁", " ").encode("utf-8")
        for s, i in added.items():
            pieces[i] = s.encode("utf-8")
        ranks = {(a.replace("▁", " ").encode(), b.replace("▁", " ").encode()): r for r, (a, b) in enumerate(merges)}
        add_bos = tcfg.get("add_bos_token", True)
        return SentencePieceBPE(pieces, merge_ranks=ranks, bos_id=bos_id, eos_id=eos_id, special_tokens=special,
                                chat_template=template, add_bos=add_bos, name=f"tokenizer.json {folder.name}")

    # Byte-level BPE: a token's bytes are the inverse of GPT-2's byte->char map applied to its string.
    pattern = _hf_pattern(spec.get("pre_tokenizer"), path)
    tok = byte_level_bpe(_with_all_bytes(vocab), merges, pattern, special, source=str(path))
    add_bos = bool(tcfg.get("add_bos_token", False))
    size = max(max(vocab.values()), max(added.values(), default=-1)) + 1
    return _VocabPrefix(tok, size, bos_id=bos_id, eos_id=eos_id, add_bos=add_bos, chat_template=template,
                        name=f"tokenizer.json {folder.name}")


# --------------------------------------------------------------------------------------------------
# 6. GGUF metadata (llama.cpp's model files carry their tokenizer inside)
# --------------------------------------------------------------------------------------------------

# tokenizer.ggml.pre -> split pattern (llama.cpp's names); byte-level files of other models name others.
GGUF_PRE_PATTERNS = {"default": HF_BYTELEVEL_PATTERN, "gpt2": HF_BYTELEVEL_PATTERN, "gpt-2": HF_BYTELEVEL_PATTERN,
                     "smollm": SMOLLM_PATTERN, "starcoder": SMOLLM_PATTERN}
GGUF_CONTROL = 3  # tokenizer.ggml.token_type: 1 normal, 2 unknown, 3 control, 4 user-defined, 5 unused, 6 byte


def _with_all_bytes(tokens: list[str] | dict[str, int]) -> dict[str, int]:
    """{token: id} with every single byte present. SmolLM2's vocabulary lacks 21 single bytes (control
    characters it never saw): they get placeholder ids past the vocabulary, which `_VocabPrefix` drops on
    encode, as Hugging Face's BPE without an unk token drops a character it has no token for."""
    ids = {t: i for i, t in enumerate(tokens)} if isinstance(tokens, list) else dict(tokens)
    n = max(ids.values()) + 1
    for c in gpt2_bytes_to_unicode().values():
        if c not in ids:
            ids[c], n = n, n + 1
    return ids


class _VocabPrefix(CourseTokenizer):
    """A byte-level tokenizer whose first n ids are the model's; the placeholder ids above are dropped."""

    def __init__(self, tok, n: int, **kw):
        super().__init__(tok, **kw)
        self.n = n

    @property
    def vocab_size(self) -> int:
        return self.n

    def encode(self, text: str, bos: bool | None = None, allowed_special: str = "all") -> list[int]:
        return [i for i in super().encode(text, bos=bos, allowed_special=allowed_special) if i < self.n]


def _gguf_metadata(source) -> tuple[dict, str]:
    """(metadata dict, a name for messages) of a GGUF path, a gguf.GGUFReader, or a metadata dict."""
    if isinstance(source, dict):
        return source, str(source.get("general.name", "gguf"))
    if hasattr(source, "fields"):  # gguf.GGUFReader
        return {k: f.contents() for k, f in source.fields.items()}, str(getattr(source, "path", "gguf"))
    from gguf import GGUFReader  # llama.cpp's own reader (project 3's gguf_io has a faster one)

    path = Path(source)
    if not path.is_file():
        raise TokenizerError(f"GGUF file not found: {path}")
    try:
        return _gguf_metadata(GGUFReader(path, "r"))[0], str(path)
    except Exception as e:
        raise TokenizerError(f"{path}: cannot read GGUF metadata ({type(e).__name__}); not a GGUF file or "
                             "truncated") from None


def load_gguf_tokenizer(source):
    """The tokenizer a GGUF file describes in its metadata (`tokenizer.ggml.*`, `tokenizer.chat_template`).

    source: a .gguf path, a `gguf.GGUFReader`, or the metadata dict of project 3's `read_gguf`.
    - `tokenizer.ggml.model = gpt2`: byte-level BPE. `tokens` (GPT-2's byte-to-unicode spelling, position =
      id) and `merges` ("a b" strings in merge order) go through `byte_level_bpe`; `pre` names the split
      regex (`GGUF_PRE_PATTERNS`); tokens of type control (3) are special tokens, matched whole.
    - `tokenizer.ggml.model = llama`: SentencePiece (LLaMA 2, TinyLlama): `tokens` with "▁" for a space and
      `scores` (the merge priority), `<0xNN>` byte fallback: `SentencePieceBPE`.
    BOS/EOS come from `bos_token_id` / `eos_token_id`, BOS-prepending from `add_bos_token` (llama.cpp's
    default: on for SentencePiece, off for byte-level), the chat template from `tokenizer.chat_template`.
    """
    meta, name = _gguf_metadata(source)
    model, tokens = meta.get("tokenizer.ggml.model"), meta.get("tokenizer.ggml.tokens")
    if model is None or not tokens:
        raise TokenizerError(f"{name}: the GGUF metadata holds no tokenizer (tokenizer.ggml.model / tokens); "
                             "pass one with --tokenizer")
    types = meta.get("tokenizer.ggml.token_type") or [1] * len(tokens)
    special = {t: i for i, (t, ty) in enumerate(zip(tokens, types)) if ty == GGUF_CONTROL}
    bos, eos = meta.get("tokenizer.ggml.bos_token_id"), meta.get("tokenizer.ggml.eos_token_id")
    template = meta.get("tokenizer.chat_template")
    if model == "gpt2":
        pre = meta.get("tokenizer.ggml.pre", "default")
        if pre not in GGUF_PRE_PATTERNS:
            raise TokenizerError(f"{name}: pre-tokenizer '{pre}' is not supported (supported: "
                                 f"{', '.join(GGUF_PRE_PATTERNS)})")
        tok = byte_level_bpe(_with_all_bytes(tokens), meta.get("tokenizer.ggml.merges") or [],
                             GGUF_PRE_PATTERNS[pre], special, source=name)
        return _VocabPrefix(tok, len(tokens), bos_id=bos, eos_id=eos, chat_template=template,
                            add_bos=bool(meta.get("tokenizer.ggml.add_bos_token", False)), name=f"gguf {Path(name).name}")
    if model == "llama":
        scores = meta.get("tokenizer.ggml.scores")
        if scores is None or len(scores) != len(tokens):
            raise TokenizerError(f"{name}: a SentencePiece (llama) tokenizer needs tokenizer.ggml.scores")
        pieces = [t.replace("\u2581", " ").encode("utf-8") for t in tokens]
        return SentencePieceBPE(pieces, scores=list(scores), bos_id=bos, eos_id=eos, special_tokens=special,
                                chat_template=template, add_bos=bool(meta.get("tokenizer.ggml.add_bos_token", True)),
                                name=f"gguf {Path(name).name}")
    raise TokenizerError(f"{name}: tokenizer model '{model}' is not supported (only gpt2 byte-level BPE and "
                         "llama SentencePiece)")
