"""Project 12's commands as a user meets them: `--help`, bad flags and files in one `error:` line, serve_workload.py
and the benchmark end to end on a tiny GGUF model written here (a trace of random prompts: no data needed).

Run: uv run pytest -q phase4_advanced_inference/project12_continuous_batching/test_scripts.py
"""

from __future__ import annotations

import json
import random
from pathlib import Path

import pytest

from course.clitest import assert_help_works, one_line_error
from phase1_foundation.project3_pretrain.gguf_testing import tiny_gguf_llama, write_gguf
from phase4_advanced_inference.project12_continuous_batching import benchmark, serve_workload, workload
from phase4_advanced_inference.project12_continuous_batching.request import Request

HERE = "phase4_advanced_inference/project12_continuous_batching"


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    from gguf import GGMLQuantizationType as T

    root = tmp_path_factory.mktemp("p12")
    model = write_gguf(root / "tiny.gguf", tiny_gguf_llama(), T.F32)
    rng = random.Random(0)
    reqs = [Request([rng.randrange(3, 300) for _ in range(rng.randint(2, 30))], rng.randint(1, 16),
                    arrival=0.01 * i, seed=i) for i in range(10)]
    trace = workload.save_trace(reqs, root / "trace.jsonl")
    bad = root / "bad.jsonl"
    bad.write_text('{"prompt": [1, 2]}\n')
    return {"model": str(model), "trace": str(trace), "bad": str(bad), "out": str(root / "out")}


@pytest.mark.parametrize("script", ["serve_workload.py", "benchmark.py"])
def test_help(script):
    assert_help_works(f"{HERE}/{script}", "--max_batch_tokens")


BAD = [
    (["--max_rows=0"], "max_rows (0) must be > 0"),
    (["--max_rows=8", "--max_batch_tokens=4"], "max_batch_tokens (4) must be >= max_rows (8)"),
    (["--policy=fastest"], "policy ('fastest') must be one of: continuous, static"),
    (["--rate=0"], "rate (0.0) must be > 0"),
    (["--temperature=-1"], "temperature (-1.0) must be >= 0"),
    (["--mean_output=0"], "mean_output (0.0) must be >= 1"),
    (["--model=data/smollm2/SmolLM2-360M.gguf"], "get it with: uv run python phase3_core_inference/project8_kv_cache/"
                                                "download_model.py"),
    (["--model={model}", "--trace={out}/missing.jsonl"], "trace not found"),
    (["--model={model}", "--trace={bad}"], "line 1: not a request"),
]


@pytest.mark.parametrize("argv,fragment", BAD, ids=[" ".join(a) for a, _ in BAD])
def test_bad_input_is_one_line(argv, fragment, files):
    assert fragment in one_line_error(serve_workload.main, argv, files)


def test_benchmark_bad_parts_is_one_line(files):
    assert "--parts must be" in one_line_error(benchmark.main, ["--parts=methods,magic"], files)


def test_serve_workload_end_to_end_equals_solo(files, capsys):
    serve_workload.main([f"--model={files['model']}", f"--trace={files['trace']}", "--max_rows=3",
                         "--max_batch_tokens=8", "--check", "--show=1", "--device=cpu",
                         f"--save_trace={files['out']}/again.jsonl"])
    out = capsys.readouterr().out
    assert "continuous: 10/10 requests" in out and "check: 10/10 requests identical" in out
    again = workload.load_trace(f"{files['out']}/again.jsonl")
    assert [r.prompt for r in again] == [r.prompt for r in workload.load_trace(files["trace"])]


def test_benchmark_quick_end_to_end(files, capsys):
    pytest.importorskip("transformers", reason="transformers (dev group) is needed for the hf part")
    out_dir = Path(files["out"], "bench")
    benchmark.main([f"--model={files['model']}", f"--trace={files['trace']}", "--quick", "--max_rows=4",
                    "--max_batch_tokens=16", "--parts=methods,packed,hf", f"--out_dir={out_dir}"])
    res = json.loads((out_dir / "benchmark.json").read_text())
    assert set(res["methods"]["runs"]) == {"sequential", "static", "continuous"}
    assert res["offline"]["hf"]["identical"] == 10  # transformers' continuous batching gives the same replies
    md = (out_dir / "benchmark.md").read_text()
    assert "| continuous |" in md and "10/10" in md


if __name__ == "__main__":
    from course.cli import run_demo

    run_demo(lambda: print("this file holds only tests: uv run pytest -q " + __file__), __doc__)
