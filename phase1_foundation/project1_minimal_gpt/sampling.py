"""Turning next-token logits into a sampled token: temperature, top-k and top-p (nucleus) filtering.

PAPERS
    Ackley, Hinton & Sejnowski, 1985 (temperature in the Boltzmann distribution) - the softmax
        temperature used by every LM sampler.
    Fan, Lewis & Dauphin, 2018, "Hierarchical Neural Story Generation": top-k sampling.
    Holtzman et al., 2020, "The Curious Case of Neural Text Degeneration": top-p (nucleus) sampling.

    Radford et al., 2019 (GPT-2): autoregressive generation - feed the text so far, sample the next
        token from the predicted distribution, append it, repeat (`stream_tokens`).

Every filter is pure and works on a logits tensor of shape (..., V): one row per sequence.
Filters set the logits of excluded tokens to -inf, so a softmax afterwards gives them
probability exactly 0 and renormalises the rest. Project 8 (KV-cache inference) imports these;
project 3 samples with `stream_tokens`.
"""

from __future__ import annotations

import math
from typing import Iterator, TextIO

import torch

from course.errors import ConfigError, CourseError
from phase1_foundation.project1_minimal_gpt.data import encode


def apply_temperature(logits: torch.Tensor, temperature: float) -> torch.Tensor:
    """logits / temperature.

    INTUITION: softmax(z / t): t < 1 sharpens the distribution (more conservative text),
        t > 1 flattens it (more surprising text), t = 1 leaves the model's distribution unchanged.
        t -> 0 tends to argmax; sample_next_token treats t == 0 as greedy decoding.
    """
    if not temperature > 0:
        raise ConfigError(f"temperature ({temperature}) must be > 0 here (use sample_next_token with "
                          "temperature=0 for greedy decoding)")
    return logits / temperature


def top_k_filter(logits: torch.Tensor, k: int) -> torch.Tensor:
    """Keep the k largest logits of each row, set the rest to -inf.

    PAPER: Fan et al. 2018. WHY: cuts the long tail of individually unlikely tokens that, summed,
        would otherwise be sampled surprisingly often. Ties with the k-th value are all kept.
    """
    if not isinstance(k, int) or isinstance(k, bool) or k <= 0:
        raise ConfigError(f"top_k ({k!r}) must be a positive integer")
    if k >= logits.size(-1):
        return logits
    kth = torch.topk(logits, k, dim=-1).values[..., -1:]  # (..., 1) the k-th largest value per row
    return logits.masked_fill(logits < kth, float("-inf"))


def top_p_filter(logits: torch.Tensor, p: float) -> torch.Tensor:
    """Keep the smallest set of most-likely tokens whose total probability reaches p (nucleus).

    PAPER: Holtzman et al. 2020, eq. 2: the top-p vocabulary V(p) is the smallest set with
        sum_{x in V(p)} P(x) >= p. INTUITION: unlike top-k, the number of candidates adapts -
        few when the model is confident, many when it is not.
    IMPLEMENTATION: sort descending, take the cumulative probability; a token is dropped when the
        tokens ranked before it already reach p. The most likely token is therefore always kept.
    """
    if not (isinstance(p, (int, float)) and 0.0 < p <= 1.0):
        raise ConfigError(f"top_p ({p!r}) must be in (0, 1]")
    if p >= 1.0:
        return logits
    sorted_logits, sorted_idx = torch.sort(logits, dim=-1, descending=True)
    probs = torch.softmax(sorted_logits, dim=-1)
    mass_before = torch.cumsum(probs, dim=-1) - probs           # probability of the higher-ranked tokens
    remove_sorted = mass_before >= p
    remove = remove_sorted.scatter(-1, sorted_idx, remove_sorted)  # back to vocabulary order
    return logits.masked_fill(remove, float("-inf"))


def sample_next_token(logits: torch.Tensor, temperature: float = 1.0, top_k: int | None = None,
                      top_p: float | None = None, generator: torch.Generator | None = None) -> torch.Tensor:
    """Sample one token id per row of `logits` (..., V); returns a LongTensor of shape (..., 1).

    Order: temperature, then top-k, then top-p (as in Hugging Face's samplers), then a draw from
    the softmax. temperature == 0 means greedy decoding (argmax; top-k/top-p do not change it).
    Pass a seeded torch.Generator to make the draw reproducible.
    """
    if not (temperature >= 0 and math.isfinite(temperature)):  # `not >=`: nan fails it too
        raise ConfigError(f"temperature ({temperature}) must be >= 0 (0 = greedy) and finite")
    if temperature == 0:
        return torch.argmax(logits, dim=-1, keepdim=True)
    logits = apply_temperature(logits.float(), temperature)
    if top_k is not None:
        logits = top_k_filter(logits, top_k)
    if top_p is not None:
        logits = top_p_filter(logits, top_p)
    probs = torch.softmax(logits, dim=-1)
    flat = probs.reshape(-1, probs.size(-1))
    out = torch.multinomial(flat, num_samples=1, generator=generator)  # (N, 1)
    return out.view(*probs.shape[:-1], 1)


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


def generate_text(model: torch.nn.Module, chars: list[str], prompt: str, max_new_tokens: int,
                  temperature: float = 1.0, top_k: int | None = None, top_p: float | None = None,
                  seed: int | None = None, stream: TextIO | None = None) -> str:
    """Continue `prompt` with `max_new_tokens` characters; write each to `stream` (if given) as it comes."""
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
