"""Generate text, streaming, from any LLaMA-architecture checkpoint: ours, Hugging Face, or llama2.c.

    uv run python phase3_core_inference/project8_kv_cache/generate.py                      # stories260K, greedy
    uv run python phase3_core_inference/project8_kv_cache/generate.py --prompt "Once upon a time" --temperature 0.8 --top_p 0.9
    uv run python phase3_core_inference/project8_kv_cache/generate.py --model path/to/hf_folder --chat
    uv run python phase3_core_inference/project8_kv_cache/generate.py --model TinyLlama/TinyLlama-1.1B-Chat-v1.0 --chat

The prompt is prefilled once; each new token is one decode step on the KV cache (engine.py). In --chat the
checkpoint's own chat template (Jinja, tokenizer_config.json) formats the conversation, the cache is kept
across turns (only the new turn is prefilled), and an empty line starts a new conversation.
"""

from __future__ import annotations

import argparse
import sys

import torch

from course.device import get_device, set_seed
from course.errors import CourseError, run_cli
from phase1_foundation.project2_tokenizer.chat_template import render_chat
from phase1_foundation.project3_pretrain.loading import load_model, load_tokenizer_for
from phase3_core_inference.project8_kv_cache import fast_decode
from phase3_core_inference.project8_kv_cache.config import GenerateConfig
from phase3_core_inference.project8_kv_cache.engine import Engine, TextStream
from phase3_core_inference.project8_kv_cache.sampling import SamplingParams


# ---- the command ----------------------------------------------------------------------------------
DEFAULT_NEW_TOKENS = 256


def new_token_budget(cfg: GenerateConfig, engine: Engine, prompt_len: int) -> int:
    """--max_new_tokens if given (the engine refuses it with one line if it does not fit), else up to 256
    tokens, as many as the context window leaves after the prompt."""
    return cfg.max_new_tokens or max(1, min(DEFAULT_NEW_TOKENS, engine.max_len - prompt_len))


def stream(engine: Engine, tokenizer, prompt_ids: list[int], cfg: GenerateConfig, params: SamplingParams,
           gen: torch.Generator, reuse_cache: bool = False, stop: set[int] = frozenset()) -> tuple[str, list[int]]:
    """Generate and print as tokens decode, until max_new_tokens or a stop id; return (text, ids)."""
    out = TextStream(tokenizer, prev_id=prompt_ids[-1])
    text, ids = [], []
    n = new_token_budget(cfg, engine, len(prompt_ids))
    for tok in engine.generate(prompt_ids, n, params, gen, stop_ids=stop, reuse_cache=reuse_cache):
        ids.append(tok)
        piece = out.push(tok)
        text.append(piece)
        print(piece, end="", flush=True)
    tail = out.flush()
    print(tail, flush=True)
    return "".join(text) + tail, ids


def summary(engine: Engine) -> str:
    s = engine.stats
    return (f"[{s.prompt_tokens - s.reused_tokens} prompt tokens prefilled in {s.prefill_s * 1000:.0f} ms "
            f"({s.reused_tokens} reused from the cache); {s.new_tokens} new tokens, "
            f"decode {s.decode_tok_s:.1f} tok/s; cache {engine.cache.used_bytes / 2**20:.2f} of "
            f"{engine.cache.nbytes / 2**20:.2f} MiB]")


def stop_ids(tokenizer, kind: str) -> set[int]:
    """EOS ends a reply. llama2.c models also stop at BOS, as llama2.c's run.c does: they were trained on
    stories each starting with BOS, so a BOS means the next, unrelated story is about to begin."""
    stop = {tokenizer.eos_id} if tokenizer.eos_id is not None else set()
    if kind == "llama2c" and tokenizer.bos_id is not None:
        stop.add(tokenizer.bos_id)
    return stop


def chat_loop(engine: Engine, tokenizer, cfg: GenerateConfig, params: SamplingParams, gen: torch.Generator,
              stop: set[int]) -> None:
    if not tokenizer.chat_template:
        raise CourseError(f"{cfg.model} has no chat template (chat_template in tokenizer_config.json); "
                          "use --prompt or --interactive instead of --chat")
    base = [{"role": "system", "content": cfg.system}] if cfg.system else []
    messages = list(base)
    print("chat: type a message; an empty line starts a new conversation; Ctrl-D quits.", file=sys.stderr)
    for line in sys.stdin:
        line = line.rstrip("\n")
        if not line.strip():
            messages = list(base)
            engine.reset()
            print("[new conversation]", file=sys.stderr)
            continue
        messages.append({"role": "user", "content": line})
        text = render_chat(tokenizer.chat_template, messages, bos_token=tokenizer.bos_token,
                           eos_token=tokenizer.eos_token)
        ids = tokenizer.encode(text, bos=False, allowed_special="all")
        try:
            reply, _ = stream(engine, tokenizer, ids, cfg, params, gen, reuse_cache=True, stop=stop)
        except CourseError as e:  # the conversation outgrew the context: say so, keep the session
            print(f"error: {e}; press Enter on an empty line to start a new conversation", file=sys.stderr)
            messages.pop()
            continue
        messages.append({"role": "assistant", "content": reply.strip()})
        print(summary(engine), file=sys.stderr)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__)
    GenerateConfig.add_args(parser, default_preset=None)
    cfg = GenerateConfig.from_args(parser.parse_args())
    set_seed(cfg.seed)
    device = get_device(cfg.device)
    dtype = getattr(torch, cfg.dtype)
    loaded = load_model(cfg.model, device, dtype)
    tokenizer = load_tokenizer_for(loaded, cfg.tokenizer or None)
    mcfg = loaded.model.config
    if tokenizer.vocab_size > mcfg.vocab_size:
        raise CourseError(f"the tokenizer has {tokenizer.vocab_size} tokens but the model only {mcfg.vocab_size}; "
                          "pass the tokenizer that belongs to this model with --tokenizer")
    max_len = min(cfg.max_len or mcfg.block_size, mcfg.block_size)
    step, kernels = None, "eager"
    if fast_decode.wanted(loaded.model, cfg.compile):  # the compiled step: --compile, or models >= 16 MiB
        step = fast_decode.FastDecoder(loaded.model, max_len)
        kernels = f"compiled ({step.compile_s:.1f} s to compile)"
    engine = Engine(loaded.model, max_len=max_len, step=step)
    params = cfg.sampling().check()
    gen = torch.Generator(device=device).manual_seed(cfg.seed)
    n = loaded.model.num_params()
    print(f"[{loaded.kind} model {loaded.path} ({n / 1e6:.2f}M params, {mcfg.n_layer} layers, "
          f"{mcfg.n_head}/{mcfg.n_kv_head} q/kv heads, context {mcfg.block_size}) on {device}, {cfg.dtype}; "
          f"tokenizer {tokenizer.name}; decode step: {kernels}]", file=sys.stderr)
    stop = stop_ids(tokenizer, loaded.kind)
    if cfg.chat:
        chat_loop(engine, tokenizer, cfg, params, gen, stop)
        return
    prompts = (line.rstrip("\n") for line in sys.stdin) if cfg.interactive else [cfg.prompt]
    if cfg.interactive:
        print("type a prompt per line; Ctrl-D quits.", file=sys.stderr)
    for prompt in prompts:
        ids = tokenizer.encode(prompt, bos=True) if prompt else [tokenizer.bos_id]
        if ids[0] is None:
            raise CourseError("this tokenizer has no BOS token: give a --prompt")
        if prompt:
            print(prompt, end="", flush=True)
        stream(engine, tokenizer, ids, cfg, params, gen, stop=stop)
        print(summary(engine), file=sys.stderr)
    s = engine.stats
    print(f"done: {s.new_tokens} tokens, {s.decode_tok_s:.1f} tok/s decode ({s.total_tok_s:.1f} tok/s incl. prefill)",
          file=sys.stderr)


if __name__ == "__main__":
    run_cli(main)
