"""Direct preference optimisation: sequence log-probabilities, the losses, the implicit rewards.

Papers:
    Direct Preference Optimization: Your Language Model is Secretly a Reward Model   Rafailov et al., 2023 (DPO)
        the RLHF objective (reward minus beta * KL to a reference) has a closed-form optimum; solving it for the
        reward gives r(x, y) = beta * log(pi(y|x) / pi_ref(y|x)) + beta * log Z(x), and the Bradley-Terry
        likelihood of the preferences in terms of that reward (Z cancels in a pair) is a plain classification loss
    A General Theoretical Paradigm to Understand Learning from Human Preferences   Azar et al., 2023 (IPO)
        DPO can push the log-ratio gap to infinity on deterministic preferences; a squared loss towards a
        finite target 1 / (2 beta) regularises it
    A note on DPO with noisy preferences and relationship to IPO                   Mitchell, 2023 (cDPO)
        if a share eps of the labels is flipped, the expected loss mixes both directions: label smoothing
    SimPO: Simple Preference Optimization with a Reference-Free Reward            Meng et al., 2024
        the reward is the length-normalised log-probability beta / |y| * log pi(y|x), with a target margin
        gamma; no reference model at all
    Training language models to follow instructions with human feedback           Ouyang et al., 2022
        the RLHF pipeline (SFT -> reward model -> PPO) that DPO replaces with one supervised loss

INTUITION: the implicit reward of a reply is how much more likely the policy makes it than the reference does,
beta * (log pi(y|x) - log pi_ref(y|x)). DPO asks the reward of the chosen reply to exceed the rejected one's:
    loss = -log sigmoid(beta * [(log pi(y_w) - log pi_ref(y_w)) - (log pi(y_l) - log pi_ref(y_l))])
At the start the policy IS the reference, every reward is 0, and the loss is -log sigmoid(0) = ln 2.

IMPLEMENTATION: a pair is two rows, prompt + chosen and prompt + rejected, tokenized with project 4's masking so
that only the reply's tokens (and the end-of-turn token that closes it) are scored; one forward pass runs all
2B rows ([chosen..., rejected...], as trl does). `sequence_logps` sums the log-probabilities of the scored tokens
of each row: prompt and padding positions contribute exactly 0. The losses below are written to equal trl 1.16
(test_dpo.py checks each against trl's own code): DPOTrainer's sigmoid / hinge / ipo, and CPOTrainer's
label-smoothed sigmoid (cDPO) and simpo.
"""

from __future__ import annotations

import contextlib
import copy
from collections import Counter
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F

from course.errors import CourseError
from phase2_finetuning.project4_sft.conversations import Chat
from phase2_finetuning.project4_sft.masking import (
    IGNORE,
    EncodedChat,
    collate,
    encode_chat,
    encode_prompt,
)
from phase2_finetuning.project4_sft.reply import ChatFormat
from phase2_finetuning.project5_lora.lora import adapters_disabled
from phase2_finetuning.project6_dpo.config import LOSS_TYPES, SMOOTHABLE
from phase2_finetuning.project6_dpo.preferences import Pair


# ---- tokenizing a pair ------------------------------------------------------------------------------------
@dataclass
class EncodedPair:
    """A pair as two token rows that share their first `prompt_len` ids; only the reply is trained."""

    chosen: EncodedChat
    rejected: EncodedChat
    prompt_len: int


def encode_reply(tok, fmt: ChatFormat, prompt: Chat, reply: str, prompt_ids: list[int]) -> EncodedChat:
    """prompt + reply as ids, with `trained` True on the reply's tokens and its end-of-turn token only.

    project 4's encode_chat trains every assistant turn of a chat; here the earlier assistant turns of a
    multi-turn prompt are context, so everything before the prompt's own ids (the generation prompt,
    "<|im_start|>assistant\\n" included) is switched off. What follows the reply's end token (ChatML's "\\n")
    is cut: nothing after the last scored token changes a score.
    """
    enc = encode_chat(tok, fmt.template, prompt + [{"role": "assistant", "content": reply}],
                      end_token=fmt.end_token, bos_token=fmt.bos_token)
    n = len(prompt_ids)
    if enc.ids[:n] != prompt_ids:
        raise CourseError("the chat template renders the prompt differently when a reply follows it; DPO needs "
                          "a template whose generation prompt is a prefix of the answered chat")
    trained = [False] * n + enc.trained[n:]
    last = max((i for i, t in enumerate(trained) if t), default=-1)
    return EncodedChat(enc.ids[:last + 1], trained[:last + 1])


def encode_pair(tok, fmt: ChatFormat, pair: Pair) -> EncodedPair:
    prompt_ids = encode_prompt(tok, fmt.template, pair.prompt, bos_token=fmt.bos_token, eos_token=fmt.end_token)
    return EncodedPair(encode_reply(tok, fmt, pair.prompt, pair.chosen, prompt_ids),
                       encode_reply(tok, fmt, pair.prompt, pair.rejected, prompt_ids), len(prompt_ids))


@dataclass
class PairStats:
    rows: int = 0
    skipped: Counter = field(default_factory=Counter)

    def summary(self) -> str:
        skipped = ", ".join(f"{n} {why}" for why, n in sorted(self.skipped.items())) or "none skipped"
        return f"{self.rows:,} pairs ({skipped})"


def encode_pairs(tok, fmt: ChatFormat, pairs: list[Pair], block_size: int) -> tuple[list[EncodedPair], PairStats]:
    """Encode pairs for rows of at most `block_size` inputs. A pair whose prompt + reply does not fit is
    skipped and counted, never cut: a cut reply would be scored as if it ended there, and a cut prompt
    would ask a different question than the labeller saw."""
    out, stats = [], PairStats()
    for pair in pairs:
        enc = encode_pair(tok, fmt, pair)
        if max(len(enc.chosen.ids), len(enc.rejected.ids)) > block_size + 1:
            stats.skipped[f"longer than the context ({block_size} tokens)"] += 1
            continue
        if enc.chosen.n_trained == 0 or enc.rejected.n_trained == 0:
            stats.skipped["no reply token"] += 1
            continue
        stats.rows += 1
        out.append(enc)
    return out, stats


def collate_pairs(pairs: list[EncodedPair], pad_id: int, device="cpu") -> tuple[torch.Tensor, torch.Tensor]:
    """(idx, targets) of shape (2B, T): the B chosen rows, then the B rejected rows, right-padded (project 4's
    collate: padding and prompt positions get the target IGNORE)."""
    return collate([p.chosen for p in pairs] + [p.rejected for p in pairs], pad_id, device)


# ---- log-probabilities of the reply --------------------------------------------------------------------------
def token_logps(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """log p(target_t | context) at every position, exactly 0 where the target is IGNORE. (B, T)

    cross_entropy with reduction="none" is -log_softmax gathered at the target, without materialising a second
    (B, T, V) tensor of log-probabilities; ignore_index gives 0 at prompt and padding positions.
    """
    B, T, V = logits.shape
    return -F.cross_entropy(logits.float().reshape(B * T, V), targets.reshape(B * T), ignore_index=IGNORE,
                            reduction="none").view(B, T)


def sequence_logps(model, idx: torch.Tensor, targets: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(sum of the reply's token log-probabilities, number of reply tokens) per row, both (N,)."""
    logits = model(idx)[0]
    return token_logps(logits, targets).sum(-1), (targets != IGNORE).sum(-1)


# ---- the reference model ---------------------------------------------------------------------------------
def check_same_vocab(policy, ref) -> None:
    """The log-ratio log pi(y) - log pi_ref(y) compares the same token ids: both models must share them."""
    a, b = policy.config.vocab_size, ref.config.vocab_size
    if a != b:
        raise CourseError(f"the reference model's vocabulary ({b:,} tokens) differs from the policy's ({a:,}); "
                          "the log-ratios would compare different tokens: use the policy's own base (or its SFT "
                          "model) as the reference")


class FrozenReference:
    """A frozen copy of the starting model (full fine-tuning: the policy moves, the copy does not)."""

    def __init__(self, model):
        self.model = copy.deepcopy(model).eval().requires_grad_(False)

    def context(self):
        return contextlib.nullcontext()

    @torch.no_grad()
    def logps(self, idx: torch.Tensor, targets: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return sequence_logps(self.model, idx, targets)


class AdapterReference:
    """With LoRA the reference is the policy with its adapters switched off: no second copy in memory.

    `adapters_disabled` is project 5's context manager: inside it every LoRA layer returns its frozen base
    layer's output, so the model is exactly the base it started from (the adapters' B starts at zero, so at
    step 0 policy and reference agree exactly, and afterwards the reference never moves).
    """

    def __init__(self, policy):
        self.model = policy

    def context(self):
        return adapters_disabled(self.model)

    @torch.no_grad()
    def logps(self, idx: torch.Tensor, targets: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        with self.context():
            return sequence_logps(self.model, idx, targets)


# ---- the losses --------------------------------------------------------------------------------------------
@dataclass
class PreferenceOutput:
    losses: torch.Tensor            # (B,) per pair
    chosen_rewards: torch.Tensor    # (B,) implicit rewards, detached
    rejected_rewards: torch.Tensor

    @property
    def loss(self) -> torch.Tensor:
        return self.losses.mean()


def _smoothed_sigmoid(logits: torch.Tensor, beta: float, eps: float) -> torch.Tensor:
    """-(1 - eps) log sigmoid(beta z) - eps log sigmoid(-beta z): the Bradley-Terry loss when a share eps of the
    labels is assumed flipped (cDPO). eps = 0 is plain DPO."""
    return -(1 - eps) * F.logsigmoid(beta * logits) - eps * F.logsigmoid(-beta * logits)


def preference_loss(policy_chosen: torch.Tensor, policy_rejected: torch.Tensor,
                    ref_chosen: torch.Tensor | None, ref_rejected: torch.Tensor | None,
                    chosen_len: torch.Tensor, rejected_len: torch.Tensor, *, loss_type: str = "sigmoid",
                    beta: float = 0.1, label_smoothing: float = 0.0, simpo_gamma: float = 0.5) -> PreferenceOutput:
    """Per-pair loss and implicit rewards from sequence log-probabilities (sums over reply tokens) and reply
    lengths in tokens. The reference log-probs may be None for the reference-free simpo.

        sigmoid  DPO:  -log sigmoid(beta * h),  h = (pi_w - ref_w) - (pi_l - ref_l); with label_smoothing eps,
                 conservative DPO: -(1-eps) log sigmoid(beta h) - eps log sigmoid(-beta h)
        hinge    SLiC-style: relu(1 - beta * h)
        ipo      (h' - 1 / (2 beta))^2 with h' the same gap per reply token (as trl 1.16: the log-ratios are
                 divided by each reply's length, "confirmed with the IPO authors")
        simpo    -log sigmoid(beta * (pi_w / |y_w| - pi_l / |y_l|) - gamma), label-smoothed like cDPO
    Rewards: beta * (pi - ref) for the reference-based losses, beta * pi / |y| for simpo.
    """
    if loss_type not in LOSS_TYPES:
        raise CourseError(f"unknown loss_type {loss_type!r}; choose from: {', '.join(LOSS_TYPES)}")
    if not beta > 0:
        raise CourseError(f"beta ({beta}) must be > 0")
    if label_smoothing and loss_type not in SMOOTHABLE:
        raise CourseError(f"label_smoothing applies to sigmoid or simpo, not {loss_type}")
    n_w, n_l = chosen_len.clamp(min=1).to(policy_chosen.dtype), rejected_len.clamp(min=1).to(policy_chosen.dtype)
    if loss_type == "simpo":
        avg_w, avg_l = policy_chosen / n_w, policy_rejected / n_l
        losses = _smoothed_sigmoid(avg_w - avg_l - simpo_gamma / beta, beta, label_smoothing)
        return PreferenceOutput(losses, beta * avg_w.detach(), beta * avg_l.detach())
    if ref_chosen is None or ref_rejected is None:
        raise CourseError(f"loss_type {loss_type} needs the reference model's log-probabilities")
    chosen_ratio, rejected_ratio = policy_chosen - ref_chosen, policy_rejected - ref_rejected
    h = chosen_ratio - rejected_ratio
    if loss_type == "sigmoid":
        losses = _smoothed_sigmoid(h, beta, label_smoothing)
    elif loss_type == "hinge":
        losses = torch.relu(1 - beta * h)
    else:  # ipo
        losses = (chosen_ratio / n_w - rejected_ratio / n_l - 1 / (2 * beta)) ** 2
    return PreferenceOutput(losses, beta * chosen_ratio.detach(), beta * rejected_ratio.detach())


# ---- what is logged ----------------------------------------------------------------------------------------
def reward_stats(chosen_rewards: torch.Tensor, rejected_rewards: torch.Tensor) -> dict[str, float]:
    """Means over the pairs: reward accuracy (chosen > rejected; a tie counts one half, so the untrained
    policy, whose rewards are all exactly 0, scores 50%, not 0%), the margin, and both rewards."""
    c, r = chosen_rewards.detach().double(), rejected_rewards.detach().double()
    acc = (c > r).float() + 0.5 * (c == r).float()
    return {"accuracy": acc.mean().item(), "margin": (c - r).mean().item(), "chosen": c.mean().item(),
            "rejected": r.mean().item()}


def pair_batch(policy, reference, pairs: list[EncodedPair], pad_id: int, device, *, loss_type: str, beta: float,
               label_smoothing: float = 0.0, simpo_gamma: float = 0.5) -> tuple[torch.Tensor, PreferenceOutput]:
    """One forward pass of the policy (and one of the reference, without gradients) over a batch of pairs;
    returns (mean loss with its graph, the per-pair output). `reference` is None for reference-free losses."""
    idx, tgt = collate_pairs(pairs, pad_id, device)
    logps, n = sequence_logps(policy, idx, tgt)
    B = len(pairs)
    ref_w = ref_l = None
    if reference is not None:
        ref_logps, _ = reference.logps(idx, tgt)
        ref_w, ref_l = ref_logps[:B], ref_logps[B:]
    out = preference_loss(logps[:B], logps[B:], ref_w, ref_l, n[:B], n[B:], loss_type=loss_type, beta=beta,
                          label_smoothing=label_smoothing, simpo_gamma=simpo_gamma)
    return out.loss, out


@torch.no_grad()
def heldout_logps(model, pairs: list[EncodedPair], pad_id: int, batch_size: int, device) -> dict[str, torch.Tensor]:
    """Sequence log-probs and lengths of every held-out pair's two replies under `model` (eval mode)."""
    was = model.training
    model.eval()
    parts = {"chosen": [], "rejected": [], "chosen_len": [], "rejected_len": []}
    for s in range(0, len(pairs), batch_size):
        chunk = pairs[s:s + batch_size]
        idx, tgt = collate_pairs(chunk, pad_id, device)
        logps, n = sequence_logps(model, idx, tgt)
        B = len(chunk)
        for key, val in (("chosen", logps[:B]), ("rejected", logps[B:]), ("chosen_len", n[:B]),
                         ("rejected_len", n[B:])):
            parts[key].append(val.float().cpu())
    model.train(was)
    return {k: torch.cat(v) if v else torch.zeros(0) for k, v in parts.items()}


def heldout_stats(policy: dict[str, torch.Tensor], ref: dict[str, torch.Tensor] | None, *, loss_type: str,
                  beta: float, label_smoothing: float = 0.0, simpo_gamma: float = 0.5) -> dict[str, float]:
    """The held-out loss, reward accuracy, margin and rewards, from log-probs computed by heldout_logps."""
    if len(policy["chosen"]) == 0:
        return {}
    out = preference_loss(policy["chosen"], policy["rejected"], None if ref is None else ref["chosen"],
                          None if ref is None else ref["rejected"], policy["chosen_len"], policy["rejected_len"],
                          loss_type=loss_type, beta=beta, label_smoothing=label_smoothing, simpo_gamma=simpo_gamma)
    return {"loss": out.loss.item(), **reward_stats(out.chosen_rewards, out.rejected_rewards)}
