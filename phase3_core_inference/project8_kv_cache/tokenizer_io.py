"""Every tokenizer a real checkpoint comes with, behind one small interface.

- ours: project 2's RegexTokenizer (.pkl), used as is.
- Hugging Face `tokenizer.json`, byte-level BPE (GPT-2, SmolLM, Qwen, LLaMA 3 style): converted to
  tiktoken-style mergeable ranks and loaded into project 2's classes with `RegexTokenizer.from_ranks`.
- SentencePiece-style BPE: llama2.c's tokenizer `.bin` (pieces with scores; merges are chosen by score)
  and Hugging Face `tokenizer.json` files converted from SentencePiece (LLaMA 2, TinyLlama: "▁" for spaces,
  `<0xNN>` byte-fallback tokens; merges chosen by rank).

PAPERS
- Sennrich, Haddow, Birch 2016, "Neural Machine Translation of Rare Words with Subword Units": BPE.
- Kudo & Richardson 2018, "SentencePiece: A simple and language independent subword tokenizer": spaces
  as a visible symbol ("▁"), a dummy prefix space, and (LLaMA) byte fallback for unknown characters.

The engine needs only: `encode(text, bos=...)`, `decode_bytes(ids)`, `piece_bytes(prev_id, id)` (for
streaming), `bos_id`, `eos_id`, `vocab_size`, and, for chat, `chat_template` + special token strings.
"""

from __future__ import annotations

import json
import re
import struct
from pathlib import Path

from course.errors import CourseError

GPT2_PATTERN = r"""'(?:[sdmt]|ll|ve|re)| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+"""


# ------------------------------------------------------------------------------------------------
# SentencePiece-style BPE (llama2.c .bin, and HF tokenizer.json converted from SentencePiece)
# ------------------------------------------------------------------------------------------------
class SentencePieceBPE:
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
                        raise CourseError(f"character {ch!r} is not in the vocabulary and it has no byte fallback")
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
        raise CourseError(f"tokenizer file not found: {path}")
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
        raise CourseError(f"{path} is not a llama2.c tokenizer .bin (bad record at byte {off})") from None
    if vocab_size is not None and len(pieces) != vocab_size:
        raise CourseError(f"{path} has {len(pieces)} tokens but the model's vocab_size is {vocab_size}; "
                          "pass the tokenizer that belongs to this model with --tokenizer")
    return SentencePieceBPE(pieces, scores=scores, bos_id=1, eos_id=2, name=f"llama2.c {path.name}")


# ------------------------------------------------------------------------------------------------
# Hugging Face tokenizer.json
# ------------------------------------------------------------------------------------------------
class CourseTokenizer:
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
        raise CourseError(f"{path}: byte-level BPE without a pre-tokenizer is not supported")
    if pre.get("type") == "ByteLevel":
        if pre.get("add_prefix_space"):
            raise CourseError(f"{path}: ByteLevel add_prefix_space=true is not supported")
        return GPT2_PATTERN
    if pre.get("type") == "Sequence":
        steps = pre.get("pretokenizers", [])
        if (len(steps) == 2 and steps[0].get("type") == "Split" and "Regex" in steps[0].get("pattern", {})
                and steps[0].get("behavior") == "Isolated" and steps[1].get("type") == "ByteLevel"
                and not steps[1].get("use_regex", True) and not steps[1].get("add_prefix_space")):
            return steps[0]["pattern"]["Regex"]
    raise CourseError(f"{path}: pre-tokenizer {json.dumps(pre)[:120]} is not supported "
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
        raise CourseError(f"no tokenizer.json in {folder}; pass one with --tokenizer")
    try:
        spec = json.loads(path.read_text(encoding="utf-8"))
        cfg_path = folder / "tokenizer_config.json"
        tcfg = json.loads(cfg_path.read_text(encoding="utf-8")) if cfg_path.is_file() else {}
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise CourseError(f"could not parse the tokenizer files in {folder} ({e})") from None
    model = spec.get("model") or {}
    if model.get("type") != "BPE":
        raise CourseError(f"{path}: tokenizer model {model.get('type')!r} is not supported (only BPE)")
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
    from phase1_foundation.project2_tokenizer.tokenizer import RegexTokenizer, gpt2_bytes_to_unicode

    dec = {c: b for b, c in gpt2_bytes_to_unicode().items()}
    ranks: dict[bytes, int] = {}
    for s, i in vocab.items():
        if s in special:
            continue
        try:
            ranks[bytes(dec[c] for c in s)] = i
        except KeyError:
            raise CourseError(f"{path}: token {s!r} is not byte-level encoded; not a byte-level BPE vocabulary") from None
    # tiktoken-style ranks require that a merge's result has a larger id than anything merged before it.
    last = -1
    for a, b in merges:
        i = vocab.get(a + b)
        if i is None or i <= last:
            raise CourseError(f"{path}: merges are not in id order ({a!r} + {b!r}); cannot express them as ranks")
        last = i
    pattern = _hf_pattern(spec.get("pre_tokenizer"), path)
    tok = RegexTokenizer.from_ranks(ranks, pattern, special)
    add_bos = bool(tcfg.get("add_bos_token", False))
    return CourseTokenizer(tok, bos_id=bos_id, eos_id=eos_id, add_bos=add_bos, chat_template=template,
                           name=f"tokenizer.json {folder.name}")
