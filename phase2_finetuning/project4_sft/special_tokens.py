"""The chat format of a course model: new special tokens, a grown embedding, and a template stored with them.

Papers and conventions:
    ChatML (OpenAI, 2023; used by Qwen, SmolLM2 and many open models)   <|im_start|>role\\n ... <|im_end|>
    Hugging Face `tokenizer_config.json`                                 `chat_template`, `bos_token`, `eos_token`
    Mean-embedding initialisation of new tokens                          Hewitt, "Initializing New Word
        Embeddings for Pretrained Language Models" (2021): a new row at the mean of the old ones keeps the
        model's output distribution nearly unchanged, where a random row can dominate the softmax

INTUITION: a pretrained model has never seen `<|im_start|>` or `<|im_end|>`. They get the next free ids (so
every existing token keeps its id and every trained row keeps its meaning), the embedding table and the tied
classifier grow by one row per new token, and fine-tuning teaches the model what they mean.
WHY special tokens rather than plain-text markers: each is exactly one id, so "the turn is over" is one
prediction the sampler can stop on, and no user text can ever produce one (masking.py encodes content as
plain text).
"""

from __future__ import annotations

import copy
import json
from pathlib import Path

import torch

from course.checkpoint import atomic_write_text
from course.errors import CourseError
from phase1_foundation.project2_tokenizer.formats import save_tokenizer
from phase1_foundation.project3_pretrain.model import Llama

IM_START, IM_END = "<|im_start|>", "<|im_end|>"
CHAT_TOKENS = (IM_START, IM_END)

# ChatML without a default system prompt (SmolLM2's adds one). Prefix-stable, content verbatim: what masking needs.
CHATML_TEMPLATE = (
    "{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>' + '\\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}"
)


def add_special_tokens(tok, tokens=CHAT_TOKENS):
    """A copy of a trained project 2 tokenizer with `tokens` registered as special tokens at the next free ids.

    Tokens it already has keep their ids. The caller's tokenizer is left as it was.
    """
    if not hasattr(tok, "register_special_tokens"):
        raise CourseError(f"{type(tok).__name__} cannot take new special tokens; pass a project 2 tokenizer")
    new = copy.deepcopy(tok)
    new.register_special_tokens([t for t in tokens if t not in new.special_tokens])
    return new


@torch.no_grad()
def resize_embeddings(model: Llama, vocab_size: int) -> Llama:
    """A new Llama with `vocab_size` rows in its embedding (and classifier), new rows = the mean old row.

    Every other weight is copied; a tied classifier stays tied (it is the same matrix). An untied classifier's
    new rows are its own mean row. The caller's model is not changed.
    """
    old = model.config.vocab_size
    if vocab_size < old:
        raise CourseError(f"cannot shrink the vocabulary from {old} to {vocab_size}: trained rows would be lost")
    cfg = copy.deepcopy(model.config)
    cfg.vocab_size = vocab_size
    ref = next(model.parameters())
    new = Llama(cfg).to(device=ref.device, dtype=ref.dtype)
    state = model.state_dict()
    for name in ("tok_emb.weight", "lm_head.weight"):
        if name in state:
            w = state[name]
            state[name] = torch.cat([w, w.mean(dim=0, keepdim=True).expand(vocab_size - old, -1)])
    new.load_state_dict(state)
    return new.train(model.training)


def tokenizer_config(tok, template: str = CHATML_TEMPLATE, bos_token: str | None = None,
                     eos_token: str = IM_END, pad_token: str | None = None) -> dict:
    """The Hugging Face `tokenizer_config.json` fields that carry the chat format."""
    specials = dict(tok.special_tokens)
    for name, t in (("bos_token", bos_token), ("eos_token", eos_token), ("pad_token", pad_token)):
        if t is not None and t not in specials:
            raise CourseError(f"{name} {t!r} is not a special token of this tokenizer (it has {sorted(specials)})")
    return {
        "added_tokens_decoder": {str(i): {"content": s, "special": True, "lstrip": False, "rstrip": False,
                                          "normalized": False, "single_word": False}
                                 for s, i in sorted(specials.items(), key=lambda kv: kv[1])},
        "bos_token": bos_token, "eos_token": eos_token, "pad_token": pad_token if pad_token else eos_token,
        "chat_template": template, "clean_up_tokenization_spaces": False,
        "model_max_length": 1_000_000_000, "tokenizer_class": "PreTrainedTokenizerFast",
    }


def save_chat_format(folder: str | Path, tok, template: str = CHATML_TEMPLATE, bos_token: str | None = None,
                     eos_token: str = IM_END) -> Path:
    """Write `folder/tokenizer_config.json` (atomically) and the tokenizer itself as `folder/tokenizer.pkl`."""
    folder = Path(folder)
    save_tokenizer(tok, folder / "tokenizer.pkl")
    return atomic_write_text(folder / "tokenizer_config.json",
                             json.dumps(tokenizer_config(tok, template, bos_token, eos_token), indent=2) + "\n")


def load_chat_format(folder: str | Path) -> dict:
    """The chat_template / bos_token / eos_token stored by save_chat_format (or any HF tokenizer_config.json)."""
    path = Path(folder) / "tokenizer_config.json"
    if not path.is_file():
        raise CourseError(f"no tokenizer_config.json in {folder}; save the chat format with save_chat_format")
    try:
        cfg = json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise CourseError(f"{path} is not valid JSON ({e})") from None
    if not isinstance(cfg.get("chat_template"), str):
        raise CourseError(f"{path} has no chat_template string")
    return cfg
