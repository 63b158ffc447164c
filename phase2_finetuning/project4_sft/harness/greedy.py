"""Greedy generation for the harness: the plain recompute loop, stopping on an end token or a stop string.

WHY no KV cache here: project 4 builds on projects 1-3 only; the cache is project 8's. Evaluation runs are
short generations (a GSM8K answer, a function body), and `logits_to_keep=1` already skips the classifier
for every position but the last. A later project can pass its own faster `generate` to the evaluators.
"""

from __future__ import annotations

import torch

from phase2_finetuning.project4_sft.harness.multiple_choice import encode_context


def eos_ids(tok) -> set[int]:
    """Every id that ends a turn or a document for this tokenizer: its EOS, <|endoftext|>, <|im_end|>."""
    ids = {getattr(tok, "eos_id", None), getattr(tok, "eot_token", None)}
    specials = getattr(tok, "special_tokens", None) or {}
    ids |= {specials.get(s) for s in ("<|endoftext|>", "<|im_end|>", "</s>", "<|eot_id|>")}
    return {i for i in ids if i is not None}


@torch.no_grad()
def greedy_complete(model, tok, prompt: str, max_new_tokens: int, stop: tuple[str, ...] = ()) -> str:
    """The text the model writes after `prompt`, greedy, cut at the first stop string (which is not kept)."""
    ids = encode_context(tok, prompt)
    device = next(model.parameters()).device
    block = model.config.block_size
    ends, new = eos_ids(tok), []
    for _ in range(max_new_tokens):
        ctx = torch.tensor([(ids + new)[-block:]], device=device)
        nxt = int(model(ctx, logits_to_keep=1)[0][0, -1].argmax())
        if nxt in ends:
            break
        new.append(nxt)
        text = tok.decode(new)
        hits = [text.find(s) for s in stop if s in text]
        if hits:
            return text[:min(hits)]
    return tok.decode(new)
