"""Sample Shakespeare-like text from a trained checkpoint, streaming characters as they are produced.

    uv run python phase1_foundation/project1_minimal_gpt/generate.py --prompt "ROMEO:"
    uv run python phase1_foundation/project1_minimal_gpt/generate.py --interactive --temperature 0.8 --top_k 40
    uv run python phase1_foundation/project1_minimal_gpt/generate.py --prompt "JULIET:" --top_p 0.9 --seed 7

PAPER: Radford et al. 2019 (GPT-2) - autoregressive generation: feed the text so far, sample the
next token from the predicted distribution, append it, repeat. Filters: see sampling.py.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Iterator

import torch

from course.checkpoint import load_checkpoint
from course.device import get_device
from course.errors import CourseError, run_cli
from phase1_foundation.project1_minimal_gpt.config import GPTConfig
from phase1_foundation.project1_minimal_gpt.model import GPT
from phase1_foundation.project1_minimal_gpt.sampling import sample_next_token, top_k_filter, top_p_filter
from phase1_foundation.project1_minimal_gpt.train import DEFAULT_OUT_DIR, TRAIN_CMD, encode


@torch.no_grad()
def stream_tokens(model: torch.nn.Module, idx: torch.Tensor, max_new_tokens: int, block_size: int,
                  temperature: float = 1.0, top_k: int | None = None, top_p: float | None = None,
                  generator: torch.Generator | None = None) -> Iterator[int]:
    """Yield `max_new_tokens` new token ids one at a time, continuing the sequence idx (1, T).

    Model-agnostic: any module whose call returns (logits (B, T, V), ...) works. Each step re-runs
    the model on the last `block_size` tokens (no KV cache - that is project 8's optimisation),
    reads the logits at the last position and samples from them.
    """
    for _ in range(max_new_tokens):
        idx_cond = idx if idx.size(1) <= block_size else idx[:, -block_size:]
        logits = model(idx_cond)[0][:, -1]                                   # (B, V)
        next_id = sample_next_token(logits, temperature, top_k, top_p, generator)  # (B, 1)
        idx = torch.cat([idx, next_id], dim=1)
        yield int(next_id[0, 0])


def load_model(checkpoint: str | Path, device: torch.device) -> tuple[GPT, list[str]]:
    """Rebuild the model from a train.py checkpoint; returns (model in eval mode, vocabulary chars)."""
    state = load_checkpoint(checkpoint, map_location="cpu", hint=f"train one first with: {TRAIN_CMD}")
    if "model_state_dict" not in state or "chars" not in state:
        raise CourseError(f"{checkpoint} is not a project 1 checkpoint (no model_state_dict/chars); "
                          f"train one with: {TRAIN_CMD}")
    model = GPT(GPTConfig.from_dict(state["config"]))
    model.load_state_dict(state["model_state_dict"])
    return model.to(device).eval(), state["chars"]


def generate_text(model: GPT, chars: list[str], prompt: str, max_new_tokens: int, temperature: float = 1.0,
                  top_k: int | None = None, top_p: float | None = None, seed: int | None = None,
                  stream=None) -> str:
    """Continue `prompt`; write each new character to `stream` (if given) as it is produced."""
    if not prompt:
        raise CourseError("the prompt is empty; give at least one character, e.g. --prompt $'\\n'")
    device = next(model.parameters()).device
    idx = torch.tensor([encode(prompt, chars, what="the prompt")], dtype=torch.long, device=device)
    generator = torch.Generator(device=device).manual_seed(seed) if seed is not None else None
    out = []
    for tok in stream_tokens(model, idx, max_new_tokens, model.config.block_size, temperature, top_k, top_p,
                             generator):
        ch = chars[tok]
        out.append(ch)
        if stream is not None:
            stream.write(ch)
            stream.flush()
    return "".join(out)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--checkpoint", default=str(DEFAULT_OUT_DIR / "ckpt.pt"), help="default: %(default)s")
    parser.add_argument("--prompt", default="\n", help="text to continue (default: a newline)")
    parser.add_argument("--interactive", action="store_true", help="read prompts in a loop (empty line quits)")
    parser.add_argument("--max_new_tokens", type=int, default=500)
    parser.add_argument("--temperature", type=float, default=0.8, help="0 = greedy (default: %(default)s)")
    parser.add_argument("--top_k", type=int, default=None, help="keep only the k most likely characters")
    parser.add_argument("--top_p", type=float, default=None, help="nucleus sampling: keep the top mass p")
    parser.add_argument("--seed", type=int, default=1337, help="random seed (default: %(default)s)")
    parser.add_argument("--device", default="auto", help="auto (cuda > mps > cpu), cpu, cuda or mps")
    args = parser.parse_args(argv)
    if args.max_new_tokens < 0:
        raise CourseError(f"--max_new_tokens ({args.max_new_tokens}) must be >= 0")
    # Check the sampling settings before loading anything (one clear line on a bad value).
    if args.temperature < 0:
        raise CourseError(f"--temperature ({args.temperature}) must be >= 0 (0 = greedy)")
    if args.top_k is not None:
        top_k_filter(torch.zeros(1, 2), args.top_k)
    if args.top_p is not None:
        top_p_filter(torch.zeros(1, 2), args.top_p)

    model, chars = load_model(args.checkpoint, get_device(args.device))
    if not args.interactive:
        encode(args.prompt, chars, what="the prompt")  # unknown characters: fail before printing anything
        print(args.prompt, end="", flush=True)
        generate_text(model, chars, args.prompt, args.max_new_tokens, args.temperature, args.top_k, args.top_p,
                      args.seed, stream=sys.stdout)
        print()
        return
    print(f"interactive mode: {len(chars)}-character vocabulary; an empty line or Ctrl-D quits")
    seed = args.seed
    while True:
        try:
            prompt = input("\nprompt> ")
        except EOFError:
            break
        if not prompt:
            break
        try:
            encode(prompt, chars, what="the prompt")
            print(prompt, end="", flush=True)
            generate_text(model, chars, prompt, args.max_new_tokens, args.temperature, args.top_k, args.top_p,
                          seed, stream=sys.stdout)
            print()
        except CourseError as e:  # e.g. unknown characters: say so and ask again
            print(f"\nerror: {e}")
        seed += 1  # a new continuation for every prompt, still reproducible


if __name__ == "__main__":
    run_cli(main)
