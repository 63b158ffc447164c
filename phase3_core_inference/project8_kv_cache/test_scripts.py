"""Every runnable file of project 8 as a user meets it: `--help`, bad flags and bad files, the interactive session.

Each bad input must end in ONE `error:` line on stderr with a non-zero exit and no traceback
(course.clitest.one_line_error runs `main` in this process: fast, no new interpreter); a few checks need a
real process (`--help` of a file, bytes that are not UTF-8 on stdin). Models: stories260K (data/stories260k,
cheap to load) and a tiny random GGUF file written here; never a compile (`--compile false`).

Run: uv run pytest -q phase3_core_inference/project8_kv_cache/test_scripts.py
"""

from __future__ import annotations

import io
import sys
from pathlib import Path

import pytest

from course.clitest import assert_help_works, one_line_error, run_script
from phase1_foundation.project3_pretrain.gguf_testing import tiny_gguf_llama, write_gguf
from phase3_core_inference.project8_kv_cache import (benchmark, benchmark_gguf, download_data, download_model,
                                                     generate)

HERE = "phase3_core_inference/project8_kv_cache"
STORIES = download_data.DEST / "stories260K.bin"
needs_data = pytest.mark.skipif(not STORIES.is_file(), reason=f"{STORIES} absent: run {HERE}/download_data.py "
                                "(or --source DIR)")


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    """Files and folders a user could point a flag at by mistake (names are format keys for argv)."""
    from gguf import GGMLQuantizationType as T

    root = tmp_path_factory.mktemp("bad")
    f = {"folder": root / "folder", "text": root / "notes.txt",
         "chat_gguf": write_gguf(root / "chat.gguf", tiny_gguf_llama(), T.F32),
         "plain_gguf": write_gguf(root / "plain.gguf", tiny_gguf_llama(), T.F32, template=None)}
    f["folder"].mkdir()
    f["text"].write_text("just some notes\n")
    return {k: str(v) for k, v in f.items()}


GENERATE_BAD = [  # all refused before a model is loaded
    (["--max_new_tokens=0"], "max_new_tokens (0) must be >= 1; leave the flag out for as many as fit"),
    (["--max_new_tokens=-3"], "max_new_tokens (-3) must be >= 1"),
    (["--max_new_tokens=ten"], "argument --max_new_tokens: invalid int value: 'ten'"),
    (["--max_len=0"], "max_len (0) must be >= 1; leave the flag out for the model's context window"),
    (["--temperature=nan"], "temperature (nan) must be a finite number"),
    (["--temperature=-1"], "temperature (-1.0) must be >= 0"),
    (["--top_p=0"], "top_p (0.0) must be in (0, 1]"),
    (["--top_k=abc"], "argument --top_k: invalid int value: 'abc'"),
    (["--repetition_penalty=inf"], "repetition_penalty (inf) must be a finite number"),
    (["--dtype=int8"], "dtype ('int8') must be one of: float32, bfloat16, float16"),
    (["--compile=maybe"], "argument --compile: expected true/false, got 'maybe'"),
    (["--chat", "--prompt=hi"], "--chat is interactive; drop --prompt"),
    (["--prompt=caf\udce9"], "--prompt is not valid UTF-8 text"),  # how Linux passes the byte 0xe9 of Latin-1
    (["--system=\udcff"], "--system is not valid UTF-8 text"),
    (["--preset=tpu"], "argument --preset: invalid choice: 'tpu'"),
    (["--max_new=5"], "unrecognized arguments: --max_new=5"),  # no abbreviations
    (["--device=tpu"], "unknown device 'tpu'"),
    (["--model=data/stories260k/stories15M.bin"], f"get it with: uv run python {HERE}/download_data.py"),
    (["--model=data/smollm2/SmolLM2-360M-Instruct.Q8_0.gguf", "--chat"],
     f"get it with: uv run python {HERE}/download_model.py --format gguf"),
    (["--model={folder}/model.bin"], "model not found"),  # a path, not a hub id: the hub is not asked
    (["--model={folder}"], "is a folder without config.json"),
    (["--model={text}"], "unknown model format"),
]


@pytest.mark.parametrize("argv,fragment", GENERATE_BAD, ids=[" ".join(a) for a, _ in GENERATE_BAD])
def test_generate_bad_flags_and_files(argv, fragment, files):
    assert fragment in one_line_error(generate.main, argv + ["--compile=false"], files)


GENERATE_BAD_WITH_A_MODEL = [
    ([f"--model={STORIES}", "--max_new_tokens=600"], "lower --max_new_tokens to at most 511"),
    ([f"--model={STORIES}", "--prompt=" + "Once upon a time " * 200], "the context window is 512; shorten it"),
    ([f"--model={STORIES}", "--tokenizer={folder}/tok.bin"], "tokenizer file not found"),
    # stories260K has no chat template, and the hint names no file a llama2.c model would read
    ([f"--model={STORIES}", "--chat"], "(a llama2c model carries none); use --prompt or --interactive"),
]


@needs_data
@pytest.mark.parametrize("argv,fragment", GENERATE_BAD_WITH_A_MODEL, ids=[a[-1][:30] for a, _ in
                                                                          GENERATE_BAD_WITH_A_MODEL])
def test_generate_bad_input_with_a_model(argv, fragment, files):
    line = one_line_error(generate.main, argv + ["--compile=false"], files)
    assert fragment in line and "tokenizer_config.json" not in line


def test_chat_hint_names_the_metadata_of_a_gguf_file(files):
    line = one_line_error(generate.main, ["--model={plain_gguf}", "--chat", "--compile=false"], files)
    assert "no tokenizer.chat_template in the file's metadata" in line and "tokenizer_config.json" not in line


OTHER_BAD = [
    (benchmark.main, ["--new_tokens=0"], "argument --new_tokens: expected a comma list of integers > 0, got '0'"),
    (benchmark.main, ["--new_tokens=128,x"], "argument --new_tokens: expected a comma list of integers > 0"),
    (benchmark.main, ["--new_tokens_hf=abc"], "argument --new_tokens_hf: expected an integer, got 'abc'"),
    (benchmark.main, ["--new_tokens_hf=1"], "--new_tokens_hf (1) must be >= 2"),
    (benchmark.main, ["--prompt_len=0"], "argument --prompt_len: expected an integer > 0, got '0'"),
    (benchmark.main, ["--floor_tokens=-3"], "argument --floor_tokens: expected an integer > 0, got '-3'"),
    (benchmark.main, ["--threads=-1"], "argument --threads: expected an integer >= 0, got '-1'"),
    (benchmark.main, ["--threads=1.5"], "argument --threads: expected an integer, got '1.5'"),
    (benchmark.main, ["--parts=cache,gpu"], "argument --parts: expected a comma list of cache, hf"),
    (benchmark.main, ["--shapes=Llama-70B"], "argument --shapes: expected a comma list of stories15M"),
    (benchmark.main, ["--out_dir={text}"], "is an existing file, not a folder"),
    (benchmark.main, ["--device=cuda"], "benchmark.py measures CPU decoding only; use --device cpu"),
    (benchmark.main, ["--seed=x"], "argument --seed: invalid int value: 'x'"),
    (benchmark_gguf.main, ["--rounds=0"], "argument --rounds: expected an integer > 0, got '0'"),
    (benchmark_gguf.main, ["--new_tokens=many"], "argument --new_tokens: expected an integer, got 'many'"),
    (benchmark_gguf.main, ["--ppl_tokens=-1"], "argument --ppl_tokens: expected an integer >= 0"),
    (benchmark_gguf.main, ["--threads=0"], "argument --threads: expected an integer > 0"),
    (benchmark_gguf.main, ["--model={folder}/none.gguf"], "download_model.py --source"),
    (download_data.main, ["--source={folder}/missing"], "--source folder not found"),
    (download_data.main, ["--dest={text}"], "is an existing file, not a folder"),
    (download_data.main, ["--nope"], "unrecognized arguments: --nope"),
    (download_model.main, ["--source={folder}/missing"], "--source not found"),
    (download_model.main, ["--source={folder}"], "is not a Hugging Face model folder (no config.json)"),
    (download_model.main, ["--format=onnx"], "argument --format: invalid choice: 'onnx'"),
    (download_model.main, ["--dest={text}"], "is an existing file, not a folder"),
]


@pytest.mark.parametrize("main,argv,fragment", OTHER_BAD, ids=[f"{m.__module__.split('.')[-1]} {' '.join(a)}"
                                                               for m, a, _ in OTHER_BAD])
def test_benchmark_and_download_bad_flags(main, argv, fragment, files):
    assert fragment in one_line_error(main, argv, files)


SCRIPTS = {"generate.py": generate, "benchmark.py": benchmark, "benchmark_gguf.py": benchmark_gguf,
           "download_data.py": download_data, "download_model.py": download_model}


@pytest.mark.parametrize("name", SCRIPTS)
def test_every_script_answers_help_with_its_description_once(name, capsys):
    with pytest.raises(SystemExit) as e:
        SCRIPTS[name].main(["--help"])
    out = capsys.readouterr().out
    first = SCRIPTS[name].__doc__.splitlines()[0]
    assert e.value.code == 0 and out.startswith("usage:") and out.count(first) == 1, out[:400]


def test_generate_help_documents_max_new_tokens(capsys):
    with pytest.raises(SystemExit):
        generate.main(["--help"])
    out = " ".join(capsys.readouterr().out.split())
    assert "adds exactly N tokens (N >= 1; 0 is refused)" in out and "left out, as many as the context" in out


TEST_FILES = sorted(p.name for p in Path(__file__).parent.glob("test_*.py"))


@pytest.mark.parametrize("name", TEST_FILES)
def test_every_test_file_ends_in_run_demo(name):
    """Each test_*.py run as a script goes through course.cli.run_demo (--help works, no flags runs its demo);
    one of them is run for real below."""
    tail = (Path(__file__).parent / name).read_text().split('if __name__ == "__main__":')[-1]
    assert "run_demo(" in tail, f"{name}: its __main__ does not call course.cli.run_demo"


def test_a_test_file_answers_help_in_a_real_process():
    out = assert_help_works(f"{HERE}/test_kv_cache.py")
    assert "The KV cache is exact" in out


@needs_data
def test_interactive_session_in_a_real_process():
    """A too-long prompt, bytes that are not UTF-8, an empty line, /reset: one error line each (never beside the
    echoed text) and the session goes on; the prompt marker shows; EOF ends it with a newline and status 0."""
    long_line = "Once upon a time " * 200
    stdin = (f"Once upon a time\n{long_line}\n\n".encode() + b"caf\xe9\n/reset\nLily\n")
    res = run_script(f"{HERE}/generate.py", "--interactive", "--max_new_tokens=3", "--compile=false", stdin=stdin)
    out, err = res.stdout.decode(), res.stderr.decode()
    assert res.returncode == 0 and "Traceback" not in err, err
    errors = [ln for ln in err.splitlines() if ln.startswith("error:")]
    assert errors == ["error: the prompt has 802 tokens but the context window is 512; shorten it",
                      "error: that line is not UTF-8 text; type plain UTF-8 characters",
                      "error: /reset: this tool has no conversation to reset (each line stands alone)"]
    assert sum("prompt tokens prefilled" in ln for ln in err.splitlines()) == 2  # two prompts answered
    answers = out.split("prompt> ")
    # the banner, then a marker for each of the 6 lines and one at the EOF, which is followed by a newline
    assert len(answers) == 8 and answers[0].startswith("interactive: ") and answers[-1] == "\n"
    assert answers[1].startswith("Once upon a time") and answers[-2].startswith("Lily")
    assert answers[2:6] == ["", "", "", ""]  # the bad lines printed nothing on stdout


def test_ctrl_c_stops_one_chat_reply_and_forgets_that_turn(files, monkeypatch, capsys):
    """Ctrl-C during a reply: "(stopped)", the prompt comes back, and the next turn is rendered without it."""
    real_stream, real_render = generate.stream, generate.render_chat
    rendered: list[list[dict]] = []

    def interrupted_once(*args, **kwargs):
        if len(rendered) == 1:
            raise KeyboardInterrupt
        return real_stream(*args, **kwargs)

    def render(template, messages, **kw):
        rendered.append([dict(m) for m in messages])
        return real_render(template, messages, **kw)

    monkeypatch.setattr(generate, "stream", interrupted_once)
    monkeypatch.setattr(generate, "render_chat", render)
    monkeypatch.setattr(sys, "stdin", io.StringIO("first\nsecond\n"))
    generate.main([f"--model={files['chat_gguf']}", "--chat", "--max_new_tokens=2", "--compile=false"])
    out, err = capsys.readouterr()
    assert "(stopped)" in err and sum("prompt tokens prefilled" in ln for ln in err.splitlines()) == 1
    assert rendered == [[{"role": "user", "content": "first"}], [{"role": "user", "content": "second"}]]
    assert out.count("you> ") == 3 and out.endswith("\n")


if __name__ == "__main__":
    from course.cli import run_demo

    run_demo(lambda: print("this file holds only tests: uv run pytest -q " + __file__), __doc__)
