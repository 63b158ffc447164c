"""The peer the benchmark measures us beside: transformers' own continuous batching, on the same weights.

`hf_serve(model, requests, ...)` builds a transformers LlamaForCausalLM whose parameters ARE our tensors (project
3's `hf_model_sharing`, no copy), starts its continuous-batching manager (`init_continuous_batching`: paged KV
cache, FIFO scheduler, its own varlen attention) with the same row limit and token budget as ours, submits every
request at once (offline: the throughput comparison) with its own max_new_tokens and EOS, and collects the
generated tokens. Greedy only: there the two are token for token comparable. The manager's warm-up runs before
the clock starts, as our engine's first forward is not excluded (ours has none to do).
"""

from __future__ import annotations

import math
import time

from phase1_foundation.project3_pretrain.hf_interop import hf_model_sharing
from phase4_advanced_inference.project12_continuous_batching.request import Request


def hf_serve(model, requests: list[Request], max_rows: int, max_batch_tokens: int, max_len: int,
             eos: list[int]) -> tuple[dict[str, list[int]], float]:
    """{request id: generated tokens} and the seconds from the first submission to the last result."""
    from transformers import ContinuousBatchingConfig, GenerationConfig

    hf = hf_model_sharing(model)
    page = 16
    gen = GenerationConfig(do_sample=False, max_new_tokens=max(r.max_new_tokens for r in requests),
                           eos_token_id=eos or None, pad_token_id=eos[0] if eos else 0)
    cb = ContinuousBatchingConfig(page_size=page, num_blocks=math.ceil(max_rows * max_len / page) + max_rows,
                                  max_batch_tokens=max_batch_tokens, max_requests_per_batch=max_rows,
                                  use_cuda_graph=False)
    out: dict[str, list[int]] = {}
    with hf.continuous_batching_context_manager(generation_config=gen, continuous_batching_config=cb,
                                                warmup=True) as manager:
        t0 = time.perf_counter()
        for r in requests:
            manager.add_request(r.prompt, request_id=r.id, max_new_tokens=r.max_new_tokens, eos_token_id=eos)
        while len(out) < len(requests):
            res = manager.get_result(timeout=600)
            if res is None or res.error:
                raise RuntimeError("transformers' continuous batching stopped before every request finished"
                                   + (f": {res.error}" if res else ""))
            out[res.request_id] = list(res.generated_tokens)
        seconds = time.perf_counter() - t0
    return out, seconds
