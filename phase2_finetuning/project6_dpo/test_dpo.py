"""Tests of project 6: the preference data, the sequence log-probs, every loss against trl's own code, one
training step against trl's DPOTrainer, the LoRA reference, resume, and bad input in one line.

    uv run pytest phase2_finetuning/project6_dpo -q
    uv run python phase2_finetuning/project6_dpo/test_dpo.py      # the demo: the losses at init and on a gap

What is compared with trl 1.16, and how:
    sigmoid, hinge, ipo        trl.trainer.dpo_trainer.DPOTrainer._compute_loss itself (the loss lives inline in
                               that method), called on a minimal stand-in object whose "model" returns given
                               per-token log-probs (what trl's fused LM head returns); precomputed reference log-probs
    conservative DPO (cDPO)    trl.experimental.cpo.CPOTrainer.cpo_loss, loss_type "sigmoid" with label_smoothing,
                               given the log-ratios (trl 1.16's DPOTrainer "sigmoid" has no label smoothing any more:
                               its label_smoothing now belongs to the "robust" and "exo_pair" losses)
    simpo                      CPOTrainer.cpo_loss, loss_type "simpo" (average log-probs, simpo_gamma, smoothing)
    one training step          trl's DPOTrainer.train() on transformers' LlamaForCausalLM with our tiny model's weights,
                               the same token ids (its dataset tokenization skipped: _prepare_dataset passes our ids
                               through), AdamW, clipping, constant lr: parameters after step 1 and 2 within 1e-5
"""

from __future__ import annotations

import gzip
import json
import math
import random
import types
from collections import defaultdict

import pytest
import torch

from course.cli import run_demo
from course.clitest import one_line_error
from course.errors import CourseError
from course.paths import REPO_ROOT
from phase1_foundation.project2_tokenizer.formats import save_tokenizer
from phase1_foundation.project2_tokenizer.tokenizer import RegexTokenizer
from phase1_foundation.project3_pretrain.testing import tiny_llama
from phase2_finetuning.project4_sft.masking import IGNORE
from phase2_finetuning.project4_sft.sft import pad_id, prepare_base
from phase2_finetuning.project5_lora.lora import inject_lora, lora_layers
from phase2_finetuning.project6_dpo import benchmark, download_data, preferences, train_dpo
from phase2_finetuning.project6_dpo.config import DPOConfig
from phase2_finetuning.project6_dpo.dpo import (
    AdapterReference,
    FrozenReference,
    check_same_vocab,
    collate_pairs,
    encode_pair,
    encode_pairs,
    pair_batch,
    preference_loss,
    reward_stats,
    sequence_logps,
    token_logps,
)
from phase2_finetuning.project6_dpo.preferences import (
    Pair,
    hh_pair,
    oasst_pairs,
    parse_transcript,
)

WORDS = ["the", "cat", "sat", "on", "a", "mat", "and", "the", "dog", "ran", "to", "the", "red", "barn", "while", "rain", "fell", "on", "a", "green", "hill"]


def fresh_seed() -> int:
    """A new seed every run (printed on failure): the comparisons must hold on inputs nobody chose."""
    return random.SystemRandom().randrange(2**31)


def _records(n: int, seed: int) -> list[dict]:
    rng = random.Random(seed)
    w = lambda k: " ".join(rng.choice(WORDS) for _ in range(k))
    return [{"instruction": w(4), "input": w(2) if i % 3 == 0 else "", "output": "",
             "chosen": "the cat " + w(rng.randint(1, 3)), "rejected": "a dog " + w(rng.randint(1, 4))}
            for i in range(n)]


@pytest.fixture(scope="module")
def base(tmp_path_factory):
    """A tiny 'project 3' checkpoint with a project 2 tokenizer that has no chat tokens, and a pairs file."""
    d = tmp_path_factory.mktemp("base")
    tok = RegexTokenizer("gpt4")
    tok.train(" ".join(WORDS * 30) + " user assistant system\n", 290)
    tok.register_special_tokens(["<|endoftext|>"])
    save_tokenizer(tok, d / "tokenizer.pkl")
    model = tiny_llama(seed=3, vocab_size=tok.n_vocab, block_size=128)
    torch.save({"iter": 0, "model_state_dict": model.state_dict(), "model_config": model.config.to_dict(),
                "arch": "llama", "data_meta": {"tokenizer": str(d / "tokenizer.pkl")}}, d / "ckpt.pt")
    (d / "pairs.json").write_text(json.dumps(_records(20, 0)))
    return d


@pytest.fixture(scope="module")
def cm(base):
    return prepare_base(str(base / "ckpt.pt"))


def _cfg(base, out, **kw) -> DPOConfig:
    """The full-model path unless kw says lora=True (the presets' default is LoRA)."""
    values = {"base": str(base / "ckpt.pt"), "data": f"rasbt:{base / 'pairs.json'}", "heldout": 4, "batch_size": 4,
              "max_iters": 12, "learning_rate": 1e-2, "min_lr": 1e-3, "warmup_iters": 2, "eval_interval": 6,
              "log_interval": 3, "gen_samples": 2, "gen_budget": 6, "out_dir": str(out), "device": "cpu",
              "block_size": None, "lora": False}
    return DPOConfig(**{**values, **kw}).validate_config()


def _random_pairs(rng: random.Random, n: int, turns: int = 1) -> list[Pair]:
    w = lambda k: " ".join(rng.choice(WORDS) for _ in range(rng.randint(1, k)))
    out = []
    for _ in range(n):
        prompt = []
        for t in range(turns):
            prompt.append({"role": "user", "content": w(6)})
            if t < turns - 1:
                prompt.append({"role": "assistant", "content": w(5)})
        out.append(Pair(prompt, w(5), w(7)))
    return out


# ---- the losses against trl's own code -------------------------------------------------------------------
class _Accelerator:
    device = torch.device("cpu")

    def gather_for_metrics(self, x):
        return x

    def gather(self, x):
        return x


def trl_dpo_loss(per_token: torch.Tensor, completion_mask: torch.Tensor, ref_chosen, ref_rejected, loss_type: str,
                 beta: float, label_smoothing: float = 0.0):
    """trl 1.16's DPOTrainer._compute_loss (the unbound method: trl's code, not a copy) on a stand-in `self`.

    The stand-in "model" returns `per_token` as trl's fused LM head would (log-probs of the next-token labels,
    0 where the label is masked); reference log-probs are passed precomputed, as with precompute_ref_log_probs.
    Returns (loss, trl's logged metrics).
    """
    from trl.trainer.dpo_trainer import DPOTrainer

    n, T = completion_mask.shape
    outputs = types.SimpleNamespace(log_probs=per_token, entropy=torch.zeros(n, T - 1),
                                    mean_logits=torch.zeros(n, T - 1), is_top1=torch.zeros(n, T - 1, dtype=torch.bool))
    stand_in = types.SimpleNamespace(
        model=types.SimpleNamespace(training=True), accelerator=_Accelerator(), aux_loss_enabled=False, ld_alpha=None,
        precompute_ref_logps=True, f_divergence_type="reverse_kl", loss_types=[loss_type], loss_weights=[1.0],
        beta=beta, label_smoothing=label_smoothing, use_weighting=False, _metrics={"train": defaultdict(list)},
        _total_train_tokens=0, _tp_size=1, args=None)
    inputs = {"input_ids": torch.zeros(n, T, dtype=torch.long), "attention_mask": torch.ones(n, T, dtype=torch.long),
              "completion_mask": completion_mask, "ref_chosen_logps": ref_chosen, "ref_rejected_logps": ref_rejected}
    loss = DPOTrainer._compute_loss(stand_in, lambda **kw: outputs, inputs, False)
    return loss, stand_in._metrics["train"]


def trl_cpo_loss(chosen, rejected, loss_type: str, beta: float, label_smoothing: float, simpo_gamma: float = 0.5):
    """trl's CPOTrainer.cpo_loss (unbound, on a stand-in self): (losses, chosen_rewards, rejected_rewards)."""
    from trl.experimental.cpo import CPOTrainer

    stand_in = types.SimpleNamespace(alpha=0.0, accelerator=_Accelerator(), loss_type=loss_type, beta=beta,
                                     label_smoothing=label_smoothing, simpo_gamma=simpo_gamma)
    return CPOTrainer.cpo_loss(stand_in, chosen, rejected)


def _random_batch(seed: int, B: int = 7, T: int = 14):
    """Random per-token log-probs under random completion masks (prompt first, padding last), float64."""
    g = torch.Generator().manual_seed(seed)
    mask = torch.zeros(2 * B, T, dtype=torch.long)
    for i in range(2 * B):
        p = int(torch.randint(1, 5, (1,), generator=g))
        n = int(torch.randint(1, T - p + 1, (1,), generator=g))
        mask[i, p:p + n] = 1
    per_token = -torch.rand(2 * B, T - 1, generator=g, dtype=torch.float64) * 4 * mask[:, 1:]
    ref_w = -torch.rand(B, generator=g, dtype=torch.float64) * 4 * mask[:B].sum(1)
    ref_l = -torch.rand(B, generator=g, dtype=torch.float64) * 4 * mask[B:].sum(1)
    return per_token, mask, ref_w, ref_l


@pytest.mark.parametrize("loss_type", ["sigmoid", "hinge", "ipo"])
@pytest.mark.parametrize("beta", [0.1, 0.5, 2.0])
def test_loss_equals_trl_dpo_trainer(loss_type, beta):
    seed = fresh_seed()
    per_token, mask, ref_w, ref_l = _random_batch(seed)
    theirs, metrics = trl_dpo_loss(per_token, mask, ref_w, ref_l, loss_type, beta)
    B = len(ref_w)
    logps, n = per_token.sum(1), mask.sum(1)
    ours = preference_loss(logps[:B], logps[B:], ref_w, ref_l, n[:B], n[B:], loss_type=loss_type, beta=beta)
    torch.testing.assert_close(ours.loss, theirs, rtol=0, atol=1e-6, msg=f"seed {seed}")
    stats = reward_stats(ours.chosen_rewards, ours.rejected_rewards)  # random floats: no ties, so trl's > agrees
    for key, trl_key in (("chosen", "rewards/chosen"), ("rejected", "rewards/rejected"),
                         ("margin", "rewards/margins"), ("accuracy", "rewards/accuracies")):
        assert stats[key] == pytest.approx(metrics[trl_key][0], abs=1e-6), (key, seed)


@pytest.mark.parametrize("label_smoothing", [0.0, 0.1, 0.3])
def test_conservative_dpo_equals_trl(label_smoothing):
    seed = fresh_seed()
    per_token, mask, ref_w, ref_l = _random_batch(seed)
    B = len(ref_w)
    logps, n = per_token.sum(1), mask.sum(1)
    beta = random.Random(seed).uniform(0.05, 1.0)
    losses, chosen_r, rejected_r = trl_cpo_loss(logps[:B] - ref_w, logps[B:] - ref_l, "sigmoid", beta,
                                                label_smoothing)
    ours = preference_loss(logps[:B], logps[B:], ref_w, ref_l, n[:B], n[B:], loss_type="sigmoid", beta=beta,
                           label_smoothing=label_smoothing)
    torch.testing.assert_close(ours.losses, losses, rtol=0, atol=1e-6, msg=f"seed {seed}")
    torch.testing.assert_close(ours.chosen_rewards, chosen_r, rtol=0, atol=1e-6)
    torch.testing.assert_close(ours.rejected_rewards, rejected_r, rtol=0, atol=1e-6)
    if label_smoothing == 0.0:  # and plain DPO is the same in both of trl's trainers
        theirs, _ = trl_dpo_loss(per_token, mask, ref_w, ref_l, "sigmoid", beta)
        torch.testing.assert_close(ours.loss, theirs, rtol=0, atol=1e-6)


@pytest.mark.parametrize("label_smoothing", [0.0, 0.2])
@pytest.mark.parametrize("gamma", [0.0, 0.5, 1.4])
def test_simpo_equals_trl_cpo(label_smoothing, gamma):
    seed = fresh_seed()
    per_token, mask, _, _ = _random_batch(seed)
    B = mask.shape[0] // 2
    logps, n = per_token.sum(1), mask.sum(1)
    beta = random.Random(seed).uniform(0.5, 3.0)
    losses, chosen_r, rejected_r = trl_cpo_loss(logps[:B] / n[:B], logps[B:] / n[B:], "simpo", beta,
                                                label_smoothing, gamma)
    ours = preference_loss(logps[:B], logps[B:], None, None, n[:B], n[B:], loss_type="simpo", beta=beta,
                           label_smoothing=label_smoothing, simpo_gamma=gamma)
    torch.testing.assert_close(ours.losses, losses, rtol=0, atol=1e-6, msg=f"seed {seed}")
    torch.testing.assert_close(ours.chosen_rewards, chosen_r, rtol=0, atol=1e-6)
    torch.testing.assert_close(ours.rejected_rewards, rejected_r, rtol=0, atol=1e-6)


def test_losses_by_hand_on_a_known_gap():
    """h = 2 (chosen gained 1.5, rejected lost 0.5), beta = 0.5: the formulas of the papers, by hand."""
    w, lo, rw, rl = torch.tensor([-3.5]), torch.tensor([-6.5]), torch.tensor([-5.0]), torch.tensor([-6.0])
    n_w, n_l = torch.tensor([4]), torch.tensor([2])
    loss = lambda t, **kw: preference_loss(w, lo, rw, rl, n_w, n_l, loss_type=t, beta=0.5, **kw).loss.item()
    assert loss("sigmoid") == pytest.approx(math.log1p(math.exp(-1.0)))
    assert loss("sigmoid", label_smoothing=0.25) == pytest.approx(
        0.75 * math.log1p(math.exp(-1.0)) + 0.25 * math.log1p(math.exp(1.0)))
    assert loss("hinge") == pytest.approx(0.0)
    assert loss("ipo") == pytest.approx((1.5 / 4 - (-0.5) / 2 - 1.0) ** 2)
    simpo = preference_loss(w, lo, None, None, n_w, n_l, loss_type="simpo", beta=2.0, simpo_gamma=0.5)
    assert simpo.loss.item() == pytest.approx(math.log1p(math.exp(-(2.0 * (-3.5 / 4 + 6.5 / 2) - 0.5))))
    assert simpo.chosen_rewards.item() == pytest.approx(2.0 * -3.5 / 4)


# ---- tokenizing pairs and the sequence log-probs -----------------------------------------------------------
def test_only_the_final_reply_is_trained(cm):
    rng = random.Random(fresh_seed())
    for pair in _random_pairs(rng, 5, turns=2):
        enc = encode_pair(cm.tok, cm.fmt, pair)
        for row, reply in ((enc.chosen, pair.chosen), (enc.rejected, pair.rejected)):
            assert row.ids[:enc.prompt_len] == enc.chosen.ids[:enc.prompt_len]  # one shared prompt
            assert not any(row.trained[:enc.prompt_len])  # the earlier assistant turn is context only
            trained = [i for i, t in zip(row.ids, row.trained) if t]
            assert cm.tok.decode(trained[:-1]) == reply and trained[-1] == cm.tok.special_tokens[cm.fmt.end_token]
            assert row.trained[-1]  # nothing after the end token


@pytest.mark.parametrize("reply", ["a", "assistant", "user", "im_end", "end"])
def test_a_reply_that_also_occurs_in_the_framing_is_found_in_its_place(cm, reply):
    """project 4's masking found a message's content by searching the rendered text, so a reply "a" matched the
    "a" of "<|im_start|>assistant" first and the framing was cut inside a special token; it now renders the
    message with a marker in its place and takes that position."""
    pair = Pair([{"role": "user", "content": "the cat a"}], reply, "the dog ran")
    enc = encode_pair(cm.tok, cm.fmt, pair)
    trained = [i for i, t in zip(enc.chosen.ids, enc.chosen.trained) if t]
    assert trained[-1] == cm.tok.special_tokens[cm.fmt.end_token]
    assert cm.tok.decode(trained[:-1]) == reply
    assert enc.chosen.ids.count(cm.tok.special_tokens["<|im_start|>"]) == 2  # user + assistant, as ids


def test_sequence_logps_equal_a_manual_gather_and_sum(cm):
    rng = random.Random(fresh_seed())
    rows, _ = encode_pairs(cm.tok, cm.fmt, _random_pairs(rng, 4, turns=rng.randint(1, 2)), 127)
    idx, tgt = collate_pairs(rows, pad_id(cm))
    model = cm.model.eval()
    logps, n = sequence_logps(model, idx, tgt)
    with torch.no_grad():
        logits = model(idx)[0].double()
    for b, row in enumerate([r.chosen for r in rows] + [r.rejected for r in rows]):
        lp = torch.log_softmax(logits[b], -1)
        # position t predicts ids[t + 1]; only reply tokens (trained[t + 1]) are summed
        manual = sum(lp[t, row.ids[t + 1]] for t in range(len(row.ids) - 1) if row.trained[t + 1])
        assert int(n[b]) == sum(row.trained[1:])
        assert logps[b].item() == pytest.approx(float(manual), abs=1e-4)


def test_padding_and_prompt_tokens_contribute_nothing(cm):
    rng = random.Random(fresh_seed())
    rows, _ = encode_pairs(cm.tok, cm.fmt, _random_pairs(rng, 3), 127)
    model = cm.model.eval()
    idx, tgt = collate_pairs(rows, pad_id(cm))
    base_lp, _ = sequence_logps(model, idx, tgt)
    # another pad id and 5 more padding columns: the same numbers (causal attention: a real token never sees
    # the padding after it, and padding is never scored)
    wide = torch.zeros((idx.shape[0], idx.shape[1] + 5), dtype=torch.long)
    wide[:, :idx.shape[1]] = idx
    pad_mask = torch.zeros_like(wide, dtype=torch.bool)
    for b, row in enumerate([r.chosen for r in rows] + [r.rejected for r in rows]):
        pad_mask[b, len(row.ids) - 1:] = True
    wide = torch.where(pad_mask, torch.randint(0, model.config.vocab_size, wide.shape), wide)
    wide_tgt = torch.full_like(wide, IGNORE)
    wide_tgt[:, :tgt.shape[1]] = tgt
    torch.testing.assert_close(sequence_logps(model, wide, wide_tgt)[0], base_lp, rtol=0, atol=1e-5)
    # the gradient of the sum reaches only the logits at reply positions
    logits = torch.randn(idx.shape[0], idx.shape[1], model.config.vocab_size, requires_grad=True)
    token_logps(logits, tgt).sum().backward()
    scored = (tgt != IGNORE)
    assert logits.grad[~scored].abs().max().item() == 0.0
    assert (logits.grad[scored].abs().sum(-1) > 0).all()
    # and the scores at prompt and padding positions are exactly 0
    assert token_logps(logits.detach(), tgt)[~scored].abs().max().item() == 0.0


def test_pairs_longer_than_the_context_are_skipped_and_counted(cm):
    rng = random.Random(0)
    pairs = _random_pairs(rng, 6)
    pairs[2] = Pair(pairs[2].prompt, " ".join(["the cat sat"] * 80), pairs[2].rejected)
    rows, stats = encode_pairs(cm.tok, cm.fmt, pairs, 127)
    assert stats.rows == 5 == len(rows) and stats.skipped == {"longer than the context (127 tokens)": 1}
    assert "1 longer than the context" in stats.summary()


# ---- the reference: ln 2 at the start ----------------------------------------------------------------------
@pytest.mark.parametrize("loss_type,expected", [("sigmoid", math.log(2)), ("hinge", 1.0), ("ipo", None)])
def test_at_init_dpo_loss_is_ln2_and_rewards_are_zero(cm, loss_type, expected):
    rng = random.Random(fresh_seed())
    rows, _ = encode_pairs(cm.tok, cm.fmt, _random_pairs(rng, 5, turns=rng.randint(1, 2)), 127)
    assert rows
    policy = cm.model.train()
    ref = FrozenReference(policy)
    beta = rng.uniform(0.05, 1.0)
    loss, out = pair_batch(policy, ref, rows, pad_id(cm), "cpu", loss_type=loss_type, beta=beta)
    assert out.chosen_rewards.abs().max().item() == 0.0 and out.rejected_rewards.abs().max().item() == 0.0
    if expected is not None:  # exactly: -log sigmoid(0) = ln 2 and relu(1 - 0) = 1, in float32
        assert loss.item() == torch.tensor(expected, dtype=torch.float32).item()
    else:  # ipo: (0 - 1 / (2 beta))^2
        assert loss.item() == pytest.approx((1 / (2 * beta)) ** 2, rel=1e-6)
    assert reward_stats(out.chosen_rewards, out.rejected_rewards)["accuracy"] == 0.5
    loss.backward()  # the gradient is not zero: ln 2 is where learning starts, not where it stops
    assert any(p.grad is not None and p.grad.abs().sum() > 0 for p in policy.parameters())
    policy.zero_grad(set_to_none=True)
    assert not any(p.requires_grad for p in ref.model.parameters())


def test_reference_with_another_vocabulary_is_one_clear_error(cm):
    with pytest.raises(CourseError, match="vocabulary .* differs from the policy's"):
        check_same_vocab(cm.model, tiny_llama(vocab_size=cm.model.config.vocab_size + 3))


def test_lora_reference_is_exactly_the_base_with_no_copy(cm):
    """The reference of a LoRA run is the policy with its adapters disabled: exactly the base's log-probs
    (bit for bit), while the policy with trained adapters differs; at B = 0 the DPO loss is exactly ln 2."""
    import copy

    rng = random.Random(fresh_seed())
    rows, _ = encode_pairs(cm.tok, cm.fmt, _random_pairs(rng, 4, turns=rng.randint(1, 2)), 127)
    assert rows
    base = copy.deepcopy(cm.model).eval()
    policy = copy.deepcopy(cm.model).train()
    inject_lora(policy, "all-linear", r=4, alpha=8)
    ref = AdapterReference(policy)
    assert ref.model is policy  # no second model in memory
    loss, out = pair_batch(policy, ref, rows, pad_id(cm), "cpu", loss_type="sigmoid", beta=0.1)
    assert loss.item() == torch.tensor(math.log(2)).item() and out.chosen_rewards.abs().max().item() == 0.0
    with torch.no_grad():
        for layer in lora_layers(policy).values():
            layer.lora_B.normal_(0, 0.5)  # as if trained
    idx, tgt = collate_pairs(rows, pad_id(cm))
    policy.eval()
    with torch.no_grad():
        want, _ = sequence_logps(base, idx, tgt)
        trained, _ = sequence_logps(policy, idx, tgt)
    got, _ = ref.logps(idx, tgt)
    assert torch.equal(got, want)
    # the adapters do change the policy (max over rows: a sequence's summed log-prob can move by ~0 by chance)
    assert (trained - want).abs().max().item() > 1e-2
    torch.testing.assert_close(sequence_logps(policy, idx, tgt)[0].detach(), trained, rtol=0, atol=0)  # back on


_LORA = {"lora": True, "r": 4, "lora_alpha": 8.0, "target_modules": "all-linear", "learning_rate": 3e-2,
         "min_lr": 3e-3, "max_iters": 6, "eval_interval": 3, "gen_samples": 0}


def test_lora_run_learns_and_exports_the_merged_model(base, tmp_path):
    """ckpt.pt of a LoRA run holds the merged plain weights (every loader reads them) and the adapters
    (adapter_state_dict, and adapter/ in peft's layout): both score the held-out pairs the same."""
    from phase2_finetuning.project4_sft.sft import load_chat_model
    from phase2_finetuning.project6_dpo.dpo import heldout_logps

    summary = train_dpo.train(_cfg(base, tmp_path, **_LORA), progress=False)
    assert summary["after"]["heldout"]["rasbt"]["margin"] > 0.05
    state = torch.load(tmp_path / "ckpt.pt", weights_only=False)
    assert state["lora_state_dict"] and (tmp_path / "adapter" / "adapter_config.json").is_file()
    merged = load_chat_model(str(tmp_path))
    cm = prepare_base(str(base / "ckpt.pt"))
    inject_lora(cm.model, "all-linear", r=4, alpha=8)
    cm.model.load_state_dict(state["lora_state_dict"], strict=False)
    data = preferences.load_preference_data([("rasbt", str(base / "pairs.json"))], 4, 1337)
    rows, _ = encode_pairs(cm.tok, cm.fmt, data.heldout["rasbt"], 127)
    ours = heldout_logps(cm.model, rows, pad_id(cm), 4, "cpu")
    theirs = heldout_logps(merged.model, rows, pad_id(cm), 4, "cpu")
    torch.testing.assert_close(ours["chosen"], theirs["chosen"], rtol=0, atol=1e-4)
    assert (ours["chosen"] - heldout_logps(prepare_base(str(base / "ckpt.pt")).model, rows, pad_id(cm), 4,
                                           "cpu")["chosen"]).abs().max() > 1e-3  # the adapters did something


@pytest.mark.slow
def test_lora_resume_equals_an_uninterrupted_run(base, tmp_path):
    a, b = tmp_path / "a", tmp_path / "b"
    train_dpo.train(_cfg(base, a, **_LORA), progress=False)
    assert train_dpo.train(_cfg(base, b, **_LORA), progress=False, stop_at=2)["paused"]
    train_dpo.train(_cfg(base, b, **_LORA), resume=True, progress=False)
    sa, sb = (torch.load(d / "ckpt.pt", weights_only=False) for d in (a, b))
    assert sa["lora_state_dict"].keys() == sb["lora_state_dict"].keys() and sa["lora_state_dict"]
    for k in sa["lora_state_dict"]:
        assert torch.equal(sa["lora_state_dict"][k], sb["lora_state_dict"][k]), k


# ---- one step equals trl's DPOTrainer ----------------------------------------------------------------------
def test_two_steps_equal_trl_dpo_trainer(base, tmp_path):
    """Our train() (2 steps, paused after the first and resumed) and trl's DPOTrainer.train() (2 steps) from the
    same weights, on the same token ids, with the same AdamW, clipping and constant lr: the parameters agree
    within 1e-5 after each step. Step 1 starts at ln 2; step 2 starts from a moved policy, where Adam's update
    depends on the gradients' values, not only their signs."""
    from datasets import Dataset
    from tokenizers import Tokenizer, models
    from transformers import LlamaForCausalLM, PreTrainedTokenizerFast, TrainerCallback
    from trl import DPOConfig as TRLConfig
    from trl.trainer.dpo_trainer import DPOTrainer

    from phase1_foundation.project3_pretrain.hf_interop import export_hf, hf_name_map

    seed = fresh_seed()
    beta = random.Random(seed).uniform(0.1, 1.0)
    cfg = _cfg(base, tmp_path / "ours", heldout=4, batch_size=16, max_iters=2, learning_rate=2e-3, min_lr=2e-3,
               warmup_iters=0, weight_decay=0.0, beta1=0.9, beta2=0.999, grad_clip=1.0, eval_interval=1,
               gen_samples=0, beta=beta)
    ours = []
    assert train_dpo.train(cfg, seed=seed, progress=False, stop_at=1)["paused"]
    ours.append(torch.load(tmp_path / "ours" / "ckpt.pt", weights_only=False)["model_state_dict"])
    train_dpo.train(cfg, resume=True, progress=False)
    ours.append(torch.load(tmp_path / "ours" / "ckpt.pt", weights_only=False)["model_state_dict"])

    # the same initial weights and the same token ids for trl
    cm = prepare_base(cfg.base)
    data = preferences.load_preference_data(cfg.dataset_paths, cfg.heldout, seed)
    rows, _ = encode_pairs(cm.tok, cm.fmt, data.train, 127)
    assert len(rows) == 16
    records = []
    for r in rows:  # ChatML: the trained tokens are exactly the ids after the prompt, trl's completion
        p = r.prompt_len
        assert r.chosen.trained == [False] * p + [True] * (len(r.chosen.ids) - p)
        assert r.rejected.trained == [False] * p + [True] * (len(r.rejected.ids) - p)
        records.append({"prompt_ids": r.chosen.ids[:p], "chosen_ids": r.chosen.ids[p:],
                        "rejected_ids": r.rejected.ids[p:]})
    init = {k: v.clone() for k, v in cm.model.state_dict().items()}
    export_hf(cm.model, tmp_path / "hf")
    vocab = {f"t{i}": i for i in range(cm.model.config.vocab_size)}
    pad = f"t{pad_id(cm)}"
    tok = PreTrainedTokenizerFast(tokenizer_object=Tokenizer(models.WordLevel(vocab, unk_token="t0")),
                                  pad_token=pad, eos_token=pad)

    class OurIds(DPOTrainer):
        def _prepare_dataset(self, dataset, *args, **kwargs):
            return dataset  # already tokenized, by our masking

    theirs = []

    class Snapshot(TrainerCallback):
        def on_step_end(self, args, state, control, model=None, **kw):
            theirs.append({k: v.detach().clone() for k, v in model.state_dict().items()})

    args = TRLConfig(output_dir=str(tmp_path / "trl"), per_device_train_batch_size=16, max_steps=2,
                     learning_rate=2e-3, lr_scheduler_type="constant", warmup_steps=0, weight_decay=0.0,
                     adam_beta1=0.9, adam_beta2=0.999, adam_epsilon=1e-8, max_grad_norm=1.0, optim="adamw_torch",
                     beta=beta, loss_type=["sigmoid"], use_cpu=True, report_to=[], save_strategy="no",
                     logging_steps=1, max_length=None, seed=seed, disable_tqdm=True, bf16=False)
    trainer = OurIds(model=LlamaForCausalLM.from_pretrained(tmp_path / "hf"),
                     ref_model=LlamaForCausalLM.from_pretrained(tmp_path / "hf"), args=args,
                     train_dataset=Dataset.from_list(records), processing_class=tok, callbacks=[Snapshot()])
    trainer.train()
    assert len(theirs) == 2
    names = hf_name_map(cm.model.config)
    for step in range(2):
        diff = max((ours[step][o] - theirs[step][t]).abs().max().item() for o, t in names.items())
        assert diff < 1e-5, f"step {step + 1}: max parameter difference {diff:.2e} (seed {seed})"
    moved = min((ours[1][o] - init[o]).abs().max().item() for o in names)
    assert moved > 1e-3  # every tensor moved by far more than the tolerance: the comparison can fail


# ---- training runs ------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def trained(base, tmp_path_factory):
    out = tmp_path_factory.mktemp("run")
    summary = train_dpo.train(_cfg(base, out), progress=False)
    return out, summary


def test_training_raises_the_heldout_reward_accuracy(trained):
    out, summary = trained
    before, after = summary["before"]["heldout"]["rasbt"], summary["after"]["heldout"]["rasbt"]
    assert before["accuracy"] == 0.5 and before["margin"] == 0.0  # policy == reference
    assert after["accuracy"] == 1.0 and after["margin"] > 0.5
    for name in ("ckpt.pt", "tokenizer.pkl", "tokenizer_config.json", "log.jsonl", "results.json", "loss.png",
                 "accuracy.png", "rewards.png", "margins.png"):
        assert (out / name).is_file(), name
    assert (out / "loss.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    recs = [json.loads(x) for x in (out / "log.jsonl").read_text().splitlines()]
    assert [r["iter"] for r in recs if r["kind"] == "train"] == list(range(1, 13))
    assert [r["iter"] for r in recs if r["kind"] == "eval"] == [0, 6, 12]
    assert summary["after"]["reply_tokens"] > 0


def test_result_loads_as_a_chat_model(trained):
    from phase2_finetuning.project4_sft.sft import load_chat_model

    out, _ = trained
    cm = load_chat_model(str(out))
    state = torch.load(out / "ckpt.pt", weights_only=False)
    for k, v in cm.model.state_dict().items():
        assert torch.equal(v, state["model_state_dict"][k])


@pytest.mark.parametrize("loss_type", ["ipo", pytest.param("simpo", marks=pytest.mark.slow)])
def test_resume_equals_an_uninterrupted_run(base, tmp_path, loss_type):
    a, b = tmp_path / "a", tmp_path / "b"
    kw = {"max_iters": 4, "eval_interval": 2, "gen_samples": 0, "loss_type": loss_type, "heldout": 2}
    train_dpo.train(_cfg(base, a, **kw), progress=False)
    assert train_dpo.train(_cfg(base, b, **kw), progress=False, stop_at=2)["paused"]
    train_dpo.train(_cfg(base, b, **kw), resume=True, progress=False)
    sa = torch.load(a / "ckpt.pt", weights_only=False)
    sb = torch.load(b / "ckpt.pt", weights_only=False)
    assert sa["iter"] == sb["iter"] == 4
    for k in sa["model_state_dict"]:
        assert torch.equal(sa["model_state_dict"][k], sb["model_state_dict"][k]), k
    la = [json.loads(x)["loss"] for x in (a / "log.jsonl").read_text().splitlines() if '"train"' in x]
    lb = [json.loads(x)["loss"] for x in (b / "log.jsonl").read_text().splitlines() if '"train"' in x]
    assert la == lb


def test_benchmark_trains_each_loss_and_reports_paired_changes(base, tmp_path):
    # one row (cDPO: the loss with the most fields changed) on the tiny base, trained by train_dpo.py in its own
    # process; ARC-Easy on 3 questions
    has_arc = (REPO_ROOT / "data" / "arc" / "ARC-Easy" / "ARC-Easy-Test.jsonl").is_file()
    argv = [f"--base={base / 'ckpt.pt'}", f"--data=rasbt:{base / 'pairs.json'}", "--heldout=4", "--batch_size=4",
            "--max_iters=3", "--learning_rate=1e-2", "--min_lr=1e-3", "--warmup_iters=1", "--eval_interval=3",
            "--gen_samples=1", "--gen_budget=4", "--block_size=128", "--lora=false", "--device=cpu",
            f"--out_dir={tmp_path / 'runs'}", "--losses=cdpo", f"--eval_tasks={'arc_easy' if has_arc else ''}",
            "--eval_limit=3", f"--out={tmp_path / 'bench'}", "--no_progress"]
    out = benchmark.main(argv)
    assert [r["loss_type"] for r in out["rows"]] == ["sigmoid"]
    cdpo = torch.load(tmp_path / "runs" / "cdpo" / "ckpt.pt", map_location="cpu", weights_only=False)
    assert cdpo["dpo_config"]["label_smoothing"] == benchmark.CDPO_SMOOTHING
    r = out["rows"][0]
    assert r["before"]["heldout"]["rasbt"]["accuracy"] == 0.5 and r["iters"] == 3  # before: every reward is 0
    if has_arc:
        assert len(out["base_eval"]["arc_easy"]["picks"]) == 3 and "± " in out["table"]
    assert (tmp_path / "bench.md").read_text().startswith("| loss | beta |")
    ckpt = tmp_path / "runs" / "cdpo" / "ckpt.pt"
    stamp = ckpt.stat().st_mtime_ns
    again = benchmark.main(argv + ["--reuse"])  # the finished run is neither trained nor scored again
    assert ckpt.stat().st_mtime_ns == stamp and again["rows"][0]["after"] == r["after"]
    assert again["rows"][0]["eval"] == r["eval"] and again["base_eval"] == out["base_eval"]
    changed = benchmark.main([a for a in argv if not a.startswith("--max_iters")] + ["--max_iters=2", "--reuse",
                                                                                   "--eval_tasks="])
    assert ckpt.stat().st_mtime_ns != stamp and changed["rows"][0]["iters"] == 2  # another config: trained


# ---- the data ------------------------------------------------------------------------------------------------
def test_hh_transcripts_become_multi_turn_chats():
    row = {"chosen": "\n\nHuman: hi there\n\nAssistant: hello!\n\nHuman: a joke?\n\nAssistant: knock knock",
           "rejected": "\n\nHuman: hi there\n\nAssistant: hello!\n\nHuman: a joke?\n\nAssistant: no."}
    prompt, chosen, rejected = hh_pair(row)
    assert prompt == [{"role": "user", "content": "hi there"}, {"role": "assistant", "content": "hello!"},
                      {"role": "user", "content": "a joke?"}]
    assert (chosen, rejected) == ("knock knock", "no.")
    assert parse_transcript("\n\nHuman: a\n\nAssistant: b\n\nAssistant: c") is None
    assert parse_transcript("preamble\n\nHuman: a\n\nAssistant: b") is None
    assert hh_pair({"chosen": "\n\nHuman: x\n\nAssistant: y", "rejected": "\n\nHuman: z\n\nAssistant: y"}) \
        == "chosen and rejected prompts differ"


def test_hh_reader_drops_and_counts(tmp_path):
    t = lambda h, a: f"\n\nHuman: {h}\n\nAssistant: {a}"
    rows = [{"chosen": t("q1", "good"), "rejected": t("q1", "bad")},
            {"chosen": t("q2", "same"), "rejected": t("q2", "same")},
            {"chosen": t("q3", ""), "rejected": t("q3", "bad")},
            {"chosen": t("q4", "a") + "\n\nAssistant: b", "rejected": t("q4", "c")},
            {"chosen": t("q5", "ok"), "rejected": t("q6", "no")}]
    path = tmp_path / "test.jsonl.gz"
    with gzip.open(path, "wt", encoding="utf-8") as f:
        f.write("\n".join(json.dumps(r) for r in rows))
    got = preferences.read_hh(path, "hh_helpful")
    assert [(p.prompt[-1]["content"], p.chosen, p.rejected) for p in got.pairs] == [("q1", "good", "bad")]
    assert got.skipped == {"chosen equals rejected": 1, "empty response": 1, "turns do not alternate": 1,
                           "chosen and rejected prompts differ": 1}
    assert "1 chosen equals rejected" in got.summary()


def test_rasbt_reader_drops_and_counts(tmp_path):
    recs = _records(5, 1)
    recs[1]["rejected"] = recs[1]["chosen"]
    recs[2]["chosen"] = "   "
    path = tmp_path / "pairs.json"
    path.write_text(json.dumps(recs))
    got = preferences.read_rasbt(path)
    assert len(got) == 3 and got.skipped == {"chosen equals rejected": 1, "empty response": 1}
    assert got.pairs[0].prompt == [{"role": "user", "content": f"{recs[0]['instruction']}\n\n{recs[0]['input']}"}]


def test_oasst_ranked_siblings_lower_rank_is_chosen():
    def msg(mid, parent, role, text, rank=None, **kw):
        return {"message_id": mid, "parent_id": parent, "role": role, "text": text, "rank": rank,
                "created_date": mid, **kw}
    rows = [msg("a", None, "prompter", "root?"),
            msg("b", "a", "assistant", "second best", 1), msg("c", "a", "assistant", "best", 0),
            msg("d", "a", "assistant", "worst", 2), msg("e", "a", "assistant", "unranked"),
            msg("f", "c", "prompter", "follow up?"),
            msg("g", "f", "assistant", "fine", 0), msg("h", "f", "assistant", "meh", 1, deleted=True),
            msg("i", "f", "assistant", "fine again", 1)]
    got = oasst_pairs(rows)
    assert [(p.prompt[-1]["content"], p.chosen, p.rejected) for p in got.pairs] == [
        ("root?", "best", "second best"), ("root?", "best", "worst"), ("follow up?", "fine", "fine again")]
    assert got.pairs[2].prompt == [{"role": "user", "content": "root?"}, {"role": "assistant", "content": "best"},
                                   {"role": "user", "content": "follow up?"}]
    assert got.skipped == {"message deleted": 1}


def test_split_is_fixed_by_the_seed_and_disjoint():
    pairs = _random_pairs(random.Random(3), 50)
    a = preferences.split_pairs(pairs, 10, seed=5)
    assert a == preferences.split_pairs(pairs, 10, seed=5) and a != preferences.split_pairs(pairs, 10, seed=6)
    train, held = a
    assert len(train) == 40 and len(held) == 10 and not ({id(p) for p in train} & {id(p) for p in held})


def test_real_files_parse_with_the_documented_counts():
    expected = {"rasbt": (1094, {"chosen equals rejected": 6}),
                "hh_helpful": (2333, {"chosen equals rejected": 2, "empty response": 4, "turns do not alternate": 15}),
                "hh_harmless": (2299, {"empty response": 4, "turns do not alternate": 9})}
    paths = {"rasbt": preferences.RASBT_PATH, "hh_helpful": preferences.HH_HELPFUL_PATH,
             "hh_harmless": preferences.HH_HARMLESS_PATH}
    present = [n for n in expected if (REPO_ROOT / paths[n]).is_file()]
    if not present:
        pytest.skip("no preference data in data/ (download_data.py)")
    for name in present:
        got = preferences.read_pairs(name)
        assert (len(got), dict(got.skipped)) == expected[name], name


# ---- bad input: one line -----------------------------------------------------------------------------------
@pytest.mark.parametrize("argv,fragment", [
    (["--beta=0"], "beta (0.0) must be > 0"),
    (["--beta=-1"], "beta (-1.0) must be > 0"),
    (["--beta=nan"], "beta (nan) must be a finite number"),
    (["--loss_type=kto"], "loss_type ('kto') must be one of: sigmoid, ipo, hinge, simpo"),
    (["--loss_type=ipo", "--label_smoothing=0.1"], "label_smoothing (0.1) applies to loss_type sigmoid"),
    (["--label_smoothing=0.5"], "label_smoothing (0.5) must be in [0.0, 0.5)"),
    (["--loss_type=simpo", "--ref=x.pt"], "unused by loss_type simpo"),
    (["--data=alpaca"], "data ('alpaca') must be a comma-separated list of"),
    (["--batch_size=0"], "batch_size (0) must be > 0"),
    (["--block_size=0"], "block_size (0) must be > 0"),
    (["--min_lr=1", "--learning_rate=0.1"], "min_lr (1.0) must be <= learning_rate"),
    (["--max_iters=two"], "invalid int value"),
    (["--lora", "--r=0"], "r (0) must be > 0"),
    (["--lora", "--target_modules=,"], "target_modules ('') must name modules"),
])
def test_bad_flags_are_one_line(argv, fragment):
    assert fragment in one_line_error(train_dpo.main, argv)


def test_bad_runs_are_one_line(base, tmp_path):
    fill = {"base": base / "ckpt.pt", "pairs": base / "pairs.json", "out": tmp_path / "o", "bad": tmp_path / "bad.json",
            "big": tmp_path / "big"}
    (tmp_path / "bad.json").write_text("{not json")
    big = tiny_llama(vocab_size=500, block_size=128)
    (tmp_path / "big").mkdir()
    torch.save({"iter": 0, "model_state_dict": big.state_dict(), "model_config": big.config.to_dict(),
                "arch": "llama", "data_meta": {"tokenizer": str(base / "tokenizer.pkl")}}, tmp_path / "big" / "ckpt.pt")
    common = ["--base={base}", "--device=cpu", "--out_dir={out}", "--gen_samples=0", "--max_iters=1",
              "--block_size=63", "--lora=false"]
    cases = [
        (["--data=rasbt:{bad}"], "is not valid JSON"),
        (["--data=rasbt:{out}/missing.json"], "not found; fetch it with"),
        (["--data=rasbt:{pairs}", "--block_size=500"], "block_size (500) must be <= the model's context (128)"),
        (["--data=rasbt:{pairs}", "--heldout=0", "--block_size=5"], "no training rows left"),
        (["--data=rasbt:{pairs}", "--ref={big}/ckpt.pt"], "vocabulary (500 tokens) differs from the policy's (293)"),
        (["--data=rasbt:{pairs}", "--resume"], "nothing to resume"),
    ]
    for argv, fragment in cases:
        assert fragment in one_line_error(train_dpo.main, common + argv, fill=fill), argv
    train_dpo.main([a.format(**fill) for a in common + ["--data=rasbt:{pairs}", "--no_progress"]])
    assert "--data cannot change" in one_line_error(train_dpo.main, ["--out_dir={out}", "--resume", "--data=rasbt"],
                                                    fill=fill)
    assert "--lora cannot change" in one_line_error(train_dpo.main, ["--out_dir={out}", "--resume", "--lora=true"],
                                                    fill=fill)
    assert "drop --preset" in one_line_error(train_dpo.main, ["--out_dir={out}", "--resume", "--preset=cpu"],
                                             fill=fill)


def test_download_imports_a_local_copy_and_checks_it(tmp_path, monkeypatch):
    import functools

    import course.download
    from course.paths import REPO_ROOT

    # the byte counter's redraws would be lines on stderr
    monkeypatch.setattr(course.download, "tqdm", functools.partial(course.download.tqdm, disable=True))
    src = REPO_ROOT.parent / "shared" / "data" / "hh_rlhf"
    bad = tmp_path / "bad"
    bad.mkdir()
    (bad / "test.jsonl.gz").write_bytes(b"not the file")
    fill = {"bad": bad, "data": tmp_path / "data"}
    assert "expected 875,191 bytes" in one_line_error(
        download_data.main, ["--dataset=hh_helpful", "--source={bad}", "--data_dir={data}"], fill=fill)
    assert "could not download" in one_line_error(
        download_data.main, ["--dataset=hh_helpful", "--source=http://127.0.0.1:9", "--data_dir={data}"], fill=fill)
    assert "not a folder" in one_line_error(
        download_data.main, ["--dataset=hh_helpful", "--source={data}/nowhere", "--data_dir={data}"], fill=fill)
    if not src.is_dir():
        pytest.skip("no ../shared/data/hh_rlhf to import from")
    download_data.main(["--dataset=all", f"--source={src}", f"--data_dir={tmp_path / 'data'}"])
    assert len(preferences.read_hh(tmp_path / "data" / "hh_rlhf" / "harmless-base" / "test.jsonl.gz",
                                   "hh_harmless")) == 2299


def _demo() -> None:
    """The losses on a gap the learner can vary: h = log-ratio of chosen minus that of rejected."""
    n = torch.tensor([10])
    print("h      sigmoid  cDPO(0.1)  hinge   ipo     (beta 0.1; ipo's per-token gap = h / 10)")
    for h in (-10.0, -2.0, 0.0, 2.0, 10.0, 40.0):
        w, lo, z = torch.tensor([h]), torch.tensor([0.0]), torch.tensor([0.0])
        row = [preference_loss(w, lo, z, z, n, n, loss_type=t, beta=0.1, **kw).loss.item()
               for t, kw in (("sigmoid", {}), ("sigmoid", {"label_smoothing": 0.1}), ("hinge", {}), ("ipo", {}))]
        print(f"{h:+6.1f} " + "  ".join(f"{v:7.4f}" for v in row))
    print("at h = 0 (policy = reference) sigmoid DPO is ln 2 =", round(math.log(2), 4))


if __name__ == "__main__":
    run_demo(_demo, __doc__)
