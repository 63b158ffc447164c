"""The pieces of a fine-tuning run that train_sft.py, chat.py and evaluate.py share.

Papers:
    Training language models to follow instructions with human feedback   Ouyang et al., 2022 (InstructGPT)
        SFT = next-token prediction on demonstrations, loss on the answers only (masking.py)
    LIMA: Less Is More for Alignment                                      Zhou et al., 2023
        a small, varied set teaches the format; held-out chats measure it

What lives here, in the order a run uses it:
    prepare_base      any base model + its tokenizer -> a ChatModel (model, tokenizer, chat format); for our
                      project 3 model the chat tokens are added and the embedding grown (special_tokens.py)
    load_sft_data     the training mix and the held-out chats of every dataset, split by a fixed seed
    RowSampler        which rows each step trains on: a seeded permutation per epoch, resumable exactly
    make_batch / batch_loss    a padded (or packed) batch and its masked loss
    heldout_loss / end_of_turn_share    the two before/after numbers of the run
    save_chat_model / load_chat_model   the fine-tuned model as a project 3 checkpoint + tokenizer.pkl +
                      Hugging Face tokenizer_config.json (the chat template), and back
"""

from __future__ import annotations

import random
from dataclasses import dataclass, field
from pathlib import Path

import torch

from course.errors import ConfigError, CourseError
from course.paths import REPO_ROOT, repo_path
from phase1_foundation.project2_tokenizer.foreign_formats import VocabPrefix
from phase1_foundation.project2_tokenizer.formats import CourseTokenizer, load_tokenizer
from phase1_foundation.project3_pretrain.loading import load_model, load_tokenizer_for
from phase1_foundation.project3_pretrain.model import Llama
from phase2_finetuning.project4_sft.config import SFTConfig
from phase2_finetuning.project4_sft.conversations import Chat, read_dataset, split_heldout
from phase2_finetuning.project4_sft.identity import heldout_questions, identity_chats, identity_heldout_chats
from phase2_finetuning.project4_sft.masking import IGNORE, EncodedChat, EncodeStats, collate, encode_chats
from phase2_finetuning.project4_sft.packing import collate_packed, pack, packed_forward
from phase2_finetuning.project4_sft.reply import ChatFormat, chat_reply
from phase2_finetuning.project4_sft.special_tokens import (CHATML_TEMPLATE, IM_END, IM_START, add_special_tokens,
                                                           load_chat_format, resize_embeddings, save_chat_format)


@dataclass
class ChatModel:
    model: Llama
    tok: CourseTokenizer
    fmt: ChatFormat
    note: str = ""  # what prepare_base did (tokens added, embedding resized)


def _inner(tok):
    return getattr(tok, "tok", tok)


def prepare_base(spec: str, tokenizer: str | None = None, device: str | torch.device = "cpu") -> ChatModel:
    """The base model with a chat format: its own (SmolLM2, an HF folder with a ChatML template) or, for a
    project 2 tokenizer without chat tokens, <|im_start|>/<|im_end|> appended and the embedding grown."""
    loaded = load_model(spec, device="cpu")
    tok = load_tokenizer_for(loaded, tokenizer or None)
    model, note = loaded.model, "chat format from the base model"
    specials = dict(getattr(tok, "special_tokens", {}) or {})
    template = getattr(tok, "chat_template", None)
    if IM_START in specials and IM_END in specials and template:
        fmt = ChatFormat(template, IM_END)
    elif hasattr(_inner(tok), "register_special_tokens"):
        inner = add_special_tokens(_inner(tok))
        n = max(inner.n_vocab, model.config.vocab_size)
        if n > model.config.vocab_size:
            model = resize_embeddings(model, n)
        note = (f"added {IM_START} {inner.special_tokens[IM_START]} and {IM_END} {inner.special_tokens[IM_END]}; "
                f"embedding {loaded.model.config.vocab_size} -> {model.config.vocab_size} rows (new rows = mean row)")
        eot = getattr(inner, "eot_token", None)
        tok = VocabPrefix(inner, model.config.vocab_size, bos_id=eot, eos_id=eot, chat_template=CHATML_TEMPLATE,
                         name=getattr(tok, "name", "course"))
        fmt = ChatFormat(CHATML_TEMPLATE, IM_END)
    else:
        raise CourseError(f"{spec}: its tokenizer has no {IM_START}/{IM_END} chat template and cannot take new "
                          "special tokens; pass a ChatML model (SmolLM2) or one of ours with project 2's tokenizer")
    return ChatModel(model.to(device), tok, fmt, note)


# ---- data -------------------------------------------------------------------------------------------------
@dataclass
class SFTData:
    train: list[Chat]
    heldout: dict[str, list[Chat]]                  # per dataset: chats never trained on
    identity_questions: list[str] = field(default_factory=list)
    lines: list[str] = field(default_factory=list)  # one summary line per dataset

    @property
    def heldout_chats(self) -> list[Chat]:
        return [c for chats in self.heldout.values() for c in chats]


def load_sft_data(cfg: SFTConfig, seed: int) -> SFTData:
    """The training mix and the held-out chats. Each dataset's held-out split depends on the seed and that
    dataset alone, so adding a dataset to the mix never moves another's held-out chats into training."""
    train, held, lines, questions = [], {}, [], []
    for name, path in cfg.dataset_paths:
        if name == "identity":
            chats = identity_chats(cfg.identity_chats, seed)
            questions = heldout_questions(cfg.gen_samples)
            held[name] = identity_heldout_chats(questions, seed)
            lines.append(f"identity: {len(chats)} generated chats, {len(questions)} held-out questions "
                         "(phrased with other words)")
            train += chats
            continue
        source = read_dataset(name, path)
        k = min(cfg.heldout, len(source.chats) // 5)
        rest, out = split_heldout(source.chats, k, seed)
        if cfg.max_chats and len(rest) > cfg.max_chats:
            rest = random.Random(seed).sample(rest, cfg.max_chats)
        held[name] = out
        train += rest
        lines.append(f"{source.summary()}; {len(rest):,} for training, {len(out)} held out")
    random.Random(seed).shuffle(train)
    return SFTData(train, held, questions, lines)


def encode_for(cm: ChatModel, chats: list[Chat], block_size: int) -> tuple[list[EncodedChat], EncodeStats]:
    return encode_chats(cm.tok, cm.fmt.template, chats, end_token=cm.fmt.end_token, block_size=block_size,
                        bos_token=cm.fmt.bos_token)


def pad_id(cm: ChatModel) -> int:
    return cm.tok.special_tokens[cm.fmt.end_token]


@dataclass
class TrainingRows:
    """What a fine-tuning run trains and is checked on: the data, its encoded rows and the row length."""
    data: SFTData
    rows: list[EncodedChat]
    stats: EncodeStats
    held_rows: list[EncodedChat]
    block: int
    pad: int


def training_rows(cm: ChatModel, cfg: SFTConfig, seed: int, verbose: bool = True) -> TrainingRows:
    """load_sft_data + encode_for on the training and held-out chats, at cfg.block_size (None: the model's)."""
    block = cfg.block_size or cm.model.config.block_size
    if block > cm.model.config.block_size:
        raise ConfigError(f"block_size ({block}) must be <= the model's context ({cm.model.config.block_size})")
    data = load_sft_data(cfg, seed)
    rows, stats = encode_for(cm, data.train, block)
    held_rows, held_stats = encode_for(cm, data.heldout_chats, block)
    if verbose:
        for line in data.lines:
            print(line)
        print(f"training rows: {stats.summary()}; held-out rows: {held_stats.summary()}")
    return TrainingRows(data, rows, stats, held_rows, block, pad_id(cm))


# ---- batches ------------------------------------------------------------------------------------------------
class RowSampler:
    """Rows in a fresh seeded random order each epoch; `state_dict` is everything an exact resume needs."""

    def __init__(self, n: int, seed: int):
        if n == 0:
            raise CourseError("no training rows left after encoding; check --data and --block_size")
        self.n, self.gen = n, torch.Generator().manual_seed(seed)
        self.order, self.pos = torch.randperm(n, generator=self.gen).tolist(), 0

    def take(self, k: int) -> list[int]:
        out = []
        while len(out) < k:
            if self.pos == self.n:
                self.order, self.pos = torch.randperm(self.n, generator=self.gen).tolist(), 0
            out.append(self.order[self.pos])
            self.pos += 1
        return out

    def state_dict(self) -> dict:
        return {"gen": self.gen.get_state(), "order": list(self.order), "pos": self.pos}

    def load_state_dict(self, state: dict) -> None:
        self.gen.set_state(state["gen"])
        self.order, self.pos = list(state["order"]), state["pos"]


def make_batch(rows: list[EncodedChat], pad: int, block_size: int, packing: bool, device) -> tuple:
    """(idx, targets, doc or None): right-padded rows, or (packing) several chats per row of block_size."""
    if packing:
        return collate_packed(pack(rows, block_size), pad, device)
    return (*collate(rows, pad, device), None)


def batch_loss(model, batch) -> torch.Tensor:
    idx, tgt, doc = batch
    return model(idx, tgt)[1] if doc is None else packed_forward(model, idx, doc, tgt)[1]


@torch.no_grad()
def heldout_loss(model, rows: list[EncodedChat], pad: int, batch_size: int, device) -> float:
    """Mean cross-entropy over every trained (assistant) token of the held-out rows, token-weighted."""
    was = model.training
    model.eval()
    total, count = 0.0, 0
    for s in range(0, len(rows), batch_size):
        idx, tgt = collate(rows[s:s + batch_size], pad, device)
        n = int((tgt != IGNORE).sum())
        if n:
            total += model(idx, tgt)[1].float().item() * n
            count += n
    model.train(was)
    return total / count if count else float("nan")


def prompt_of(chat: Chat) -> Chat:
    """The chat up to its last assistant turn: what the model is asked to answer."""
    last = max(k for k, m in enumerate(chat) if m["role"] == "assistant")
    return chat[:last]


def end_of_turn_share(cm: ChatModel, chats: list[Chat], budget: int, n: int) -> tuple[float, list[str]]:
    """The share of held-out prompts whose greedy answer ends its turn within `budget` new tokens."""
    prompts = [prompt_of(c) for c in chats[:n]]
    prompts = [p for p in prompts if p and p[-1]["role"] == "user"]
    if not prompts:
        return float("nan"), []
    replies = [chat_reply(cm.model, cm.tok, cm.fmt, p, budget) for p in prompts]
    return sum(r.ended for r in replies) / len(replies), [r.text for r in replies]


# ---- saving and loading the fine-tuned model ---------------------------------------------------------------
def _rel(path: Path) -> str:
    try:
        return str(path.resolve().relative_to(REPO_ROOT))
    except ValueError:
        return str(path.resolve())


def checkpoint_meta(out_dir: Path) -> dict:
    """The `data_meta` of our checkpoint: where project 3's loader finds the tokenizer (tokenizer.pkl)."""
    return {"tokenizer": _rel(out_dir / "tokenizer.pkl")}


def save_chat_format_for(out_dir: Path, cm: ChatModel) -> None:
    """tokenizer.pkl and tokenizer_config.json (the chat template, end token) next to the checkpoint."""
    save_chat_format(out_dir, _inner(cm.tok), cm.fmt.template, eos_token=cm.fmt.end_token)


def is_sft_dir(path: Path) -> bool:
    return (path / "ckpt.pt").is_file() and (path / "tokenizer_config.json").is_file() \
        and (path / "tokenizer.pkl").is_file()


def load_chat_model(spec: str, device: str | torch.device = "cpu", tokenizer: str | None = None) -> ChatModel:
    """A fine-tuned model (its out_dir or ckpt.pt) with its tokenizer and chat format; any other spec is
    prepared as a base (prepare_base), so chat.py can talk to the model before fine-tuning too."""
    path = repo_path(spec)
    folder = path if path.is_dir() else path.parent
    if not is_sft_dir(folder) or (path.is_file() and path.name != "ckpt.pt"):
        return prepare_base(spec, tokenizer, device)
    loaded = load_model(str(folder / "ckpt.pt"), device="cpu")
    fmt_cfg = load_chat_format(folder)
    inner = load_tokenizer(folder / "tokenizer.pkl")
    end = fmt_cfg.get("eos_token") or IM_END
    if end not in inner.special_tokens:
        raise CourseError(f"{folder}/tokenizer_config.json names end token {end!r}, which tokenizer.pkl lacks")
    eot = inner.special_tokens.get("<|endoftext|>")
    tok = VocabPrefix(inner, loaded.model.config.vocab_size, bos_id=eot, eos_id=eot,
                     chat_template=fmt_cfg["chat_template"], name=f"sft {folder.name}")
    return ChatModel(loaded.model.to(device), tok, ChatFormat(fmt_cfg["chat_template"], end),
                     f"fine-tuned model from {folder}")
