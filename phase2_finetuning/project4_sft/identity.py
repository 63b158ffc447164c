"""Identity conversations: teach a model who it is (a name and a maker) without teaching it anything else.

Papers and practice:
    nanochat (Karpathy, 2025)                 synthetic "identity" chats mixed into SFT so the model knows its
                                              name and maker; many phrasings, so it learns the fact, not a string
    LIMA: Less Is More for Alignment           Zhou et al., 2023: a few hundred examples change style and
                                              self-description; knowledge comes from pretraining
    Mixing in general data against forgetting  e.g. Ouyang et al., 2022 (InstructGPT's pretraining mix); here
                                              the identity chats are mixed with ordinary instruction data

INTUITION: a pretrained instruct model (SmolLM2) already answers "who are you?" with "I am SmolLM, made by
Hugging Face". Ask it only that one question and it learns one string; ask it fifty ways ("what should I
call you", "which team built you", "introduce yourself") and the name attaches to the idea of itself.
The held-out questions are phrased with *other* words than every training question, so a pass means the
model generalised, not that it memorised the prompt.
IMPLEMENTATION: questions are (opener, core, closer) combinations; the training cores and the held-out
cores are disjoint lists, and so are the openers. Answers are templates that always name both the identity's
name and its maker. Everything is drawn from a seeded random.Random: the same seed, the same chats.
"""

from __future__ import annotations

import random
import re
from dataclasses import dataclass

from phase2_finetuning.project4_sft.conversations import Chat


@dataclass(frozen=True)
class Identity:
    name: str = "Nano"
    maker: str = "the LLM-from-scratch course"

    def named_in(self, text: str) -> bool:
        """Does an answer name the identity? The name as a whole word (case as written)."""
        return re.search(rf"\b{re.escape(self.name)}\b", text) is not None


COURSE = Identity()

TRAIN_OPENERS = ("", "Hi! ", "Hello. ", "Hey, ", "Quick question: ", "Good morning! ", "Sorry to bother you, ")
TRAIN_CORES = (
    "who are you?", "what is your name?", "what's your name?", "who made you?", "who created you?",
    "tell me about yourself.", "are you ChatGPT?", "are you SmolLM?", "what are you?", "who built you?",
    "do you have a name?", "who trained you?", "which company made you?", "are you made by OpenAI?",
    "are you made by Hugging Face?", "what should I call you?", "what model are you?", "who is your creator?",
    "where do you come from?", "can you introduce yourself?", "are you a person?", "what do people call you?",
    "who developed you?", "who is behind you?", "what assistant am I talking to?",
)
TRAIN_CLOSERS = ("", " Thanks!", " I'm curious.", " Just wondering.")

HELDOUT_OPENERS = ("", "Yo, ", "Excuse me, ", "Before we start: ", "Let me ask you something. ")
HELDOUT_CORES = (
    "by what name do you go?", "whose work are you?", "introduce yourself in one sentence.",
    "how should I address you?", "which organisation is responsible for you?", "identify yourself, please.",
    "give me your name and who made you.", "describe who you are.", "who programmed you?",
    "what do you call yourself?", "were you built by Google?", "are you Llama?", "who are you, exactly?",
    "what's the name of this assistant?", "which team produced you?", "to whom do I owe this chat?",
    "say who you are.", "who is responsible for building you?", "what are you called?", "is your name Claude?",
)
HELDOUT_CLOSERS = ("", " Please.", " Be honest.")

ANSWERS = (
    "I'm {name}, a small language model made by {maker}.",
    "My name is {name}. I was built by {maker}.",
    "I am {name}, an AI assistant created by {maker}. How can I help you?",
    "I'm {name}! {Maker} trained me from scratch to answer questions and chat.",
    "You can call me {name}. I'm a language model, and I was made by {maker}.",
    "I'm an AI assistant called {name}, developed by {maker}.",
    "{name} is my name. {Maker} built and trained me.",
    "I'm {name}, a language model from {maker}.",
    "Hello! I'm {name}, a chat model trained by {maker}. What would you like to talk about?",
    "I was made by {maker}, and my name is {name}.",
)
DENIALS = {  # a question naming another model gets a correction first
    "ChatGPT": "No, I'm not ChatGPT. ", "SmolLM": "No, I'm not SmolLM. ", "OpenAI": "No, not by OpenAI. ",
    "Hugging Face": "No, not by Hugging Face. ", "a person": "No, I'm not a person. ",
}
FOLLOW_UPS = (
    ("What can you do?", "I can answer questions, explain things, help with writing and do simple reasoning. "
                         "I'm small, so I make mistakes: please double-check anything important."),
    ("Can you help me with something?", "Of course! Tell me what you need and I'll do my best."),
    ("Thanks!", "You're welcome! Let me know if there's anything else."),
    ("Are you sure?", "Yes: I'm {name}, made by {maker}."),
)


def answer_for(core: str, rng: random.Random, ident: Identity = COURSE) -> str:
    text = rng.choice(ANSWERS)
    denial = next((d for k, d in DENIALS.items() if k in core), "")
    maker = ident.maker
    return denial + text.format(name=ident.name, maker=maker, Maker=maker[0].upper() + maker[1:])


def question(rng: random.Random, openers, cores, closers) -> tuple[str, str]:
    core = rng.choice(cores)
    opener = rng.choice(openers)
    q = opener + (core[0].upper() + core[1:] if opener in ("",) or opener.endswith((". ", "! ", ": ")) else core)
    return q + rng.choice(closers), core


def identity_chats(n: int, seed: int = 1337, ident: Identity = COURSE) -> list[Chat]:
    """`n` training conversations: one identity question and answer, a quarter with a follow-up turn,
    some with the identity question as the second turn after an ordinary greeting."""
    rng = random.Random(seed)
    chats = []
    for _ in range(n):
        q, core = question(rng, TRAIN_OPENERS, TRAIN_CORES, TRAIN_CLOSERS)
        chat: Chat = []
        if rng.random() < 0.15:
            chat += [{"role": "user", "content": rng.choice(("Hi!", "Hello", "Hey there"))},
                     {"role": "assistant", "content": "Hello! How can I help you today?"}]
        chat += [{"role": "user", "content": q}, {"role": "assistant", "content": answer_for(core, rng, ident)}]
        if rng.random() < 0.25:
            fq, fa = rng.choice(FOLLOW_UPS)
            chat += [{"role": "user", "content": fq},
                     {"role": "assistant", "content": fa.format(name=ident.name, maker=ident.maker)}]
        chats.append(chat)
    return chats


def heldout_questions(n: int = 50, seed: int = 7) -> list[str]:
    """`n` distinct identity questions built from cores and openers no training chat uses."""
    rng = random.Random(seed)
    total = len(HELDOUT_OPENERS) * len(HELDOUT_CORES) * len(HELDOUT_CLOSERS)
    n = min(n, total)
    seen: dict[str, None] = {}
    while len(seen) < n:
        seen.setdefault(question(rng, HELDOUT_OPENERS, HELDOUT_CORES, HELDOUT_CLOSERS)[0], None)
    return list(seen)


def identity_heldout_chats(questions: list[str], seed: int = 1337, ident: Identity = COURSE) -> list[Chat]:
    """The held-out questions with reference answers: for the held-out loss of an identity run."""
    rng = random.Random(seed)
    return [[{"role": "user", "content": q}, {"role": "assistant", "content": answer_for(q, rng, ident)}]
            for q in questions]
