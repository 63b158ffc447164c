"""Generate text through project 8's engine with flash attention: the prompt prefilled by tiles, and every new
token's attention over the KV cache computed by flash-decoding (the cache split into chunks over the cores).

    uv run python phase3_core_inference/project9_flash_attention/generate.py                     # stories260K, greedy
    uv run python phase3_core_inference/project9_flash_attention/generate.py --prompt "Lily and Tom" --check
    uv run python phase3_core_inference/project9_flash_attention/generate.py --decode_impl=sdpa --attn_impl=flash

The model is any LLaMA-architecture checkpoint project 8's generate.py takes (--model: ours, a Hugging Face
folder or hub id, llama2.c .bin, GGUF). It is not changed: the engine runs a twin of it that shares its weights
and attends with this project's code (flash_model.py). --check runs project 8's plain engine (SDPA) on the same
prompt and settings and compares the tokens. Flags: project 8's GenerateConfig and this project's FlashConfig.
For chat and interactive sessions use project 8's generate.py; its compiled decode step (--compile) has its own
attention, so it is not offered here.
"""

from __future__ import annotations

import sys

import torch

from course.cli import ArgumentParser
from course.config import parse_configs
from course.device import get_device, set_seed
from course.errors import CourseError, run_cli
from phase1_foundation.project3_pretrain.loading import load_model, load_tokenizer_for
from phase3_core_inference.project8_kv_cache.config import GenerateConfig
from phase3_core_inference.project8_kv_cache.engine import Engine, TextStream
from phase3_core_inference.project9_flash_attention.config import FlashConfig
from phase3_core_inference.project9_flash_attention.flash_model import FlashAttend, with_attention

DEFAULT_NEW_TOKENS = 256


def run(engine: Engine, tokenizer, ids: list[int], n: int, cfg: GenerateConfig, stop: set[int], out=None) -> list[int]:
    """Generate up to n tokens (greedy or sampled as cfg says), writing the text to `out` as it comes."""
    gen = torch.Generator(device=engine.device).manual_seed(cfg.seed)
    text = TextStream(tokenizer, prev_id=ids[-1])
    new = []
    for tok in engine.generate(ids, n, cfg.sampling().check(), gen, stop_ids=stop):
        new.append(tok)
        if out is not None:
            out.write(text.push(tok))
            out.flush()
    if out is not None:
        out.write(text.flush() + "\n")
    return new


def build_parser() -> ArgumentParser:
    parser = ArgumentParser(description=__doc__)
    parser.add_argument("--check", action="store_true", help="also generate with project 8's plain engine (SDPA) "
                        "and compare the tokens")
    return parser


def main(argv: list[str] | None = None) -> dict:
    args, cfg, fcfg = parse_configs(build_parser(), GenerateConfig, FlashConfig, argv=argv)
    for flag in ("chat", "interactive"):
        if getattr(cfg, flag):
            raise CourseError(f"--{flag} is project 8's: uv run python phase3_core_inference/project8_kv_cache/"
                              f"generate.py --{flag}; this script continues one --prompt")
    if cfg.compile:
        raise CourseError("--compile is project 8's compiled decode step, which has its own attention; leave it out")
    set_seed(cfg.seed)
    device = get_device(cfg.device)
    loaded = load_model(cfg.model, device, getattr(torch, cfg.dtype))
    tokenizer = load_tokenizer_for(loaded, cfg.tokenizer)
    model, mcfg = loaded.model, loaded.model.config
    if not cfg.prompt and tokenizer.bos_id is None:
        raise CourseError("this tokenizer has no BOS token to start from: give a --prompt")
    ids = tokenizer.encode(cfg.prompt, bos=True) if cfg.prompt else [tokenizer.bos_id]
    max_len = min(cfg.max_len or mcfg.block_size, mcfg.block_size)
    n = cfg.max_new_tokens or max(1, min(DEFAULT_NEW_TOKENS, max_len - len(ids)))
    stop = {tokenizer.eos_id} if tokenizer.eos_id is not None else set()
    if loaded.kind == "llama2c" and tokenizer.bos_id is not None:
        stop.add(tokenizer.bos_id)  # llama2.c models start every story with BOS: a BOS ends this one (run.c)
    with FlashAttend(fcfg) as attend:
        engine = Engine(with_attention(model, attend), max_len=max_len)
        workers = attend.decoder.workers if attend.decoder is not None else 0
        print(f"[{loaded.kind} model {loaded.path} ({model.num_params() / 1e6:.2f}M params, context {mcfg.block_size}) "
              f"on {device}, {cfg.dtype}; {attend}{f', {workers} workers' if workers else ''}]", file=sys.stderr)
        sys.stdout.write(cfg.prompt)
        ours = run(engine, tokenizer, ids, n, cfg, stop, out=sys.stdout)
        s = engine.stats
        result = {"tokens": ours, "decode_tok_s": s.decode_tok_s, "prefill_s": s.prefill_s}
        print(f"[{s.prompt_tokens} prompt tokens prefilled in {s.prefill_s * 1000:.0f} ms; {s.new_tokens} new tokens, "
              f"decode {s.decode_tok_s:.1f} tok/s]", file=sys.stderr)
    line = f"summary: {len(ours)} tokens, decode {s.decode_tok_s:.1f} tok/s with {fcfg.attn_impl} / {fcfg.decode_impl}"
    if args.check:
        plain = Engine(model, max_len=max_len)
        ref = run(plain, tokenizer, ids, n, cfg, stop)
        same = next((i for i, (a, b) in enumerate(zip(ours, ref)) if a != b), None)
        result.update(sdpa_tokens=ref, same=same is None and len(ours) == len(ref))
        line += (f"; project 8's plain engine (SDPA): {plain.stats.decode_tok_s:.1f} tok/s, "
                 + ("the same tokens" if result["same"] else f"tokens differ from position {same or min(len(ours), len(ref))}"))
    print(line, file=sys.stderr)
    return result


if __name__ == "__main__":
    run_cli(main)
