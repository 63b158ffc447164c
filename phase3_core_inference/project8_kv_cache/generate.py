"""Generate text, streaming, from any LLaMA-architecture checkpoint: ours, Hugging Face, llama2.c or GGUF.

    uv run python phase3_core_inference/project8_kv_cache/generate.py                      # stories260K, greedy
    uv run python phase3_core_inference/project8_kv_cache/generate.py --prompt "Once upon a time" --temperature 0.8 --top_p 0.9
    uv run python phase3_core_inference/project8_kv_cache/generate.py --interactive         # a prompt per line
    uv run python phase3_core_inference/project8_kv_cache/generate.py --model path/to/hf_folder --chat
    uv run python phase3_core_inference/project8_kv_cache/generate.py --model TinyLlama/TinyLlama-1.1B-Chat-v1.0 --chat

The prompt is prefilled once; each new token is one decode step on the KV cache (engine.py). In --chat the
checkpoint's own chat template (Jinja) formats the conversation and the cache is kept across turns (only the
new turn is prefilled).

--max_new_tokens N adds exactly N tokens (N >= 1; 0 is refused) and must fit in the context window; left out,
as many as the context leaves after the prompt, up to 256. --max_len N caps the KV cache (left out: the model's
context window). --top_k, --top_p, --min_p left out are off.

--interactive and --chat follow the course's one session behaviour (course/interactive.py): a bad line (a
prompt longer than the context, text that is not UTF-8) is reported and the prompt comes back; an empty line
does nothing; /reset starts a new conversation (--chat); Ctrl-C stops the current answer, a second Ctrl-C,
Ctrl-D or /quit quits.
"""

from __future__ import annotations

import sys

import torch

from course.cli import ArgumentParser
from course.device import get_device, set_seed
from course.errors import CourseError, run_cli
from course.interactive import run_session
from course.paths import REPO_ROOT, repo_path
from phase1_foundation.project2_tokenizer.chat_template import render_chat
from phase1_foundation.project3_pretrain.loading import load_model, load_tokenizer_for
from phase3_core_inference.project8_kv_cache import fast_decode
from phase3_core_inference.project8_kv_cache.config import GenerateConfig
from phase3_core_inference.project8_kv_cache.engine import Engine, TextStream
from phase3_core_inference.project8_kv_cache.sampling import SamplingParams


# ---- the command ----------------------------------------------------------------------------------
DEFAULT_NEW_TOKENS = 256
HERE = "phase3_core_inference/project8_kv_cache"
GET_MODEL = {  # the folders of data/ this project's download scripts fill, and the command that fills each
    REPO_ROOT / "data" / "stories260k": f"uv run python {HERE}/download_data.py",
    REPO_ROOT / "data" / "smollm2": f"uv run python {HERE}/download_model.py",
}


def check_model_exists(spec: str) -> None:
    """A missing file under data/ is a download not yet run: say which command gets it (before anything loads).
    Other specs (hub ids, other paths) are left to project 3's loader, which names what it expected."""
    path = repo_path(spec)
    if path.exists():
        return
    for folder, command in GET_MODEL.items():
        if path.is_relative_to(folder):
            if path.suffix == ".gguf" and "download_model" in command:
                command += " --format gguf"
            raise CourseError(f"model not found: {spec}; get it with: {command}")
    if path.suffix in (".pt", ".bin", ".gguf"):  # a file, not a hub id: do not ask the hub for it
        raise CourseError(f"model not found: {spec}; get stories260K with: uv run python {HERE}/download_data.py, "
                          f"SmolLM2 with: uv run python {HERE}/download_model.py, or train one with project 3")


def new_token_budget(cfg: GenerateConfig, engine: Engine, prompt_len: int) -> int:
    """--max_new_tokens if given (the engine refuses it with one line if it does not fit), else up to 256
    tokens, as many as the context window leaves after the prompt."""
    if cfg.max_new_tokens is not None:
        return cfg.max_new_tokens
    return max(1, min(DEFAULT_NEW_TOKENS, engine.max_len - prompt_len))


def stream(engine: Engine, tokenizer, prompt_ids: list[int], cfg: GenerateConfig, params: SamplingParams,
           gen: torch.Generator, reuse_cache: bool = False, stop: set[int] = frozenset(), out=None,
           echo: str = "", header: str = "") -> tuple[str, list[int]]:
    """Generate and write to `out` as tokens decode, until max_new_tokens or a stop id; return (text, ids).

    `echo` (the prompt, to `out`) and `header` (to stderr) are written once the engine has accepted the
    prompt, so a prompt it refuses (too long for the context) prints nothing but its one error line."""
    out = out or sys.stdout
    text_out = TextStream(tokenizer, prev_id=prompt_ids[-1])
    text, ids = [], []
    n = new_token_budget(cfg, engine, len(prompt_ids))
    for tok in engine.generate(prompt_ids, n, params, gen, stop_ids=stop, reuse_cache=reuse_cache):
        if not ids:
            if header:
                print(header, file=sys.stderr, flush=True)
            out.write(echo)
        ids.append(tok)
        piece = text_out.push(tok)
        text.append(piece)
        out.write(piece)
        out.flush()
    tail = text_out.flush()
    out.write(tail + "\n")
    out.flush()
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


def no_template_error(model: str, kind: str) -> CourseError:
    """--chat needs a chat template; only a Hugging Face folder reads it from a file the user could edit."""
    where = {"hf": "no chat_template in its tokenizer_config.json",
             "gguf": "no tokenizer.chat_template in the file's metadata"}.get(kind, f"a {kind} model carries none")
    return CourseError(f"{model} has no chat template ({where}); use --prompt or --interactive instead of --chat, "
                       f"or chat with SmolLM2-135M-Instruct (get it with: uv run python {HERE}/download_model.py)")


def chat_session(engine: Engine, tokenizer, cfg: GenerateConfig, params: SamplingParams, gen: torch.Generator,
                 stop: set[int], kind: str) -> None:
    if not tokenizer.chat_template:
        raise no_template_error(cfg.model, kind)
    base = [{"role": "system", "content": cfg.system}] if cfg.system else []
    messages = list(base)

    def answer(line: str, out) -> None:
        messages.append({"role": "user", "content": line.rstrip("\n")})
        text = render_chat(tokenizer.chat_template, messages, bos_token=tokenizer.bos_token,
                           eos_token=tokenizer.eos_token)
        ids = tokenizer.encode(text, bos=False, allowed_special="all")
        try:
            reply, _ = stream(engine, tokenizer, ids, cfg, params, gen, reuse_cache=True, stop=stop, out=out)
        except CourseError as e:  # the conversation outgrew the context: the turn is dropped, the session goes on
            messages.pop()
            raise CourseError(f"{e}; /reset starts a new conversation") from None
        except KeyboardInterrupt:  # the reply was stopped: forget the turn (the cache re-checks its prefix)
            messages.pop()
            raise
        messages.append({"role": "assistant", "content": reply.strip()})
        out.end_line()
        print(summary(engine), file=sys.stderr, flush=True)

    def reset() -> None:
        messages[:] = base
        engine.reset()

    run_session(answer, prompt="you> ", reset=reset,
                banner="chat: type a message; /reset starts a new conversation; Ctrl-C stops a reply; "
                       "/quit or Ctrl-D quits")


def prompt_session(engine: Engine, tokenizer, cfg: GenerateConfig, params: SamplingParams, gen: torch.Generator,
                   stop: set[int]) -> None:
    def answer(line: str, out) -> None:
        prompt = line.rstrip("\n")
        stream(engine, tokenizer, tokenizer.encode(prompt, bos=True), cfg, params, gen, stop=stop, out=out,
               echo=prompt)
        out.end_line()
        print(summary(engine), file=sys.stderr, flush=True)

    run_session(answer, prompt="prompt> ",
                banner="interactive: type a prompt per line, it is continued; Ctrl-C stops an answer, "
                       "/quit or Ctrl-D quits")


def build_parser() -> ArgumentParser:
    parser = ArgumentParser(description=__doc__)
    GenerateConfig.add_args(parser, default_preset=None)
    return parser


def main(argv: list[str] | None = None) -> None:
    cfg = GenerateConfig.from_args(build_parser().parse_args(argv))  # every flag checked before anything loads
    check_model_exists(cfg.model)
    set_seed(cfg.seed)
    device = get_device(cfg.device)
    dtype = getattr(torch, cfg.dtype)
    loaded = load_model(cfg.model, device, dtype)
    tokenizer = load_tokenizer_for(loaded, cfg.tokenizer)
    mcfg = loaded.model.config
    if tokenizer.vocab_size > mcfg.vocab_size:
        raise CourseError(f"the tokenizer has {tokenizer.vocab_size} tokens but the model only {mcfg.vocab_size}; "
                          "pass the tokenizer that belongs to this model with --tokenizer")
    if cfg.chat and not tokenizer.chat_template:  # before compiling anything
        raise no_template_error(cfg.model, loaded.kind)
    if not (cfg.chat or cfg.interactive or cfg.prompt) and tokenizer.bos_id is None:
        raise CourseError("this tokenizer has no BOS token to start from: give a --prompt")
    max_len = min(cfg.max_len or mcfg.block_size, mcfg.block_size)
    step, kernels = None, "eager"
    if fast_decode.wanted(loaded.model, cfg.compile):  # the compiled step: --compile, or models >= 16 MiB
        step = fast_decode.FastDecoder(loaded.model, max_len)
        kernels = f"compiled ({step.compile_s:.1f} s to compile)"
    engine = Engine(loaded.model, max_len=max_len, step=step)
    params = cfg.sampling().check()
    gen = torch.Generator(device=device).manual_seed(cfg.seed)
    n = loaded.model.num_params()
    header = (f"[{loaded.kind} model {loaded.path} ({n / 1e6:.2f}M params, {mcfg.n_layer} layers, "
          f"{mcfg.n_head}/{mcfg.n_kv_head} q/kv heads, context {mcfg.block_size}) on {device}, {cfg.dtype}; "
          f"tokenizer {tokenizer.name}; decode step: {kernels}]")
    stop = stop_ids(tokenizer, loaded.kind)
    if cfg.chat or cfg.interactive:
        print(header, file=sys.stderr, flush=True)
    if cfg.chat:
        return chat_session(engine, tokenizer, cfg, params, gen, stop, loaded.kind)
    if cfg.interactive:
        return prompt_session(engine, tokenizer, cfg, params, gen, stop)
    ids = tokenizer.encode(cfg.prompt, bos=True) if cfg.prompt else [tokenizer.bos_id]
    stream(engine, tokenizer, ids, cfg, params, gen, stop=stop, echo=cfg.prompt, header=header)
    print(summary(engine), file=sys.stderr)
    s = engine.stats
    print(f"done: {s.new_tokens} tokens, {s.decode_tok_s:.1f} tok/s decode ({s.total_tok_s:.1f} tok/s incl. prefill)",
          file=sys.stderr)


if __name__ == "__main__":
    run_cli(main)
