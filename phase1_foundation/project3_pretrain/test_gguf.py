"""GGUF: de-quantization against gguf.quants, tiny random LLaMA GGUF files (every supported type) against
transformers' GGUF loader, the tokenizer and chat template from GGUF metadata, bad input, and the real
SmolLM2-135M-Instruct file (skipped when data/smollm2/ has not been imported)."""

from __future__ import annotations

import random

import numpy as np
import pytest
import torch
from gguf import GGMLQuantizationType as T
from gguf import GGUFReader, quants

from course.errors import CourseError
from course.paths import REPO_ROOT
from phase1_foundation.project2_tokenizer.foreign_formats import load_gguf_tokenizer
from phase1_foundation.project3_pretrain import gguf_quants as gq
from phase1_foundation.project3_pretrain.gguf_io import GGUFFile, load_gguf, read_gguf
from phase1_foundation.project3_pretrain.gguf_testing import CHATML, TYPES, quantized, write_gguf
from phase1_foundation.project3_pretrain.gguf_testing import tiny_gguf_llama as tiny

REAL = REPO_ROOT / "data" / "smollm2" / "SmolLM2-135M-Instruct.Q4_1.gguf"


# ---- de-quantization ---------------------------------------------------------------------------------
@pytest.mark.parametrize("qtype", TYPES, ids=lambda t: t.name)
def test_dequantize_equals_gguf(qtype):
    rng = np.random.default_rng(int(qtype) + 100)
    x = (rng.standard_normal((3, 512)) * rng.uniform(0.01, 3)).astype(np.float32)
    raw = quantized(x, qtype, rng)
    theirs = quants.dequantize(raw, qtype)
    ours = gq.dequantize(raw, int(qtype), (3, 512))
    assert ours.dtype == torch.float32 and ours.shape == (3, 512)
    np.testing.assert_array_equal(ours.numpy(), theirs)  # bit for bit
    if qtype in (T.F32, T.F16, T.BF16, T.Q8_0):  # and close to what was quantized
        assert np.abs(ours.numpy() - x).max() <= np.abs(x).max() * 0.01


def test_unsupported_type_is_one_line():
    with pytest.raises(CourseError, match="quantization type Q2_K is not supported"):
        gq.dequantize(np.zeros(84, np.uint8), int(T.Q2_K), (256,), "blk.0.attn_q.weight")
    with pytest.raises(CourseError, match="truncated"):
        gq.dequantize(np.zeros(30, np.uint8), int(T.Q8_0), (32,))


# ---- tiny GGUF files ---------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def files(tmp_path_factory):
    d = tmp_path_factory.mktemp("gguf")
    return {t: write_gguf(d / f"tiny-{t.name}.gguf", tiny(tied=t != T.Q8_0), t, seed=int(t)) for t in TYPES}


def transformers_logits(path, ids):
    transformers = pytest.importorskip("transformers")
    ref = transformers.AutoModelForCausalLM.from_pretrained(str(path.parent), gguf_file=path.name,
                                                            dtype=torch.float32).eval()
    with torch.no_grad():
        return ref(ids).logits


@pytest.mark.parametrize("qtype", TYPES, ids=lambda t: t.name)
def test_tiny_gguf_logits_equal_transformers(files, qtype):
    ids = torch.randint(0, 300, (2, 11), generator=torch.Generator().manual_seed(int(qtype)))
    model = load_gguf(files[qtype])
    assert model.config.tie_embeddings == (qtype != T.Q8_0)
    with torch.no_grad():
        ours = model(ids)[0]
    torch.testing.assert_close(ours, transformers_logits(files[qtype], ids), rtol=1e-5, atol=1e-5)


def test_f32_file_round_trips_the_model_exactly(files):
    original, loaded = tiny(), load_gguf(files[T.F32])
    for (name, a), b in zip(original.state_dict().items(), loaded.state_dict().values()):
        assert torch.equal(a, b), name  # names, q/k permutation, dim order all undone


def test_container_parser_equals_gguf_reader(files):
    path = files[T.Q4_K]
    ours, ref = GGUFFile(path), GGUFReader(path)
    assert ours.metadata == {k: f.contents() for k, f in ref.fields.items() if not k.startswith("GGUF.")}
    assert ours.tensors == {t.name: (tuple(reversed(t.shape.tolist())), int(t.tensor_type), int(t.data_offset))
                            for t in ref.tensors}


# ---- tokenizer and chat template from the metadata ----------------------------------------------------
TEXTS = ["the cat sat on the mat", "Hello, World! It's 2024: 12 + 345 = 357.", "a  1  22   333\n\n  x",
         "def f(x):\n    return x**2  # square\n\n\n", "  spaces   everywhere   ", "Ünïcödé 日本語 🎉 café",
         "<|im_start|>user\nhi<|im_end|>\n<|im_start|>assistant\n", "tabs\t\tand\r\nCRLF 3.14159 ½ ² ٣"]


def smollm_reference(meta: dict):
    """SmolLM2's tokenizer.json as the `tokenizers` library runs it: Digits(individual) + ByteLevel BPE."""
    tk = pytest.importorskip("tokenizers")
    tokens = meta["tokenizer.ggml.tokens"]
    ref = tk.Tokenizer(tk.models.BPE({t: i for i, t in enumerate(tokens)},
                                     [tuple(m.split(" ", 1)) for m in meta["tokenizer.ggml.merges"]]))
    ref.pre_tokenizer = tk.pre_tokenizers.Sequence([tk.pre_tokenizers.Digits(individual_digits=True),
                                                    tk.pre_tokenizers.ByteLevel(add_prefix_space=False)])
    ref.decoder = tk.decoders.ByteLevel()
    ref.add_special_tokens([tk.AddedToken(t, special=True, normalized=False)
                            for t, ty in zip(tokens, meta["tokenizer.ggml.token_type"]) if ty == 3])
    return ref


def random_texts(n: int, seed: int) -> list[str]:
    rng = random.Random(seed)
    alphabet = list("abcdefghij XYZ  \n\t0123456789.,'!?-_()é日🎉") + ["<|im_end|>", " the", "'s", "   "]
    return [''.join(rng.choice(alphabet) for _ in range(rng.randint(1, 40))) for _ in range(n)]


def test_tiny_tokenizer_equals_smollm_reference(files):
    meta = GGUFFile(files[T.F32]).metadata
    ours, ref = load_gguf_tokenizer(meta), smollm_reference(meta)
    assert (ours.bos_id, ours.eos_id, ours.add_bos, ours.vocab_size) == (1, 2, False, 300)
    assert ours.chat_template == CHATML and ours.eos_token == "<|im_end|>"
    for text in TEXTS + random_texts(200, 0):
        ids = ours.encode(text)
        assert ids == ref.encode(text).ids, text
        assert ours.decode(ids) == ref.decode(ids, skip_special_tokens=True), text


def test_tokenizer_from_path_reader_and_metadata_agree(files):
    path = files[T.F16]
    a, b, c = load_gguf_tokenizer(path), load_gguf_tokenizer(GGUFReader(path)), load_gguf_tokenizer(read_gguf(path)[2])
    for text in TEXTS:
        assert a.encode(text) == b.encode(text) == c.encode(text)


def test_chat_template_equals_transformers(files):
    from phase1_foundation.project2_tokenizer.chat_template import render_chat
    transformers = pytest.importorskip("transformers")
    path = files[T.F16]
    ref = transformers.AutoTokenizer.from_pretrained(str(path.parent), gguf_file=path.name)
    ours = load_gguf_tokenizer(path)
    rng = random.Random(1)
    for trial in range(12):
        msgs = [{"role": "system", "content": f"be brief {trial}"}] if trial % 2 else []
        for turn in range(rng.randint(1, 4)):
            msgs.append({"role": "user", "content": " ".join(rng.choice(["hi", "what", "2+2?", "ünï"])
                                                             for _ in range(rng.randint(1, 6)))})
            if turn < 3 and rng.random() < 0.7:
                msgs.append({"role": "assistant", "content": rng.choice(["ok.", "4", "sure thing"])})
        for gen in (True, False):
            theirs = ref.apply_chat_template(msgs, tokenize=False, add_generation_prompt=gen)
            assert render_chat(ours.chat_template, msgs, bos_token=ours.bos_token, eos_token=ours.eos_token,
                               add_generation_prompt=gen) == theirs


# ---- bad input: one line each ---------------------------------------------------------------------------
def test_bad_files_are_one_line(tmp_path, files):
    not_gguf = tmp_path / "x.gguf"
    not_gguf.write_bytes(b"PK\x03\x04 not a model")
    with pytest.raises(CourseError, match="is not a GGUF file"):
        load_gguf(not_gguf)
    for head in (b"", b"GGUF"):  # an empty file cannot even be memory-mapped; a bare magic has no header
        short = tmp_path / f"short{len(head)}.gguf"
        short.write_bytes(head)
        with pytest.raises(CourseError, match=r"is not a GGUF file \(only \d+ bytes\)"):
            load_gguf(short)
    data = files[T.Q4_0].read_bytes()
    for cut in (100, 5000, len(data) - 10):
        cut_file = tmp_path / f"cut{cut}.gguf"
        cut_file.write_bytes(data[:cut])
        with pytest.raises(CourseError, match="truncated"):
            load_gguf(cut_file)
    with pytest.raises(CourseError, match="architecture 'qwen2' is not supported"):
        load_gguf(write_gguf(tmp_path / "qwen.gguf", tiny(), T.F32, arch="qwen2"))
    with pytest.raises(CourseError, match="quantization type Q5_0 is not supported"):
        load_gguf(write_gguf(tmp_path / "q50.gguf", tiny(), T.Q5_0))
    with pytest.raises(CourseError, match="tokenizer model 'bert' is not supported"):
        load_gguf_tokenizer(write_gguf(tmp_path / "bert.gguf", tiny(), T.F32, tok_model="bert"))
    with pytest.raises(CourseError, match="not found"):
        load_gguf(tmp_path / "missing.gguf")


# ---- the real SmolLM2-135M-Instruct file -----------------------------------------------------------------
needs_real = pytest.mark.skipif(not REAL.is_file(), reason=f"{REAL} absent; import it with: uv run python "
                                "phase3_core_inference/project8_kv_cache/download_model.py --source "
                                "../shared/data/smollm2/SmolLM2-135M-Instruct.Q4_1.gguf")


@needs_real
def test_real_file_config_and_tokenizer():
    f = GGUFFile(REAL)
    cfg, tensors, meta = read_gguf(f)
    assert (cfg.n_layer, cfg.n_embd, cfg.n_head, cfg.n_kv_head, cfg.ffn_dim, cfg.vocab_size) == (30, 576, 9, 3,
                                                                                                   1536, 49152)
    assert cfg.tie_embeddings and cfg.rope_theta == 100_000.0 and "lm_head.weight" not in tensors
    assert sum(t.numel() for t in tensors.values()) == 134_515_008
    ours, ref = load_gguf_tokenizer(meta), smollm_reference(meta)
    for text in TEXTS + random_texts(100, 1):
        assert ours.encode(text) == ref.encode(text).ids, text


@needs_real
@pytest.mark.slow
def test_real_file_equals_transformers():
    """fp32 logits within 1e-4 on several prompts, 64 greedy tokens identical with the chat template, the
    reference answer, and token ids equal to transformers' own GGUF tokenizer where it splits digits alike."""
    transformers = pytest.importorskip("transformers")
    from phase1_foundation.project2_tokenizer.chat_template import render_chat
    from phase1_foundation.project3_pretrain.generation import generate_ids

    model, tok = load_gguf(REAL), load_gguf_tokenizer(GGUFFile(REAL).metadata)
    kw = dict(gguf_file=REAL.name, dtype=torch.float32)
    ref = transformers.AutoModelForCausalLM.from_pretrained(str(REAL.parent), **kw).eval()
    ref_tok = transformers.AutoTokenizer.from_pretrained(str(REAL.parent), gguf_file=REAL.name)
    # transformers' GGUF tokenizer has no 'smollm' pre-tokenizer (it uses GPT-2's split, which keeps a space
    # before a digit): so compare on text without a space before a digit
    for text in ["Hello, World! It's a test.", "def f(x):\n    return x**2", "Ünïcödé 日本語 🎉 café", "x12y3"]:
        assert tok.encode(text) == ref_tok.encode(text), text
    prompts = ["The capital of France is", "def fibonacci(n):", "Once upon a time, in a land far away,"]
    for p in prompts:
        ids = torch.tensor([tok.encode(p)])
        with torch.no_grad():
            torch.testing.assert_close(model(ids)[0], ref(ids).logits, rtol=0, atol=1e-4)
    for question, answer in [("What is the capital of France? Answer in one sentence.",
                              "The capital of France is Paris."), ("Write a haiku about the sea.", None)]:
        text = render_chat(tok.chat_template, [{"role": "user", "content": question}])
        assert text == ref_tok.apply_chat_template([{"role": "user", "content": question}], tokenize=False,
                                                   add_generation_prompt=True)
        ids = torch.tensor([tok.encode(text)])
        # attention_mask given: without it transformers masks every id equal to pad_token_id, and the chat prompt
        # holds <|im_end|> (2) after its system turn, so its greedy tokens would come from another prompt
        theirs = ref.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=64, do_sample=False,
                              eos_token_id=None, pad_token_id=2)
        ours = generate_ids(model, ids, 64, temperature=0.0)
        assert ours.tolist() == theirs.tolist()
        if answer:
            reply = ours[0, ids.shape[1]:].tolist()
            assert tok.decode(reply[:reply.index(2)]) == answer
