"""Tests of train_sft.py, the identity data and chat.py: a tiny SFT run overfits a few chats on the assistant
tokens only, --resume equals an uninterrupted run, the result loads everywhere, bad flags are one line.

    uv run pytest phase2_finetuning/project4_sft/test_train_sft.py -q
"""

from __future__ import annotations

import io
import json
import math
import random

import pytest
import torch

from course.clitest import one_line_error
from phase1_foundation.project2_tokenizer.formats import save_tokenizer
from phase1_foundation.project2_tokenizer.tokenizer import RegexTokenizer
from phase1_foundation.project3_pretrain.loading import load_model, load_tokenizer_for
from phase1_foundation.project3_pretrain.testing import tiny_llama
from phase2_finetuning.project4_sft import chat, make_identity, train_sft
from phase2_finetuning.project4_sft.config import SFTConfig
from phase2_finetuning.project4_sft.harness.identity import identity_share
from phase2_finetuning.project4_sft.identity import (COURSE, HELDOUT_CORES, TRAIN_CORES, heldout_questions,
                                                     identity_chats)
from phase2_finetuning.project4_sft.masking import render
from phase2_finetuning.project4_sft.reply import chat_reply
from phase2_finetuning.project4_sft.sft import encode_for, load_chat_model, prompt_of
from phase2_finetuning.project4_sft.special_tokens import IM_END, IM_START

WORDS = "the cat sat on a mat and the dog ran to the red barn while rain fell on a green hill".split()


def _chats(n: int, seed: int) -> list[dict]:
    rng = random.Random(seed)
    return [{"instruction": " ".join(rng.choice(WORDS) for _ in range(4)), "input": "",
             "output": " ".join(rng.choice(WORDS) for _ in range(rng.randint(2, 5)))} for _ in range(n)]


@pytest.fixture(scope="module")
def base(tmp_path_factory):
    """A tiny 'project 3' checkpoint with a project 2 tokenizer that has no chat tokens, and a chat file."""
    d = tmp_path_factory.mktemp("base")
    tok = RegexTokenizer("gpt4")
    tok.train(" ".join(WORDS * 30) + " user assistant system\n", 290)
    tok.register_special_tokens(["<|endoftext|>"])
    save_tokenizer(tok, d / "tokenizer.pkl")
    model = tiny_llama(seed=3, vocab_size=tok.n_vocab, block_size=64)
    torch.save({"iter": 0, "model_state_dict": model.state_dict(), "model_config": model.config.to_dict(),
                "arch": "llama", "data_meta": {"tokenizer": str(d / "tokenizer.pkl")}}, d / "ckpt.pt")
    (d / "chats.json").write_text(json.dumps(_chats(6, 0)))
    return d


def _cfg(base, out, **kw) -> SFTConfig:
    values = dict(base=str(base / "ckpt.pt"), data=f"alpaca:{base / 'chats.json'}", heldout=1, batch_size=5,
                  max_iters=80, learning_rate=3e-2, min_lr=3e-3, warmup_iters=2, eval_interval=40, log_interval=5,
                  gen_samples=2, gen_budget=8, out_dir=str(out), device="cpu")
    return SFTConfig(**{**values, **kw}).validate_config()


@pytest.fixture(scope="module")
def trained(base, tmp_path_factory):
    out = tmp_path_factory.mktemp("sft")
    summary = train_sft.train(_cfg(base, out), seed=1, progress=False)
    return out, summary


def test_tiny_sft_overfits_the_assistant_tokens_and_ends_its_turns(trained, base):
    out, summary = trained
    recs = [json.loads(line) for line in open(out / "log.jsonl")]
    losses = [r["loss"] for r in recs if r["kind"] == "train"]
    assert losses[-1] < 0.25 * losses[0], losses
    assert math.isfinite(summary["after"]["heldout_loss"]) and (out / "loss.png").is_file()
    cm = load_chat_model(str(out))
    chats = [[{"role": "user", "content": c["instruction"]}, {"role": "assistant", "content": c["output"]}]
             for c in _chats(6, 0)]
    rows, _ = encode_for(cm, chats, 64)
    # user tokens never trained: the trained ids decode to exactly the assistant contents (+ end tokens)
    end = cm.tok.special_tokens[IM_END]
    for row, c in zip(rows, chats):
        trained_ids = [i for i, t in zip(row.ids, row.trained) if t]
        assert trained_ids.count(end) == 1 and trained_ids[-1] == end
        assert cm.tok.decode(trained_ids) == c[1]["content"]
    # overfit: on most training prompts the greedy answer is the training answer, and the turn ends
    hits = [chat_reply(cm.model, cm.tok, cm.fmt, prompt_of(c), 16) for c in chats]
    good = sum(r.ended and r.text == c[1]["content"] for r, c in zip(hits, chats))
    assert good >= 5, [(r.text, c[1]["content"]) for r, c in zip(hits, chats)]


def test_the_fine_tuned_model_loads_through_project_3_and_keeps_its_template(trained):
    out, _ = trained
    loaded = load_model(str(out / "ckpt.pt"))
    tok = load_tokenizer_for(loaded)
    n = loaded.model.config.vocab_size
    assert tok.special_tokens[IM_START] == n - 2 and tok.special_tokens[IM_END] == n - 1
    cfg = json.loads((out / "tokenizer_config.json").read_text())
    chat_ = [{"role": "user", "content": "the cat"}, {"role": "assistant", "content": "sat"}]
    assert cfg["eos_token"] == IM_END and render(cfg["chat_template"], chat_).startswith(f"{IM_START}user\nthe cat")


def test_resume_gives_the_same_weights_as_an_uninterrupted_run(base, tmp_path):
    kw = dict(max_iters=8, eval_interval=4, gen_samples=0)
    whole = train_sft.train(_cfg(base, tmp_path / "a", **kw), seed=2, progress=False)
    train_sft.train(_cfg(base, tmp_path / "b", **kw), seed=2, progress=False, stop_at=4)
    assert torch.load(tmp_path / "b" / "ckpt.pt", weights_only=False)["iter"] == 4
    resumed = train_sft.train(_cfg(base, tmp_path / "b", **kw), resume=True, progress=False)
    a = torch.load(tmp_path / "a" / "ckpt.pt", weights_only=False)["model_state_dict"]
    b = torch.load(tmp_path / "b" / "ckpt.pt", weights_only=False)["model_state_dict"]
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert resumed["after"]["heldout_loss"] == whole["after"]["heldout_loss"]


def test_a_diverging_run_stops_with_one_line(base, tmp_path):
    state = torch.load(base / "ckpt.pt", weights_only=False)
    state["model_state_dict"]["norm.weight"] = torch.full_like(state["model_state_dict"]["norm.weight"], float("nan"))
    torch.save(state, tmp_path / "nan.pt")
    line = one_line_error(train_sft.main, ["--base", str(tmp_path / "nan.pt"), "--data", f"alpaca:{base / 'chats.json'}",
                                           "--heldout=1", "--gen_samples=0", "--device=cpu", "--no_progress",
                                           "--out_dir", str(tmp_path / "o")])
    assert "loss became nan at iter 0" in line


@pytest.mark.parametrize("argv,fragment", [
    (["--learning_rate=0"], "learning_rate (0.0) must be > 0"),
    (["--learning_rate=nan"], "must be a finite number"),
    (["--data=alpaca,wiki"], "data ('alpaca,wiki') must be a comma-separated list"),
    (["--min_lr=0.1", "--learning_rate=0.01"], "min_lr (0.1) must be <= learning_rate"),
    (["--dtype=int8"], "dtype ('int8') must be one of"),
    (["--batch_size=two"], "argument --batch_size"),
    (["--base=/nonexistent/model.pt"], "not found"),
    (["--resume", "--preset=gpu"], "drop --preset"),
])
def test_train_sft_bad_flags_are_one_line(argv, fragment, tmp_path):
    assert fragment in one_line_error(train_sft.main, argv + ["--out_dir", str(tmp_path)])


def test_resume_without_a_checkpoint_is_one_line(tmp_path):
    assert "nothing to resume" in one_line_error(train_sft.main, ["--resume", "--out_dir", str(tmp_path)])


@pytest.mark.parametrize("argv,fragment", [
    (["--temperature=-1"], "argument --temperature"),
    (["--max_new_tokens=0"], "expected an integer > 0"),
    (["--model=nowhere/at/all.pt"], "not found"),
])
def test_chat_bad_flags_are_one_line(argv, fragment):
    assert fragment in one_line_error(chat.main, argv)


def test_chat_is_multi_turn_and_resets(trained):
    out, _ = trained
    cm = load_chat_model(str(out))
    conv = chat.Conversation(cm, max_new_tokens=8, temperature=0.0, top_k=0)
    first = _chats(6, 0)[0]
    buf = io.StringIO()
    conv.answer(first["instruction"], buf)
    assert buf.getvalue() == first["output"]  # overfit, greedy, streamed piece by piece
    conv.answer("the dog", io.StringIO())
    assert [m["role"] for m in conv.messages] == ["user", "assistant", "user", "assistant"]
    conv.reset()
    assert conv.messages == []


# ---- identity data ------------------------------------------------------------------------------------------
def test_identity_chats_are_seeded_varied_and_heldout_phrasings_are_new():
    chats = identity_chats(200, seed=5)
    assert chats == identity_chats(200, seed=5) and chats != identity_chats(200, seed=6)
    # every chat has an identity answer naming the identity, and the answers vary
    assert all(any(m["role"] == "assistant" and COURSE.named_in(m["content"]) for m in c) for c in chats)
    assert len({m["content"] for c in chats for m in c if m["role"] == "assistant"}) >= 10
    train_q = {m["content"].lower() for c in chats for m in c if m["role"] == "user"}
    held = heldout_questions(50)
    assert len(held) == 50 == len(set(held))
    assert not set(HELDOUT_CORES) & set(TRAIN_CORES)
    assert not {q.lower() for q in held} & train_q
    assert not any(core in q.lower() for q in held for core in TRAIN_CORES)
    assert COURSE.named_in("Hi, I'm Nano.") and not COURSE.named_in("I am SmolLM, or nanotech") \
        and not COURSE.named_in("Nanobot")


def test_identity_share_counts_answers_naming_the_identity(trained):
    out, _ = trained
    cm = load_chat_model(str(out))
    res = identity_share(cm.model, cm.tok, cm.fmt, ["the cat", "the dog"], 6)
    assert res.n == 2 and res.accuracy == 0.0 and len(res.extra["answers"]) == 2  # it never learned a name


def test_make_identity_writes_the_files(tmp_path):
    make_identity.main(["--n", "7", "--heldout", "5", "--out_dir", str(tmp_path)])
    lines = (tmp_path / "identity_train.jsonl").read_text().splitlines()
    assert [json.loads(x) for x in lines] == identity_chats(7, 1337)
    assert len((tmp_path / "identity_heldout.jsonl").read_text().splitlines()) == 5
    assert "expected an integer > 0" in one_line_error(make_identity.main, ["--n=0"])


def test_evaluate_runs_the_identity_task_on_a_fine_tuned_model(trained):
    from phase2_finetuning.project4_sft import evaluate
    from phase2_finetuning.project4_sft.config import EvalConfig

    out, _ = trained
    cm = load_chat_model(str(out / "ckpt.pt"))
    res = evaluate.run_task("identity", cm.model, cm.tok, EvalConfig(tasks="identity", gen_limit=3, max_new_tokens=6),
                            cm.fmt)
    assert res.task == "identity" and res.n == 3 and res.accuracy == 0.0
    assert [a["question"] for a in res.extra["answers"]] == heldout_questions(3)
