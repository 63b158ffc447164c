"""Workloads for the engine: seeded synthetic traffic from real instructions, and recorded traces (JSONL).

- Arrivals: a Poisson process at `rate` requests per second (exponential gaps of mean 1 / rate), the usual model
  of many independent users (vLLM's and Sarathi-Serve's benchmarks draw arrivals the same way).
- Prompts: Alpaca instructions (project 4's reader, data/alpaca_subset) as one user turn in the model's chat
  template; `long_prompts` of them are replaced by a long prompt (several instructions to summarise at once), the
  case chunked prefill is for.
- Output lengths: 1 + a geometric draw of mean `mean_output`, capped at `max_output`: most replies short, a few
  long (the spread is what static batching pays for: a group waits for its longest member).
- A trace is one JSON object per line: {"arrival": s, "prompt": [ids], "max_new_tokens": n, "seed": s} and
  optionally "temperature", "top_k", "top_p", "min_p", "repetition_penalty", "stop": [strings].
"""

from __future__ import annotations

import json
import math
import random
from pathlib import Path

from course.checkpoint import atomic_write_text
from course.errors import CourseError
from course.paths import repo_path
from phase3_core_inference.project8_kv_cache.sampling import SamplingParams
from phase4_advanced_inference.project12_continuous_batching.request import Request

SAMPLING_KEYS = ("temperature", "top_k", "top_p", "min_p", "repetition_penalty")


def output_length(rng: random.Random, mean: float, cap: int) -> int:
    """1 + Geometric(p = 1 / mean) - 1 draws, i.e. mean `mean` before the cap; always in [1, cap]."""
    if mean <= 1:
        return 1
    p = 1.0 / mean
    n = 1 + int(math.log(1.0 - rng.random()) / math.log(1.0 - p))
    return max(1, min(cap, n))


def synthetic(prompts: list[list[int]], n: int, rate: float | None, seed: int, mean_output: float,
              max_output: int, params: SamplingParams | None = None) -> list[Request]:
    """`n` requests: prompts drawn (with replacement) from `prompts`, Poisson arrivals at `rate` per second
    (None: all at time 0, an offline batch), output lengths from `output_length`, one seed each."""
    if not prompts:
        raise CourseError("the workload needs at least one prompt")
    rng = random.Random(seed)
    t, out = 0.0, []
    for i in range(n):
        if rate is not None and i > 0:
            t += rng.expovariate(rate)
        out.append(Request(list(rng.choice(prompts)), output_length(rng, mean_output, max_output),
                           params or SamplingParams(temperature=0.0), seed=rng.randrange(2**31), arrival=t,
                           id=f"req-{i}"))
    return out


def chat_prompt(tok, text: str) -> list[int]:
    """`text` as one user turn in the tokenizer's chat template, ready for the reply (plain text with BOS for a
    tokenizer without a template)."""
    from phase1_foundation.project2_tokenizer.chat_template import render_chat

    if not getattr(tok, "chat_template", None):
        return tok.encode(text, bos=True)
    rendered = render_chat(tok.chat_template, [{"role": "user", "content": text}], bos_token=tok.bos_token,
                           eos_token=tok.eos_token)
    return tok.encode(rendered, bos=False, allowed_special="all")


def alpaca_prompts(tok, count: int, seed: int, max_tokens: int, path: str | None = None) -> list[list[int]]:
    """`count` Alpaca instructions (with their input, if any) as chat prompts of at most `max_tokens` tokens."""
    from phase2_finetuning.project4_sft.conversations import ALPACA_PATH, read_alpaca

    chats = read_alpaca(path or ALPACA_PATH).chats
    rng = random.Random(seed)
    rng.shuffle(chats)
    out = []
    for chat in chats:
        ids = chat_prompt(tok, chat[0]["content"])
        if len(ids) <= max_tokens:
            out.append(ids)
        if len(out) == count:
            break
    return out


def long_prompt(tok, tokens: int, seed: int, path: str | None = None) -> list[int]:
    """One prompt of about `tokens` tokens: Alpaca instructions to summarise, one after another."""
    from phase2_finetuning.project4_sft.conversations import ALPACA_PATH, read_alpaca

    chats = read_alpaca(path or ALPACA_PATH).chats
    rng = random.Random(seed)
    parts, ids = [], []
    while len(ids) < tokens:
        parts.append(rng.choice(chats)[0]["content"])
        ids = chat_prompt(tok, "Summarise these requests in one line each:\n\n" + "\n\n".join(parts))
    return ids


def with_long_prompts(requests: list[Request], long: list[int], count: int, seed: int) -> list[Request]:
    """Give `count` of the requests (seeded pick) the long prompt instead of theirs."""
    rng = random.Random(seed)
    for r in rng.sample(requests, min(count, len(requests))):
        r.prompt = list(long)
    return requests


GET = {"smollm2": "uv run python phase3_core_inference/project8_kv_cache/download_model.py --format gguf",
       "stories260k": "uv run python phase3_core_inference/project8_kv_cache/download_data.py",
       "alpaca_subset": "uv run python phase2_finetuning/project4_sft/download_data.py --dataset alpaca"}


def require(path: str, what: str) -> None:
    p = repo_path(path)
    if not p.exists():
        hint = next((cmd for folder, cmd in GET.items() if folder in p.parts), None)
        raise CourseError(f"{what} not found: {path}" + (f"; get it with: {hint}" if hint else ""))


def stop_ids(tok, kind: str) -> frozenset[int]:
    stop = {tok.eos_id} if tok.eos_id is not None else set()
    if kind == "llama2c" and tok.bos_id is not None:
        stop.add(tok.bos_id)  # llama2.c stories end at the next BOS
    return frozenset(stop)


def from_config(cfg, tok, kind: str, max_len: int) -> list:
    """The requests of a BatchConfig (a trace, or a seeded synthetic workload); stop ids from the tokenizer,
    max_new_tokens clipped to what fits in max_len."""
    if cfg.trace:
        reqs = load_trace(cfg.trace)
    else:
        if getattr(tok, "chat_template", None):
            require("data/alpaca_subset/alpaca_5000.json", "Alpaca data (the workload's prompts)")
            prompts = alpaca_prompts(tok, 500, cfg.seed, cfg.max_prompt)
        else:  # a model without a chat template (llama2.c stories): every request starts from BOS
            if tok.bos_id is None:
                raise CourseError("this tokenizer has neither a chat template nor BOS: give --trace")
            prompts = [[tok.bos_id]]
        reqs = synthetic(prompts, cfg.requests, cfg.rate, cfg.seed, cfg.mean_output, cfg.max_output,
                                  cfg.sampling().check())
        if cfg.long_prompts:
            long = long_prompt(tok, cfg.long_prompt_tokens, cfg.seed)
            with_long_prompts(reqs, long, cfg.long_prompts, cfg.seed)
    stop = stop_ids(tok, kind)
    for r in reqs:
        r.stop_ids = stop
        r.max_new_tokens = max(1, min(r.max_new_tokens, max_len - len(r.prompt)))
    return reqs


# ---- traces ----------------------------------------------------------------------------------------------
def save_trace(requests: list[Request], path: str | Path) -> Path:
    """The requests as a JSONL trace (atomically)."""
    lines = []
    for r in requests:
        row = {"arrival": r.arrival, "prompt": r.prompt, "max_new_tokens": r.max_new_tokens, "seed": r.seed}
        row.update({k: getattr(r.params, k) for k in SAMPLING_KEYS})
        if r.stop:
            row["stop"] = list(r.stop)
        lines.append(json.dumps(row))
    return atomic_write_text(Path(path), "\n".join(lines) + "\n")


def load_trace(path: str | Path) -> list[Request]:
    """Requests from a JSONL trace; a bad line is one error naming the file and the line."""
    path = Path(path)
    if not path.is_file():
        raise CourseError(f"trace not found: {path} (one JSON object per line: arrival, prompt, max_new_tokens)")
    out = []
    for n, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
            params = SamplingParams(**{k: row[k] for k in SAMPLING_KEYS if k in row})
            req = Request([int(t) for t in row["prompt"]], int(row["max_new_tokens"]), params,
                          seed=int(row.get("seed", n)), stop=tuple(row.get("stop", ())),
                          arrival=float(row["arrival"]), id=f"req-{len(out)}")
        except (ValueError, TypeError, KeyError, json.JSONDecodeError) as e:
            raise CourseError(f"{path} line {n}: not a request ({type(e).__name__}: {e}); expected "
                              '{"arrival": seconds, "prompt": [token ids], "max_new_tokens": n}') from None
        out.append(req)
    return out
