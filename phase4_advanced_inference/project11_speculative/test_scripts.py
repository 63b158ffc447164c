"""Project 11's commands as a user meets them: `--help`, bad flags and files in one `error:` line, generate.py with
every drafter and the benchmark end to end on a tiny GGUF model written here (with a chat template).

Run: uv run pytest -q phase4_advanced_inference/project11_speculative/test_scripts.py
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from course.clitest import assert_help_works, one_line_error
from phase1_foundation.project3_pretrain.gguf_testing import tiny_gguf_llama, write_gguf
from phase1_foundation.project3_pretrain.testing import tiny_llama
from phase4_advanced_inference.project11_speculative import benchmark, generate

HERE = "phase4_advanced_inference/project11_speculative"


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    from gguf import GGMLQuantizationType as T

    root = tmp_path_factory.mktemp("p11")
    model = write_gguf(root / "tiny.gguf", tiny_gguf_llama(), T.F32)
    draft = write_gguf(root / "draft.gguf", tiny_gguf_llama(seed=4), T.F32)
    other = write_gguf(root / "other.gguf", tiny_llama(seed=5, vocab_size=320, n_embd=256, intermediate_size=512,
                                                        block_size=512), T.F32)
    text = root / "notes.txt"
    text.write_text("notes\n")
    return {"model": str(model), "draft": str(draft), "other": str(other), "text": str(text), "out": str(root / "out")}


@pytest.mark.parametrize("script", ["generate.py", "benchmark.py"])
def test_help(script):
    assert_help_works(f"{HERE}/{script}", "--k")


GENERATE_BAD = [
    (["--k=0"], "k (0) must be >= 1"),
    (["--k=-3"], "k (-3) must be >= 1"),
    (["--k=two"], "argument --k: invalid int value: 'two'"),
    (["--k=4", "--k_max=2"], "k_max (2) must be >= k (4)"),
    (["--speculative=medusa"], "speculative ('medusa') must be one of: lookup, self, model, none"),
    (["--speculative=model"], "--speculative model needs --draft PATH"),
    (["--draft={draft}"], "--draft is only used by --speculative model (not lookup)"),
    (["--min_ngram=3", "--max_ngram=2"], "must satisfy 1 <= min_ngram <= max_ngram"),
    (["--max_new_tokens=0"], "max_new_tokens (0) must be >= 1"),
    (["--temperature=-1"], "temperature (-1.0) must be >= 0"),
    (["--top_p=0"], "top_p (0.0) must be in (0, 1]"),
    (["--prompt=caf\udce9"], "--prompt is not valid UTF-8 text"),
    (["--model=data/smollm2/SmolLM2-360M.gguf"], "get it with: uv run python phase3_core_inference/project8_kv_cache/"
                                                "download_model.py"),
    (["--model={text}"], "unknown model format"),
    (["--model={model}", "--speculative=model", "--draft={out}/missing.gguf"], "draft model not found"),
    (["--model={model}", "--speculative=model", "--draft={other}"], "the draft model has a vocabulary of 320 tokens, "
                                                                    "the target 300"),
    (["--model={model}", "--speculative=self", "--draft_layers=0-9"], "must name layers in 0..1"),
    (["--model={model}", "--speculative=self", "--draft_layers=0-1"], "the draft would be the target itself"),
    (["--model={model}", "--prompt=hi", "--max_new_tokens=600"], "lower --max_new_tokens to at most"),
]


@pytest.mark.parametrize("argv,fragment", GENERATE_BAD, ids=[" ".join(a) for a, _ in GENERATE_BAD])
def test_generate_bad_input_is_one_line(argv, fragment, files):
    assert fragment in one_line_error(generate.main, argv, files)


@pytest.mark.parametrize("extra", [["--speculative=lookup"], ["--speculative=self", "--draft_layers=0"],
                                   ["--speculative=model", "--draft={draft}", "--k=3", "--adaptive"],
                                   ["--speculative=none"]], ids=["lookup", "self", "model", "none"])
def test_generate_end_to_end_greedy_equals_plain(extra, files, capsys):
    generate.main([f"--model={files['model']}", "--chat", "--prompt=say hello hello hello", "--max_new_tokens=20",
                   "--compare", "--device=cpu"] + [a.format(**files) for a in extra])
    err = capsys.readouterr().err
    assert "greedy output identical to plain decoding" in err
    if "none" not in extra[0]:
        assert "tokens per target forward" in err


def test_generate_sampled_runs(files, capsys):
    generate.main([f"--model={files['model']}", "--prompt=abc", "--max_new_tokens=10", "--temperature=0.8",
                   "--top_p=0.9", "--compare", "--device=cpu"])
    assert "sampled (compared in distribution only)" in capsys.readouterr().err


BENCH_BAD = [
    (["--k=0"], "argument --k: expected an integer > 0"),
    (["--tasks=chat,poems"], "argument --tasks: expected a comma-separated list of grounded,chat,code"),
    (["--temperatures=0,-1"], "argument --temperatures: expected a number in [0, inf], got '-1'"),
    (["--sweep_k=1,0"], "argument --sweep_k: expected comma-separated integers > 0"),
    (["--per_task=5"], "--per_task (5) must be at most 4"),
    (["--device=cuda"], "benchmark.py measures the CPU only"),
    (["--model={text}"], "unknown model format"),
    (["--model={model}", "--draft_layers=0-7"], "must name layers in 0..1"),
]


@pytest.mark.parametrize("argv,fragment", BENCH_BAD, ids=[" ".join(a) for a, _ in BENCH_BAD])
def test_benchmark_bad_input_is_one_line(argv, fragment, files):
    assert fragment in one_line_error(benchmark.main, argv, files)


def test_benchmark_quick_end_to_end(files, capsys):
    benchmark.main([f"--model={files['model']}", "--quick", f"--out_dir={files['out']}/bench", "--check"])
    out = capsys.readouterr().out
    assert "summary: ran" in out and "target identical greedy output: 1/1: met" in out
    bench = Path(files["out"], "bench")
    res = json.loads((bench / "benchmark_quick.json").read_text())
    greedy = res["main"]["tables"]["grounded T=0"]
    assert [r["peer"].split()[0] for r in greedy] == ["plain", "lookup", "lookup", "self", "hf", "hf", "hf"]
    assert all(r["same_outputs"] == 1 for r in greedy)  # every peer, HF's included, decodes greedy identically
    assert set(res["main"]["tables"]) == {f"{t} T={x}" for t in ("grounded", "chat", "code") for x in ("0", "0.7")}
    assert (bench / "speedup_vs_k_quick.png").read_bytes()[:4] == b"\x89PNG"


if __name__ == "__main__":
    from course.cli import run_demo

    run_demo(lambda: print("this file holds only tests: uv run pytest -q " + __file__), __doc__)
