"""Tokenizers of real checkpoints: HF tokenizer.json (byte-level and SentencePiece-style) against the
`tokenizers` library, and llama2.c's tokenizer .bin against hand-worked merges and stories260K's tokens.

Run: uv run pytest -q phase1_foundation/project2_tokenizer/test_formats.py
"""

from __future__ import annotations

import json
import random
import struct
from pathlib import Path

import pytest

from course.errors import CourseError
from course.paths import REPO_ROOT
from phase1_foundation.project2_tokenizer.foreign_formats import load_hf_tokenizer, load_llama2c_tokenizer

DATA = REPO_ROOT / "data" / "stories260k"
TEXT = ("Once upon a time, there was a little girl named Lily. She loved to play outside in the park. "
        "One day she saw a big red ball! It was 12345 times bigger than her dog's bone... "
        "Don't you think? They'll say: we've done it.\n\nThe end.  Tabs\tand   spaces.\n")


def random_texts(seed: int, n: int = 30) -> list[str]:
    rng = random.Random(seed)
    alphabet = list("abcdefghij klmnop ,.!?'\n\t0123") + ["é", "ß", "日本", "🙂", "  ", "'s", "'ll"]
    words = TEXT.split(" ")
    out = []
    for _ in range(n):
        parts = [rng.choice(words) if rng.random() < 0.6 else "".join(rng.choices(alphabet, k=rng.randint(1, 6)))
                 for _ in range(rng.randint(1, 12))]
        out.append(" ".join(parts))
    return out


# ---- Hugging Face tokenizer.json --------------------------------------------------------------------
hf_tokenizers = pytest.importorskip("tokenizers", reason="tokenizers (dev group) is needed")


def write_folder(folder: Path, tok, tcfg: dict) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    tok.save(str(folder / "tokenizer.json"))
    (folder / "tokenizer_config.json").write_text(json.dumps(tcfg))
    return folder


@pytest.fixture(scope="module")
def byte_level(tmp_path_factory):
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=400, special_tokens=["<|endoftext|>", "<|im_start|>", "<|im_end|>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tok.train_from_iterator([TEXT] * 20 + random_texts(0, 200), trainer)
    folder = write_folder(tmp_path_factory.mktemp("bytelevel"), tok,
                          {"bos_token": "<|endoftext|>", "eos_token": "<|im_end|>",
                           "chat_template": "{% for m in messages %}<|im_start|>{{ m.role }}\n{{ m.content }}"
                                            "<|im_end|>\n{% endfor %}{% if add_generation_prompt %}"
                                            "<|im_start|>assistant\n{% endif %}"})
    return tok, load_hf_tokenizer(folder)


def test_byte_level_tokenizer_json_matches_tokenizers(byte_level):
    ref, ours = byte_level
    for text in [TEXT] + random_texts(1):
        expected = ref.encode(text).ids
        assert ours.encode(text, bos=False) == expected, text
        assert ours.decode(expected) == text
    assert len(ref.encode(TEXT).ids) < len(TEXT.encode()) / 2  # merges were learned and used


def test_byte_level_special_tokens_and_chat_template(byte_level):
    from phase1_foundation.project2_tokenizer.chat_template import render_chat

    ref, ours = byte_level
    assert ours.eos_id == ref.token_to_id("<|im_end|>") and ours.bos_id == ref.token_to_id("<|endoftext|>")
    assert (ours.bos_token, ours.eos_token) == ("<|endoftext|>", "<|im_end|>")
    text = render_chat(ours.chat_template, [{"role": "user", "content": "hi there"}], bos_token=ours.bos_token,
                       eos_token=ours.eos_token)
    assert text == "<|im_start|>user\nhi there<|im_end|>\n<|im_start|>assistant\n"
    ids = ours.encode(text, bos=False)
    assert ids == ref.encode(text).ids and ids[0] == ref.token_to_id("<|im_start|>")


@pytest.fixture(scope="module")
def sentencepiece_style(tmp_path_factory):
    """A LLaMA-2-style tokenizer.json: "▁" for spaces, no pre-split, byte fallback tokens <0x00>..<0xFF>."""
    from tokenizers import Tokenizer, decoders, models, normalizers, trainers

    tok = Tokenizer(models.BPE(byte_fallback=True, unk_token="<unk>", fuse_unk=True))
    tok.normalizer = normalizers.Sequence([normalizers.Prepend("▁"), normalizers.Replace(" ", "▁")])
    tok.decoder = decoders.Sequence([decoders.Replace("▁", " "), decoders.ByteFallback(), decoders.Fuse(),
                                     decoders.Strip(" ", 1, 0)])
    byte_tokens = [f"<0x{i:02X}>" for i in range(256)]
    trainer = trainers.BpeTrainer(vocab_size=600, special_tokens=["<unk>", "<s>", "</s>"] + byte_tokens,
                                  show_progress=False)
    tok.train_from_iterator([TEXT] * 20 + random_texts(2, 200), trainer)
    folder = write_folder(tmp_path_factory.mktemp("spm"), tok, {"bos_token": "<s>", "eos_token": "</s>"})
    spec = json.loads((folder / "tokenizer.json").read_text())
    # as in LLaMA's file, byte tokens are ordinary vocabulary entries, not added special tokens
    spec["added_tokens"] = [t for t in spec["added_tokens"] if not t["content"].startswith("<0x")]
    (folder / "tokenizer.json").write_text(json.dumps(spec))
    return Tokenizer.from_file(str(folder / "tokenizer.json")), load_hf_tokenizer(folder)


def test_sentencepiece_style_tokenizer_json_matches_tokenizers(sentencepiece_style):
    ref, ours = sentencepiece_style
    for text in [TEXT] + [t for t in random_texts(3) if t.strip()]:
        expected = ref.encode(text).ids
        assert ours.encode(text, bos=False) == expected, text
        assert ours.decode(expected) == ref.decode(expected)
    # a character never seen in training falls back to its UTF-8 bytes, as in the reference
    assert ours.encode("Ж", bos=False) == ref.encode("Ж").ids
    assert ours.encode("Ж", bos=False)[-2:] == [ref.token_to_id(f"<0x{b:02X}>") for b in "Ж".encode()]


# ---- llama2.c tokenizer .bin --------------------------------------------------------------------------
def write_llama2c_tokenizer(path: Path, pieces: list[bytes], scores: list[float]) -> Path:
    with open(path, "wb") as f:
        f.write(struct.pack("<i", max(len(p) for p in pieces)))
        for p, s in zip(pieces, scores):
            f.write(struct.pack("<fi", s, len(p)) + p)
    return path


def test_llama2c_merges_by_score_with_byte_fallback(tmp_path):
    pieces = [b"<unk>", b"\n<s>\n", b"\n</s>\n"] + [f"<0x{i:02X}>".encode() for i in range(256)]
    base = len(pieces)
    extra = [b" ", b"a", b"b", b"c", b" a", b"ab", b"bc", b" ab", b"abc"]
    scores = [0.0] * base + [-1000.0] * 4 + [-5.0, -1.0, -0.5, -2.0, -3.0]
    path = write_llama2c_tokenizer(tmp_path / "tok.bin", pieces + extra, scores)
    tok = load_llama2c_tokenizer(path)
    ids = {p: base + i for i, p in enumerate(extra)}
    # " abc": pairs " a"(-5), "ab"(-1), "bc"(-0.5) -> "bc" first; then " a"(-5) vs "a"+"bc" = "abc"(-3) -> "abc"
    assert tok.encode("abc", bos=True) == [1, ids[b" "], ids[b"abc"]]
    # "ab": "bc" impossible; "ab"(-1) beats " a"(-5), then " "+"ab" -> " ab"(-2)
    assert tok.encode("ab", bos=False) == [ids[b" ab"]]
    assert tok.encode("aé", bos=False) == [ids[b" a"], 3 + 0xC3, 3 + 0xA9]  # é is not a piece: UTF-8 bytes
    assert tok.decode(tok.encode("abc aé", bos=True)) == "abc aé"


def test_llama2c_tokenizer_bad_files(tmp_path):
    with pytest.raises(CourseError, match="not found"):
        load_llama2c_tokenizer(tmp_path / "missing.bin")
    (tmp_path / "bad.bin").write_bytes(struct.pack("<i", 4) + struct.pack("<fi", 0.0, 999) + b"xx")
    with pytest.raises(CourseError, match="not a llama2.c tokenizer"):
        load_llama2c_tokenizer(tmp_path / "bad.bin")
    path = write_llama2c_tokenizer(tmp_path / "t.bin", [b"a", b"b"], [0.0, 0.0])
    with pytest.raises(CourseError, match="vocab_size is 512"):
        load_llama2c_tokenizer(path, vocab_size=512)


@pytest.mark.skipif(not (DATA / "tok512.bin").is_file(), reason="data/stories260k absent: run "
                    "phase3_core_inference/project8_kv_cache/download_data.py (or --source DIR)")
def test_tok512_encodes_like_the_model_writes():
    tok = load_llama2c_tokenizer(DATA / "tok512.bin", 512)
    # the first tokens stories260K generates greedily from BOS (llama2.c run.c, and transformers on these weights)
    model_ids = [1, 403, 407, 261, 378, 432, 383, 286, 261, 376, 298, 315, 421, 395, 317, 426]
    text = "Once upon a time, there was a little girl named Lily."
    assert tok.encode(text) == model_ids
    assert tok.decode(model_ids) == text
    for t in random_texts(4, 10):
        assert tok.decode(tok.encode(t)) == t


# ---- run as a script: validation examples ----------------------------------------------------------------
def _demo() -> None:
    path = DATA / "tok512.bin"
    if path.is_file():
        tok = load_llama2c_tokenizer(path, 512)
        ids = tok.encode("Once upon a time, there was a little girl named Lily.")
        print(f"1. llama2.c {path.name} (SentencePiece-style BPE, merges by score):\n   ids {ids}\n"
              f"   pieces {[tok.piece_bytes(p, i).decode('utf-8', 'replace') for p, i in zip([None] + ids, ids)]}")
    else:
        print(f"1. (no {path}: run phase3_core_inference/project8_kv_cache/download_data.py to see llama2.c's tokens)")
    try:
        from tokenizers import Tokenizer, models, pre_tokenizers, trainers
    except ImportError:
        print("2. (the tokenizers library is not installed: no tokenizer.json comparison)")
        return
    import tempfile

    ref = Tokenizer(models.BPE())
    ref.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    ref.train_from_iterator([TEXT] * 20, trainers.BpeTrainer(vocab_size=300, show_progress=False,
                                                             initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    with tempfile.TemporaryDirectory() as tmp:
        ours = load_hf_tokenizer(write_folder(Path(tmp), ref, {}))
    same = sum(ours.encode(t, bos=False) == ref.encode(t).ids for t in random_texts(0))
    print(f"2. a byte-level tokenizer.json trained by HF tokenizers, read by load_hf_tokenizer: "
          f"ids identical on {same}/30 random texts")


if __name__ == "__main__":
    from course.cli import run_demo

    run_demo(_demo, __doc__)
