"""Sample Shakespeare-like text from a trained checkpoint, streaming characters as they are produced.

    uv run python phase1_foundation/project1_minimal_gpt/generate.py --prompt "ROMEO:"
    uv run python phase1_foundation/project1_minimal_gpt/generate.py --interactive --temperature 0.8 --top_k 40
    uv run python phase1_foundation/project1_minimal_gpt/generate.py --prompt "JULIET:" --top_p 0.9 --seed 7

PAPER: Radford et al. 2019 (GPT-2) - autoregressive generation: feed the text so far, sample the
next token from the predicted distribution, append it, repeat. Filters: see sampling.py.

--max_new_tokens N adds exactly N characters, N >= 1 (0 is refused: it would add nothing).
--interactive follows the course's one session behaviour (course/interactive.py): a bad line is
reported and the prompt comes back; an empty line does nothing; Ctrl-C stops the current answer
and a second Ctrl-C, Ctrl-D or /quit quits.
"""

from __future__ import annotations

import sys

from course.cli import ArgumentParser, float_in, nonneg_float, positive_int, utf8_text
from course.device import get_device
from course.errors import run_cli
from course.interactive import run_session
from phase1_foundation.project1_minimal_gpt.data import DEFAULT_OUT_DIR, encode
from phase1_foundation.project1_minimal_gpt.sampling import generate_text
from phase1_foundation.project1_minimal_gpt.training import load_model


def build_parser() -> ArgumentParser:
    parser = ArgumentParser(description=__doc__)
    parser.add_argument("--checkpoint", default=str(DEFAULT_OUT_DIR / "ckpt.pt"), help="default: %(default)s")
    parser.add_argument("--prompt", type=utf8_text, default="\n", help="text to continue (default: a newline)")
    parser.add_argument("--interactive", action="store_true",
                        help="read prompts in a loop (empty line: nothing; /quit, Ctrl-D or Ctrl-C twice: quit)")
    parser.add_argument("--max_new_tokens", type=positive_int, default=500,
                        help="characters to add, >= 1 (default: %(default)s)")
    parser.add_argument("--temperature", type=nonneg_float, default=0.8, help="0 = greedy (default: %(default)s)")
    parser.add_argument("--top_k", type=positive_int, default=None, help="keep only the k most likely characters")
    parser.add_argument("--top_p", type=float_in(0.0, 1.0, lo_open=True), default=None,
                        help="nucleus sampling: keep the top mass p, in (0, 1]")
    parser.add_argument("--seed", type=int, default=1337, help="random seed (default: %(default)s)")
    parser.add_argument("--device", default="auto", help="auto (cuda > mps > cpu), cpu, cuda or mps")
    return parser


def main(argv: list[str] | None = None) -> None:
    args = build_parser().parse_args(argv)  # every flag checked before anything is loaded
    model, chars = load_model(args.checkpoint, get_device(args.device))
    sample = dict(max_new_tokens=args.max_new_tokens, temperature=args.temperature, top_k=args.top_k,
                  top_p=args.top_p)
    if not args.interactive:
        encode(args.prompt, chars, what="the prompt")  # unknown characters: fail before printing anything
        print(args.prompt, end="", flush=True)
        generate_text(model, chars, args.prompt, seed=args.seed, stream=sys.stdout, **sample)
        print()
        return

    seed = args.seed

    def answer(prompt: str, out) -> None:
        nonlocal seed
        encode(prompt, chars, what="the prompt")  # unknown characters: one error line, before any output
        out.write(prompt)
        generate_text(model, chars, prompt, seed=seed, stream=out, **sample)
        seed += 1  # a new continuation for every prompt, still reproducible

    run_session(answer, prompt="\nprompt> ",
                banner=f"interactive mode: {len(chars)}-character vocabulary; Ctrl-C stops an answer, "
                       "/quit or Ctrl-D quits")


if __name__ == "__main__":
    run_cli(main)
