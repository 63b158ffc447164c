"""Tests of the reliability mechanisms: one-line CLI errors, nan/inf configs, several configs on one
command line, signal-safe saves, the shared interactive session and the script-test helpers."""

from __future__ import annotations

import argparse
import dataclasses
import gzip
import io
import math
import os
import signal
import subprocess
import sys
import textwrap
import time
import warnings
from typing import ClassVar
from unittest import mock

import pytest
import torch

from course import cli
from course.checkpoint import atomic_write, load_checkpoint, remove_stale_temps, save_checkpoint, stale_temps
from course.clitest import assert_help_works, check_one_line, one_line_error, run_script
from course.config import ALLOW_NONFINITE, BaseConfig, configs_from_args, parse_configs
from course.errors import ConfigError, CourseError, NonFiniteLossError, check_finite_loss, run_cli
from course.interactive import run_session
from course.paths import REPO_ROOT


@dataclasses.dataclass
class ModelCfg(BaseConfig):
    n_layer: int = 2
    block_size: int = 64
    dropout: float = 0.0
    PRESETS: ClassVar[dict] = {"cpu": {"n_layer": 1}, "gpu": {"n_layer": 12, "block_size": 1024}}

    def check(self):
        errors = super().check()
        self.check_positive(errors, "n_layer", "block_size")
        self.check_range(errors, "dropout", 0.0, 1.0, hi_open=True)
        return errors


@dataclasses.dataclass
class TrainCfg(BaseConfig):
    lr: float = 1e-3
    block_size: int = 64                      # shared with ModelCfg: they agree (type, default, presets)
    clip: float = dataclasses.field(default=math.inf, metadata=ALLOW_NONFINITE)  # inf = no clipping
    PRESETS: ClassVar[dict] = {"cpu": {"lr": 3e-3}, "gpu": {"block_size": 1024}}

    def check(self):
        errors = super().check()
        self.check_positive(errors, "lr")
        return errors


# ---- nan / inf --------------------------------------------------------------------------------------
@pytest.mark.parametrize("value", [math.nan, math.inf, -math.inf])
def test_config_rejects_nonfinite_floats_one_message_per_field(value):
    with pytest.raises(ConfigError) as exc:
        ModelCfg(dropout=value).validate_config()
    assert str(exc.value) == f"invalid config: dropout ({value}) must be a finite number"  # not also "in [0, 1)"
    with pytest.raises(ConfigError) as exc:
        configs_from_args(argparse.Namespace(cfg__lr=value, cfg__dropout=value), ModelCfg, TrainCfg)
    assert str(exc.value) == (f"invalid config: dropout ({value}) must be a finite number; "
                              f"lr ({value}) must be a finite number")


def test_a_field_may_allow_nonfinite():
    assert TrainCfg(clip=math.inf).validate_config().clip == math.inf
    assert math.isnan(TrainCfg(clip=math.nan).validate_config().clip)


def test_nan_from_the_command_line_is_one_line():
    def main(argv):
        parse_configs(cli.ArgumentParser(prog="t.py"), ModelCfg, TrainCfg, argv=argv)
    assert one_line_error(main, ["--lr=nan"]) == "error: invalid config: lr (nan) must be a finite number"
    assert one_line_error(main, ["--dropout", "inf"]) == "error: invalid config: dropout (inf) must be a finite number"


def test_check_finite_loss_stops_with_one_line():
    assert check_finite_loss(1.5, 3) == 1.5
    for bad in (math.nan, math.inf):
        with pytest.raises(NonFiniteLossError, match=rf"^the loss became {bad} at iter 7; .*lower --learning_rate"
                                                     r".*; last good: x\.pt$"):
            check_finite_loss(bad, 7, hint="last good: x.pt")
    assert issubclass(NonFiniteLossError, CourseError)


# ---- several configs from one command line ------------------------------------------------------------
def test_parse_configs_one_preset_one_flag_per_field():
    args, m, t = parse_configs(cli.ArgumentParser(), ModelCfg, TrainCfg, argv=["--n_layer=3", "--block_size=32"],
                               default_preset="cpu")
    assert (m.n_layer, m.block_size, t.block_size, t.lr) == (3, 32, 32, 3e-3)  # cpu preset lr, shared flag
    assert args.preset == "cpu" and not args.preset_given
    assert args.overrides == {"n_layer": 3, "block_size": 32}
    args, m, t = parse_configs(cli.ArgumentParser(), ModelCfg, TrainCfg, argv=["--preset", "gpu"],
                               default_preset="cpu")
    assert (m.n_layer, m.block_size, t.block_size, t.lr) == (12, 1024, 1024, 1e-3)
    assert args.preset == "gpu" and args.preset_given and args.overrides == {}


def test_parse_configs_refuses_a_shared_field_that_disagrees():
    @dataclasses.dataclass
    class Other(BaseConfig):
        block_size: int = 128  # another default than ModelCfg's 64: one flag cannot mean both

    with pytest.raises(ConfigError, match="field 'block_size' is in both ModelCfg and Other"):
        parse_configs(cli.ArgumentParser(), ModelCfg, Other, argv=[])

    @dataclasses.dataclass
    class PresetDiffers(BaseConfig):
        block_size: int = 64
        PRESETS: ClassVar[dict] = {"gpu": {"block_size": 2048}}

    with pytest.raises(ConfigError, match="field 'block_size' is in both"):
        parse_configs(cli.ArgumentParser(), ModelCfg, PresetDiffers, argv=[])


def test_old_add_args_keeps_its_preset_default():
    parser = argparse.ArgumentParser()
    ModelCfg.add_args(parser, default_preset="cpu")
    args = parser.parse_args([])
    assert args.preset == "cpu" and ModelCfg.from_args(args).n_layer == 1


# ---- the one-line parser and its types ----------------------------------------------------------------
def flag_parser() -> cli.ArgumentParser:
    p = cli.ArgumentParser(prog="tool.py")
    p.add_argument("--n", type=cli.positive_int)
    p.add_argument("--k", type=cli.nonneg_int)
    p.add_argument("--x", type=cli.finite_float)
    p.add_argument("--p", type=cli.float_in(0.0, 1.0, lo_open=True))
    p.add_argument("--q", type=cli.probability)
    p.add_argument("--t", type=cli.nonneg_float)
    p.add_argument("--text", type=cli.utf8_text)
    p.add_argument("--file", type=cli.existing_file)
    p.add_argument("--out_dir", type=cli.out_dir)
    p.add_argument("--mode", choices=["a", "b"])
    return p


@pytest.mark.parametrize("argv,line", [
    (["--n=0"], "error: argument --n: expected an integer > 0, got '0' (see --help)"),
    (["--n=2.5"], "error: argument --n: expected an integer, got '2.5' (see --help)"),
    (["--k=-1"], "error: argument --k: expected an integer >= 0, got '-1' (see --help)"),
    (["--x=nan"], "error: argument --x: expected a finite number, got 'nan' (see --help)"),
    (["--x=-inf"], "error: argument --x: expected a finite number, got '-inf' (see --help)"),
    (["--x=abc"], "error: argument --x: expected a number, got 'abc' (see --help)"),
    (["--p=0"], "error: argument --p: expected a number in (0, 1], got '0' (see --help)"),
    (["--q=1.5"], "error: argument --q: expected a number in [0, 1], got '1.5' (see --help)"),
    (["--t=-1"], "error: argument --t: expected a number in [0, inf], got '-1' (see --help)"),
    (["--text=ab\udcff"], "error: argument --text: is not valid UTF-8 text; pass plain UTF-8 characters "
                          "(see --help)"),
    (["--file=/nonexistent/f.txt"], "error: argument --file: file not found: /nonexistent/f.txt "
                                    "(see --help)"),
    (["--mode=c"], "error: argument --mode: invalid choice: 'c' (choose from 'a', 'b') (see --help)"),
    (["--nope"], "error: unrecognized arguments: --nope (see --help)"),
    (["--n"], "error: argument --n: expected one argument (see --help)"),
])
def test_parser_errors_are_one_line(argv, line):
    assert one_line_error(lambda a: flag_parser().parse_args(a), argv) == line


def test_parser_accepts_good_values_and_folder_checks(tmp_path):
    f = tmp_path / "f.txt"
    f.write_text("x")
    a = flag_parser().parse_args(["--n=3", "--k=0", "--x=1e-3", "--p=1", "--q=0", "--t=0", f"--file={f}",
                                  f"--out_dir={tmp_path / 'new'}"])
    assert (a.n, a.k, a.x, a.p, a.q, a.t, a.file, a.out_dir) == (3, 0, 1e-3, 1.0, 0.0, 0.0, f, tmp_path / "new")
    assert "is an existing file, not a folder" in one_line_error(lambda v: flag_parser().parse_args(v),
                                                                [f"--out_dir={f}"])
    assert f"{tmp_path} is not a file" in one_line_error(lambda v: flag_parser().parse_args(v), [f"--file={tmp_path}"])


def test_read_text_file_every_bad_file_is_one_error(tmp_path):
    good = tmp_path / "good.txt.gz"
    with gzip.open(good, "wt", encoding="utf-8") as f:
        f.write("héllo")
    assert cli.read_text_file(good) == "héllo"
    cases = {"empty.txt": (b"", "is empty; it needs at least 1"),
             "bin.txt": (b"ok\xff\xfe", "is not UTF-8 text (byte 2: invalid start byte)"),
             "bad.gz": (b"not gzip at all", "is not a readable .gz file"),
             "cut.gz": (gzip.compress(b"hello world" * 100)[:-20], "is not a readable .gz file")}
    for name, (data, fragment) in cases.items():
        (tmp_path / name).write_bytes(data)
        with pytest.raises(CourseError, match=fragment.replace("(", r"\(").replace(")", r"\)")):
            cli.read_text_file(tmp_path / name)
    with pytest.raises(CourseError, match="not found"):
        cli.read_text_file(tmp_path / "missing.txt")
    with pytest.raises(CourseError, match="is a folder"):
        cli.read_text_file(tmp_path)
    with pytest.raises(CourseError, match="has only 5 characters; it needs at least 100"):
        cli.read_text_file(good, min_chars=100)


def test_no_colour_when_not_a_terminal(monkeypatch):
    class Tty(io.StringIO):
        def isatty(self):
            return True
    monkeypatch.delenv("NO_COLOR", raising=False)
    monkeypatch.setenv("TERM", "xterm")
    assert cli.color("ok", "32", io.StringIO()) == "ok"
    assert cli.color("ok", "32", Tty()) == "\033[32mok\033[0m"
    monkeypatch.setenv("NO_COLOR", "1")
    assert cli.color("ok", "32", Tty()) == "ok"


def test_gpu_preset_on_a_cpu_machine_warns_once(capsys):
    with mock.patch("torch.cuda.is_available", return_value=False):
        assert cli.warn_if_gpu_preset_without_gpu("gpu", "auto")
        assert not cli.warn_if_gpu_preset_without_gpu("cpu", "auto")
    with mock.patch("torch.cuda.is_available", return_value=True):
        assert not cli.warn_if_gpu_preset_without_gpu("gpu", "auto")
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("warning: --preset gpu on a machine without a CUDA GPU")


def test_run_cli_silences_cuda_warnings_and_turns_sigterm_into_a_clean_exit(capsys):
    def main():
        warnings.warn("CUDA initialization: Found no NVIDIA driver on your system.", UserWarning)
        warnings.warn("something else", UserWarning)

    with warnings.catch_warnings(record=True) as seen:
        warnings.simplefilter("always")
        run_cli(main)
    assert [str(w.message) for w in seen] == ["something else"]

    def killed():
        os.kill(os.getpid(), signal.SIGTERM)
        time.sleep(5)
    before = signal.getsignal(signal.SIGTERM)
    with pytest.raises(SystemExit) as exc:
        run_cli(killed)
    assert exc.value.code == 143 and capsys.readouterr().err == "\nterminated\n"
    assert signal.getsignal(signal.SIGTERM) is before  # restored


def test_run_demo_help_and_demo(capsys):
    ran = []
    with pytest.raises(SystemExit) as exc:
        cli.run_demo(lambda: ran.append(1), "My demo.", ["--help"])
    assert exc.value.code == 0 and not ran and "My demo." in capsys.readouterr().out
    cli.run_demo(lambda: ran.append(1), "My demo.", [])
    assert ran == [1]


# ---- signal-safe saves -------------------------------------------------------------------------------
class SignalDuringPickle:
    """Pickling this sends SIGINT to the process: a Ctrl-C that lands in the middle of torch.save."""

    def __init__(self, times: int = 1):
        self.times = times

    def __reduce__(self):
        for _ in range(self.times):
            os.kill(os.getpid(), signal.SIGINT)
            time.sleep(0.01)
        return (int, (5,))


def test_sigint_during_save_waits_for_the_rename_then_interrupts(tmp_path, capsys):
    path = save_checkpoint(tmp_path / "last.pt", {"iter": 1})
    with pytest.raises(KeyboardInterrupt):
        save_checkpoint(path, {"iter": 2, "w": torch.randn(1000), "x": SignalDuringPickle()})
    assert load_checkpoint(path)["iter"] == 2  # the save completed, then the Ctrl-C was delivered
    assert [p.name for p in tmp_path.iterdir()] == ["last.pt"]
    assert "finishing the checkpoint save" in capsys.readouterr().err
    assert signal.getsignal(signal.SIGINT) is signal.default_int_handler  # handlers restored


def test_second_sigint_abandons_the_save_cleanly(tmp_path):
    path = save_checkpoint(tmp_path / "last.pt", {"iter": 1})
    with pytest.raises(KeyboardInterrupt):
        save_checkpoint(path, {"iter": 2, "x": SignalDuringPickle(times=2)})
    assert load_checkpoint(path)["iter"] == 1  # old checkpoint untouched
    assert [p.name for p in tmp_path.iterdir()] == ["last.pt"]


def test_sigterm_during_save_is_delivered_after_it(tmp_path):
    got = []
    old = signal.signal(signal.SIGTERM, lambda s, f: got.append(s))
    try:
        def write(f):
            f.write(b"abc")
            os.kill(os.getpid(), signal.SIGTERM)
            time.sleep(0.01)
            assert not got  # held back while writing
            f.write(b"def")
        atomic_write(tmp_path / "a.bin", write)
    finally:
        signal.signal(signal.SIGTERM, old)
    assert got == [signal.SIGTERM] and (tmp_path / "a.bin").read_bytes() == b"abcdef"


def test_stale_temp_files_of_a_killed_save_are_removed_and_reported(tmp_path, capsys):
    save_checkpoint(tmp_path / "last.pt", {"iter": 1})
    (tmp_path / ".last.pt.x1y2.tmp").write_bytes(b"half")
    (tmp_path / "notes.tmp").write_text("not ours: no leading dot")
    assert [p.name for p in stale_temps(tmp_path)] == [".last.pt.x1y2.tmp"]
    assert [p.name for p in remove_stale_temps(tmp_path)] == [".last.pt.x1y2.tmp"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["last.pt", "notes.tmp"]
    assert capsys.readouterr().out.startswith("note: removed 1 unfinished temp file(s)")
    assert remove_stale_temps(tmp_path / "nonexistent") == []


SLOW_SAVE = textwrap.dedent("""
    import sys, time, torch
    from course.checkpoint import save_checkpoint
    from course.errors import CourseError, run_cli
    path = sys.argv[1]
    real_save = torch.save
    def slow_save(obj, f, *a, **kw):  # a big checkpoint on a slow disk: about 1.5 s
        print("saving", flush=True)
        time.sleep(1.5)
        real_save(obj, f, *a, **kw)
    torch.save = slow_save
    def main():
        try:
            save_checkpoint(path, {"iter": 2, "w": torch.arange(10.0)})
            time.sleep(30)
        except KeyboardInterrupt:
            raise CourseError("training interrupted; continue with --resume") from None
    run_cli(main)
""")


@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGTERM])
def test_signal_to_a_process_during_a_slow_save(tmp_path, sig):
    path = tmp_path / "last.pt"
    save_checkpoint(path, {"iter": 1})
    proc = subprocess.Popen([sys.executable, "-c", SLOW_SAVE, str(path)], cwd=REPO_ROOT, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)
    assert proc.stdout.readline() == "saving\n"
    time.sleep(0.3)
    proc.send_signal(sig)
    out, err = proc.communicate(timeout=60)
    assert proc.returncode == 2 and "Traceback" not in err, err
    assert err.strip().endswith("error: training interrupted; continue with --resume"), err
    assert load_checkpoint(path)["iter"] == 2
    assert [p.name for p in tmp_path.iterdir()] == ["last.pt"]


# ---- the interactive session --------------------------------------------------------------------------
def session(lines, answer=None, reset=None):
    """Run a session on scripted input; out and err share one buffer, as on a terminal."""
    screen = io.StringIO()

    def default_answer(line, out):
        if line == "bad":
            out.write("partial answ")
            raise CourseError("that line is bad; try another")
        if line == "slow":
            out.write("begin")
            raise KeyboardInterrupt  # Ctrl-C while answering
        out.write(f"<{line}>")

    with mock.patch("builtins.input", side_effect=lines):
        run_session(answer or default_answer, out=screen, err=screen, reset=reset)
    return screen.getvalue()


def test_session_bad_line_empty_line_and_quit():
    screen = session(["one", "", "   ", "bad", "two", "/quit", "never read"])
    assert screen == "<one>\npartial answ\nerror: that line is bad; try another\n<two>\n"


def test_session_ctrl_c_stops_the_answer_and_a_second_one_quits():
    screen = session(["slow", KeyboardInterrupt, "unused"])
    assert screen == "begin\n(stopped)\n\n"
    # one Ctrl-C at an idle prompt only says how to quit; the session goes on
    screen = session([KeyboardInterrupt, "one", EOFError])
    assert screen == "\n(Ctrl-C again, Ctrl-D or /quit quits)\n<one>\n\n"


def test_session_eof_prints_a_newline_and_non_utf8_lines_continue():
    screen = session(["a\udcff", UnicodeDecodeError("utf-8", b"\xff", 0, 1, "invalid start byte"), "ok", EOFError])
    assert screen == ("error: that line is not UTF-8 text; type plain UTF-8 characters\n"
                      "error: that line is not UTF-8 text; type plain UTF-8 characters\n<ok>\n\n")


def test_session_reset_only_where_there_is_a_conversation():
    resets = []
    assert "(new conversation)" in session(["/reset", "/quit"], reset=lambda: resets.append(1)) and resets == [1]
    assert "error: /reset: this tool has no conversation" in session(["/reset", "/quit"])


def test_session_on_piped_bytes_that_are_not_utf8():
    code = ("from course.interactive import run_session\n"
            "run_session(lambda line, out: out.write(line.upper()), prompt='> ')\n")
    res = subprocess.run([sys.executable, "-c", code], cwd=REPO_ROOT, input=b"abc\n\xff\xfe\nxyz\n",
                         capture_output=True, timeout=60)
    assert res.returncode == 0, res.stderr
    assert res.stdout.decode() == "> ABC\n> > XYZ\n> \n"
    assert res.stderr.decode() == "error: that line is not UTF-8 text; type plain UTF-8 characters\n"


# ---- the script-test helpers themselves ---------------------------------------------------------------
def test_clitest_helpers_catch_what_they_promise():
    def fails_cleanly(argv):
        raise CourseError("bad thing; do this")
    assert one_line_error(fails_cleanly, []) == "error: bad thing; do this"
    with pytest.raises(ValueError):  # a crash is not swallowed: the test fails with its traceback
        one_line_error(lambda argv: int("x"), [])
    with pytest.raises(AssertionError, match="non-zero"):
        one_line_error(lambda argv: None, [])
    with pytest.raises(AssertionError, match="exactly one line"):
        check_one_line(2, "error: a\nerror: b\n")
    with pytest.raises(AssertionError):
        check_one_line(1, "Traceback (most recent call last):\n")
    res = run_script("-c", "print('hi')")
    assert res.returncode == 0 and res.stdout == b"hi\n"


def test_assert_help_works_on_a_file(tmp_path):
    script = tmp_path / "demo.py"
    script.write_text("from course.cli import run_demo\nrun_demo(lambda: print('demo ran'), 'Demo doc.')\n")
    assert "Demo doc." in assert_help_works(script)
    assert run_script(script).stdout == b"demo ran\n"
