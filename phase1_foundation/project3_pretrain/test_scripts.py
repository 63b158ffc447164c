"""Every runnable file of project 3 answers --help, and bad flags, bad files and bad checkpoints end in one line.

Table-driven with course.clitest: `one_line_error` runs a script's `main` in this process (no new interpreter,
no second torch import); only the `--help` checks and one bad flag run real subprocesses.
"""

from __future__ import annotations

import gzip

import pytest
import torch

from course.checkpoint import save_checkpoint
from course.clitest import assert_help_works, assert_one_line_error, one_line_error, run_script
from course.errors import CourseError
from phase1_foundation.project3_pretrain import (benchmark, download_data, evaluate, export_hf, generate, loading,
                                                 prepare_data, train)
from phase1_foundation.project3_pretrain.config import LlamaConfig, TrainConfig
from phase1_foundation.project3_pretrain.testing import tiny_llama

HERE = "phase1_foundation/project3_pretrain"
RUNNABLE = ["train.py", "generate.py", "evaluate.py", "prepare_data.py", "export_hf.py", "benchmark.py",
            "download_data.py", "test_pretrain.py"]


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    """Bad files and checkpoints: an existing file, an empty text, a corrupt .gz, project 1's checkpoint,
    a project-3 checkpoint, and one whose config does not match its weights."""
    d = tmp_path_factory.mktemp("bad")
    (d / "file.txt").write_text("not a folder")
    (d / "empty.txt").write_text("")
    (d / "corrupt.txt.gz").write_bytes(gzip.compress(bytes(range(256)) * 40)[:300])  # truncated mid-stream
    (d / "p1").mkdir()
    save_checkpoint(d / "p1" / "ckpt.pt", {"config": {"n_layer": 2}, "chars": list("ab"), "model_state_dict": {}})
    model = tiny_llama()
    state = {"model_state_dict": model.state_dict(), "model_config": model.config.to_dict(), "arch": "llama",
             "train_config": TrainConfig(out_dir=str(d / "p3")).to_dict(), "optimizer_state_dict": {}}
    (d / "p3").mkdir()
    save_checkpoint(d / "p3" / "ckpt.pt", state)
    bad = dict(state, model_config=dict(model.config.to_dict(), intermediate_size=48))
    save_checkpoint(d / "mismatch.pt", bad)
    return d


CASES = [
    # train.py: configs, flags of its own, out_dir, --resume
    (train, ["--learning_rate=nan"], "learning_rate (nan) must be a finite number"),
    (train, ["--lr=1e-3"], "unrecognized arguments: --lr=1e-3"),  # the old name: one line, never a silent prefix
    (train, ["--time_budget_s=-5"], "time_budget_s (-5.0) must be > 0"),
    (train, ["--threads=-1"], "threads (-1) must be > 0"),
    (train, ["--head_dim=-2"], "head_dim (-2) must be > 0"),
    (train, ["--batch_size=0"], "batch_size (0) must be > 0"),
    (train, ["--out_dir={d}/file.txt"], "is an existing file, not a folder"),
    (train, ["--resume", "--preset=gpu"], "--preset cannot be combined with --resume"),
    (train, ["--resume", "--out_dir={d}/nothing"], "nothing to resume"),
    (train, ["--resume", "--out_dir={d}/p1"], "is a project 1 checkpoint"),
    (train, ["--resume", "--out_dir={d}/p3", "--n_layer=8"], "cannot change n_layer when resuming"),
    # evaluate.py: bad text files and out-of-range flags, before any model loads
    (evaluate, ["--text_file={d}/empty.txt"], "is empty"),
    (evaluate, ["--text_file={d}/corrupt.txt.gz"], "is not a readable .gz file"),
    (evaluate, ["--text_file={d}/missing.txt"], "text file not found"),
    (evaluate, ["--split=val", "--batch_size=0"], "argument --batch_size: expected an integer > 0"),
    (evaluate, ["--split=val", "--max_tokens=-1"], "argument --max_tokens: expected an integer > 0"),
    (evaluate, ["--split=val", "--ckpt={d}/mismatch.pt"], "tensor 'layers.0.mlp"),
    (evaluate, ["--split=val", "--ckpt={d}/p1/ckpt.pt"], "is a project 1 checkpoint"),
    (evaluate, [], "one of the arguments --text_file --split is required"),
    # generate.py: the course's sampling-flag rules
    (generate, ["--max_new_tokens=0"], "argument --max_new_tokens: expected an integer > 0"),
    (generate, ["--num_samples=-3"], "argument --num_samples: expected an integer > 0"),
    (generate, ["--temperature=nan"], "argument --temperature: expected a finite number"),
    (generate, ["--top_p=0"], "argument --top_p: expected a number in (0, 1]"),
    (generate, ["--top_k=0"], "argument --top_k: expected an integer > 0"),
    (generate, ["--ckpt={d}/mismatch.pt"], "the stored config implies"),
    (generate, ["--ckpt={d}/p1/ckpt.pt", "--hf_dir={d}"], "not allowed with argument"),
    # prepare_data.py, export_hf.py, benchmark.py, download_data.py
    (prepare_data, ["--heldout_every=0"], "argument --heldout_every: expected an integer > 0"),
    (prepare_data, ["--input_dir={d}/nowhere"], "is not a folder"),
    (prepare_data, ["--out_dir={d}/file.txt"], "is an existing file, not a folder"),
    (export_hf, ["--out_dir={d}/file.txt"], "is an existing file, not a folder"),
    (export_hf, ["--ckpt={d}/p1/ckpt.pt"], "is a project 1 checkpoint"),
    (export_hf, ["--max_new_tokens=0"], "expected an integer > 0"),
    (benchmark, ["--steps=0"], "argument --steps: expected an integer > 0"),
    (benchmark, ["--threads=two"], "argument --threads: expected an integer, got 'two'"),
    (download_data, ["--dataset=nope"], "argument --dataset: invalid choice"),
    (download_data, ["--data_dir={d}/file.txt"], "is an existing file, not a folder"),
]


@pytest.mark.parametrize("script,argv,fragment", CASES,
                         ids=[f"{s.__name__.rsplit('.', 1)[1]}:{' '.join(a) or '(none)'}" for s, a, _ in CASES])
def test_bad_input_is_one_line(files, script, argv, fragment):
    line = one_line_error(script.main, argv, {"d": files})
    assert fragment in line, line


def test_old_checkpoint_configs_still_load():
    """Checkpoints saved before the renames: `lr` is read as learning_rate, 0 as None (off/automatic)."""
    old = dict(TrainConfig().to_dict(), time_budget_s=0.0, lr_decay_iters=0, threads=0, peak_flops=0.0)
    old["lr"] = old.pop("learning_rate")
    old["lr"] = 3e-3
    cfg = TrainConfig.from_dict(old).validate_config()
    assert (cfg.learning_rate, cfg.time_budget_s, cfg.lr_decay_iters, cfg.threads, cfg.peak_flops) == \
        (3e-3, None, None, None, None)
    m = LlamaConfig.from_dict(dict(LlamaConfig().to_dict(), head_dim=0, intermediate_size=0)).validate_config()
    assert (m.head_dim, m.intermediate_size, m.hd, m.ffn_dim) == (None, None, 64, 704)


def test_missing_model_path_is_not_a_hub_id(monkeypatch):
    """`missing/model.pt` matches owner/name, but a model suffix or a path shape means "not found", no download."""
    def no_download(spec):
        raise AssertionError(f"tried to download {spec}")
    monkeypatch.setattr(loading, "hub_download", no_download)
    for spec, hint in [("missing/model.pt", "train.py"), ("missing/stories.bin", "download_data.py"),
                       ("missing/m.gguf", "existing .gguf"), ("./owner/name", "hub id"), ("a/b/c", "hub id")]:
        with pytest.raises(CourseError, match=f"model not found: .*{hint}"):
            loading.load_model(spec)


def test_gpu_preset_on_cpu_warns_in_one_line(files, capsys):
    if torch.cuda.is_available():
        pytest.skip("the warning is for machines without CUDA")
    with pytest.raises(SystemExit):
        from course.errors import run_cli
        run_cli(lambda: train.main(["--preset=gpu", f"--out_dir={files}/file.txt"]))
    err = capsys.readouterr().err.strip().splitlines()
    assert err[0].startswith("warning: --preset gpu on a machine without a CUDA GPU") and len(err) == 2, err


@pytest.mark.parametrize("name", RUNNABLE)
def test_help_works(name):
    assert_help_works(f"{HERE}/{name}")


def test_bad_flag_in_a_real_process():
    assert "argument --max_new_tokens" in assert_one_line_error(run_script(f"{HERE}/generate.py",
                                                                           "--max_new_tokens", "0"))
