"""SentencePiece-style BPE: merges over characters, chosen by score or rank, with byte fallback.

The tokenizer of LLaMA 2, TinyLlama and llama2.c, read from llama2.c's `.bin` (pieces with scores), from a
Hugging Face `tokenizer.json` converted from SentencePiece, or from GGUF metadata (foreign_formats.py).

PAPERS
- Kudo & Richardson 2018, "SentencePiece: A simple and language independent subword tokenizer": spaces
  as a visible symbol ("▁"), a dummy prefix space, and (LLaMA) byte fallback for unknown characters.
- Sennrich, Haddow, Birch 2016, "Neural Machine Translation of Rare Words with Subword Units": BPE.

WHY a second algorithm beside bpe.py: byte-level BPE starts from bytes and merges by learned rank;
SentencePiece starts from characters (bytes only as a fallback) and llama2.c's files give a score per
piece instead of a merge order. The same idea, another starting alphabet and priority.
"""

from __future__ import annotations

import re

from phase1_foundation.project2_tokenizer.formats import _TokenStrings
from phase1_foundation.project2_tokenizer.tokenizer import TokenizerError


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
