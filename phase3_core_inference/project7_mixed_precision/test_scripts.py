"""train.py and benchmark.py end to end on a tiny corpus and model; every runnable file's --help; bad input in one line.

The scripts run in this process (course.clitest.one_line_error: no second torch import); one --help runs the real
file. The corpus is random token ids written in project 3's shard format, so no download is needed.
"""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from course.cli import run_demo
from course.clitest import assert_help_works, one_line_error
from phase1_foundation.project3_pretrain.loading import load_model_from_checkpoint
from phase3_core_inference.project7_mixed_precision import (
    benchmark,
    formats,
    mixed_precision,
    test_formats,
    test_loss_scaler,
    test_mixed_precision,
    train,
)

HERE = "phase3_core_inference/project7_mixed_precision"
TINY = ["--n_layer=1", "--n_head=2", "--n_kv_head=1", "--n_embd=32", "--intermediate_size=64", "--block_size=16",
        "--batch_size=2", "--max_iters=6", "--eval_interval=3", "--eval_iters=1", "--log_interval=2",
        "--stats_interval=2", "--warmup_iters=2"]


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    """Project 3's shard format (uint16 ids + meta.json) with random tokens over a 61-token vocabulary."""
    d = tmp_path_factory.mktemp("corpus")
    rng = np.random.default_rng(0)
    meta = {"vocab_size": 61, "splits": {}}
    for split, n in (("train", 4000), ("val", 1000)):
        rng.integers(0, 61, n, dtype=np.uint16).tofile(d / f"{split}.bin")
        meta["splits"][split] = {"tokens": n, "bytes": 3 * n}
    (d / "meta.json").write_text(json.dumps(meta))
    (d / "file.txt").write_text("not a folder")
    return d


def _args(corpus, tmp_path, *extra):
    return [f"--data_dir={corpus}", f"--out_dir={tmp_path}", *TINY, *extra]


@pytest.mark.parametrize("mode", ["fp32", "fp16_scaled", "bf16_pure_kahan"])
def test_train_writes_a_checkpoint_project3_loads(corpus, tmp_path, mode, capsys):
    s = train.main(_args(corpus, tmp_path, f"--mode={mode}", "--no_progress"))
    out = capsys.readouterr().out
    assert f"done: mode={mode} iters=6 val_loss=" in out
    d = tmp_path / mode
    assert {p.name for p in d.iterdir()} >= {"ckpt.pt", "log.jsonl", "curves.png", "summary.json"}
    model, state = load_model_from_checkpoint(d / "ckpt.pt")
    assert state["mode"] == mode and model.config.vocab_size == 61 and s["iters"] == 6
    kinds = {json.loads(line)["kind"] for line in (d / "log.jsonl").read_text().splitlines()}
    assert kinds == ({"eval", "train", "updates"} if mode.startswith("bf16_pure") else {"eval", "train"})


def test_benchmark_quick_runs_every_part(corpus, tmp_path, capsys):
    report = benchmark.main(_args(corpus, tmp_path, "--quick", "--no_progress", "--timing_rounds=1",
                                  "--modes=fp32,fp16_scaled,fp16_unscaled,bf16_pure,bf16_pure_kahan"))
    out = capsys.readouterr().out
    d = tmp_path / "benchmark"
    assert {"table.md", "results.json", "val_loss.png", "grad_underflow.png", "lost_updates.png"} <= {
        p.name for p in d.iterdir()}
    assert "| bf16_pure_kahan |" in (d / "table.md").read_text() and out.strip().splitlines()[-1].startswith("done:")
    assert set(report["summaries"]) == {"fp32", "fp16_scaled", "fp16_unscaled", "bf16_pure", "bf16_pure_kahan",
                                        "fp16_scaled @1/64", "fp16_unscaled @1/64"}
    assert report["summaries"]["fp16_unscaled @1/64"]["val_loss"] > 0
    assert [u["accumulate"] for u in report["underflow"]] == [1, 8]
    b = {m: s["bytes_per_param"] for m, s in report["summaries"].items()}
    assert b["bf16_pure"] < b["fp32"] < b["fp16_scaled"]


CASES = [
    (train, ["--mode=fp12"], "mode ('fp12') must be one of: fp32, fp16_scaled"),
    (train, ["--growth_factor=1"], "growth_factor (1.0) must be > 1"),
    (train, ["--growth_factor=0.5", "--backoff_factor=2"], "backoff_factor (2.0) must be in (0, 1)"),
    (train, ["--backoff_factor=0"], "backoff_factor (0.0) must be in (0, 1)"),
    (train, ["--backoff_factor=1"], "backoff_factor (1.0) must be in (0, 1)"),
    (train, ["--init_scale=-1"], "init_scale (-1.0) must be a finite number > 0"),
    (train, ["--learning_rate=nan"], "learning_rate (nan) must be a finite number"),
    (train, ["--micro_batch_of=0"], "micro_batch_of (0) must be > 0"),
    (benchmark, ["--fp16_large_batch=0"], "argument --fp16_large_batch: expected an integer > 0"),
    (train, ["--stats_interval=0"], "stats_interval (0) must be > 0 (leave it out for off)"),
    (train, ["--batch_size=0"], "batch_size (0) must be > 0"),
    (train, ["--min_lr=1"], "min_lr (1.0) must be <= learning_rate"),
    (train, ["--data_dir={d}/nothing"], "meta.json not found; tokenize the corpus first"),
    (train, ["--out_dir={d}/file.txt"], "is an existing file, not a folder"),
    (train, ["--device=tpu"], "unknown device 'tpu'"),
    (benchmark, ["--modes=fp32,fp12"], "unknown mode(s) in --modes: fp12; choose from fp32"),
    (benchmark, ["--mode=fp32"], "--mode is train.py's flag"),
    (benchmark, ["--timing_rounds=0"], "argument --timing_rounds: expected an integer > 0"),
    (benchmark, ["--growth_factor=0.9"], "growth_factor (0.9) must be > 1"),
    (formats, ["--format=fp12"], "unsupported dtype name 'fp12'; choose one of fp32, fp16, bf16"),
    (formats, ["1e999"], "argument values: expected a finite number"),
]


@pytest.mark.parametrize("script,argv,fragment", CASES, ids=[f"{c[0].__name__.rsplit('.', 1)[-1]}:{' '.join(c[1])}"
                                                             for c in CASES])
def test_bad_input_is_one_line(corpus, script, argv, fragment):
    data = [] if any(a.startswith(("--data_dir", "--modes=fp32,fp12")) for a in argv) or script is formats else [
        f"--data_dir={corpus}"]
    assert fragment in one_line_error(script.main, [*data, *argv], fill={"d": corpus})


def test_fp16_on_a_device_without_it_is_one_line(corpus, tmp_path, monkeypatch):
    def no_half(dtype, device):
        if dtype == torch.float16:
            raise RuntimeError("\"addmm_impl_cpu_\" not implemented for 'Half'")
    monkeypatch.setattr(mixed_precision, "_probe", no_half)
    line = one_line_error(train.main, _args(corpus, tmp_path, "--mode=fp16_scaled"))
    assert "fp16 is not supported on cpu by this PyTorch" in line and "use --mode bf16_autocast" in line
    # bf16 modes still run on it
    assert train.main(_args(corpus, tmp_path, "--mode=bf16_autocast", "--max_iters=1", "--no_progress"))["iters"] == 1


@pytest.mark.parametrize("main", [train.main, benchmark.main, formats.main] + [
    (lambda argv, m=m: run_demo(m._demo, m.__doc__, argv)) for m in (test_formats, test_loss_scaler,
                                                                      test_mixed_precision)])
def test_help_in_process(main, capsys):
    with pytest.raises(SystemExit) as e:
        main(["--help"])
    assert e.value.code == 0 and capsys.readouterr().out.startswith("usage:")


@pytest.mark.slow  # a second interpreter importing torch: seconds; the in-process --help above covers the parser
def test_help_of_the_real_file():
    assert_help_works(f"{HERE}/train.py", "--mode", "--growth_factor", "--learning_rate")


def _demo() -> None:
    print("run with pytest: the scripts end to end on a tiny corpus, and their bad-input table")


if __name__ == "__main__":
    run_demo(_demo, __doc__)
