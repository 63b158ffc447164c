"""Tests of the course helpers: config, device, checkpoint, download, plots, errors."""

from __future__ import annotations

import argparse
import dataclasses
import hashlib
import random
from typing import ClassVar
from unittest import mock

import numpy as np
import pytest
import torch

from course.checkpoint import (atomic_write, capture_rng_state, load_checkpoint, restore_rng_state,
                               save_checkpoint)
from course.config import BaseConfig
from course.device import get_device, set_seed
from course.download import fetch_file, sha256_file
from course.errors import ConfigError, CourseError, run_cli
from course.plots import plot_curves


@dataclasses.dataclass
class ToyConfig(BaseConfig):
    n_layer: int = 2
    lr: float = 1e-3
    name: str = "toy"
    compile: bool = False
    dropout: float = 0.0
    PRESETS: ClassVar[dict] = {"cpu": {"n_layer": 1}, "gpu": {"n_layer": 12, "compile": True}}

    def check(self):
        errors = super().check()
        self.check_positive(errors, "n_layer", "lr")
        self.check_range(errors, "dropout", 0.0, 1.0, hi_open=True)
        return errors


# ---- config ---------------------------------------------------------------------------
def test_config_presets_and_overrides():
    parser = argparse.ArgumentParser()
    ToyConfig.add_args(parser, default_preset="cpu")
    cfg = ToyConfig.from_args(parser.parse_args(["--lr=0.5", "--compile"]))
    assert (cfg.n_layer, cfg.lr, cfg.compile) == (1, 0.5, True)
    cfg = ToyConfig.from_args(parser.parse_args(["--preset", "gpu", "--compile=false", "--n_layer", "3"]))
    assert (cfg.n_layer, cfg.compile) == (3, False)


def test_an_optional_field_is_set_to_none_from_the_command_line():
    @dataclasses.dataclass
    class Opt(BaseConfig):
        limit: int | None = 500      # a non-None default that the command line must be able to turn off
        tokenizer: str | None = None

    parser = argparse.ArgumentParser()
    Opt.add_args(parser)
    assert Opt.from_args(parser.parse_args([])).limit == 500
    assert Opt.from_args(parser.parse_args(["--limit=none"])).limit is None
    assert Opt.from_args(parser.parse_args(["--limit", "None", "--tokenizer=t.pkl"])) == Opt(None, "t.pkl")
    assert Opt.from_args(parser.parse_args(["--limit=7"])).limit == 7
    with pytest.raises(SystemExit):
        parser.parse_args(["--limit=seven"])  # argparse: invalid int value
    with pytest.raises(SystemExit):
        ToyConfig.add_args(p2 := argparse.ArgumentParser()) or p2.parse_args(["--n_layer=none"])  # not optional


@pytest.mark.parametrize("field,value,fragment", [
    ("n_layer", 0, "n_layer (0) must be > 0"),
    ("lr", -1.0, "lr (-1.0) must be > 0"),
    ("dropout", 1.0, "dropout (1.0) must be in [0.0, 1.0)"),
    ("n_layer", 2.5, "n_layer (2.5) must be of type int"),
    ("compile", "yes", "compile ('yes') must be of type bool"),
])
def test_config_each_bad_field_has_its_own_message(field, value, fragment):
    with pytest.raises(ConfigError, match=r"^invalid config: " + fragment.replace("(", r"\(").replace(")", r"\)")
                       .replace("[", r"\[").replace(".", r"\.") + "$"):
        ToyConfig(**{field: value}).validate_config()


def test_config_unknown_preset_and_field():
    with pytest.raises(ConfigError, match="unknown preset 'tpu'; choose from: cpu, gpu"):
        ToyConfig.from_preset("tpu")
    with pytest.raises(ConfigError, match="unknown ToyConfig field"):
        ToyConfig.from_dict({"n_layers": 3})


def test_print_config_marks_changed_fields(capsys):
    ToyConfig(n_layer=5).print_config()
    out = capsys.readouterr().out
    assert "n_layer = 5   *" in out and "lr      = 0.001\n" in out


# ---- device and seeding ---------------------------------------------------------------
def test_device_auto_and_errors():
    assert get_device("cpu").type == "cpu"
    assert get_device("auto").type in ("cpu", "cuda", "mps")
    with pytest.raises(CourseError, match="unknown device 'tpu'"):
        get_device("tpu")
    with pytest.raises(CourseError, match="invalid device 'cpu:x'"):
        get_device("cpu:x")
    if not torch.cuda.is_available():
        with pytest.raises(CourseError, match="no CUDA GPU"):
            get_device("cuda")


def test_set_seed_repeats_all_generators():
    def draw():
        return random.random(), np.random.rand(), torch.rand(1).item()
    set_seed(123)
    a = draw()
    set_seed(123)
    assert draw() == a


# ---- checkpoints ----------------------------------------------------------------------
def test_checkpoint_round_trip_and_rng(tmp_path):
    set_seed(0)
    rng = capture_rng_state()
    expected = torch.rand(3)
    path = save_checkpoint(tmp_path / "ck" / "model.pt", {"iter": 7, "w": torch.arange(4.0), "rng": rng})
    state = load_checkpoint(path)
    assert state["iter"] == 7 and torch.equal(state["w"], torch.arange(4.0))
    restore_rng_state(state["rng"])
    assert torch.equal(torch.rand(3), expected)
    assert [p.name for p in path.parent.iterdir()] == ["model.pt"]  # no temp files left


def test_interrupted_save_keeps_old_file(tmp_path):
    path = save_checkpoint(tmp_path / "model.pt", {"iter": 1})

    def boom(f):
        f.write(b"partial")
        raise KeyboardInterrupt
    with pytest.raises(KeyboardInterrupt):
        atomic_write(path, boom)
    assert load_checkpoint(path)["iter"] == 1
    assert [p.name for p in tmp_path.iterdir()] == ["model.pt"]


def test_load_checkpoint_errors(tmp_path):
    with pytest.raises(CourseError, match=r"checkpoint not found: .*missing\.pt; train first"):
        load_checkpoint(tmp_path / "missing.pt", hint="train first")
    bad = tmp_path / "bad.pt"
    bad.write_bytes(b"not a checkpoint")
    with pytest.raises(CourseError, match="corrupt or not a checkpoint"):
        load_checkpoint(bad)


# ---- download -------------------------------------------------------------------------
def test_fetch_from_local_source_verifies_hash(tmp_path):
    src = tmp_path / "src.txt"
    src.write_bytes(b"hello world\n" * 100)
    digest = hashlib.sha256(src.read_bytes()).hexdigest()
    dest = fetch_file(tmp_path / "data" / "out.txt", url="https://example.invalid/x", source=str(src),
                      sha256=digest, size=1200)
    assert dest.read_bytes() == src.read_bytes() and sha256_file(dest) == digest
    with pytest.raises(CourseError, match="does not match the expected"):
        fetch_file(tmp_path / "data" / "bad.txt", url="x://", source=str(src), sha256="0" * 64)
    assert not (tmp_path / "data" / "bad.txt").exists()  # nothing half-verified left behind
    with pytest.raises(CourseError, match="--source file not found"):
        fetch_file(tmp_path / "x.txt", url="x://", source=str(tmp_path / "nope"))


def test_fetch_offline_says_use_source(tmp_path):
    import urllib.error
    with mock.patch("urllib.request.urlopen", side_effect=urllib.error.URLError("no network")):
        with pytest.raises(CourseError, match=r"could not download .*--source PATH_OR_URL"):
            fetch_file(tmp_path / "x.txt", url="https://example.com/x.txt")
    assert not (tmp_path / "x.txt").exists()


# ---- plots and cli --------------------------------------------------------------------
def test_plot_curves_writes_png(tmp_path):
    path = plot_curves(tmp_path / "loss.png", {"train": ([0, 1, 2], [3.0, 2.0, 1.5]), "val": ([0, 2], [3.1, 1.7])})
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_run_cli_prints_one_line(capsys):
    def main():
        raise CourseError("data file missing; run download_data.py")
    with pytest.raises(SystemExit) as exc:
        run_cli(main)
    assert exc.value.code == 2
    assert capsys.readouterr().err == "error: data file missing; run download_data.py\n"


def test_repo_path_resolves_relative_paths_from_anywhere(tmp_path, monkeypatch):
    from course.paths import REPO_ROOT, repo_path

    assert (REPO_ROOT / "pyproject.toml").is_file()
    monkeypatch.chdir(tmp_path)
    assert repo_path("checkpoints/project1") == REPO_ROOT / "checkpoints" / "project1"  # not here: the repo's
    (tmp_path / "mine.txt").write_text("x")
    assert repo_path("mine.txt").resolve() == (tmp_path / "mine.txt").resolve()  # present here: yours
    assert repo_path(tmp_path / "abs") == tmp_path / "abs"


def test_atomic_write_gives_the_mode_a_plain_open_would(tmp_path):
    import os

    umask = os.umask(0o022)
    try:
        path = atomic_write(tmp_path / "a.bin", lambda f: f.write(b"x"))
        assert path.stat().st_mode & 0o777 == 0o644  # not mkstemp's owner-only 0600
    finally:
        os.umask(umask)


def test_config_flags_are_never_abbreviated():
    """`--n_l` must not silently mean `--n_layer` (argparse's prefix matching): a typo or a guessed name
    such as `--lr` for `--lr_decay_iters` would otherwise change another setting."""
    parser = argparse.ArgumentParser()
    ToyConfig.add_args(parser)
    assert parser.parse_args(["--n_layer=10"]).cfg__n_layer == 10
    with pytest.raises(SystemExit):
        parser.parse_args(["--n_l=10"])  # an unambiguous prefix: argparse would accept it
