"""Project 13's benchmark as a user meets it: `--help`, bad flags in one `error:` line, and a quick run end to end on
a tiny GGUF model written here (a trace of random prompts: no data needed).

Run: uv run pytest -q phase4_advanced_inference/project13_paged_attention/test_scripts.py
"""

from __future__ import annotations

import json
import random
from pathlib import Path

import pytest

from course.clitest import assert_help_works, one_line_error
from phase1_foundation.project3_pretrain.gguf_testing import tiny_gguf_llama, write_gguf
from phase4_advanced_inference.project12_continuous_batching import workload
from phase4_advanced_inference.project12_continuous_batching.request import Request
from phase4_advanced_inference.project13_paged_attention import benchmark

HERE = "phase4_advanced_inference/project13_paged_attention"


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    from gguf import GGMLQuantizationType as T

    root = tmp_path_factory.mktemp("p13")
    model = write_gguf(root / "tiny.gguf", tiny_gguf_llama(), T.F32)
    rng = random.Random(1)
    reqs = [Request([rng.randrange(3, 300) for _ in range(rng.randint(2, 40))], rng.randint(1, 20), seed=i)
            for i in range(12)]
    return {"model": str(model), "trace": str(workload.save_trace(reqs, root / "trace.jsonl")), "out": str(root)}


def test_help():
    assert_help_works(f"{HERE}/benchmark.py", "--block_size")


BAD = [
    (["--block_size=0"], "block_size (0) must be > 0"),
    (["--kv_budget_tokens=100", "--max_len=512"], "kv_budget_tokens (100) must hold at least one row"),
    (["--n_samples=0"], "n_samples (0) must be > 0"),
]


@pytest.mark.parametrize("argv,fragment", BAD, ids=[" ".join(a) for a, _ in BAD])
def test_bad_input_is_one_line(argv, fragment, files):
    assert fragment in one_line_error(benchmark.main, argv, files)


def test_benchmark_quick_end_to_end(files):
    out = Path(files["out"], "bench")
    benchmark.main([f"--model={files['model']}", f"--trace={files['trace']}", "--quick", "--max_len=128",
                    "--kv_budget_tokens=256", "--paged_rows=8", "--block_size=4", "--max_batch_tokens=32",
                    f"--out_dir={out}"])
    res = json.loads((out / "benchmark.json").read_text())
    waste = res["KV memory waste"]
    assert waste["paged"]["waste_mean"] < waste["contiguous"]["waste_mean"]
    budget = res["A fixed KV budget of 256 tokens"]
    assert budget["paged"]["rows_max"] > budget["contiguous"]["rows_max"] == 2  # more requests fit the same bytes
    par = res["Parallel sampling"]
    assert par["shared"] < par["copies"]
    assert "12/12" in (out / "benchmark.md").read_text()  # the paged engine's replies equal the contiguous ones


if __name__ == "__main__":
    from course.cli import run_demo

    run_demo(lambda: print("this file holds only tests: uv run pytest -q " + __file__), __doc__)
