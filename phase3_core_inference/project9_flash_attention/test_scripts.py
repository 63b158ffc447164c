"""benchmark.py and generate.py end to end, every runnable file's --help, and bad input in one line.

The scripts run in this process (course.clitest.one_line_error); one --help per file runs the real file.
Run: uv run pytest -q phase3_core_inference/project9_flash_attention/test_scripts.py
"""

from __future__ import annotations

import json

import pytest

from course.clitest import assert_help_works, one_line_error
from course.paths import REPO_ROOT
from phase3_core_inference.project9_flash_attention import benchmark, generate

HERE = "phase3_core_inference/project9_flash_attention"
STORIES = REPO_ROOT / "data" / "stories260k" / "stories260K.bin"
needs_data = pytest.mark.skipif(not STORIES.is_file(), reason="data/stories260k absent: run "
                                "phase3_core_inference/project8_kv_cache/download_data.py (or --source DIR)")


@pytest.mark.parametrize("name", ["benchmark.py", "generate.py", "test_flash_attention.py"])
def test_help(name):
    assert_help_works(f"{HERE}/{name}", "usage:")


def test_benchmark_quick_writes_its_tables(tmp_path, capsys):
    report = benchmark.main(["--quick", "--check", "--parts=memory,decode,gpu", f"--out_dir={tmp_path}"])
    out = capsys.readouterr().out
    assert out.strip().splitlines()[-1].startswith("summary: memory, decode, gpu")
    assert {p.name for p in tmp_path.iterdir()} >= {"benchmark.md", "benchmark.json", "memory.png", "decode.png"}
    saved = json.loads((tmp_path / "benchmark.json").read_text())
    rows = saved["memory"]["rows"]
    assert [r["tokens"] for r in rows] == [64, 128, 256] and all(r["max_diff"] < 1e-5 for r in rows)
    assert rows[-1]["naive"] > rows[-1]["ours"]  # 256 x 256 scores against tiles of 32 x 32
    assert all(r["max_diff"] < 1e-5 for r in report["decode"]["rows"])
    assert "Quality bar:" in out and "| 256 |" in (tmp_path / "benchmark.md").read_text()


@needs_data
def test_generate_decodes_stories260k_with_flash_decoding_like_sdpa(capsys):
    result = generate.main(["--max_new_tokens=40", "--decode_workers=2", "--decode_chunk=16", "--check"])
    out, err = capsys.readouterr()
    assert out.startswith("Once upon a time, there was a little girl named Lily.")  # llama2.c's reference story
    assert result["same"] and len(result["tokens"]) == 40
    assert err.strip().splitlines()[-1].startswith("summary: 40 tokens") and "the same tokens" in err


@pytest.mark.parametrize("main,argv,fragment", [
    (benchmark.main, ["--mem_lengths=a,b"], "mem_lengths ('a,b') must be a comma-separated list of integers"),
    (benchmark.main, ["--parts=memory,speed"], "parts ('memory,speed') must be a comma list of"),
    (benchmark.main, ["--rounds=0"], "rounds (0) must be > 0"),
    (benchmark.main, ["--n_head=6", "--n_kv_head=4"], "n_head (6) must be a multiple of n_kv_head (4)"),
    (benchmark.main, ["--block_q=0"], "block_q (0) must be > 0"),
    (generate.main, ["--chat"], "--chat is project 8's"),
    (generate.main, ["--attn_impl=fast"], "attn_impl ('fast') must be one of: sdpa, flash, triton"),
    (generate.main, ["--block_k=-1"], "block_k (-1) must be > 0"),
    (generate.main, ["--model=data/nothing_here.bin"], "model not found"),
])
def test_bad_input_is_one_line(main, argv, fragment):
    assert fragment in one_line_error(main, argv)
