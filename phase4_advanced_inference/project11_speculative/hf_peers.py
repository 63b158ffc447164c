"""The reference the benchmark measures us beside: `transformers`' assisted generation on the same weights.

- `hf_sharing(model)`: a transformers LlamaForCausalLM whose parameters ARE our tensors (project 3's name map; no
  copy). Works for `drafters.EarlyExit` too (its state dict has the same names over its kept layers), so HF's
  `assistant_model` can be exactly our self-speculation draft.
- `hf_generate(hf, prompt, n, ...)`: plain `generate()`, prompt lookup (`prompt_lookup_num_tokens=k`), or a draft
  model (`assistant_model`, k tokens per round: the constant schedule, no confidence cut-off, as ours).
Greedy only: that is where the two are token for token comparable.
"""

from __future__ import annotations

import torch

from phase1_foundation.project3_pretrain.hf_interop import hf_model_sharing


hf_sharing = hf_model_sharing  # project 3's: the parameters ARE our tensors


@torch.inference_mode()
def hf_generate(hf, prompt: list[int], n: int, stop: set[int], lookup_k: int | None = None,
                assistant=None, assistant_k: int = 4) -> list[int]:
    """Greedy `generate()`: plain, with prompt lookup (lookup_k), or with an assistant model; the new tokens."""
    ids = torch.tensor([prompt])
    kw = {}
    if lookup_k:
        kw["prompt_lookup_num_tokens"] = lookup_k
    if assistant is not None:
        assistant.generation_config.num_assistant_tokens = assistant_k
        assistant.generation_config.num_assistant_tokens_schedule = "constant"
        assistant.generation_config.assistant_confidence_threshold = 0.0
        kw["assistant_model"] = assistant
    out = hf.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=n, do_sample=False,
                      eos_token_id=sorted(stop) or None, pad_token_id=sorted(stop)[0] if stop else 0, **kw)
    return out[0, len(prompt):].tolist()
