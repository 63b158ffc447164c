"""Sample text from a trained project-3 checkpoint (or from any HF LLaMA folder via hf_interop.import_hf).

    uv run python phase1_foundation/project3_pretrain/generate.py --prompt "It was a dark and stormy night"
    uv run python phase1_foundation/project3_pretrain/generate.py --temperature 0 --max_new_tokens 50   # greedy
    uv run python phase1_foundation/project3_pretrain/generate.py --hf_dir checkpoints/project3/hf

Sampling is project 1's (stream_tokens + sampling.sample_next_token: temperature, top-k, top-p; temperature 0
is greedy); this file only adds the BPE tokenizer and streaming of multi-byte characters. No KV cache: each
token re-runs the whole context (project 8 adds the cache through Llama's kv_cache argument).
"""

from __future__ import annotations

import codecs
import sys
import time

import torch

from course.cli import ArgumentParser, existing_file, float_in, nonneg_float, positive_int, utf8_text
from course.device import get_device, set_seed
from course.errors import CourseError, run_cli
from course.paths import REPO_ROOT
from phase1_foundation.project1_minimal_gpt.sampling import stream_tokens
from phase1_foundation.project3_pretrain.loading import DEFAULT_CKPT, load_any, load_matching_tokenizer


def main(argv: list[str] | None = None) -> None:
    p = ArgumentParser(description=__doc__)
    model_group = p.add_mutually_exclusive_group()
    model_group.add_argument("--ckpt", default=None,
                             help=f"train.py checkpoint (default {DEFAULT_CKPT.relative_to(REPO_ROOT)})")
    model_group.add_argument("--hf_dir", default=None, help="load a Hugging Face LLaMA folder instead of --ckpt")
    p.add_argument("--tokenizer", type=existing_file, default=None,
                   help="tokenizer .pkl (default: the one the data was prepared with)")
    p.add_argument("--prompt", type=utf8_text, default="The ", help="text to continue")
    p.add_argument("--max_new_tokens", type=positive_int, default=None,
                   help="tokens to add to each sample (default: until the end-of-text token or block_size)")
    p.add_argument("--temperature", type=nonneg_float, default=0.8, help="0 = greedy")
    p.add_argument("--top_k", type=positive_int, default=None, help="keep the k most likely tokens (default: off)")
    p.add_argument("--top_p", type=float_in(0.0, 1.0, lo_open=True), default=None,
                   help="nucleus sampling: keep the smallest set with this much probability (default: off)")
    p.add_argument("--num_samples", type=positive_int, default=1)
    p.add_argument("--seed", type=int, default=1337)
    p.add_argument("--device", default="auto")
    args = p.parse_args(argv)
    dev = get_device(args.device)
    set_seed(args.seed)
    model, stored_tok = load_any(args.ckpt, args.hf_dir, dev)
    tok = load_matching_tokenizer(args.tokenizer, model, stored_tok)
    ids = tok.encode(args.prompt, allowed_special="all")
    if not ids:
        raise CourseError("the prompt is empty; give at least one character")
    # absent --max_new_tokens: up to the context (one block), ended early by the end-of-text token
    max_new = args.max_new_tokens if args.max_new_tokens is not None else model.config.block_size
    gen = torch.Generator(device=dev).manual_seed(args.seed)
    n_total, t0 = 0, time.perf_counter()
    for s in range(args.num_samples):
        idx = torch.tensor([ids], dtype=torch.long, device=dev)
        decoder = codecs.getincrementaldecoder("utf-8")(errors="replace")
        sys.stdout.write(args.prompt)
        with torch.inference_mode():
            for t in stream_tokens(model, idx, max_new, model.config.block_size, args.temperature,
                                   args.top_k, args.top_p, gen):
                n_total += 1
                if t == tok.eot_token:
                    break
                sys.stdout.write(decoder.decode(tok.decode_bytes([t])))  # a character may span two tokens
                sys.stdout.flush()
        sys.stdout.write(decoder.decode(b"", final=True) + "\n" + ("-" * 40 + "\n" if s < args.num_samples - 1 else ""))
    dt = time.perf_counter() - t0
    print(f"done: samples={args.num_samples} new_tokens={n_total} tokens_per_s={n_total / dt:.1f}")


if __name__ == "__main__":
    run_cli(main)
