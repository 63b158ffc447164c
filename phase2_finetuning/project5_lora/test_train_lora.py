"""Tests of train_lora.py and benchmark.py on a tiny base: LoRA and QLoRA runs learn through project 4's loop, the
saved adapter is the trained model, a Ctrl-C + --resume equals one uninterrupted run, --merge writes an HF folder
that project 3's loader and transformers read with the same logits, the benchmark's quick mode fills its table,
and bad flags are one line.

    uv run pytest phase2_finetuning/project5_lora/test_train_lora.py -q          (-m slow: the benchmark's processes)
"""

from __future__ import annotations

import contextlib
import io
import json
import random

import pytest
import torch

from course.clitest import one_line_error
from phase1_foundation.project2_tokenizer.formats import save_tokenizer
from phase1_foundation.project2_tokenizer.tokenizer import RegexTokenizer
from phase1_foundation.project3_pretrain.loading import load_model
from phase1_foundation.project3_pretrain.testing import tiny_llama
from phase2_finetuning.project4_sft import loop
from phase2_finetuning.project4_sft.sft import prepare_base
from phase2_finetuning.project5_lora import benchmark, train_lora
from phase2_finetuning.project5_lora.config import LoRAConfig
from phase2_finetuning.project5_lora.lora import inject_lora, load_adapter, lora_layers
from phase2_finetuning.project5_lora.nf4 import quantize_model
from phase2_finetuning.project5_lora.peft_io import CONFIG_NAME, WEIGHTS_NAME

WORDS = ["the", "cat", "sat", "on", "a", "mat", "and", "the", "dog", "ran", "to", "the", "red", "barn", "while", "rain",
         "fell", "on", "a", "green", "hill"]


@pytest.fixture(scope="module")
def base(tmp_path_factory):
    """A tiny 'project 3' checkpoint (project 2 tokenizer, no chat tokens) and six chats. The classifier gets a
    pretrained-like scale (std 0.2, not the init's 0.02): LoRA leaves it frozen, and a classifier of
    near-zero logits could not express any answer, however the adapters moved the hidden states."""
    d = tmp_path_factory.mktemp("base")
    tok = RegexTokenizer("gpt4")
    tok.train(" ".join(WORDS * 30) + " user assistant system\n", 290)
    tok.register_special_tokens(["<|endoftext|>"])
    save_tokenizer(tok, d / "tokenizer.pkl")
    model = tiny_llama(seed=3, vocab_size=tok.n_vocab, block_size=64)
    with torch.no_grad():
        model.lm_head.weight.normal_(0, 0.2, generator=torch.Generator().manual_seed(0))
    torch.save({"iter": 0, "model_state_dict": model.state_dict(), "model_config": model.config.to_dict(),
                "arch": "llama", "data_meta": {"tokenizer": str(d / "tokenizer.pkl")}}, d / "ckpt.pt")
    rng = random.Random(0)
    chats = [{"instruction": " ".join(rng.choice(WORDS) for _ in range(4)), "input": "",
              "output": " ".join(rng.choice(WORDS) for _ in range(rng.randint(2, 5)))} for _ in range(6)]
    (d / "chats.json").write_text(json.dumps(chats))
    return d


def _cfg(base, out, **kw) -> LoRAConfig:
    values = {"base": str(base / "ckpt.pt"), "data": f"alpaca:{base / 'chats.json'}", "max_chats": None,
              "heldout": 1, "batch_size": 5, "block_size": 64, "max_iters": 40, "learning_rate": 1.5e-2,
              "min_lr": 1.5e-3, "warmup_iters": 2, "eval_interval": 20, "log_interval": 1, "gen_samples": 1,
              "gen_budget": 4, "out_dir": str(out), "device": "cpu", "threads": 1, "target_modules": "all-linear",
              "r": 4, "lora_alpha": 32.0}
    return LoRAConfig(**{**values, **kw}).validate_config()


def _quiet(fn, *a, **kw):
    with contextlib.redirect_stdout(io.StringIO()):
        return fn(*a, **kw)


def _losses(out) -> list[float]:
    return [json.loads(line)["loss"] for line in open(out / "log.jsonl") if '"train"' in line]


@pytest.fixture(scope="module")
def trained(base, tmp_path_factory):
    out = tmp_path_factory.mktemp("lora")
    return out, _quiet(train_lora.train, _cfg(base, out), seed=1, progress=False, merge=True)


def _model_from_adapter(base, out, method="lora"):
    """A fresh base (as train_lora prepares it) with the saved adapter loaded through the peft-layout reader."""
    cm = prepare_base(str(base / "ckpt.pt"))
    if method == "qlora":
        quantize_model(cm.model)
    load_adapter(cm.model, out)
    return cm.model.eval()


def test_a_lora_run_learns_and_saves_the_adapter_in_peft_layout(trained, base):
    out, summary = trained
    losses = _losses(out)
    assert losses[-1] < 0.6 * losses[0], losses
    # r * (in + out) summed over the 7 linears of a block (in: 6 * 32 + 64, out: 32+16+16+32+64+64+32), 2 blocks
    assert summary["trainable_params"] == 2 * 4 * (256 + 256)
    # AdamW: exp_avg and exp_avg_sq (float32) per adapter weight, and a float32 step per tensor (A, B of 14 layers)
    assert summary["optimizer_state_bytes"] == 8 * summary["trainable_params"] + 4 * 28
    cfg = json.loads((out / CONFIG_NAME).read_text())
    assert cfg["r"] == 4 and cfg["lora_alpha"] == 32 and len(cfg["target_modules"]) == 7
    assert (out / WEIGHTS_NAME).is_file() and (out / "loss.png").is_file() and (out / "tokenizer_config.json").is_file()


def test_the_saved_adapter_is_the_trained_model(trained, base):
    out, _ = trained
    model = _model_from_adapter(base, out)
    state = torch.load(out / train_lora.STATE, weights_only=False)
    for n, m in lora_layers(model).items():
        assert torch.equal(m.lora_A, state["adapters"][f"{n}.A"]) and torch.equal(m.lora_B, state["adapters"][f"{n}.B"])
    assert any(m.lora_B.abs().sum() > 0 for m in lora_layers(model).values())


def test_merge_writes_an_hf_folder_with_the_lora_models_logits(trained, base):
    out, summary = trained
    lora_model = _model_from_adapter(base, out)
    merged = load_model(summary["merged"])
    assert merged.kind == "hf" and (out / "merged" / "tokenizer.pkl").is_file()
    idx = torch.randint(0, lora_model.config.vocab_size, (2, 16))
    # the tiny run trains hard (lr 1.5e-2, scale 8): its updates are ~100x test_lora's, and so is the float32
    # rounding of W + scale * B A against W x + scale * B (A x); 3e-5 on logits of size ~5
    with torch.no_grad():
        ref = lora_model(idx)[0]
        torch.testing.assert_close(merged.model(idx)[0], ref, rtol=1e-5, atol=3e-5)
        transformers = pytest.importorskip("transformers")
        hf = transformers.LlamaForCausalLM.from_pretrained(out / "merged", attn_implementation="eager").eval()
        torch.testing.assert_close(hf(idx).logits, ref, rtol=1e-5, atol=3e-5)


def test_a_qlora_run_learns_on_an_nf4_base_and_merges_to_the_same_logits(base, tmp_path):
    summary = _quiet(train_lora.train, _cfg(base, tmp_path, method="qlora"), seed=1, progress=False, merge=True)
    losses = _losses(tmp_path)
    assert losses[-1] < 0.5 * losses[0], losses
    assert summary["nf4_bytes_per_param"] <= 0.6
    qlora_model = _model_from_adapter(base, tmp_path, "qlora")
    idx = torch.randint(0, qlora_model.config.vocab_size, (2, 16))
    with torch.no_grad():
        torch.testing.assert_close(load_model(summary["merged"]).model(idx)[0], qlora_model(idx)[0],
                                   rtol=1e-5, atol=3e-5)


def test_ctrl_c_then_resume_equals_one_uninterrupted_run(base, tmp_path, monkeypatch, capsys):
    kw = {"max_iters": 8, "eval_interval": 4, "gen_samples": 0, "lora_dropout": 0.1}  # dropout: RNG must resume too
    whole = _quiet(train_lora.train, _cfg(base, tmp_path / "a", **kw), seed=2, progress=False)
    real = loop.cosine_lr

    def interrupt_at_6(it, *a):
        if it == 6:
            raise KeyboardInterrupt
        return real(it, *a)

    monkeypatch.setattr(loop, "cosine_lr", interrupt_at_6)
    with pytest.raises(KeyboardInterrupt):
        train_lora.train(_cfg(base, tmp_path / "b", **kw), seed=2, progress=False)
    assert "--resume --out_dir" in capsys.readouterr().out
    monkeypatch.setattr(loop, "cosine_lr", real)
    resumed = _quiet(train_lora.train, _cfg(base, tmp_path / "b", **kw), resume=True, progress=False)
    assert resumed["iters"] == whole["iters"] == 8
    a = torch.load(tmp_path / "a" / train_lora.STATE, weights_only=False)["adapters"]
    b = torch.load(tmp_path / "b" / train_lora.STATE, weights_only=False)["adapters"]
    for k in a:
        assert torch.equal(a[k], b[k]), k
    assert _losses(tmp_path / "a") == _losses(tmp_path / "b")


def test_an_injected_but_untrained_adapter_model_is_the_base(base):
    cm = prepare_base(str(base / "ckpt.pt"))
    idx = torch.randint(0, cm.model.config.vocab_size, (2, 8))
    with torch.no_grad():
        ref = cm.model(idx)[0]
        inject_lora(cm.model, "all-linear", r=4)
        assert torch.equal(cm.model(idx)[0], ref)


# ---- the benchmark -------------------------------------------------------------------------------------------
def test_benchmark_quick_fills_the_table(base, tmp_path):
    argv = ["--quick", "--in_process", "--no_progress", "--base", str(base / "ckpt.pt"), "--data",
            f"alpaca:{base / 'chats.json'},identity", "--heldout", "1", "--threads", "1", "--eval_tasks", "",
            "--out", str(tmp_path / "bench")]
    result = _quiet(benchmark.main, argv)
    rows = {r["method"]: r for r in result["rows"]}
    assert set(rows) == {"full", "lora", "qlora"}
    assert rows["full"]["trainable_params"] == rows["full"]["total_params"]
    assert rows["lora"]["trainable_params"] == rows["qlora"]["trainable_params"] < rows["full"]["trainable_params"]
    assert rows["lora"]["optimizer_state_bytes"] < rows["full"]["optimizer_state_bytes"]
    assert rows["qlora"]["nf4_bytes"] == rows["qlora"]["nf4_bytes_computed"] and rows["qlora"]["nf4_bytes_per_param"] <= 0.6
    assert all(r["tokens_per_s"] > 0 and r["peak_rss"] > 0 for r in rows.values())
    md = (tmp_path / "bench.md").read_text()
    assert "| QLoRA (NF4 base + LoRA) |" in md and "bytes/weight measured" in md
    assert json.loads((tmp_path / "bench.json").read_text())["quick"] is True
    # --reuse: the kept rows come back as they were; a changed setting measures that row again
    again = _quiet(benchmark.main, argv + ["--reuse", "--methods", "lora"])
    assert again["rows"] == [rows["lora"]] and again["base"] == result["base"]
    changed = _quiet(benchmark.main, argv + ["--reuse", "--methods", "lora", "--r", "2"])["rows"][0]
    assert changed["trainable_params"] < rows["lora"]["trainable_params"]


@pytest.mark.slow
def test_benchmark_runs_each_method_in_its_own_process(base, tmp_path):
    argv = ["--quick", "--base", str(base / "ckpt.pt"), "--data", f"alpaca:{base / 'chats.json'}", "--heldout", "1",
            "--threads", "1", "--methods", "lora,qlora", "--eval_tasks", "", "--out", str(tmp_path / "bench")]
    rows = _quiet(benchmark.main, argv)["rows"]
    assert [r["method"] for r in rows] == ["lora", "qlora"] and all(r["load_peak_rss"] > 0 for r in rows)


# ---- bad input: one line each --------------------------------------------------------------------------------
@pytest.mark.parametrize("argv,fragment", [
    (["--r=0"], "r (0) must be > 0"), (["--r=x"], "invalid int value"),
    (["--lora_dropout=1.0"], "lora_dropout (1.0) must be in [0.0, 1.0)"),
    (["--lora_alpha=nan"], "lora_alpha (nan) must be a finite number"), (["--method=dora"], "method ('dora')"),
    (["--nf4_blocksize=3"], "nf4_blocksize (3) must be a positive even number"),
    (["--target_modules=x_proj"], "'x_proj' matches no linear layer"),
    (["--target_modules=q_proj", "--r=40"], "must be <= min(in, out) = 32 of layer layers.0.attn.wq"),
    (["--resume"], "nothing to resume"), (["--resume", "--r=4"], "drop --r"),
    (["--resume", "--preset=cpu"], "drop --preset"), (["--out_dir={file}"], "is a file"),
])
def test_train_lora_bad_input_is_one_line(base, tmp_path, argv, fragment):
    (tmp_path / "file").write_text("x")
    given = {a.split("=")[0] for a in argv}
    common = [] if "--resume" in given else [f"--base={base / 'ckpt.pt'}", f"--data=alpaca:{base / 'chats.json'}",
                                             "--device=cpu", "--gen_samples=0", "--max_iters=1", "--heldout=1"]
    common += [] if "--out_dir" in given else [f"--out_dir={tmp_path / 'out'}"]
    assert fragment in one_line_error(train_lora.main, argv + common, fill={"file": tmp_path / "file"})


@pytest.mark.parametrize("argv,fragment", [
    (["--methods=full,dora"], "methods ('full,dora')"), (["--eval_tasks=gsm8k"], "eval_tasks ('gsm8k')"),
    (["--method=qlora"], "choose them with --methods"), (["--eval_limit=0"], "eval_limit (0) must be > 0"),
    (["--full_learning_rate=-1"], "full_learning_rate (-1.0) must be > 0"), (["--out={dir}"], "is a folder"),
])
def test_benchmark_bad_input_is_one_line(tmp_path, argv, fragment):
    assert fragment in one_line_error(benchmark.main, argv, fill={"dir": tmp_path})


@pytest.mark.parametrize("main", [train_lora.main, benchmark.main], ids=["train_lora", "benchmark"])
def test_help_prints_the_docstring_and_exits_0(main):
    out = io.StringIO()
    with contextlib.redirect_stdout(out), pytest.raises(SystemExit) as e:
        main(["--help"])
    assert e.value.code == 0 and out.getvalue().startswith("usage:") and "--lora_alpha" in out.getvalue()
