"""generate.py end to end: every model format, chat with a kept cache, and one clear line for each bad input.

Run: uv run pytest -q phase3_core_inference/project8_kv_cache/test_generate.py
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from course.checkpoint import save_checkpoint
from course.errors import CourseError
from course.paths import REPO_ROOT
from phase1_foundation.project3_pretrain.hf_interop import export_hf
from phase1_foundation.project3_pretrain.loading import hub_download, load_model
from phase1_foundation.project3_pretrain.model import Llama, LlamaConfig
from phase3_core_inference.project8_kv_cache.download_data import DEST

SCRIPT = "phase3_core_inference/project8_kv_cache/generate.py"
DATA = DEST  # data/stories260k
needs_data = pytest.mark.skipif(not (DATA / "stories260K.bin").is_file(), reason="data/stories260k absent: run "
                                "phase3_core_inference/project8_kv_cache/download_data.py (or --source DIR)")


def run(*args, stdin: str | None = None) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, SCRIPT, *args], cwd=REPO_ROOT, capture_output=True, text=True, input=stdin,
                          timeout=120)


def one_line_error(proc: subprocess.CompletedProcess, match: str) -> None:
    assert proc.returncode == 2, proc.stderr
    lines = [ln for ln in proc.stderr.strip().splitlines() if ln.startswith("error:")]
    assert len(lines) == 1 and "Traceback" not in proc.stderr, proc.stderr
    assert match in lines[0], lines[0]


def tiny_hf_folder(tmp_path: Path, chat: bool = True) -> Path:
    """A tiny random Llama exported to HF layout, with a byte-level tokenizer.json and (optionally) a chat template."""
    from tokenizers import Tokenizer, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    trainer = trainers.BpeTrainer(vocab_size=300, special_tokens=["<|endoftext|>", "<|user|>", "<|assistant|>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tok.train_from_iterator(["hello world, how are you today? fine thanks"] * 10, trainer)
    torch.manual_seed(0)
    model = Llama(LlamaConfig(block_size=96, vocab_size=tok.get_vocab_size(), n_layer=2, n_head=4, n_kv_head=2,
                              n_embd=32, intermediate_size=64))
    folder = export_hf(model, tmp_path / "hf")
    tok.save(str(folder / "tokenizer.json"))
    tcfg = {"bos_token": "<|endoftext|>", "eos_token": "<|endoftext|>"}
    if chat:
        tcfg["chat_template"] = ("{% for m in messages %}{{ '<|' + m.role + '|>' + m.content }}{% endfor %}"
                                 "{% if add_generation_prompt %}<|assistant|>{% endif %}")
    (folder / "tokenizer_config.json").write_text(json.dumps(tcfg))
    return folder


@needs_data
def test_stories260k_cli_streams_reference_and_reports_speed():
    proc = run("--max_new_tokens", "40")
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.startswith("Once upon a time, there was a little girl named Lily.")
    assert "tok/s" in proc.stderr.splitlines()[-1]


@needs_data
def test_seed_reproduces_sampled_text():
    a = run("--prompt", "Tom had a dog", "--temperature", "1.0", "--top_k", "40", "--seed", "7", "--max_new_tokens", "30")
    b = run("--prompt", "Tom had a dog", "--temperature", "1.0", "--top_k", "40", "--seed", "7", "--max_new_tokens", "30")
    c = run("--prompt", "Tom had a dog", "--temperature", "1.0", "--top_k", "40", "--seed", "8", "--max_new_tokens", "30")
    assert a.returncode == 0 and a.stdout == b.stdout and a.stdout != c.stdout
    assert a.stdout.startswith("Tom had a dog")


def test_hf_folder_chat_keeps_the_cache_and_resets(tmp_path):
    folder = tiny_hf_folder(tmp_path)
    proc = run("--model", str(folder), "--chat", "--max_new_tokens", "5", stdin="hello\nhow are you\n/reset\nhello\n")
    assert proc.returncode == 0, proc.stderr
    summaries = [ln for ln in proc.stderr.splitlines() if "prefilled" in ln]
    assert len(summaries) == 3
    assert "(0 reused" in summaries[0] and "(0 reused" not in summaries[1]  # turn 2 only prefills what is new
    assert "(0 reused" in summaries[2]  # /reset emptied the cache
    # stdout: the banner, then after each `you> ` marker r1, r2, the reset note, r1 again (greedy: the same first
    # message after a reset gets the same reply), and the newline printed at EOF
    banner, r1, r2, note, r1_again, end = proc.stdout.split("you> ")
    assert banner.startswith("chat: ") and note == "(new conversation)\n" and end == "\n"
    assert r1.endswith("\n") and r1 == r1_again
    new = [ln.split(" new tokens")[0].rsplit(" ", 1)[1] for ln in summaries]
    assert new[0] == new[2]  # same reply length too (its text may be blank: random weights)


def test_ours_checkpoint_loads_and_bad_shapes_are_one_line(tmp_path):
    torch.manual_seed(0)
    cfg = LlamaConfig(block_size=32, vocab_size=64, n_layer=1, n_head=2, n_kv_head=1, n_embd=16, intermediate_size=32)
    model = Llama(cfg)
    save_checkpoint(tmp_path / "ckpt.pt", {"model_state_dict": model.state_dict(), "model_config": cfg.to_dict(),
                                           "arch": "llama", "iter": 1})
    loaded = load_model(str(tmp_path / "ckpt.pt"))
    assert loaded.kind == "ours" and torch.equal(loaded.model.tok_emb.weight, model.tok_emb.weight)
    bad = dict(cfg.to_dict(), n_embd=32)
    save_checkpoint(tmp_path / "bad.pt", {"model_state_dict": model.state_dict(), "model_config": bad, "arch": "llama"})
    with pytest.raises(CourseError, match="tensor 'tok_emb.weight' has shape"):
        load_model(str(tmp_path / "bad.pt"))
    one_line_error(run("--model", str(tmp_path / "bad.pt"), "--tokenizer", "x.pkl"), "has shape (64, 16)")


def test_project3_gpt_checkpoint_is_refused_clearly(tmp_path):
    from phase1_foundation.project3_pretrain.loading import build_model

    cfg = LlamaConfig(block_size=32, vocab_size=64, n_layer=1, n_head=2, n_kv_head=2, n_embd=16)
    gpt = build_model("gpt", cfg)
    save_checkpoint(tmp_path / "gpt.pt", {"model_state_dict": gpt.state_dict(), "model_config": cfg.to_dict(),
                                          "arch": "gpt"})
    with pytest.raises(CourseError, match="project 1's GPT"):
        load_model(str(tmp_path / "gpt.pt"))


def test_default_new_tokens_fit_a_small_context(tmp_path):
    """Without --max_new_tokens, a model with a 96-token context still generates (up to what fits)."""
    folder = tiny_hf_folder(tmp_path, chat=False)
    proc = run("--model", str(folder), "--prompt", "hello world")
    assert proc.returncode == 0, proc.stderr
    n = int(proc.stderr.split("done: ")[1].split(" tokens")[0])
    assert 0 < n <= 96


def test_llama2c_models_also_stop_at_bos():
    from types import SimpleNamespace

    from phase3_core_inference.project8_kv_cache.generate import stop_ids

    tok = SimpleNamespace(bos_id=1, eos_id=2)
    assert stop_ids(tok, "llama2c") == {1, 2} and stop_ids(tok, "hf") == {2}
    assert stop_ids(SimpleNamespace(bos_id=None, eos_id=None), "ours") == set()


def test_hf_folder_with_wrong_shapes_is_one_line(tmp_path):
    folder = tiny_hf_folder(tmp_path, chat=False)
    cfg = json.loads((folder / "config.json").read_text())
    cfg["intermediate_size"] = 80
    (folder / "config.json").write_text(json.dumps(cfg))
    one_line_error(run("--model", str(folder), "--prompt", "hi"), "has shape")


@pytest.mark.slow  # eight real processes (~60 s); test_scripts.py checks the same faults in-process by default
def test_bad_inputs_are_one_clear_line(tmp_path):
    folder = tiny_hf_folder(tmp_path, chat=False)
    one_line_error(run("--model", str(tmp_path / "nope.pt")), "not found")
    (tmp_path / "weights.xyz").write_bytes(b"123")
    one_line_error(run("--model", str(tmp_path / "weights.xyz")), "unknown model format")
    (tmp_path / "junk.bin").write_bytes(b"\x00" * 64)
    one_line_error(run("--model", str(tmp_path / "junk.bin")), "does not look like a llama2.c model")
    one_line_error(run("--model", str(folder), "--chat"), "has no chat template")
    one_line_error(run("--model", str(folder), "--prompt", "hello " * 200), "context window")
    one_line_error(run("--model", str(folder), "--prompt", "hi", "--max_new_tokens", "500"), "lower --max_new_tokens")
    one_line_error(run("--model", str(folder), "--top_p", "0"), "top_p")


def test_truncated_llama2c_file_is_one_line(tmp_path):
    import struct
    (tmp_path / "m.bin").write_bytes(struct.pack("<7i", 64, 172, 5, 8, 4, 512, 512) + b"\x00" * 4000)
    one_line_error(run("--model", str(tmp_path / "m.bin"), "--tokenizer", str(tmp_path / "t.bin")), "truncated")


def test_hub_id_offline_is_one_line(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(CourseError, match="could not download 'karpathy/no-such-model'"):
        hub_download("karpathy/no-such-model")


@pytest.mark.slow
def test_benchmark_quick_runs_and_writes_results(tmp_path):
    proc = subprocess.run([sys.executable, "phase3_core_inference/project8_kv_cache/benchmark.py", "--quick",
                           "--out_dir", str(tmp_path)], cwd=REPO_ROOT, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr
    results = json.loads((tmp_path / "benchmark_quick.json").read_text())
    assert results["hf"][0]["same_tokens"] and results["cache"][-1]["speedup"] > 1
    assert all(r["same_tokens"] for r in results["cache"]) and results["cache"][0]["mode"] == "eager"
    assert len(results["hf"][0]["floor_tokens"]) == 3  # --quick pairs 3 decode steps with bandwidth samples
    assert (tmp_path / "kv_cache_speedup.png").stat().st_size > 1000


if __name__ == "__main__":
    from course.cli import run_demo

    run_demo(lambda: print("this file holds only tests: uv run pytest -q " + __file__), __doc__)
