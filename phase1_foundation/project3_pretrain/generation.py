"""Sampling token ids from a project-3 model without a KV cache (generate.py, export_hf.py and tests use it).

PAPER: Radford et al., 2019 (GPT-2): autoregressive generation, one sampled token appended at a time. The
sampling itself is project 1's (`stream_tokens` over `sampling.sample_next_token`: temperature, top-k, top-p;
temperature 0 is greedy); this module adds a stop token and returns the whole sequence.
No KV cache: each token re-runs the whole context (project 8 adds the cache).
"""

from __future__ import annotations

import torch

from phase1_foundation.project1_minimal_gpt.sampling import stream_tokens


@torch.inference_mode()
def generate_ids(model: torch.nn.Module, idx: torch.Tensor, max_new_tokens: int, temperature: float = 1.0,
                 top_k: int | None = None, top_p: float | None = None, generator: torch.Generator | None = None,
                 stop_token: int | None = None) -> torch.Tensor:
    """prompt ids (1, T) -> prompt + continuation (1, T + n), through project 1's stream_tokens."""
    out = idx.tolist()[0]
    for tok in stream_tokens(model, idx, max_new_tokens, model.config.block_size, temperature, top_k, top_p,
                             generator):
        out.append(tok)
        if tok == stop_token:
            break
    return torch.tensor([out], dtype=torch.long)
