"""Generate with speculative decoding: a drafter proposes --k tokens, the target verifies them in one forward.

    uv run python phase4_advanced_inference/project11_speculative/generate.py --chat \\
        --prompt "Rewrite this sentence in the past tense: The cat sits on the mat and looks at the birds."
    uv run python phase4_advanced_inference/project11_speculative/generate.py --speculative self --draft_layers 0-9
    uv run python phase4_advanced_inference/project11_speculative/generate.py --speculative model --draft PATH --k 3
    uv run python phase4_advanced_inference/project11_speculative/generate.py --model data/stories260k/stories260K.bin \\
        --prompt "Once upon a time" --temperature 0.8 --compare

--speculative lookup (default): prompt lookup, n-grams of the text so far, no model. self: the target's own first
layers (--draft_layers) with its final norm and classifier. model: --draft, any model with the target's
tokenizer (checked: same vocabulary, same bytes for every token id). none: project 8's plain decoding.
--adaptive grows k after a fully accepted draft and shrinks it after a rejection. --compare also decodes plainly
with project 8's engine and compares: greedy output must be identical (it is checked and said); sampled output
is only timed (it is exact in distribution, not token for token). The summary line gives the acceptance rate,
the mean accepted length and the tokens per target forward.
"""

from __future__ import annotations

import sys
import time

import torch

from course.cli import ArgumentParser
from course.device import get_device, set_seed
from course.errors import CourseError, run_cli
from course.paths import repo_path
from phase1_foundation.project2_tokenizer.chat_template import render_chat
from phase1_foundation.project3_pretrain.loading import load_model, load_tokenizer_for
from phase3_core_inference.project8_kv_cache.engine import Engine, TextStream
from phase4_advanced_inference.project11_speculative.config import SpeculativeConfig
from phase4_advanced_inference.project11_speculative.drafters import build_drafter, check_same_vocab
from phase4_advanced_inference.project11_speculative.speculative import SpeculativeEngine

GET_DATA = {"smollm2": "uv run python phase3_core_inference/project8_kv_cache/download_model.py --format gguf",
            "stories260k": "uv run python phase3_core_inference/project8_kv_cache/download_data.py"}


def check_exists(spec: str, what: str) -> None:
    """A missing file under data/ is a download not yet run: say which command gets it, before anything loads."""
    path = repo_path(spec)
    if path.exists() or path.suffix not in (".pt", ".bin", ".gguf"):
        return  # an HF folder or hub id: project 3's loader names what it expected
    hint = next((cmd for folder, cmd in GET_DATA.items() if folder in path.parts), None)
    raise CourseError(f"{what} not found: {spec}" + (f"; get it with: {hint}" if hint else ""))


def prompt_ids(cfg: SpeculativeConfig, tok) -> list[int]:
    if cfg.chat:
        if not tok.chat_template:
            raise CourseError(f"{cfg.model} has no chat template; drop --chat")
        text = render_chat(tok.chat_template, [{"role": "user", "content": cfg.prompt}],
                           bos_token=tok.bos_token, eos_token=tok.eos_token)
        return tok.encode(text, bos=False, allowed_special="all")
    if cfg.prompt:
        return tok.encode(cfg.prompt, bos=True)
    if tok.bos_id is None:
        raise CourseError("this tokenizer has no BOS token to start from: give a --prompt")
    return [tok.bos_id]


def stop_ids(tok, kind: str) -> set[int]:
    """EOS ends a reply; llama2.c models also stop at BOS (the next story), as project 8's generate.py does."""
    stop = {tok.eos_id} if tok.eos_id is not None else set()
    if kind == "llama2c" and tok.bos_id is not None:
        stop.add(tok.bos_id)
    return stop


def summary(engine: Engine, seconds: float) -> str:
    s = engine.stats
    line = f"{s.new_tokens} new tokens in {seconds:.2f} s ({s.new_tokens / seconds:.1f} tok/s incl. prefill)"
    if isinstance(engine, SpeculativeEngine):
        line += (f"; {engine.drafter.name}, k={engine.k}{' adaptive' if engine.adaptive else ''}: acceptance "
                 f"{100 * s.acceptance_rate:.1f}%, mean accepted {s.mean_accepted:.2f}, "
                 f"{s.tokens_per_forward:.2f} tokens per target forward ({s.target_forwards} forwards)")
    return line


def build_parser() -> ArgumentParser:
    parser = ArgumentParser(description=__doc__)
    SpeculativeConfig.add_args(parser, default_preset=None)
    return parser


def main(argv: list[str] | None = None) -> None:
    cfg = SpeculativeConfig.from_args(build_parser().parse_args(argv))  # every flag checked before anything loads
    check_exists(cfg.model, "model")
    if cfg.draft:
        check_exists(cfg.draft, "draft model")
    set_seed(cfg.seed)
    device = get_device(cfg.device)
    dtype = getattr(torch, cfg.dtype)
    loaded = load_model(cfg.model, device, dtype)
    tok = load_tokenizer_for(loaded, cfg.tokenizer)
    model = loaded.model
    max_len = min(cfg.max_len or model.config.block_size, model.config.block_size)
    ids = prompt_ids(cfg, tok)
    n = cfg.max_new_tokens or max(1, min(256, max_len - len(ids)))
    params = cfg.sampling().check()
    if cfg.speculative == "none":
        engine = Engine(model, max_len)
    else:
        draft = None
        if cfg.speculative == "model":
            dl = load_model(cfg.draft, device, dtype)
            draft = dl.model
            check_same_vocab(model, draft, tok, load_tokenizer_for(dl))
        drafter = build_drafter(cfg.speculative, model, max_len, draft, cfg.draft_layers, cfg.max_ngram,
                                cfg.min_ngram)
        engine = SpeculativeEngine(model, drafter, cfg.k, max_len, cfg.adaptive, cfg.k_max)
    engine.check_request(ids, n)  # a request that cannot fit: its one line, before anything is printed
    stop = stop_ids(tok, loaded.kind)
    print(f"[{loaded.kind} model {loaded.path} ({model.num_params() / 1e6:.2f}M params, {model.config.n_layer} "
          f"layers) on {device}, {cfg.dtype}; {len(ids)} prompt tokens; decoding: "
          f"{engine.drafter.name if isinstance(engine, SpeculativeEngine) else 'plain'}]", file=sys.stderr)
    gen = torch.Generator(device=device).manual_seed(cfg.seed)
    text = TextStream(tok, prev_id=ids[-1])
    sys.stdout.write(cfg.prompt if not cfg.chat else "")
    t0 = time.perf_counter()
    out = []
    for t in engine.generate(ids, n, params, gen, stop_ids=stop):
        out.append(t)
        sys.stdout.write(text.push(t))
        sys.stdout.flush()
    seconds = time.perf_counter() - t0
    sys.stdout.write(text.flush() + "\n")
    print(summary(engine, seconds), file=sys.stderr)
    if cfg.compare:
        plain = Engine(model, max_len)
        gen = torch.Generator(device=device).manual_seed(cfg.seed)
        t0 = time.perf_counter()
        ref = list(plain.generate(ids, n, params, gen, stop_ids=stop))
        ref_s = time.perf_counter() - t0
        same = "identical" if ref == out else "DIFFERENT"
        verdict = f"greedy output {same} to plain decoding" if params.greedy else "sampled (compared in distribution only)"
        print(f"check: plain decoding {len(ref) / ref_s:.1f} tok/s, this {len(out) / seconds:.1f} tok/s "
              f"({ref_s / seconds * len(out) / max(len(ref), 1):.2f}x); {verdict}", file=sys.stderr)
        if params.greedy and ref != out:
            raise CourseError("speculative greedy output differs from plain decoding (a near-tie in the logits, "
                              "or a bug): report it with the command line")


if __name__ == "__main__":
    run_cli(main)
