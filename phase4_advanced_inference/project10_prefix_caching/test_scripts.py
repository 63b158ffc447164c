"""Project 10's commands as a user meets them: `--help`, bad flags and files in one `error:` line, and both scripts
end to end on a tiny GGUF model (written here, with a chat template) and a few made-up MMLU subjects.

Run: uv run pytest -q phase4_advanced_inference/project10_prefix_caching/test_scripts.py
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from course.clitest import assert_help_works, one_line_error
from phase1_foundation.project3_pretrain.gguf_testing import tiny_gguf_llama, write_gguf
from phase4_advanced_inference.project10_prefix_caching import benchmark, evaluate_mmlu

HERE = "phase4_advanced_inference/project10_prefix_caching"
SUBJECTS = ["miscellaneous", "alpha_facts", "beta_facts", "gamma_facts", "delta_facts"]


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    """A tiny GGUF chat model and a data folder with five MMLU subjects (5 dev, 12 test questions each)."""
    from gguf import GGMLQuantizationType as T

    root = tmp_path_factory.mktemp("p10")
    for split, n in (("dev", 5), ("test", 12)):
        (root / "mmlu" / split).mkdir(parents=True)
        for s in SUBJECTS:
            rows = [f'"Which {s} fact number {k} holds?",one,two,three,four,{"ABCD"[k % 4]}' for k in range(n)]
            (root / "mmlu" / split / f"{s}_{split}.csv").write_text("\n".join(rows) + "\n")
    model = write_gguf(root / "tiny.gguf", tiny_gguf_llama(), T.F32)
    text = root / "notes.txt"
    text.write_text("notes\n")
    return {"model": str(model), "data": str(root), "text": str(text), "out": str(root / "out")}


@pytest.mark.parametrize("script", ["evaluate_mmlu.py", "benchmark.py"])
def test_help(script):
    assert_help_works(f"{HERE}/{script}", "--prefix_cache_mb")


EVAL_BAD = [
    (["--prefix_cache_mb=0"], "prefix_cache_mb (0.0) must be > 0"),
    (["--prefix_cache_mb=-2"], "prefix_cache_mb (-2.0) must be > 0"),
    (["--prefix_cache_mb=nan"], "prefix_cache_mb (nan) must be a finite number"),
    (["--store=lru"], "store ('lru') must be one of: radix, block"),
    (["--block_size=0"], "block_size (0) must be > 0"),
    (["--limit=0"], "limit (0) must be > 0"),
    (["--shots=6"], "shots (6) must be in [0, 5]"),
    (["--subjects=,"], "subjects (',') must name at least one MMLU subject"),
    (["--data_dir={data}", "--subjects=omega_facts"], "unknown MMLU subject(s): omega_facts"),
    (["--data_dir={out}/none"], "fetch it with: uv run python phase2_finetuning/project4_sft/download_data.py"),
    (["--data_dir={data}", "--subjects=alpha_facts", "--model={out}/missing.gguf"], "model not found"),
    (["--data_dir={data}", "--subjects=alpha_facts", "--model={text}"], "unknown model format"),
]


@pytest.mark.parametrize("argv,fragment", EVAL_BAD, ids=[" ".join(a) for a, _ in EVAL_BAD])
def test_evaluate_mmlu_bad_input_is_one_line(argv, fragment, files):
    assert fragment in one_line_error(evaluate_mmlu.main, argv, files)


BENCH_BAD = [
    (["--prefix_cache_mb=0"], "argument --prefix_cache_mb: expected a number in (0, inf]"),
    (["--parts=shared,speed"], "argument --parts: expected a comma-separated list of shared,chat,mmlu,budget"),
    (["--budget_fractions=0.5,-1"], "argument --budget_fractions: expected comma-separated numbers > 0"),
    (["--questions=0"], "argument --questions: expected an integer > 0"),
    (["--turns=11"], "--turns (11) must be at most 10"),
    (["--device=cuda"], "benchmark.py measures the CPU only"),
    (["--model={text}"], "unknown model format"),
]


@pytest.mark.parametrize("argv,fragment", BENCH_BAD, ids=[" ".join(a) for a, _ in BENCH_BAD])
def test_benchmark_bad_input_is_one_line(argv, fragment, files):
    assert fragment in one_line_error(benchmark.main, argv, files)


def test_evaluate_mmlu_end_to_end(files, capsys):
    evaluate_mmlu.main([f"--model={files['model']}", f"--data_dir={files['data']}", "--subjects=alpha_facts,beta_facts",
                        "--limit=8", f"--out={files['out']}/mmlu", "--prefix_cache_mb=4"])
    out = capsys.readouterr().out
    summary = out.strip().splitlines()[-1]  # the last line
    assert summary.startswith("summary: MMLU 5-shot, 8 questions of 2 subject(s)") and "picks identical" in summary
    report = json.loads(Path(files["out"], "mmlu.json").read_text())
    without, cached = report["results"]
    assert without["extra"]["picks"] == cached["extra"]["picks"] and report["meta"]["picks_differ"] == 0
    assert cached["extra"]["prefix_cache"]["hit_rate"] > 0.5  # 4 questions per subject behind one 5-shot block


def test_benchmark_quick_end_to_end(files, capsys):
    benchmark.main([f"--model={files['model']}", f"--data_dir={files['data']}", "--quick",
                    "--mmlu_subjects=alpha_facts,beta_facts", "--sweep_subjects=alpha_facts,beta_facts,gamma_facts",
                    f"--out_dir={files['out']}/bench", "--check"])
    out = capsys.readouterr().out
    assert "summary: ran" in out and "target MMLU accuracy identical" in out
    bench = Path(files["out"], "bench")
    res = json.loads((bench / "benchmark_quick.json").read_text())
    assert set(res) >= {"shared", "chat", "mmlu", "budget"}
    radix = res["shared"]["rows"][1]
    assert radix["same_outputs"] == radix["requests"] and radix["hit_rate"] > 0
    assert res["chat"]["rows"][2]["same_outputs"] == res["chat"]["rows"][2]["turns"]
    assert res["mmlu"]["picks_differ"] == 0
    assert (bench / "budget_hit_rate.png").read_bytes()[:4] == b"\x89PNG" and (bench / "budget_ttft.png").is_file()
    assert "Budget sweep" in (bench / "benchmark_quick.md").read_text()


if __name__ == "__main__":
    from course.cli import run_demo

    run_demo(lambda: print("this file holds only tests: uv run pytest -q " + __file__), __doc__)
