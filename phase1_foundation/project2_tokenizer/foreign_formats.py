"""Tokenizer files of other ecosystems: Hugging Face `tokenizer.json`, llama2.c `.bin`, GGUF metadata.

- Hugging Face `tokenizer.json` (+ `tokenizer_config.json` for BOS/EOS and the chat template):
  byte-level BPE (GPT-2, SmolLM, Qwen, LLaMA 3 style) through `formats.byte_level_bpe`, or
  SentencePiece-style BPE (LLaMA 2, TinyLlama: "▁" for spaces, `<0xNN>` byte tokens) (`load_hf_tokenizer`).
- llama2.c's tokenizer `.bin`: pieces with scores (`load_llama2c_tokenizer`).
- GGUF (llama.cpp's model files): the tokenizer in the metadata (`load_gguf_tokenizer`), byte-level BPE
  through `byte_level_bpe` again, or SentencePiece.
Each returns the inference interface of formats.py (`CourseTokenizer` or `SentencePieceBPE`).

PAPERS
- Radford et al. 2019 (GPT-2): byte-level BPE and its byte -> printable character map.
- Kudo & Richardson 2018, "SentencePiece": the "▁" space symbol, byte fallback.
"""

from __future__ import annotations

import json
import struct
from pathlib import Path

from phase1_foundation.project2_tokenizer.formats import CourseTokenizer, byte_level_bpe, gpt2_bytes_to_unicode
from phase1_foundation.project2_tokenizer.patterns import HF_BYTELEVEL_PATTERN, SMOLLM_PATTERN
from phase1_foundation.project2_tokenizer.sentencepiece_bpe import SentencePieceBPE
from phase1_foundation.project2_tokenizer.tokenizer import TokenizerError

# --------------------------------------------------------------------------------------------------
# 1. llama2.c's tokenizer .bin
# --------------------------------------------------------------------------------------------------

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
# 2. Hugging Face tokenizer.json
# --------------------------------------------------------------------------------------------------

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
    return VocabPrefix(tok, size, bos_id=bos_id, eos_id=eos_id, add_bos=add_bos, chat_template=template,
                        name=f"tokenizer.json {folder.name}")


# --------------------------------------------------------------------------------------------------
# 3. GGUF metadata (llama.cpp's model files carry their tokenizer inside)
# --------------------------------------------------------------------------------------------------

# tokenizer.ggml.pre -> split pattern (llama.cpp's names); byte-level files of other models name others.
GGUF_PRE_PATTERNS = {"default": HF_BYTELEVEL_PATTERN, "gpt2": HF_BYTELEVEL_PATTERN, "gpt-2": HF_BYTELEVEL_PATTERN,
                     "smollm": SMOLLM_PATTERN, "starcoder": SMOLLM_PATTERN}
GGUF_CONTROL = 3  # tokenizer.ggml.token_type: 1 normal, 2 unknown, 3 control, 4 user-defined, 5 unused, 6 byte


def _with_all_bytes(tokens: list[str] | dict[str, int]) -> dict[str, int]:
    """{token: id} with every single byte present. SmolLM2's vocabulary lacks 21 single bytes (control
    characters it never saw): they get placeholder ids past the vocabulary, which `VocabPrefix` drops on
    encode, as Hugging Face's BPE without an unk token drops a character it has no token for."""
    ids = {t: i for i, t in enumerate(tokens)} if isinstance(tokens, list) else dict(tokens)
    n = max(ids.values()) + 1
    for c in gpt2_bytes_to_unicode().values():
        if c not in ids:
            ids[c], n = n, n + 1
    return ids


class VocabPrefix(CourseTokenizer):
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
        return VocabPrefix(tok, len(tokens), bos_id=bos, eos_id=eos, chat_template=template,
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

