"""generate.py on GGUF files: a tiny random one written here (streams, --chat keeps the cache across turns with
the template from the file's metadata; no template is one line), and the real SmolLM2-135M-Instruct file
(answers the reference question and stops at <|im_end|>; skipped when data/smollm2/ has not been imported)."""

from __future__ import annotations

import io
import sys

import pytest

from course.errors import run_cli
from course.paths import REPO_ROOT
from phase1_foundation.project3_pretrain.gguf_testing import tiny_gguf_llama, write_gguf
from phase1_foundation.project3_pretrain.loading import load_model, load_tokenizer_for
from phase3_core_inference.project8_kv_cache import generate

REAL = REPO_ROOT / "data" / "smollm2" / "SmolLM2-135M-Instruct.Q4_1.gguf"


def run_generate(monkeypatch, capsys, argv: list[str], stdin: str = "", cli: bool = False) -> tuple[str, str]:
    monkeypatch.setattr(sys, "argv", ["generate.py", *argv])
    monkeypatch.setattr(sys, "stdin", io.StringIO(stdin))
    run_cli(generate.main) if cli else generate.main()
    out = capsys.readouterr()
    return out.out, out.err


@pytest.fixture(scope="module")
def tiny_file(tmp_path_factory):
    from gguf import GGMLQuantizationType as T
    return write_gguf(tmp_path_factory.mktemp("gguf") / "tiny-Q8_0.gguf", tiny_gguf_llama(), T.Q8_0)


def test_load_model_and_tokenizer_from_gguf(tiny_file):
    loaded = load_model(str(tiny_file))
    tok = load_tokenizer_for(loaded)
    assert loaded.kind == "gguf" and loaded.model.config.vocab_size == tok.vocab_size == 300
    assert tok.eos_token == "<|im_end|>" and "<|im_start|>" in tok.chat_template
    assert tok.encode("<|im_start|>user\n")[0] == 1


def test_chat_on_tiny_gguf_keeps_the_cache(monkeypatch, capsys, tiny_file):
    _, err = run_generate(monkeypatch, capsys, ["--model", str(tiny_file), "--chat", "--max_new_tokens", "3",
                                                  "--temperature", "0"], "hi there\nand again\n")
    summaries = [line for line in err.splitlines() if "prompt tokens prefilled" in line]
    assert len(summaries) == 2 and "(0 reused" in summaries[0]
    assert "(0 reused" not in summaries[1]  # the second turn prefilled only its new tokens
    assert "3 new tokens" in summaries[0] and "3 new tokens" in summaries[1]


def test_chat_without_template_is_one_line(monkeypatch, capsys, tmp_path):
    from gguf import GGMLQuantizationType as T
    path = write_gguf(tmp_path / "no-template.gguf", tiny_gguf_llama(), T.F32, template=None)
    with pytest.raises(SystemExit) as exit_info:
        run_generate(monkeypatch, capsys, ["--model", str(path), "--chat"], "hi\n", cli=True)
    err = capsys.readouterr().err
    assert exit_info.value.code == 2 and "Traceback" not in err
    assert err.strip().splitlines()[-1].startswith("error: ") and "has no chat template" in err


@pytest.mark.skipif(not REAL.is_file(), reason=f"{REAL} absent; import it with: uv run python "
                    "phase3_core_inference/project8_kv_cache/download_model.py --source "
                    "../shared/data/smollm2/SmolLM2-135M-Instruct.Q4_1.gguf")
@pytest.mark.slow
def test_real_smollm2_chat_answers_and_stops(monkeypatch, capsys):
    out, err = run_generate(monkeypatch, capsys, ["--model", str(REAL), "--chat", "--max_len", "256",
                                                  "--temperature", "0", "--compile", "false"],
                            "What is the capital of France? Answer in one sentence.\n")
    banner, reply, end = out.split("you> ")  # the session's banner, the reply after the marker, the EOF newline
    assert banner.startswith("chat: ") and end == "\n"
    assert reply == "The capital of France is Paris.\n"
    assert "8 new tokens" in err  # 7 text tokens + <|im_end|>, where it stopped


if __name__ == "__main__":
    from course.cli import run_demo

    run_demo(lambda: print("this file holds only tests: uv run pytest -q " + __file__), __doc__)
