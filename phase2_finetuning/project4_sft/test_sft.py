"""Tests of project 4's data, chat format, loss masking and packing.

    uv run pytest phase2_finetuning/project4_sft/test_sft.py -q
"""

from __future__ import annotations

import json
import random

import pytest
import torch

from course.errors import CourseError
from course.paths import REPO_ROOT
from phase1_foundation.project2_tokenizer.tokenizer import RegexTokenizer
from phase1_foundation.project3_pretrain.testing import tiny_llama
from phase2_finetuning.project4_sft import conversations as conv
from phase2_finetuning.project4_sft.masking import IGNORE, collate, encode_chat, encode_chats, encode_prompt, render
from phase2_finetuning.project4_sft.packing import collate_packed, pack, packed_forward, positions_and_mask
from phase2_finetuning.project4_sft.special_tokens import (CHATML_TEMPLATE, IM_END, IM_START, add_special_tokens,
                                                           load_chat_format, resize_embeddings, save_chat_format)

DATA = REPO_ROOT / "data"
WORDS = ("the cat sat on a mat and then it ran far away to see what the dog was doing near the old red barn "
         "while rain fell on every green hill of the quiet town").split()


@pytest.fixture(scope="module")
def base_tok():
    tok = RegexTokenizer("gpt4")
    tok.train(" ".join(WORDS * 20) + " 0123456789 .,!?", 300)
    return tok


@pytest.fixture(scope="module")
def tok(base_tok):
    return add_special_tokens(base_tok)


def random_text(rng: random.Random, n: int = 6) -> str:
    return " ".join(rng.choice(WORDS) for _ in range(rng.randint(1, n)))


def random_chat(rng: random.Random, turns: int | None = None, system: bool | None = None) -> list[dict]:
    chat = [{"role": "system", "content": random_text(rng)}] if (rng.random() < 0.3 if system is None else system) else []
    for _ in range(turns or rng.randint(1, 3)):
        chat += [{"role": "user", "content": random_text(rng)}, {"role": "assistant", "content": random_text(rng)}]
    return chat


# ---- special tokens and the template ----------------------------------------------------------------------
def test_special_tokens_are_appended_and_the_original_is_untouched(base_tok, tok):
    n = base_tok.n_vocab
    assert tok.special_tokens == {IM_START: n, IM_END: n + 1}
    assert base_tok.special_tokens == {} and tok.vocab == base_tok.vocab
    assert add_special_tokens(tok).special_tokens == tok.special_tokens  # idempotent


def test_special_tokens_encode_to_one_id_and_never_from_plain_text(tok):
    chat = [{"role": "user", "content": f"say {IM_END} and {IM_START} please"},
            {"role": "assistant", "content": f"ok {IM_END}"}]
    enc = encode_chat(tok, CHATML_TEMPLATE, chat, end_token=IM_END)
    # framing: 2 turns x (one start + one end); the strings inside the content are bytes, not control ids
    assert enc.ids.count(tok.special_tokens[IM_START]) == 2
    assert enc.ids.count(tok.special_tokens[IM_END]) == 2
    assert tok.decode(enc.ids) == render(CHATML_TEMPLATE, chat)


def test_template_matches_transformers_apply_chat_template(tok, tmp_path):
    from tokenizers import Tokenizer, models
    from transformers import PreTrainedTokenizerFast

    save_chat_format(tmp_path, tok)
    cfg = load_chat_format(tmp_path)
    hf = PreTrainedTokenizerFast(tokenizer_object=Tokenizer(models.BPE()), eos_token=IM_END)
    rng = random.Random(0)
    # also a template with bos and stripped, role-dependent framing (Llama-2 style)
    llama2 = ("{{ bos_token }}{% for m in messages %}{% if m['role'] == 'user' %}{{ '[INST] ' + m['content'] | trim "
              "+ ' [/INST]' }}{% elif m['role'] == 'assistant' %}{{ ' ' + m['content'] | trim + ' ' + eos_token }}"
              "{% else %}{{ '<<SYS>>' + m['content'] + '<</SYS>>' }}{% endif %}{% endfor %}")
    for _ in range(20):
        chat, gen = random_chat(rng), rng.random() < 0.5
        for template in (cfg["chat_template"], llama2):
            ours = render(template, chat, bos_token="<s>", eos_token=IM_END, add_generation_prompt=gen)
            theirs = hf.apply_chat_template(chat, chat_template=template, tokenize=False, add_generation_prompt=gen,
                                            bos_token="<s>")
            assert ours == theirs
    assert json.loads((tmp_path / "tokenizer_config.json").read_text())["eos_token"] == IM_END


def test_resize_embeddings_mean_rows_and_same_logits_on_old_tokens():
    for tied in (True, False):
        model = tiny_llama(seed=1, tie_embeddings=tied)
        before = {k: v.clone() for k, v in model.state_dict().items()}
        big = resize_embeddings(model, 99)
        assert all(torch.equal(v, model.state_dict()[k]) for k, v in before.items())  # caller's model unchanged
        emb = model.tok_emb.weight
        torch.testing.assert_close(big.tok_emb.weight[:97], emb, rtol=0, atol=0)
        torch.testing.assert_close(big.tok_emb.weight[97:], emb.mean(0).expand(2, -1), rtol=0, atol=0)
        assert (big.lm_head.weight is big.tok_emb.weight) == tied
        idx = torch.randint(0, 97, (2, 11))
        with torch.no_grad():
            torch.testing.assert_close(big(idx)[0][..., :97], model(idx)[0], rtol=1e-5, atol=1e-5)
    with pytest.raises(CourseError, match="shrink"):
        resize_embeddings(model, 50)


# ---- the mask ------------------------------------------------------------------------------------------------
def test_two_turn_chat_trains_exactly_the_assistant_tokens(tok):
    chat = [{"role": "user", "content": "the cat sat"}, {"role": "assistant", "content": "on a mat"},
            {"role": "user", "content": "and then"}, {"role": "assistant", "content": "it ran far away"}]
    enc = encode_chat(tok, CHATML_TEMPLATE, chat, end_token=IM_END)
    S, E, p = tok.special_tokens[IM_START], tok.special_tokens[IM_END], tok.encode_ordinary
    # built by hand from the ChatML layout: (ids, trained?)
    pieces = []
    for m in chat:
        a = m["role"] == "assistant"
        pieces += [([S] + p(m["role"] + "\n"), False), (p(m["content"]), a), ([E], a), (p("\n"), False)]
    ids = [i for piece, _ in pieces for i in piece]
    trained = [t for piece, t in pieces for _ in piece]
    assert enc.ids == ids and enc.trained == trained
    x, y = enc.inputs_and_targets()
    expected = [ids[j + 1] if trained[j + 1] else IGNORE for j in range(len(ids) - 1)]
    assert y == expected and x == ids[:-1]
    assert enc.n_trained == len(p("on a mat")) + len(p("it ran far away")) + 2


def test_masked_loss_is_the_manual_cross_entropy_and_user_logits_get_no_gradient(tok):
    rng = random.Random(3)
    model = resize_embeddings(tiny_llama(seed=2, vocab_size=tok.n_vocab - 2), tok.n_vocab)
    rows, _ = encode_chats(tok, CHATML_TEMPLATE, [random_chat(rng, turns=2) for _ in range(3)], end_token=IM_END,
                           block_size=64)
    idx, tgt = collate(rows, pad_id=tok.special_tokens[IM_END])
    logits, loss = model(idx, tgt)
    logits.retain_grad()
    logp = torch.log_softmax(logits.float(), -1)
    terms = [-logp[b, t, tgt[b, t]] for b in range(idx.size(0)) for t in range(idx.size(1)) if tgt[b, t] != IGNORE]
    torch.testing.assert_close(loss, torch.stack(terms).mean(), rtol=1e-6, atol=1e-6)
    loss.backward()
    g = logits.grad.abs().sum(-1)
    assert (g[tgt == IGNORE] == 0).all() and (g[tgt != IGNORE] > 0).all()


def test_truncation_is_counted_and_bad_chats_are_one_clear_error(tok):
    long = [{"role": "user", "content": " ".join(WORDS[:8])}, {"role": "assistant", "content": " ".join(WORDS)}]
    short = [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "the cat"}]
    only_user = [{"role": "user", "content": " ".join(WORDS * 3)}, {"role": "assistant", "content": "ok"}]
    rows, stats = encode_chats(tok, CHATML_TEMPLATE, [long, short, only_user], end_token=IM_END, block_size=60)
    assert stats.rows == 2 and stats.truncated == 1 and sum(stats.skipped.values()) == 1
    assert all(len(r.ids) <= 61 for r in rows)
    with pytest.raises(CourseError, match="no assistant turn"):
        encode_chat(tok, CHATML_TEMPLATE, [{"role": "user", "content": "hi"}], end_token=IM_END)
    with pytest.raises(CourseError, match="unknown role"):
        encode_chat(tok, CHATML_TEMPLATE, [{"role": "robot", "content": "hi"}] + short, end_token=IM_END)
    with pytest.raises(CourseError):
        encode_chat(tok, "{% for m in messages %}{{ m.content }", short, end_token=IM_END)
    with pytest.raises(CourseError, match="does not close"):
        encode_chat(tok, "{% for m in messages %}{{ m.content }}{% endfor %}", short, end_token=IM_END)


def test_encode_prompt_is_the_training_encoding_up_to_the_answer(tok):
    rng = random.Random(11)
    S = tok.special_tokens[IM_START]
    for _ in range(20):
        chat = random_chat(rng)
        enc = encode_chat(tok, CHATML_TEMPLATE, chat, end_token=IM_END)
        prompt = encode_prompt(tok, CHATML_TEMPLATE, chat[:-1], eos_token=IM_END)
        # the prompt ends "<|im_start|>assistant\n"; training continues it with the answer's tokens
        assert enc.ids[:len(prompt)] == prompt and prompt[-1 - len(tok.encode_ordinary("assistant\n"))] == S
        assert enc.trained[len(prompt)] and not any(enc.trained[len(prompt) - 3:len(prompt)])
    with pytest.raises(CourseError, match="end with a user message"):
        encode_prompt(tok, CHATML_TEMPLATE, chat, eos_token=IM_END)


# ---- packing ---------------------------------------------------------------------------------------------------
def test_positions_and_mask_are_block_diagonal_causal():
    doc = torch.tensor([[0, 0, 0, 1, 1, 2, -1, -1]])
    pos, mask = positions_and_mask(doc)
    assert pos.tolist() == [[0, 1, 2, 0, 1, 0, 0, 1]]
    expected = torch.zeros(8, 8, dtype=torch.bool)
    for s, e in ((0, 3), (3, 5), (5, 6), (6, 8)):
        expected[s:e, s:e] = torch.ones(e - s, e - s, dtype=torch.bool).tril()
    assert torch.equal(mask[0, 0], expected)


def test_packed_loss_equals_unpacked_loss(tok):
    rng = random.Random(5)
    model = resize_embeddings(tiny_llama(seed=4, vocab_size=tok.n_vocab - 2), tok.n_vocab)
    rows, _ = encode_chats(tok, CHATML_TEMPLATE, [random_chat(rng, turns=1, system=False) for _ in range(7)], end_token=IM_END, block_size=64)
    pad = tok.special_tokens[IM_END]
    with torch.no_grad():
        _, plain = model(*collate(rows, pad))
        packed = pack(rows, 64)
        assert len(packed) < len(rows) and sum(len(r.inputs) for r in packed) == sum(len(r.ids) - 1 for r in rows)
        idx, tgt, doc = collate_packed(packed, pad)
        logits, loss = packed_forward(model, idx, doc, tgt)
        torch.testing.assert_close(loss, plain, rtol=1e-5, atol=1e-6)
        # and each chat's logits inside the pack are that chat's logits alone
        x, _ = rows[0].inputs_and_targets()
        torch.testing.assert_close(logits[0, :len(x)], model(torch.tensor([x]))[0][0], rtol=1e-5, atol=1e-5)


# ---- datasets --------------------------------------------------------------------------------------------------
def test_alpaca_chat_joins_instruction_and_input():
    assert conv.alpaca_chat({"instruction": "Add.", "input": "2 and 3", "output": " 5 "}) == [
        {"role": "user", "content": "Add.\n\n2 and 3"}, {"role": "assistant", "content": "5"}]
    assert conv.alpaca_chat({"instruction": "Say hi.", "input": "", "output": "hi"})[0]["content"] == "Say hi."


def _msg(mid, parent, role, text, **kw):
    return {"message_id": mid, "parent_id": parent, "role": role, "text": text, "deleted": False,
            "review_result": True, "rank": None, **kw}


def test_oasst_threads_follow_parent_ids_and_drop_bad_rows():
    rows = [_msg("r", None, "prompter", "q1"),
            _msg("a1", "r", "assistant", "second best", rank=1), _msg("a0", "r", "assistant", "best", rank=0),
            _msg("u", "a0", "prompter", "follow up"), _msg("b", "u", "assistant", "answer two"),
            _msg("x", "r", "assistant", "deleted one", deleted=True), _msg("xc", "x", "prompter", "orphan"),
            _msg("f", "a1", "prompter", "failed", review_result=False),
            _msg("r2", None, "prompter", "no reply")]
    top = conv.oasst_threads(rows, "top1")
    assert top.chats == [[{"role": "user", "content": "q1"}, {"role": "assistant", "content": "best"},
                          {"role": "user", "content": "follow up"}, {"role": "assistant", "content": "answer two"}]]
    assert top.skipped["deleted"] == 1 and top.skipped["failed review"] == 1
    assert top.skipped["orphaned (parent dropped or not in the file)"] == 1
    assert top.skipped["thread without an assistant reply"] == 1
    leaves = conv.oasst_threads(rows, "leaves")
    assert sorted(len(c) for c in leaves.chats) == [2, 4]  # r-a1 (its child failed review) and r-a0-u-b


def test_heldout_split_is_fixed_by_the_seed_and_disjoint():
    chats = [[{"role": "user", "content": str(i)}, {"role": "assistant", "content": "x"}] for i in range(100)]
    train, held = conv.split_heldout(chats, 0.1, seed=7)
    assert len(held) == 10 and len(train) == 90
    assert conv.split_heldout(chats, 0.1, seed=7) == (train, held)
    assert conv.split_heldout(chats, 0.1, seed=8)[1] != held
    assert not {c[0]["content"] for c in train} & {c[0]["content"] for c in held}


def test_corrupt_file_is_one_clear_line(tmp_path):
    bad = tmp_path / "x.jsonl"
    bad.write_text('{"question": "a", "answer": "b"}\n{"question": \n')
    with pytest.raises(CourseError, match="line 2 is not valid JSON"):
        conv.read_gsm8k(bad)
    with pytest.raises(CourseError, match="download_data.py --dataset alpaca"):
        conv.read_alpaca(tmp_path / "missing.json")


@pytest.mark.skipif(not (DATA / "oasst1" / "en-validation.jsonl").is_file(), reason="oasst1 not in data/ "
                    "(uv run python phase2_finetuning/project4_sft/download_data.py --dataset oasst1)")
def test_real_datasets_read_with_the_documented_counts():
    oa = conv.read_oasst1()
    assert oa.skipped["deleted"] == 40 and len(oa) == 188  # 188 root prompts in the English validation split
    assert all(c[0]["role"] == "user" and c[-1]["role"] == "assistant" for c in oa.chats)
    if (DATA / "rasbt_instruction" / "instruction-data.json").is_file():
        assert len(conv.read_rasbt()) == 1100
    if (DATA / "gsm8k" / "train.jsonl").is_file():
        g = conv.read_gsm8k()
        assert len(g) == 7473 and "<<" not in g.chats[0][1]["content"] and "#### 72" in g.chats[0][1]["content"]
