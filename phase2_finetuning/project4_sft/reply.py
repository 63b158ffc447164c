"""A chat reply: the plain sampling loop, stopping at the end-of-turn token (or when the budget runs out).

PAPER CONTEXT: Holtzman et al., 2020 ("The Curious Case of Neural Text Degeneration") on why greedy decoding
repeats itself and temperature / top-k sampling reads better; the default here is greedy (temperature 0),
which makes before/after comparisons reproducible.
INTUITION: an assistant's turn ends when the model itself writes `<|im_end|>`. A base model never saw that
token, so it rambles until the budget runs out; after SFT it should stop on its own. Whether it did is what
`Reply.ended` records, and what train_sft.py's "end-of-turn share" counts.
IMPLEMENTATION: recompute the whole window at every step (no KV cache: that is project 8), asking the model
for the last position's logits only (`logits_to_keep=1`). Streaming: `on_token(text)` gets each new piece of
text as soon as it decodes to whole UTF-8 characters.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch

from phase2_finetuning.project4_sft.masking import encode_prompt


@dataclass
class ChatFormat:
    """How a model's chats are framed: its Jinja template, the token that ends a turn, its BOS string."""

    template: str
    end_token: str = "<|im_end|>"
    bos_token: str = ""

    def end_ids(self, tok) -> set[int]:
        """The ids that end an answer: the end-of-turn token, and end-of-text if the tokenizer has one."""
        specials = dict(getattr(tok, "special_tokens", {}) or {})
        ids = {specials.get(self.end_token), specials.get("<|endoftext|>"), getattr(tok, "eos_id", None)}
        return {i for i in ids if i is not None}


@dataclass
class Reply:
    text: str
    ids: list[int]
    ended: bool  # the model wrote an end token within the budget


@torch.no_grad()
def sample_reply(model, prompt_ids: list[int], end_ids: set[int], max_new_tokens: int, decode: Callable,
                 temperature: float = 0.0, top_k: int = 0, generator: torch.Generator | None = None,
                 on_token: Callable[[str], object] | None = None) -> Reply:
    """Continue `prompt_ids` until an id in `end_ids` (not kept) or `max_new_tokens` new ids."""
    was_training = model.training
    model.eval()
    device = next(model.parameters()).device
    block = model.config.block_size
    new: list[int] = []
    shown = ""
    ended = False
    try:
        for _ in range(max_new_tokens):
            ctx = torch.tensor([(prompt_ids + new)[-block:]], device=device)
            logits = model(ctx, logits_to_keep=1)[0][0, -1].float()
            if temperature <= 0:
                nxt = int(logits.argmax())
            else:
                logits = logits / temperature
                if top_k > 0:
                    kth = torch.topk(logits, min(top_k, logits.numel())).values[-1]
                    logits = logits.masked_fill(logits < kth, float("-inf"))
                probs = torch.softmax(logits, dim=-1).cpu()
                nxt = int(torch.multinomial(probs, 1, generator=generator))
            if nxt in end_ids:
                ended = True
                break
            new.append(nxt)
            if on_token is not None:
                text = decode(new)
                if not text.endswith("\ufffd") and len(text) > len(shown):  # wait for a whole character
                    on_token(text[len(shown):])
                    shown = text
    finally:
        model.train(was_training)
    text = decode(new)
    if on_token is not None and len(text) > len(shown):
        on_token(text[len(shown):])
    return Reply(text, new, ended)


def chat_reply(model, tok, fmt: ChatFormat, messages: list[dict], max_new_tokens: int, **kw) -> Reply:
    """The assistant's next turn in `messages` (which end with a user message)."""
    ids = encode_prompt(tok, fmt.template, messages, bos_token=fmt.bos_token, eos_token=fmt.end_token)
    return sample_reply(model, ids, fmt.end_ids(tok), max_new_tokens, tok.decode, **kw)
