"""Packing: several short conversations in one row, kept apart by a block-diagonal causal mask.

Papers:
    Efficient Sequence Packing without Cross-contamination                 Krell et al., 2021
        pack examples into full rows; mask attention so no example sees another, restart positions per example
    Exploring the Limits of Transfer Learning (T5)                          Raffel et al., 2020
        packing as standard practice for short examples

INTUITION: instruction chats are short (a few hundred tokens) and padding a batch to its longest row wastes
most of the compute. Packing puts chats end to end in one row of block_size tokens. Two things must then hold
for the loss to be the one of the unpacked chats: a token attends only to earlier tokens *of its own chat*
(a block-diagonal causal mask), and each chat's RoPE positions start again at 0.
IMPLEMENTATION: `pack` fills rows greedily in order; `packed_forward` runs the model's own modules (embedding,
blocks, norm, classifier) with per-row positions and that mask. The model object is only read, never changed.
WHY it is opt-in: the plain padded batch is what a learner reads first, and it is the reference packing is
tested equal to (same loss, to float precision).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from course.errors import CourseError
from phase1_foundation.project3_pretrain.model import Llama
from phase2_finetuning.project4_sft.masking import IGNORE, EncodedChat


@dataclass
class PackedRow:
    inputs: list[int]
    targets: list[int]
    doc: list[int]  # which chat of the row each position belongs to (0, 1, ...)


def pack(rows: list[EncodedChat], block_size: int) -> list[PackedRow]:
    """Greedy in-order packing of (inputs, targets) pairs into rows of at most block_size positions."""
    out: list[PackedRow] = []
    cur = PackedRow([], [], [])
    for r in rows:
        x, y = r.inputs_and_targets()
        if len(x) > block_size:
            raise CourseError(f"a chat of {len(x)} positions does not fit block_size {block_size}; encode with "
                              "max_tokens=block_size + 1 first (encode_chats does)")
        if len(cur.inputs) + len(x) > block_size:
            out.append(cur)
            cur = PackedRow([], [], [])
        d = cur.doc[-1] + 1 if cur.doc else 0
        cur.inputs += x
        cur.targets += y
        cur.doc += [d] * len(x)
    if cur.inputs:
        out.append(cur)
    return out


def collate_packed(rows: list[PackedRow], pad_id: int, device: torch.device | str = "cpu"):
    """(idx, targets, doc) tensors (B, T); padding is a chat of its own (doc -1) with IGNORE targets."""
    T = max(len(r.inputs) for r in rows)
    idx = torch.full((len(rows), T), pad_id, dtype=torch.long)
    tgt = torch.full((len(rows), T), IGNORE, dtype=torch.long)
    doc = torch.full((len(rows), T), -1, dtype=torch.long)
    for b, r in enumerate(rows):
        n = len(r.inputs)
        idx[b, :n], tgt[b, :n], doc[b, :n] = torch.tensor(r.inputs), torch.tensor(r.targets), torch.tensor(r.doc)
    return idx.to(device), tgt.to(device), doc.to(device)


def positions_and_mask(doc: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-position RoPE positions (B, T), restarting at 0 for each chat, and the (B, 1, T, T) boolean mask:
    query t may see key s iff s <= t and both belong to the same chat."""
    B, T = doc.shape
    t = torch.arange(T, device=doc.device)
    starts = torch.ones_like(doc, dtype=torch.bool)
    starts[:, 1:] = doc[:, 1:] != doc[:, :-1]
    # position = t - (index of the first token of t's chat): cummax of the start indices seen so far
    first = torch.where(starts, t.expand(B, T), torch.zeros_like(doc)).cummax(dim=1).values
    pos = t - first
    same = doc[:, :, None] == doc[:, None, :]
    causal = t[None, :, None] >= t[None, None, :]
    return pos, (same & causal).unsqueeze(1)


def packed_forward(model: Llama, idx: torch.Tensor, doc: torch.Tensor, targets: torch.Tensor | None = None):
    """The model's forward on a packed batch: (logits, loss), loss as in Llama.forward (mean over targets)."""
    if idx.size(1) > model.config.block_size:
        raise CourseError(f"packed rows of {idx.size(1)} positions exceed block_size {model.config.block_size}")
    pos, mask = positions_and_mask(doc)
    cos, sin = model.rope_cos[pos].unsqueeze(1), model.rope_sin[pos].unsqueeze(1)
    x = model.tok_emb(idx)
    for i, layer in enumerate(model.layers):
        x = layer(x, cos, sin, kv_cache=None, layer_idx=i, mask=mask)
    logits = model.lm_head(model.norm(x))
    loss = None
    if targets is not None:
        loss = F.cross_entropy(logits.float().view(-1, logits.size(-1)), targets.reshape(-1), ignore_index=IGNORE)
    return logits, loss
