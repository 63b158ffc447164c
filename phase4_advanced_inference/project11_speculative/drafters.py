"""Drafters: whatever proposes the next k tokens cheaply, behind one interface, for the target to verify.

PAPERS
- Leviathan et al. 2023; Chen et al. 2023: a smaller model of the same family (same tokenizer) drafts.
- Saxena 2023, "Prompt Lookup Decoding" (github.com/apoorvumang/prompt-lookup-decoding): no model at all; find
  the last few generated tokens earlier in the prompt (or the text so far) and propose what followed them there.
  Input-grounded tasks (summarise, edit, answer from a document, rewrite code) copy long spans of their input.
- Zhang, Wang, Li, Chen, Chen, Shou, Mehrotra 2023, "Draft & Verify: Lossless Large Language Model Acceleration
  via Self-Speculative Decoding": the target with some of its layers skipped is its own draft, no extra weights.
- Elhoushi et al. 2024, "LayerSkip: Enabling Early Exit Inference and Self-Speculative Decoding": the first E
  layers, then the model's own final norm and classifier (a model trained for it; ours is not, and it shows).

THE INTERFACE
`propose(tokens, k, params, generator) -> Draft`: up to k tokens that would follow `tokens` (the whole sequence so
far), and the distributions they were drawn from (`q`, (n, V), after the same sampling pipeline as the target's),
or None for a deterministic proposal (acceptance.one_hot_q stands in). A drafter may return fewer than k tokens
(nothing found, its context full): the engine then verifies what there is, at worst nothing (a plain step).
`reset()` forgets a sequence. A model drafter keeps its own KV cache in step with the text the way project 8's
engine does across chat turns: it keeps the longest prefix it shares with the tokens it is given and computes the
rest (after a rejection, its cache is rewound past the rejected draft; after full acceptance it catches up on the
tokens it has not seen: the last draft and the bonus token).
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

import torch
import torch.nn as nn

from course.errors import CourseError
from phase1_foundation.project3_pretrain.model import CachePlan
from phase3_core_inference.project8_kv_cache.kv_cache import KVCache
from phase3_core_inference.project8_kv_cache.sampling import SamplingParams, process_logits

__all__ = ["Draft", "Drafter", "PromptLookup", "ModelDrafter", "EarlyExit", "parse_layers", "check_same_vocab",
           "default_layers", "build_drafter"]


@dataclass
class Draft:
    tokens: list[int]
    q: torch.Tensor | None = None  # (len(tokens), V) distributions the tokens were drawn from; None = deterministic


class Drafter:
    """Base class: a drafter proposes, the engine verifies. Subclasses implement `propose`."""

    name = "drafter"

    def propose(self, tokens: list[int], k: int, params: SamplingParams,
                generator: torch.Generator | None = None) -> Draft:
        raise NotImplementedError

    def reset(self) -> None:
        """A new sequence starts (nothing to forget for a drafter without state)."""


class PromptLookup(Drafter):
    """Saxena 2023: match the last `max_ngram` .. `min_ngram` tokens earlier in the sequence; propose what followed.

    INTUITION: when the model is copying (an edit of given code, a summary quoting its source) the last few tokens
    occur in the input, and what followed them there is what is about to follow now.
    IMPLEMENTATION: the longest n-gram first (a longer match is more specific); for one n, the most recent earlier
    occurrence (HF's `prompt_lookup_num_tokens` takes the first; in text that repeats itself, such as code, the
    latest one is usually the closer context). A plain scan over Python lists: ~100 us for 1,000 tokens, against
    tens of milliseconds for a forward pass of the target.
    """

    name = "lookup"

    def __init__(self, max_ngram: int = 3, min_ngram: int = 1):
        if not 1 <= min_ngram <= max_ngram:
            raise CourseError(f"prompt lookup needs 1 <= min_ngram ({min_ngram}) <= max_ngram ({max_ngram})")
        self.max_ngram, self.min_ngram = max_ngram, min_ngram

    def propose(self, tokens, k, params, generator=None) -> Draft:
        L = len(tokens)
        for n in range(min(self.max_ngram, L - 1), self.min_ngram - 1, -1):
            pattern = tokens[L - n:]
            for start in range(L - n - 1, -1, -1):  # an earlier occurrence with at least one token after it
                if tokens[start:start + n] == pattern:
                    return Draft(tokens[start + n:start + n + k])
        return Draft([])


class ModelDrafter(Drafter):
    """Any causal LM with the target's vocabulary drafts autoregressively from its own KV cache.

    `model` is called like project 3's Llama (`model(idx, kv_cache=..., logits_to_keep=1)`): a small trained
    model, the target itself (every greedy draft is then kept: a test), or `EarlyExit` (self-speculation)."""

    name = "model"

    def __init__(self, model: nn.Module, max_len: int, name: str | None = None):
        self.model = model.eval()
        p = next(model.parameters())
        self.max_len = min(max_len, model.config.block_size)
        self.cache = KVCache.for_model(model.config, batch=1, max_len=self.max_len, dtype=p.dtype, device=p.device)
        self.device = p.device
        self.tokens: list[int] = []  # tokens whose K/V are in the draft cache
        self.name = name or self.name

    def reset(self) -> None:
        self.cache.reset()
        self.tokens = []

    def _forward(self, ids: list[int]) -> torch.Tensor:
        x = torch.tensor([ids], dtype=torch.long, device=self.device)
        logits = self.model(x, kv_cache=self.cache, logits_to_keep=1)[0][:, -1]
        self.tokens += ids
        return logits

    @torch.inference_mode()
    def propose(self, tokens, k, params, generator=None) -> Draft:
        # a context longer than the draft's: clipped, the draft proposes nothing (the step is a plain one)
        k = min(k, self.max_len - len(tokens) + 1)  # the k-th token is drawn but never fed: L + k - 1 positions
        if k <= 0:
            return Draft([])
        keep = 0  # the longest prefix of `tokens` whose K/V are in the draft cache (always recompute the last one)
        while keep < min(len(self.tokens), len(tokens) - 1) and self.tokens[keep] == tokens[keep]:
            keep += 1
        self.cache.crop(keep)
        self.tokens = self.tokens[:keep]
        logits = self._forward(tokens[keep:])
        out, qs = [], []
        context = list(tokens)
        penalty = params.repetition_penalty != 1.0
        for i in range(k):
            prev = torch.tensor([context], device=self.device) if penalty else None
            scores = process_logits(logits, params, prev)  # the same pipeline as the target's rows
            if params.greedy:
                tok = int(scores.argmax(-1))
            else:
                q = torch.softmax(scores.float(), dim=-1)
                tok = int(torch.multinomial(q, 1, generator=generator))
                qs.append(q[0])
            out.append(tok)
            context.append(tok)
            if i + 1 < k:
                logits = self._forward([tok])
        return Draft(out, torch.stack(qs) if qs else None)


def parse_layers(spec: str, n_layer: int) -> list[int]:
    """"0-9" or "0-5,27-29" or "0,1,2" -> sorted distinct layer indices of a model with n_layer layers."""
    layers: set[int] = set()
    try:
        for part in (p.strip() for p in spec.split(",") if p.strip()):
            lo, _, hi = part.partition("-")
            layers.update(range(int(lo), int(hi or lo) + 1))
    except ValueError:
        raise CourseError(f"draft_layers ({spec!r}) must be layer indices and ranges such as 0-9 or 0-5,27-29")
    if not layers or min(layers) < 0 or max(layers) >= n_layer:
        raise CourseError(f"draft_layers ({spec!r}) must name layers in 0..{n_layer - 1} (the target has {n_layer})")
    if len(layers) == n_layer:
        raise CourseError(f"draft_layers ({spec!r}) keeps all {n_layer} layers: the draft would be the target itself; "
                          "keep fewer, e.g. 0-" + str(max(0, n_layer // 3 - 1)))
    return sorted(layers)


class EarlyExit(nn.Module):
    """Self-speculation: some of the target's layers (the first E: LayerSkip; or with the middle skipped: Draft &
    Verify), then the target's final norm and classifier. No weight of its own: every module is the target's.

    Called like project 3's Llama; its config says n_layer = len(layers), so project 8's KVCache.for_model sizes a
    cache for the kept layers only (a draft's K/V of layer i would differ from the target's where layers before
    i were skipped, so the two caches are kept apart)."""

    def __init__(self, target: nn.Module, layers: list[int]):
        super().__init__()
        self.config = dataclasses.replace(target.config, n_layer=len(layers))
        self.kept = list(layers)
        self.tok_emb, self.norm, self.lm_head = target.tok_emb, target.norm, target.lm_head
        self.layers = nn.ModuleList(target.layers[i] for i in layers)
        self._target = [target]  # for its RoPE tables; a list, so the target is not registered as a submodule

    def forward(self, idx: torch.Tensor, kv_cache=None, logits_to_keep: int = 0):
        """project 3's Llama.forward over the kept layers (no targets, no dropout, no checkpointing)."""
        target = self._target[0]
        T = idx.size(1)
        plan = kv_cache.begin(T) if kv_cache is not None else CachePlan(0, None, None, T)
        cos, sin = target.rope_for(plan, T)
        x = self.tok_emb(idx)
        for i, layer in enumerate(self.layers):  # i: the layer's slot in the draft's own cache
            x = layer(x, cos, sin, kv_cache, i, plan.mask)
        if logits_to_keep:
            x = x[:, -logits_to_keep:]
        return self.lm_head(self.norm(x)), None


def check_same_vocab(target: nn.Module, draft: nn.Module, target_tok=None, draft_tok=None) -> None:
    """A draft must speak the target's tokens: the same vocabulary size and, when both tokenizers are known, the
    same token for every id (compared on the byte strings of all ids). One line when not."""
    tv, dv = target.config.vocab_size, draft.config.vocab_size
    if tv != dv:
        raise CourseError(f"the draft model has a vocabulary of {dv} tokens, the target {tv}: a draft must use the "
                          "target's tokenizer (its ids mean other tokens); pass a draft trained on the target's "
                          "tokenizer, or use --speculative lookup or self")
    if target_tok is None or draft_tok is None:
        return
    for i in range(min(tv, target_tok.vocab_size, draft_tok.vocab_size)):
        a, b = target_tok.piece_bytes(None, i), draft_tok.piece_bytes(None, i)
        if a != b:
            raise CourseError(f"the draft's tokenizer differs from the target's (token {i} is {b!r} for the draft, "
                              f"{a!r} for the target): a draft must use the target's tokenizer")
    if target_tok.vocab_size != draft_tok.vocab_size:
        raise CourseError(f"the draft's tokenizer has {draft_tok.vocab_size} tokens, the target's "
                          f"{target_tok.vocab_size}: a draft must use the target's tokenizer")


def default_layers(n_layer: int) -> str:
    """Self-speculation's default: the first third of the layers (at least one)."""
    return f"0-{max(1, n_layer // 3) - 1}"


def build_drafter(kind: str, target: nn.Module, max_len: int, draft: nn.Module | None = None,
                  layers: str | None = None, max_ngram: int = 3, min_ngram: int = 1) -> Drafter:
    """The drafter a script names: "lookup", "self" (layers of the target, `default_layers` if None), "model"
    (`draft`, checked to share the target's vocabulary by the caller with its tokenizers)."""
    if kind == "lookup":
        return PromptLookup(max_ngram, min_ngram)
    if kind == "self":
        spec = layers or default_layers(target.config.n_layer)
        return ModelDrafter(EarlyExit(target, parse_layers(spec, target.config.n_layer)), max_len, name=f"self {spec}")
    if kind == "model":
        if draft is None:
            raise CourseError("--speculative model needs a draft model (--draft PATH)")
        check_same_vocab(target, draft)
        return ModelDrafter(draft, max_len)
    raise CourseError(f"unknown drafter {kind!r}: choose lookup, self or model")
