"""Loss masking for supervised fine-tuning: render a chat with its template, train only the assistant's tokens.

Papers:
    Training language models to follow instructions with human feedback   Ouyang et al., 2022 (InstructGPT)
        SFT is next-token prediction on demonstrations; the loss is taken on the labeller's answer
    LIMA: Less Is More for Alignment                                      Zhou et al., 2023
        the loss is computed on the responses only, and every turn ends with an end-of-turn token
    Hugging Face chat templates (`apply_chat_template`, `{% generation %}` masks)   2023-2024
        the template, not the trainer, decides how turns are framed

INTUITION: a chat is one string once the template has framed it:
    <|im_start|>user\\nWhat is 2+2?<|im_end|>\\n<|im_start|>assistant\\n4<|im_end|>\\n
The model should learn to *answer*, not to predict the user's question or the framing the template adds, so
the targets are -1 (ignored by the cross-entropy) everywhere except the assistant's content and the end token
that closes its turn: that token is what teaches the model to stop. Every assistant turn of a multi-turn chat
is trained; the user turns in between are context only.

IMPLEMENTATION: the rendered string is cut into pieces at every message boundary: each message's content,
and the framing between them. Content is encoded as plain text (a user who types "<|im_end|>" gets the bytes,
never the control token); framing is encoded with its special tokens as single ids. Where each message's content
sits is found by rendering the chat one message longer at a time (templates are prefix-stable: the string for
k messages starts with the string for k - 1), so any Jinja template works, not just ChatML.

WHY encode piece by piece: generation sees exactly this split (the prompt ends at "<|im_start|>assistant\\n" and
the answer's tokens start fresh), so training on it matches what the model meets at inference.
"""

from __future__ import annotations

import re
from collections import Counter
from dataclasses import dataclass, field

import torch

from course.errors import CourseError
from phase1_foundation.project2_tokenizer.chat_template import render_chat
from phase2_finetuning.project4_sft.conversations import Chat, check_chat

IGNORE = -1  # project 3's Llama.forward: cross_entropy(..., ignore_index=-1)
_PROBE = "\ue000content\ue000"  # private-use characters: never in a template, never in real text


def render(template: str, messages: list[dict], *, bos_token: str = "", eos_token: str = "",
           add_generation_prompt: bool = False) -> str:
    """Render a Hugging Face chat template (project 2's `render_chat`: sandboxed Jinja, like transformers)."""
    return render_chat(template, messages, bos_token=bos_token, eos_token=eos_token,
                       add_generation_prompt=add_generation_prompt)


# ---- the tokenizer side: plain text and special tokens ----------------------------------------------
def plain_encoder(tok):
    """text -> ids with no special tokens at all (project 2's `encode_ordinary`, or that of a wrapped one).

    A wrapper that is narrower than what it wraps (the GGUF adapter gives the few bytes SmolLM2's vocabulary
    lacks placeholder ids past its `vocab_size`) drops those ids, as its own `encode` does.
    """
    if hasattr(tok, "encode_ordinary"):
        return tok.encode_ordinary
    inner = getattr(tok, "tok", None)
    if inner is not None and hasattr(inner, "encode_ordinary"):
        n_outer, n_inner = getattr(tok, "vocab_size", None), getattr(inner, "vocab_size", None)
        if isinstance(n_outer, int) and isinstance(n_inner, int) and n_outer < n_inner:
            return lambda text: [i for i in inner.encode_ordinary(text) if i < n_outer]
        return inner.encode_ordinary
    raise CourseError(f"{type(tok).__name__} has no encode_ordinary(text); pass a project 2 tokenizer "
                      "(or an adapter around one)")


def special_ids(tok) -> dict[str, int]:
    specials = dict(getattr(tok, "special_tokens", None) or getattr(getattr(tok, "tok", None), "special_tokens", {}))
    if not specials:
        raise CourseError("the tokenizer has no special tokens; add the chat tokens first (special_tokens.py)")
    return specials


@dataclass
class EncodedChat:
    """One chat as token ids, with `trained[j]` True where token j is a target the loss sees."""

    ids: list[int]
    trained: list[bool]
    truncated: bool = False

    def inputs_and_targets(self) -> tuple[list[int], list[int]]:
        """(input ids, targets): targets[t] = ids[t + 1] where that token is trained, else IGNORE."""
        return self.ids[:-1], [i if m else IGNORE for i, m in zip(self.ids[1:], self.trained[1:])]

    @property
    def n_trained(self) -> int:
        return sum(self.trained[1:])


def message_spans(template: str, chat: Chat, bos_token: str = "", eos_token: str = "") -> tuple[str, list[tuple[int, int]]]:
    """The rendered chat and, per message, the (start, end) characters of its content in that string."""
    kw = dict(bos_token=bos_token, eos_token=eos_token, add_generation_prompt=False)
    full = render(template, chat, **kw)
    spans, lo = [], 0
    for k, msg in enumerate(chat):
        prefix = render(template, chat[:k + 1], **kw)
        if not full.startswith(prefix):
            raise CourseError(f"the chat template is not prefix-stable (the chat up to message {k} renders "
                              "differently inside the whole chat); masking needs one that is")
        content = msg["content"].strip()
        # Where the template puts message k's content: render it with a marker in its place. Searching for the
        # content itself could match inside the framing first (a reply "a" inside "<|im_start|>assistant").
        probe = render(template, chat[:k] + [{**msg, "content": _PROBE}], **kw)
        at = probe.find(_PROBE)
        if at >= lo and full.startswith(content, at):
            start = at
        else:  # a template that rewrites the content: the first verbatim match after the previous message
            start = full.find(content, lo, len(prefix)) if content else len(prefix)
        if start < 0:
            raise CourseError(f"message {k} ({msg['role']}) does not appear verbatim in the rendered chat; "
                              "the template rewrites message content, which masking cannot follow")
        spans.append((start, start + len(content)))
        lo = start + len(content)
    return full, spans


def encode_chat(tok, template: str, chat: Chat, *, end_token: str, bos_token: str = "",
                max_tokens: int | None = None) -> EncodedChat:
    """Tokenize a chat so that only assistant content and each assistant turn's `end_token` are trained.

    `max_tokens` keeps the first max_tokens ids (a training row of block_size inputs needs block_size + 1);
    a cut row says so in `.truncated` (the caller counts them, nothing is dropped silently).
    """
    check_chat(chat)
    full, spans = message_spans(template, chat, bos_token=bos_token, eos_token=end_token)
    specials = special_ids(tok)
    if end_token not in specials:
        raise CourseError(f"end token {end_token!r} is not a special token of this tokenizer")
    plain = plain_encoder(tok)
    special_re = re.compile("|".join(re.escape(s) for s in sorted(specials, key=len, reverse=True)))

    # Pieces (start, end, is_content, trained), in order; they tile the rendered string.
    cuts: list[tuple[int, int, bool, bool]] = []
    pos = 0
    for k, (msg, (s, e)) in enumerate(zip(chat, spans)):
        if msg["role"] == "assistant":
            nxt = spans[k + 1][0] if k + 1 < len(spans) else len(full)
            close = full.find(end_token, e, nxt)
            if close < 0:
                raise CourseError(f"the template does not close assistant turns with {end_token!r}; pass the "
                                  "end-of-turn token it uses")
            cuts += [(pos, s, False, False), (s, e, True, True), (e, close + len(end_token), False, True)]
            pos = close + len(end_token)
        else:
            cuts += [(pos, s, False, False), (s, e, True, False)]
            pos = e
    cuts.append((pos, len(full), False, False))

    ids: list[int] = []
    trained: list[bool] = []
    for s, e, is_content, train in cuts:
        if s >= e:
            continue
        text = full[s:e]
        piece = plain(text) if is_content else _encode_framing(text, plain, specials, special_re)
        ids += piece
        trained += [train] * len(piece)
    truncated = max_tokens is not None and len(ids) > max_tokens
    if truncated:
        ids, trained = ids[:max_tokens], trained[:max_tokens]
    return EncodedChat(ids, trained, truncated)


def _encode_framing(text: str, plain, specials: dict[str, int], special_re) -> list[int]:
    """Framing text: special-token strings become their single ids, the rest is plain text."""
    piece, at = [], 0
    for m in special_re.finditer(text):
        piece += plain(text[at:m.start()]) + [specials[m.group()]]
        at = m.end()
    return piece + plain(text[at:])


def encode_prompt(tok, template: str, chat: Chat, *, bos_token: str = "", eos_token: str = "") -> list[int]:
    """The ids a model continues to answer `chat`: the chat rendered with the generation prompt
    ("<|im_start|>assistant\\n"), split exactly as encode_chat splits a training chat (content as plain
    text, framing with its special tokens), so the model meets at inference what it was trained on."""
    if not chat or chat[-1].get("role") != "user":
        raise CourseError("a prompt must end with a user message (the model answers it)")
    for k, m in enumerate(chat):
        if not isinstance(m, dict) or m.get("role") not in ("system", "user", "assistant") \
                or not isinstance(m.get("content"), str):
            raise CourseError(f"prompt message {k} must be {{'role': system|user|assistant, 'content': str}}")
    full, spans = message_spans(template, chat, bos_token=bos_token, eos_token=eos_token)
    with_prompt = render(template, chat, bos_token=bos_token, eos_token=eos_token, add_generation_prompt=True)
    if not with_prompt.startswith(full):
        raise CourseError("the chat template's generation prompt does not extend the rendered chat; "
                          "masking and generation need a prefix-stable template")
    specials = special_ids(tok)
    plain = plain_encoder(tok)
    special_re = re.compile("|".join(re.escape(s) for s in sorted(specials, key=len, reverse=True)))
    ids, pos = [], 0
    for s, e in spans:
        ids += _encode_framing(with_prompt[pos:s], plain, specials, special_re) + plain(with_prompt[s:e])
        pos = e
    return ids + _encode_framing(with_prompt[pos:], plain, specials, special_re)


@dataclass
class EncodeStats:
    rows: int = 0
    truncated: int = 0
    skipped: Counter = field(default_factory=Counter)

    def summary(self) -> str:
        skipped = ", ".join(f"{n} {why}" for why, n in self.skipped.items()) or "none skipped"
        return f"{self.rows:,} rows, {self.truncated:,} truncated to the context, {skipped}"


def encode_chats(tok, template: str, chats: list[Chat], *, end_token: str, block_size: int,
                 bos_token: str = "") -> tuple[list[EncodedChat], EncodeStats]:
    """Encode many chats for rows of `block_size` inputs; truncations counted, a row left with no trained token
    (its assistant turn cut off entirely) skipped and counted."""
    out, stats = [], EncodeStats()
    for chat in chats:
        enc = encode_chat(tok, template, chat, end_token=end_token, bos_token=bos_token, max_tokens=block_size + 1)
        if enc.n_trained == 0:
            stats.skipped["no assistant token left after truncation"] += 1
            continue
        stats.truncated += enc.truncated
        stats.rows += 1
        out.append(enc)
    return out, stats


def collate(rows: list[EncodedChat], pad_id: int, device: torch.device | str = "cpu") -> tuple[torch.Tensor, torch.Tensor]:
    """Right-pad a batch: (idx, targets), both (B, T); padding positions get the target IGNORE.

    Right padding needs no attention mask for training: causal attention means a real token never sees the
    padding after it, and the padding's own outputs are never scored.
    """
    pairs = [r.inputs_and_targets() for r in rows]
    T = max(len(x) for x, _ in pairs)
    idx = torch.full((len(rows), T), pad_id, dtype=torch.long)
    tgt = torch.full((len(rows), T), IGNORE, dtype=torch.long)
    for b, (x, y) in enumerate(pairs):
        idx[b, :len(x)] = torch.tensor(x)
        tgt[b, :len(y)] = torch.tensor(y)
    return idx.to(device), tgt.to(device)
