"""Every runnable file of project 2 as a user meets it: `--help`, bad flags and bad files, the interactive viewer.

Each bad input must end in ONE `error:` line on stderr with a non-zero exit and no traceback
(course.clitest.one_line_error runs `main` in this process: fast); a few checks need a real process
(`--help` of each file, bytes that are not UTF-8 on stdin).

Run: uv run pytest -q phase1_foundation/project2_tokenizer/test_scripts.py
"""

from __future__ import annotations

import gzip
import io
import json

import pytest

import course.paths
from course.clitest import assert_help_works, assert_one_line_error, one_line_error, run_script
from phase1_foundation.project2_tokenizer import benchmark, download_data, train_tokenizer
from phase1_foundation.project2_tokenizer import test_tokenizer as viewer
from phase1_foundation.project2_tokenizer.formats import save_tokenizer
from phase1_foundation.project2_tokenizer.tokenizer import ENDOFTEXT, RegexTokenizer

HERE = "phase1_foundation/project2_tokenizer"
BOOK = ("*** START OF THE PROJECT GUTENBERG EBOOK X ***\n" + "It was the best of times, it was the worst of times. " * 40
        + "\n*** END OF IT ***\n")


@pytest.fixture(scope="module")
def bad_files(tmp_path_factory):
    """Files and folders a user could point a flag at by mistake (names are format keys for argv)."""
    root = tmp_path_factory.mktemp("bad")
    files = {"folder": root / "folder", "empty": root / "empty", "corrupt": root / "corrupt",
             "latin1": root / "latin1", "one_book": root / "one_book", "books": root / "books",
             "text": root / "notes.txt"}
    for key in ("folder", "empty", "corrupt", "latin1", "one_book", "books"):
        files[key].mkdir()
    files["text"].write_text("just some notes\n")
    (files["corrupt"] / "a.txt.gz").write_bytes(gzip.compress(BOOK.encode())[:-12])  # truncated download
    (files["latin1"] / "a.txt.gz").write_bytes(gzip.compress("café au lait\n".encode("latin-1")))
    (files["one_book"] / "a.txt.gz").write_bytes(gzip.compress(BOOK.encode()))  # book 0 is the held-out one
    for k in range(3):
        (files["books"] / f"b{k}.txt.gz").write_bytes(gzip.compress(BOOK.replace("times", f"times {k}").encode()))
    tok = RegexTokenizer("gpt4", [ENDOFTEXT]).train(BOOK * 3, 300)
    files["tokenizer"] = save_tokenizer(tok, root / "tok" / "tokenizer.pkl")
    return {k: str(v) for k, v in files.items()}


TRAIN_BAD = [
    (["--vocab_size=257"], "vocab_size (257) must be > 256 + 1 special token(s)"),
    (["--vocab_size=ten"], "argument --vocab_size: invalid int value: 'ten'"),
    (["--max_train_mb=nan"], "max_train_mb (nan) must be a finite number"),
    (["--max_train_mb=inf"], "max_train_mb (inf) must be a finite number"),
    (["--max_train_mb=-1"], "max_train_mb (-1.0) must be >= 0"),
    (["--num_workers=0"], "num_workers (0) must be > 0"),
    (["--num_workers=1000"], "num_workers (1000) must be <= 64"),
    (["--pattern=gpt5"], "pattern ('gpt5') must be one of: gpt2, gpt4"),
    (["--trainer=heap"], "trainer ('heap') must be one of: plain, fast"),
    (["--preset=tpu"], "argument --preset: invalid choice: 'tpu'"),
    (["--device=tpu"], "argument --device: expected one of auto, cpu, cuda, mps, got 'tpu'"),
    (["--log=5"], "unrecognized arguments: --log=5"),  # no abbreviation of --log_every
    (["--out_dir={text}"], "is an existing file, not a folder"),
    (["--data_dir={empty}"], "no Gutenberg books (*.txt.gz)"),
    (["--data_dir={corrupt}"], "is not a readable .gz file"),
    (["--data_dir={latin1}"], "is not UTF-8 text"),
    (["--data_dir={one_book}"], "no training text"),
]


@pytest.mark.parametrize("argv,fragment", TRAIN_BAD, ids=[a[0] for a, _ in TRAIN_BAD])
def test_train_tokenizer_bad_flags_and_files(argv, fragment, bad_files, tmp_path):
    if not any(a.startswith("--data_dir") for a in argv):
        argv = argv + ["--data_dir={one_book}", "--heldout_every=0"]  # a case that wrongly passes stays short
    if not any(a.startswith("--out_dir") for a in argv):
        argv = argv + [f"--out_dir={tmp_path / 'out'}"]
    workers = ["--num_workers=1"] * (not any("workers" in a for a in argv))
    assert fragment in one_line_error(train_tokenizer.main, argv + workers, bad_files)
    assert not (tmp_path / "out").exists()  # nothing written


BENCH_BAD = [
    (["--max_books=-1"], "argument --max_books: expected an integer >= 0, got '-1'"),
    (["--max_books=all"], "argument --max_books: expected an integer, got 'all'"),
    (["--vocab_size=100"], "argument --vocab_size: expected an integer >= 258"),
    (["--vocab_size=nan"], "argument --vocab_size: expected an integer, got 'nan'"),
    (["--num_workers=0"], "argument --num_workers: expected an integer > 0, got '0'"),
    (["--num_workers=999"], "argument --num_workers: expected an integer in [1, 64], got '999'"),
    (["--plain_kb=0"], "argument --plain_kb: expected an integer > 0, got '0'"),
    (["--plain_merges=-5"], "argument --plain_merges: expected an integer > 0, got '-5'"),
    (["--out={folder}"], "is a folder; give the .json file to write"),
    (["--device=cuda"], "benchmark.py measures tokenizers on the CPU"),
    (["--seed=1.5"], "argument --seed: invalid int value: '1.5'"),
    (["--data_dir={empty}"], "no Gutenberg books (*.txt.gz)"),
    (["--data_dir={corrupt}"], "is not a readable .gz file"),
]


@pytest.mark.parametrize("argv,fragment", BENCH_BAD, ids=[a[0] for a, _ in BENCH_BAD])
def test_benchmark_bad_flags_and_files(argv, fragment, bad_files, tmp_path):
    if not any(a.startswith("--data_dir") for a in argv):
        argv = argv + ["--data_dir={empty}"]  # were a bad flag accepted, the run still ends at once
    assert fragment in one_line_error(benchmark.main, argv + [f"--out={tmp_path / 'b.json'}"] * (not any(
        a.startswith("--out") for a in argv)), bad_files)


OTHER_BAD = [
    (download_data.main, [], "the following arguments are required: --dataset"),
    (download_data.main, ["--dataset=books"], "argument --dataset: invalid choice: 'books'"),
    (download_data.main, ["--dataset=gpt2_bpe", "--source={folder}/missing"], "argument --source: not a folder"),
    (download_data.main, ["--dataset=gpt2_bpe", "--data_dir={text}"], "is an existing file, not a folder"),
    (download_data.main, ["--dataset=gpt2_bpe", "--source={empty}", "--data_dir={folder}/d"],
     "--source file not found"),  # an empty local copy: offline, the one-line hint
    (viewer.main, ["--tokenizer={folder}/none.pkl"], "tokenizer not found"),
    (viewer.main, ["--interactive", "--tokenizer={text}"], "the file is corrupt or not a tokenizer"),
    (viewer.main, ["--nope"], "unrecognized arguments: --nope"),
]


@pytest.mark.parametrize("main,argv,fragment", OTHER_BAD, ids=[f"{m.__module__.split('.')[-1]} {' '.join(a)}"
                                                               for m, a, _ in OTHER_BAD])
def test_download_and_viewer_bad_flags(main, argv, fragment, bad_files):
    assert fragment in one_line_error(main, argv, bad_files)


def test_benchmark_labels_rows_with_the_real_vocab_size(bad_files, tmp_path, capsys):
    out = tmp_path / "bench.json"
    r = benchmark.main([f"--data_dir={bad_files['books']}", "--vocab_size=300", "--skip_references", "--num_workers=1",
                        "--plain_kb=2", "--plain_merges=5", f"--out={out}"])
    table = capsys.readouterr().out
    assert "| train 300 vocab, gpt2 pattern (s) |" in table and "| encode, our 300 ranks (MB/s, 1 process) |" in table
    assert "10K" not in table
    assert r["vocab_size"] == 300 and json.loads(out.read_text())["slice_equal"] is True


def test_viewer_finds_its_default_tokenizer_from_any_directory(bad_files, tmp_path, monkeypatch, capsys):
    """The default checkpoints/project2/tokenizer.pkl is found under the repo root, wherever the user is."""
    repo = tmp_path / "repo"
    save_tokenizer(RegexTokenizer("gpt4", [ENDOFTEXT]).train(BOOK * 3, 300), repo / viewer.DEFAULT_TOKENIZER)
    monkeypatch.setattr(course.paths, "REPO_ROOT", repo)
    (tmp_path / "elsewhere").mkdir()
    monkeypatch.chdir(tmp_path / "elsewhere")
    monkeypatch.setattr("sys.stdin", io.StringIO("It was the best\n\n/quit\nnever read\n"))
    viewer.main(["--interactive"])
    out = capsys.readouterr().out
    assert "vocab_size=300" in out and out.count("tokens, ") == 1 and "| was| the| best\n" in out


def test_viewer_examples_run_without_flags(capsys):
    viewer.main([])
    out = capsys.readouterr().out
    assert "1. BPE by hand" in out and "[258, 100, 258, 97, 99]" in out and "2. " in out and "3. " in out


@pytest.mark.parametrize("name", ["train_tokenizer.py", "benchmark.py", "download_data.py", "test_tokenizer.py",
                                  "test_bpe.py", "test_formats.py", "test_chat_template.py"])
def test_every_runnable_file_answers_help(name):
    assert_help_works(f"{HERE}/{name}", "usage:")


def test_interactive_viewer_session_in_a_real_process(bad_files):
    """Not-UTF-8 bytes, an empty line, /reset: one error line each and the session goes on; EOF ends it cleanly."""
    stdin = b"It was the best\n\n\xff\xfe not utf-8\n/reset\nof times\\nit was\n"
    res = run_script(f"{HERE}/test_tokenizer.py", "--interactive", f"--tokenizer={bad_files['tokenizer']}", stdin=stdin)
    out, err = res.stdout.decode(), res.stderr.decode()
    assert res.returncode == 0 and "Traceback" not in err, err
    assert err.splitlines() == ["error: that line is not UTF-8 text; type plain UTF-8 characters",
                                "error: /reset: this tool has no conversation to reset (each line stands alone)"]
    assert out.count("tokens, ") == 2 and "\x1b[" not in out and out.endswith("\n")  # no colours in a pipe
    assert "|\\n|" in out and ", 10, " in out  # "\n" typed as two characters is a newline (byte 10)


def test_a_bad_flag_in_a_real_process_is_one_line():
    res = run_script(f"{HERE}/benchmark.py", "--max_books", "-1")
    assert assert_one_line_error(res) == "error: argument --max_books: expected an integer >= 0, got '-1' (see --help)"


if __name__ == "__main__":
    from course.cli import run_demo

    run_demo(lambda: print("this file holds only tests: uv run pytest -q " + __file__), __doc__)
