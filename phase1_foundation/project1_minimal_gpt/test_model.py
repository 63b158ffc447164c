"""Tests of the minimal GPT: model, attention, sampling, training loop, checkpoints and scripts.

    uv run pytest -q phase1_foundation/project1_minimal_gpt            # the tests (~30 s on 2 cores)
    uv run python phase1_foundation/project1_minimal_gpt/test_model.py  # validation examples, printed

Each reference comparison uses an independent implementation: torch.nn.MultiheadAttention and a
NumPy float64 loop for attention, the written-out formula for LayerNorm, plain Python sorting
for top-k / top-p.
"""

from __future__ import annotations

import math
import random
import re
import subprocess
import sys
import time
import urllib.error
from pathlib import Path
from unittest import mock

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from course.checkpoint import load_checkpoint, save_checkpoint
from course.cli import run_demo
from course.clitest import assert_help_works, assert_one_line_error, one_line_error, run_script
from course.errors import ConfigError, CourseError, run_cli
from course.paths import REPO_ROOT
from phase1_foundation.project1_minimal_gpt import benchmark, data, download_data, generate, schedule, train, training
from phase1_foundation.project1_minimal_gpt.config import GPTConfig
from phase1_foundation.project1_minimal_gpt.model import GPT, LayerNorm
from phase1_foundation.project1_minimal_gpt.sampling import (apply_temperature, generate_text, sample_next_token,
                                                             stream_tokens, top_k_filter, top_p_filter)

TINY = dict(vocab_size=11, block_size=16, n_layer=2, n_head=2, n_embd=32)
TINY_TRAIN = dict(block_size=16, n_layer=2, n_head=2, n_embd=32, batch_size=4, max_iters=8, eval_interval=4,
                  eval_iters=2, warmup_iters=2, log_interval=2, time_budget_s=None)


def tiny_model(seed: int = 0, **kw) -> GPT:
    torch.manual_seed(seed)
    return GPT(GPTConfig(**{**TINY, **kw}))


def randomize(model: torch.nn.Module, std: float = 0.3, seed: int = 0) -> None:
    """Replace the tiny GPT-2 init by larger random weights, so disagreements would show."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            noise = torch.randn(p.shape, generator=g) * std
            p.copy_(noise + 1.0 if p.dim() == 1 else noise)  # LayerNorm gains (and biases) around 1


@pytest.fixture
def text_file(tmp_path) -> Path:
    rng = random.Random(0)
    words = ["to", "be", "or", "not", "the", "king", "ROMEO:", "JULIET:", "\n"]
    text = " ".join(rng.choice(words) for _ in range(1500))
    path = tmp_path / "tiny.txt"
    path.write_text(text)
    return path


def run_train(text_file, out_dir, *extra) -> dict:
    args = [f"--data_path={text_file}", f"--out_dir={out_dir}", "--device=cpu", "--no_progress"]
    args += [f"--{k}={v}" for k, v in TINY_TRAIN.items() if v is not None]
    return train.main(args + list(extra))


def cli_error(fn, capsys) -> str:
    """Run fn through run_cli; assert it exits 2 with one stderr line; return that line."""
    with pytest.raises(SystemExit) as exc:
        run_cli(fn)
    assert exc.value.code == 2
    err = capsys.readouterr().err
    lines = [line for line in re.split(r"[\r\n]", err) if line.strip()]  # \r: tqdm bars redraw in place
    assert "Traceback" not in err and lines[-1].startswith("error: "), err
    assert sum(line.startswith("error") for line in lines) == 1, err
    return lines[-1]


# ---- model --------------------------------------------------------------------------------
def test_shapes_and_loss():
    model = tiny_model()
    idx = torch.randint(0, 11, (3, 16))
    logits, loss = model(idx)
    assert logits.shape == (3, 16, 11) and loss is None
    logits, loss = model(idx[:, :5], idx[:, 1:6])
    assert logits.shape == (3, 5, 11) and loss.shape == ()
    with pytest.raises(CourseError, match="sequence length 17 exceeds block_size 16"):
        model(torch.zeros(1, 17, dtype=torch.long))


@pytest.mark.parametrize("impl", ["sdpa", "manual"])
def test_causality(impl):
    """Changing token t never changes the logits before t (and does change them at t)."""
    model = tiny_model(attn_impl=impl).eval()
    randomize(model, 0.2)
    idx = torch.randint(0, 11, (2, 16))
    for t in (0, 5, 15):
        other = idx.clone()
        other[:, t] = (idx[:, t] + 1) % 11
        a, b = model(idx)[0], model(other)[0]
        torch.testing.assert_close(a[:, :t], b[:, :t], rtol=0, atol=1e-6)
        assert (a[:, t:] - b[:, t:]).abs().max() > 1e-3


def test_initial_loss_is_ln_vocab():
    torch.manual_seed(0)
    model = GPT(GPTConfig(vocab_size=65, block_size=32))
    idx = torch.randint(0, 65, (8, 32))
    _, loss = model(idx, torch.randint(0, 65, (8, 32)))
    assert abs(loss.item() - math.log(65)) < 0.05, loss.item()


def test_overfits_one_batch():
    model = tiny_model(n_embd=64)
    x = torch.randint(0, 11, (4, 16))
    y = torch.randint(0, 11, (4, 16))
    opt = model.configure_optimizer(0.0, 3e-3, (0.9, 0.99), "cpu")
    for _ in range(250):
        _, loss = model(x, y)
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
    assert loss.item() < 0.05, loss.item()


def test_layernorm_matches_formula():
    x = torch.randn(4, 7, 32) * 3 + 1
    ln = LayerNorm(32, bias=True)
    with torch.no_grad():
        ln.weight.normal_()
        ln.bias.normal_()
    mean = x.mean(-1, keepdim=True)
    var = ((x - mean) ** 2).mean(-1, keepdim=True)  # biased variance, as in the paper
    expected = (x - mean) / torch.sqrt(var + 1e-5) * ln.weight + ln.bias
    torch.testing.assert_close(ln(x), expected, rtol=1e-5, atol=1e-5)
    assert LayerNorm(8, bias=False).bias is None


def test_weight_tying_and_gpt2_init():
    torch.manual_seed(0)
    model = GPT(GPTConfig(vocab_size=65, n_layer=4, n_embd=256, n_head=4))
    assert model.lm_head.weight is model.transformer.wte.weight
    h = model.transformer.h[0]
    assert abs(h.attn.c_attn.weight.std().item() - 0.02) < 0.001
    assert abs(h.mlp.c_proj.weight.std().item() - 0.02 / math.sqrt(8)) < 0.0005
    assert abs(h.attn.c_proj.weight.std().item() - 0.02 / math.sqrt(8)) < 0.0005
    n = sum(p.numel() for p in model.parameters())
    assert n == 65 * 256 + 128 * 256 + 4 * (12 * 256 * 256 + 2 * 256) + 256  # tied table counted once


def test_optimizer_decay_groups():
    model = tiny_model(bias=True)
    opt = model.configure_optimizer(0.1, 1e-3, (0.9, 0.95), "cpu")
    decay, no_decay = opt.param_groups
    assert decay["weight_decay"] == 0.1 and no_decay["weight_decay"] == 0.0
    assert all(p.dim() == 2 for p in decay["params"]) and all(p.dim() == 1 for p in no_decay["params"])
    ids = [id(p) for g in opt.param_groups for p in g["params"]]
    assert len(ids) == len(set(ids)) == len(list(model.parameters()))
    assert id(model.transformer.wte.weight) in {id(p) for p in decay["params"]}


# ---- attention against independent references ----------------------------------------------
def numpy_attention(x, w_qkv, b_qkv, w_o, b_o, n_head):
    """Causal multi-head attention in float64 NumPy, one head and one query at a time."""
    T, C = x.shape
    D = C // n_head
    qkv = x @ w_qkv.T + b_qkv
    q, k, v = qkv[:, :C], qkv[:, C:2 * C], qkv[:, 2 * C:]
    out = np.zeros((T, C))
    for h in range(n_head):
        s = slice(h * D, (h + 1) * D)
        for t in range(T):
            scores = np.array([q[t, s] @ k[j, s] / math.sqrt(D) for j in range(t + 1)])
            w = np.exp(scores - scores.max())
            w /= w.sum()
            out[t, s] = sum(w[j] * v[j, s] for j in range(t + 1))
    return out @ w_o.T + b_o


def test_attention_paths_agree_with_each_other_and_references():
    torch.manual_seed(1)
    model = GPT(GPTConfig(vocab_size=11, block_size=12, n_layer=1, n_head=4, n_embd=32, bias=True))
    randomize(model, 0.3, seed=1)
    attn = model.transformer.h[0].attn
    x = torch.randn(3, 12, 32)
    attn.attn_impl = "manual"
    y_manual = attn(x)
    attn.attn_impl = "sdpa"
    y_sdpa = attn(x)
    torch.testing.assert_close(y_manual, y_sdpa, rtol=0, atol=1e-5)

    mha = torch.nn.MultiheadAttention(32, 4, bias=True, batch_first=True)
    with torch.no_grad():  # nn.MultiheadAttention stacks W_Q, W_K, W_V the same way as c_attn
        mha.in_proj_weight.copy_(attn.c_attn.weight)
        mha.in_proj_bias.copy_(attn.c_attn.bias)
        mha.out_proj.weight.copy_(attn.c_proj.weight)
        mha.out_proj.bias.copy_(attn.c_proj.bias)
    future = torch.triu(torch.ones(12, 12, dtype=torch.bool), diagonal=1)  # True = may not attend
    y_ref = mha(x, x, x, attn_mask=future, need_weights=False)[0]
    torch.testing.assert_close(y_sdpa, y_ref, rtol=0, atol=1e-5)

    p = {n: t.detach().double().numpy() for n, t in attn.named_parameters()}
    y_np = numpy_attention(x[0].double().numpy(), p["c_attn.weight"], p["c_attn.bias"], p["c_proj.weight"],
                           p["c_proj.bias"], 4)
    np.testing.assert_allclose(y_manual[0].detach().numpy(), y_np, rtol=0, atol=1e-5)


def test_whole_model_same_logits_with_either_attention_path():
    model = tiny_model().eval()
    randomize(model, 0.2)
    idx = torch.randint(0, 11, (2, 16))
    model.set_attn_impl("manual")
    a = model(idx)[0]
    model.set_attn_impl("sdpa")
    torch.testing.assert_close(a, model(idx)[0], rtol=0, atol=1e-5)


# ---- sampling -------------------------------------------------------------------------------
def test_temperature_and_greedy():
    logits = torch.randn(3, 20)
    torch.testing.assert_close(apply_temperature(logits, 0.5), logits * 2)
    assert torch.equal(sample_next_token(logits, temperature=0), logits.argmax(-1, keepdim=True))
    assert sample_next_token(logits[0], temperature=1.0).shape == (1,)
    with pytest.raises(ConfigError, match=r"temperature \(-1\) must be >= 0"):
        sample_next_token(logits, temperature=-1)


def test_top_k_against_sorting():
    torch.manual_seed(0)
    logits = torch.randn(5, 30)
    for k in (1, 4, 29, 30, 100):
        kept = torch.isfinite(top_k_filter(logits, k))
        for row, mask in zip(logits.tolist(), kept):
            best = sorted(range(30), key=lambda i: -row[i])[:k]
            assert set(torch.nonzero(mask).flatten().tolist()) == set(best)
    assert torch.equal(top_k_filter(logits, 3)[torch.isfinite(top_k_filter(logits, 3))],
                       logits[torch.isfinite(top_k_filter(logits, 3))])  # kept logits unchanged
    with pytest.raises(ConfigError, match=r"top_k \(0\) must be a positive integer"):
        top_k_filter(logits, 0)


def test_top_p_against_brute_force():
    torch.manual_seed(0)
    logits = torch.randn(6, 25) * 2
    for p in (0.05, 0.3, 0.75, 0.9, 0.999, 1.0):
        kept = torch.isfinite(top_p_filter(logits, p))
        for row, mask in zip(logits.double().tolist(), kept):
            z = sum(math.exp(v) for v in row)
            probs = [math.exp(v) / z for v in row]
            order = sorted(range(len(row)), key=lambda i: -probs[i])
            nucleus, mass = [], 0.0
            for i in order:  # smallest prefix whose mass reaches p
                nucleus.append(i)
                mass += probs[i]
                if mass >= p:
                    break
            assert set(torch.nonzero(mask).flatten().tolist()) == set(nucleus), p
    with pytest.raises(ConfigError, match=r"top_p \(1.5\) must be in \(0, 1\]"):
        top_p_filter(logits, 1.5)


def test_sampling_frequencies_match_filtered_distribution():
    logits = torch.tensor([2.0, 1.5, 1.0, 0.5, 0.0, -1.0])
    g = torch.Generator().manual_seed(0)
    draws = torch.cat([sample_next_token(logits.expand(1000, 6), 0.7, top_k=3, generator=g) for _ in range(8)])
    counts = torch.bincount(draws.flatten(), minlength=6).double() / draws.numel()
    expected = torch.softmax(logits[:3].double() / 0.7, -1)
    assert counts[3:].sum() == 0
    torch.testing.assert_close(counts[:3], expected, rtol=0, atol=0.02)


# ---- training pieces --------------------------------------------------------------------------
def test_cosine_lr_shape():
    lr = lambda it: schedule.cosine_lr(it, 10, 110, 1e-3, 1e-4)  # noqa: E731
    assert lr(0) == pytest.approx(1e-3 / 11) and lr(9) == pytest.approx(1e-3 * 10 / 11)
    assert lr(10) == pytest.approx(1e-3)
    assert lr(60) == pytest.approx((1e-3 + 1e-4) / 2)
    assert lr(110) == lr(500) == pytest.approx(1e-4)
    assert all(lr(i) >= lr(i + 1) for i in range(10, 120))


def test_estimate_loss_is_mean_over_batches():
    values = iter(range(100))

    class Fake(torch.nn.Module):
        def forward(self, x, y):
            return None, x.float().mean()

    def get_batch(split):
        v = next(values)
        return torch.full((2, 3), v), None

    model = Fake().train()
    out = schedule.estimate_loss(model, get_batch, 4)
    assert out == {"train": 1.5, "val": 5.5} and model.training


def test_get_batch_targets_are_shifted_inputs():
    ids = torch.arange(1000)
    gb = data.make_get_batch(ids[:900], ids[900:], 8, 5, torch.device("cpu"))
    x, y = gb("train")
    assert x.shape == y.shape == (5, 8) and torch.equal(y, x + 1) and x.max() < 900
    x, _ = gb("val")
    assert x.min() >= 900


# ---- train.py end to end -------------------------------------------------------------------------
def test_train_writes_checkpoint_metrics_plot_and_summary(text_file, tmp_path, capsys):
    summary = run_train(text_file, tmp_path / "run")
    out = capsys.readouterr().out
    assert re.search(r"^done: val_loss=\d+\.\d+ train_loss=\d+\.\d+ wall_s=\d+ tokens_per_s=\d+$", out, re.M)
    names = sorted(p.name for p in (tmp_path / "run").iterdir())
    assert names == ["ckpt.pt", "last.pt", "loss.png", "metrics.json"]  # no temp files
    ck = load_checkpoint(tmp_path / "run" / "last.pt")
    for key in ("iter", "model_state_dict", "optimizer_state_dict", "train_loss", "val_loss", "config", "chars",
                "rng_state"):
        assert key in ck
    assert ck["iter"] == 8 and ck["val_loss"] == pytest.approx(summary["val_loss"])
    assert ck["chars"] == sorted(set(text_file.read_text()))


def test_checkpoint_round_trip_identical_logits(tmp_path):
    model = tiny_model()
    randomize(model, 0.1)
    opt = model.configure_optimizer(0.1, 1e-3, (0.9, 0.99), "cpu")
    chars = [chr(ord("a") + i) for i in range(11)]
    losses = {"train": 1.0, "val": 1.1}
    save_checkpoint(tmp_path / "ckpt.pt", training.checkpoint_state(model, opt, model.config, chars, 3, losses,
                                                                     1.1, {}, 0))
    loaded, loaded_chars = training.load_model(tmp_path / "ckpt.pt", torch.device("cpu"))
    idx = torch.randint(0, 11, (2, 16))
    assert loaded_chars == chars and torch.equal(model.eval()(idx)[0], loaded(idx)[0])


def test_resume_continues_exactly(text_file, tmp_path):
    """8 steps in one go == 4 steps, then --resume for 4 more (dropout on, so RNG state matters)."""
    common = ["--dropout=0.1", "--lr_decay_iters=8"]
    run_train(text_file, tmp_path / "a", *common)
    run_train(text_file, tmp_path / "b", *common, "--max_iters=4")
    run_train(text_file, tmp_path / "b", *common, "--resume", "--max_iters=8")
    a, b = load_checkpoint(tmp_path / "a" / "last.pt"), load_checkpoint(tmp_path / "b" / "last.pt")
    assert a["iter"] == b["iter"] == 8
    for name, tensor in a["model_state_dict"].items():
        assert torch.equal(tensor, b["model_state_dict"][name]), name
    for pid, st in a["optimizer_state_dict"]["state"].items():
        assert torch.equal(st["exp_avg"], b["optimizer_state_dict"]["state"][pid]["exp_avg"])
    assert a["val_loss"] == b["val_loss"] and a["history"]["val"] == b["history"]["val"]


def test_time_budget_stops_gracefully(text_file, tmp_path):
    summary = run_train(text_file, tmp_path / "run", "--max_iters=100000", "--time_budget_s=1.5")
    assert summary["stopped_by"] == "time_budget" and 0 < summary["iters"] < 100000
    assert load_checkpoint(tmp_path / "run" / "last.pt")["iter"] == summary["iters"]


def test_interrupted_save_leaves_no_partial_checkpoint(text_file, tmp_path, capsys):
    run_train(text_file, tmp_path / "run", "--max_iters=4")
    before = load_checkpoint(tmp_path / "run" / "last.pt")["iter"]

    def broken_save(obj, f, *a, **kw):
        f.write(b"half a checkpoint")
        raise KeyboardInterrupt

    with mock.patch("torch.save", broken_save):
        msg = cli_error(lambda: run_train(text_file, tmp_path / "run", "--resume", "--max_iters=8"), capsys)
    assert "training interrupted at iter 8" in msg and "--resume" in msg
    assert sorted(p.name for p in (tmp_path / "run").iterdir()) == ["ckpt.pt", "last.pt", "loss.png",
                                                                     "metrics.json"]
    assert load_checkpoint(tmp_path / "run" / "last.pt")["iter"] == before


# ---- config errors --------------------------------------------------------------------------------
@pytest.mark.parametrize("field,value,message", [
    ("vocab_size", 0, "vocab_size (0) must be > 0"),
    ("block_size", -8, "block_size (-8) must be > 0"),
    ("n_layer", 0, "n_layer (0) must be > 0"),
    ("n_head", 3, "n_embd (128) must be divisible by n_head (3)"),
    ("n_embd", 130, "n_embd (130) must be divisible by n_head (4)"),
    ("dropout", 1.0, "dropout (1.0) must be in [0.0, 1.0)"),
    ("bias", "yes", "bias ('yes') must be of type bool"),
    ("attn_impl", "flash", "attn_impl ('flash') must be one of: sdpa, manual"),
    ("batch_size", 0, "batch_size (0) must be > 0"),
    ("max_iters", 0, "max_iters (0) must be > 0"),
    ("lr_decay_iters", 0, "lr_decay_iters (0) must be > 0"),
    ("learning_rate", -1e-3, "learning_rate (-0.001) must be > 0"),
    ("min_lr", 1.0, "min_lr (1.0) must be in [0, learning_rate (0.002)]"),
    ("warmup_iters", -1, "warmup_iters (-1) must be >= 0"),
    ("weight_decay", -0.1, "weight_decay (-0.1) must be >= 0"),
    ("beta1", 1.0, "beta1 (1.0) must be in [0.0, 1.0)"),
    ("beta2", -0.5, "beta2 (-0.5) must be in [0.0, 1.0)"),
    ("grad_clip", -1.0, "grad_clip (-1.0) must be >= 0 (0 disables clipping)"),
    ("time_budget_s", -1.0, "time_budget_s (-1.0) must be >= 0 (0 = no limit)"),
    ("eval_interval", 0, "eval_interval (0) must be > 0"),
    ("eval_iters", 0, "eval_iters (0) must be > 0"),
    ("log_interval", 0, "log_interval (0) must be > 0"),
    ("n_layer", 2.5, "n_layer (2.5) must be of type int"),
])
def test_each_invalid_config_field_has_its_own_error(field, value, message):
    with pytest.raises(ConfigError) as exc:
        GPTConfig(**{field: value}).validate_config()
    assert str(exc.value) == "invalid config: " + message


def test_presets_are_valid():
    for name in GPTConfig.PRESETS:
        GPTConfig.from_preset(name).validate_config()
    gpu = GPTConfig.from_preset("gpu")
    assert (gpu.n_layer, gpu.n_head, gpu.n_embd, gpu.block_size) == (6, 6, 384, 256)


# ---- generation ------------------------------------------------------------------------------------
def test_generation_reproducible_with_seed():
    model = tiny_model().eval()
    randomize(model, 0.2)
    chars = list("abcdefghij ")
    kw = dict(max_new_tokens=40, temperature=1.0, top_k=5, top_p=0.9)
    a = generate_text(model, chars, "abc", seed=3, **kw)
    assert a == generate_text(model, chars, "abc", seed=3, **kw) and len(a) == 40
    assert a != generate_text(model, chars, "abc", seed=4, **kw)


def test_stream_tokens_greedy_matches_manual_loop():
    model = tiny_model().eval()
    randomize(model, 0.2)
    idx = torch.tensor([[1, 2, 3]])
    got = list(stream_tokens(model, idx, 20, block_size=16, temperature=0))  # crosses block_size
    seq = idx[0].tolist()
    for _ in range(20):
        with torch.no_grad():
            seq.append(int(model(torch.tensor([seq[-16:]]))[0][0, -1].argmax()))
    assert got == seq[3:]


# ---- one-line errors of the scripts ------------------------------------------------------------------
def test_generate_unknown_prompt_chars(text_file, tmp_path, capsys):
    run_train(text_file, tmp_path / "run", "--max_iters=2", "--eval_interval=2")
    capsys.readouterr()
    msg = cli_error(lambda: generate.main([f"--checkpoint={tmp_path / 'run' / 'ckpt.pt'}", "--prompt", "kingZ@",
                                           "--device=cpu"]), capsys)
    assert "the prompt contains characters not in the model's vocabulary: '@', 'Z'" in msg


def test_generate_bad_sampling_flags(capsys):
    msg = cli_error(lambda: generate.main(["--top_k=0"]), capsys)
    assert msg == "error: argument --top_k: expected an integer > 0, got '0' (see --help)"
    msg = cli_error(lambda: generate.main(["--top_p=2"]), capsys)
    assert msg == "error: argument --top_p: expected a number in (0, 1], got '2' (see --help)"
    msg = cli_error(lambda: generate.main(["--temperature=-1"]), capsys)
    assert msg == "error: argument --temperature: expected a number in [0, inf], got '-1' (see --help)"


def test_generate_interactive_loop(text_file, tmp_path, capsys):
    """A bad line is reported and the session goes on; an empty line does nothing; /quit quits."""
    run_train(text_file, tmp_path / "run", "--max_iters=2", "--eval_interval=2")
    capsys.readouterr()
    with mock.patch("builtins.input", side_effect=["king", "Zed", "", "the", "/quit", "never read"]):
        generate.main([f"--checkpoint={tmp_path / 'run' / 'ckpt.pt'}", "--interactive", "--max_new_tokens=5",
                       "--device=cpu"])
    captured = capsys.readouterr()
    assert captured.err == "error: the prompt contains characters not in the model's vocabulary: 'Z', 'd'; the " \
                           "model knows only the 22 characters of its training text\n"
    answers = [line for line in captured.out.splitlines()[1:] if line]  # after the banner
    assert len(answers) == 2 and answers[0].startswith("king") and answers[1].startswith("the")
    assert all(len(a) in (4 + 5, 3 + 5) for a in answers)  # the prompt + exactly 5 new characters


def test_generate_interactive_ctrl_c_stops_one_answer(text_file, tmp_path, capsys):
    run_train(text_file, tmp_path / "run", "--max_iters=2", "--eval_interval=2")
    capsys.readouterr()
    real = generate.generate_text

    def interrupted_on_king(model, chars, prompt, **kw):
        if prompt == "king":
            kw["stream"].write("ab")
            raise KeyboardInterrupt  # Ctrl-C while this answer is being sampled
        return real(model, chars, prompt, **kw)

    with mock.patch.object(generate, "generate_text", interrupted_on_king), \
            mock.patch("builtins.input", side_effect=["king", "the", EOFError]):
        generate.main([f"--checkpoint={tmp_path / 'run' / 'ckpt.pt'}", "--interactive", "--max_new_tokens=5",
                       "--device=cpu"])
    captured = capsys.readouterr()
    assert captured.err == "(stopped)\n"
    assert "kingab\n" in captured.out and captured.out.endswith("\n") and captured.out.count("the") >= 1


def test_generate_missing_checkpoint(tmp_path, capsys):
    msg = cli_error(lambda: generate.main([f"--checkpoint={tmp_path / 'nope.pt'}"]), capsys)
    assert msg.endswith("train one first with: uv run python phase1_foundation/project1_minimal_gpt/train.py")


def test_train_missing_data_and_missing_resume(tmp_path, capsys):
    msg = cli_error(lambda: train.main([f"--data_path={tmp_path / 'none.txt'}", "--device=cpu"]), capsys)
    assert "data file not found" in msg and "download_data.py" in msg
    (tmp_path / "t.txt").write_text("hello world " * 100)
    msg = cli_error(lambda: train.main([f"--data_path={tmp_path / 't.txt'}", f"--out_dir={tmp_path}", "--resume",
                                        "--device=cpu"]), capsys)
    assert "checkpoint not found" in msg and "without --resume" in msg


def test_train_bad_config_flag_and_resume_shape_change(text_file, tmp_path, capsys):
    msg = cli_error(lambda: train.main(["--n_head=3"]), capsys)
    assert msg == "error: invalid config: n_embd (128) must be divisible by n_head (3)"
    run_train(text_file, tmp_path / "run", "--max_iters=2", "--eval_interval=2")
    capsys.readouterr()
    msg = cli_error(lambda: run_train(text_file, tmp_path / "run", "--resume", "--n_layer=3"), capsys)
    assert "cannot change n_layer when resuming" in msg


def test_train_fetches_missing_default_data_and_offline_is_one_clear_error(tmp_path, monkeypatch):
    """train.py downloads Tiny Shakespeare itself when data/ lacks it; offline that ends in the --source line."""
    missing = tmp_path / "shakespeare.txt"
    monkeypatch.setattr(data, "DATA_PATH", missing)
    with mock.patch("urllib.request.urlopen", side_effect=urllib.error.URLError("no network")):
        with pytest.raises(CourseError, match=r"offline\? import a local copy .* --source PATH_TO/input.txt"):
            data.load_text(missing)
    assert not missing.exists()
    binary = tmp_path / "weights.bin"
    binary.write_bytes(bytes(range(256)) * 4)
    with pytest.raises(CourseError, match="is not UTF-8 text"):
        data.load_text(binary)


def test_download_offline_and_bad_source(tmp_path, capsys):
    dest = tmp_path / "shakespeare.txt"
    with mock.patch("urllib.request.urlopen", side_effect=urllib.error.URLError("no network")):
        msg = cli_error(lambda: download_data.main([f"--dest={dest}"]), capsys)
    assert "offline?" in msg and "--source PATH_TO/input.txt" in msg
    wrong = tmp_path / "wrong.txt"
    wrong.write_text("not shakespeare")
    msg = cli_error(lambda: download_data.main([f"--dest={dest}", f"--source={wrong}"]), capsys)
    assert "expected 1,115,394 bytes" in msg
    assert not dest.exists()


def test_scripts_run_as_file_and_as_module():
    for cmd in (["phase1_foundation/project1_minimal_gpt/train.py", "--help"],
                ["-m", "phase1_foundation.project1_minimal_gpt.generate", "--help"]):
        res = subprocess.run([sys.executable, *cmd], cwd=REPO_ROOT, capture_output=True, text=True, timeout=120)
        assert res.returncode == 0 and "--seed" in res.stdout and "--device" in res.stdout, res.stderr


# ---- every script: bad flags and bad files end in one line, never a traceback -----------------------------
@pytest.fixture
def bad_files(tmp_path, text_file) -> dict[str, Path]:
    files = {"empty": tmp_path / "empty.txt", "binary": tmp_path / "bin.txt", "short": tmp_path / "short.txt",
             "folder": tmp_path / "folder", "not_ckpt": tmp_path / "other.pt", "corrupt": tmp_path / "corrupt.pt",
             "mismatch": tmp_path / "mismatch.pt", "text": text_file}
    files["empty"].write_text("")
    files["binary"].write_bytes(b"\x80\x81\xfe" * 100)
    files["short"].write_text("too short")
    files["folder"].mkdir()
    save_checkpoint(files["not_ckpt"], {"iter": 1, "model_state_dict": {}})  # no config, no chars
    files["corrupt"].write_bytes(b"PK\x03\x04 half a zip")
    chars = sorted(set(text_file.read_text()))  # the text's own vocabulary: only the weights are wrong
    model = tiny_model(vocab_size=len(chars))
    opt = model.configure_optimizer(0.1, 1e-3, (0.9, 0.99), "cpu")
    state = training.checkpoint_state(model, opt, model.config, chars, 0, {"train": 1, "val": 1}, 1.0, {}, 0)
    state["config"]["n_embd"] = 64  # a config that does not match its weights
    state["config"]["n_head"] = 2
    save_checkpoint(files["mismatch"], state)
    return files


TRAIN_BAD = [
    (["--n_layer=0"], "invalid config: n_layer (0) must be > 0"),
    (["--learning_rate=nan"], "invalid config: learning_rate (nan) must be a finite number"),
    (["--learning_rate=inf"], "invalid config: learning_rate (inf) must be a finite number"),
    (["--dropout=nan"], "invalid config: dropout (nan) must be a finite number"),
    (["--time_budget_s=-inf"], "invalid config: time_budget_s (-inf) must be a finite number"),
    (["--batch_size=0"], "invalid config: batch_size (0) must be > 0"),
    (["--max_iters=-1"], "invalid config: max_iters (-1) must be > 0"),
    (["--n_layer=two"], "argument --n_layer: invalid int value: 'two'"),
    (["--lr=1e-3"], "unrecognized arguments: --lr=1e-3"),  # no abbreviation of --lr_decay_iters
    (["--preset=tpu"], "argument --preset: invalid choice: 'tpu'"),
    (["--seed=x"], "argument --seed: invalid int value: 'x'"),
    (["--device=tpu"], "unknown device 'tpu'"),
    (["--out_dir={text}"], "is an existing file, not a folder"),
    (["--data_path={empty}"], "is empty; it needs at least 100"),
    (["--data_path={binary}"], "is not UTF-8 text"),
    (["--data_path={short}"], "has only 9 characters; it needs at least 100"),
    (["--data_path={folder}"], "is a folder; pass a file"),
    (["--data_path={folder}/none.txt"], "data file not found"),
]


@pytest.mark.parametrize("argv,fragment", TRAIN_BAD, ids=[a[0] for a, _ in TRAIN_BAD])
def test_train_bad_flags_and_files(argv, fragment, bad_files, tmp_path):
    argv = [a.format(**bad_files) for a in argv]
    if not any(a.startswith("--data_path") for a in argv):
        argv.append(f"--data_path={bad_files['text']}")
    if not any(a.startswith("--out_dir") for a in argv):
        argv.append(f"--out_dir={tmp_path / 'run'}")
    for flag, default in (("--device", "cpu"), ("--time_budget_s", "1")):  # a case that wrongly passes stays short
        if not any(a.startswith(flag) for a in argv):
            argv.append(f"{flag}={default}")
    assert fragment in one_line_error(train.main, argv + ["--no_progress"])
    assert not (tmp_path / "run").exists() or not any((tmp_path / "run").iterdir())


@pytest.mark.parametrize("argv,fragment", [
    (["--preset=gpu"], "--preset cannot be combined with --resume"),
    (["--n_embd=64"], "cannot change n_embd when resuming"),
    (["--learning_rate=nan"], "learning_rate (nan) must be a finite number"),
])
def test_train_resume_refuses_conflicting_flags(argv, fragment, text_file, tmp_path, capsys):
    run_train(text_file, tmp_path / "run", "--max_iters=2", "--eval_interval=2")
    before = (tmp_path / "run" / "last.pt").read_bytes()
    assert fragment in one_line_error(train.main, [f"--data_path={text_file}", f"--out_dir={tmp_path / 'run'}",
                                                   "--device=cpu", "--no_progress", "--resume", *argv])
    assert (tmp_path / "run" / "last.pt").read_bytes() == before


def test_train_resume_from_a_checkpoint_of_another_kind(bad_files, tmp_path):
    run_dir = tmp_path / "other_run"
    run_dir.mkdir()
    for name, fragment in (("not_ckpt", "is not a project 1 checkpoint (it has no config, chars)"),
                           ("corrupt", "the file is corrupt or not a checkpoint"),
                           ("mismatch", "do not match its config")):
        (run_dir / "last.pt").write_bytes(bad_files[name].read_bytes())
        assert fragment in one_line_error(train.main, [f"--data_path={bad_files['text']}", f"--out_dir={run_dir}",
                                                       "--device=cpu", "--no_progress", "--resume"])


def test_train_stops_when_the_loss_becomes_nan(text_file, tmp_path):
    """--learning_rate is finite, but so large that the weights overflow: one line, non-zero exit, no
    diverged checkpoint saved over the good one."""
    line = one_line_error(train.main, [f"--data_path={text_file}", f"--out_dir={tmp_path / 'run'}", "--device=cpu",
                                       "--no_progress", "--learning_rate=1e30", "--warmup_iters=0", "--grad_clip=0",
                                       *[f"--{k}={v}" for k, v in TINY_TRAIN.items()
                                         if v is not None and k != "warmup_iters"]])
    assert re.match(r"error: the loss became (nan|inf) at iter \d+; the run is stopped", line), line
    assert "the last good checkpoint is" in line
    state = load_checkpoint(tmp_path / "run" / "last.pt")
    assert all(torch.isfinite(t).all() for t in state["model_state_dict"].values())


def test_train_removes_stale_temp_files_of_a_killed_save(text_file, tmp_path, capsys):
    (tmp_path / "run").mkdir()
    (tmp_path / "run" / ".last.pt.k1ll3d.tmp").write_bytes(b"half a checkpoint")
    run_train(text_file, tmp_path / "run", "--max_iters=2", "--eval_interval=2")
    assert "note: removed 1 unfinished temp file(s)" in capsys.readouterr().out
    assert not list((tmp_path / "run").glob(".*.tmp"))


SLOW_SAVE_TRAIN = """
import sys, time, torch
real_save = torch.save
calls = []
def slow_save(obj, f, *a, **kw):   # the second save is last.pt's: slow, like a big model on a slow disk
    calls.append(1)
    if len(calls) == 2:
        print("saving last.pt", flush=True)
        time.sleep(1.5)
    real_save(obj, f, *a, **kw)
torch.save = slow_save
from course.errors import run_cli
from phase1_foundation.project1_minimal_gpt import train
run_cli(lambda: train.main(sys.argv[1:]))
"""


def test_sigint_during_a_checkpoint_save_of_train_py(text_file, tmp_path):
    """Ctrl-C while last.pt is written: the save completes, then the usual one-line resume hint."""
    import signal

    out_dir = tmp_path / "run"
    args = [f"--data_path={text_file}", f"--out_dir={out_dir}", "--device=cpu", "--no_progress",
            *[f"--{k}={v}" for k, v in TINY_TRAIN.items() if v is not None], "--max_iters=100000"]
    proc = subprocess.Popen([sys.executable, "-c", SLOW_SAVE_TRAIN, *args], cwd=REPO_ROOT, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)
    for line in proc.stdout:
        if line == "saving last.pt\n":
            break
    time.sleep(0.3)
    proc.send_signal(signal.SIGINT)
    _, err = proc.communicate(timeout=120)
    lines = [ln for ln in err.splitlines() if ln.strip()]
    assert proc.returncode == 2 and "Traceback" not in err, err
    assert lines[-1] == (f"error: training interrupted at iter 0; the last complete checkpoint is {out_dir / 'last.pt'}"
                         f"; continue with: {data.TRAIN_CMD} --resume --out_dir {out_dir}"), err
    assert load_checkpoint(out_dir / "last.pt")["iter"] == 0  # intact and loadable
    assert sorted(p.name for p in out_dir.iterdir()) == ["ckpt.pt", "last.pt"]  # no temp file left


GENERATE_BAD = [
    (["--top_k=0"], "argument --top_k: expected an integer > 0, got '0'"),
    (["--top_k=1.5"], "argument --top_k: expected an integer, got '1.5'"),
    (["--top_p=0"], "argument --top_p: expected a number in (0, 1], got '0'"),
    (["--top_p=nan"], "argument --top_p: expected a finite number, got 'nan'"),
    (["--temperature=nan"], "argument --temperature: expected a finite number, got 'nan'"),
    (["--temperature=inf"], "argument --temperature: expected a finite number, got 'inf'"),
    (["--max_new_tokens=0"], "argument --max_new_tokens: expected an integer > 0, got '0'"),
    (["--max_new_tokens=-3"], "argument --max_new_tokens: expected an integer > 0, got '-3'"),
    (["--prompt=ab\udcff"], "argument --prompt: is not valid UTF-8 text"),  # how Linux passes non-UTF-8 argv
    (["--seed=x"], "argument --seed: invalid int value: 'x'"),
    (["--checkpoint={folder}/none.pt"], "checkpoint not found"),
    (["--checkpoint={not_ckpt}"], "is not a project 1 checkpoint (it has no config, chars)"),
    (["--checkpoint={corrupt}"], "the file is corrupt or not a checkpoint"),
    (["--checkpoint={mismatch}"], "do not match its config (size mismatch for"),
    (["--checkpoint={mismatch}", "--device=tpu"], "unknown device 'tpu'"),
]


@pytest.mark.parametrize("argv,fragment", GENERATE_BAD, ids=[" ".join(a) for a, _ in GENERATE_BAD])
def test_generate_bad_flags_and_files(argv, fragment, bad_files):
    assert fragment in one_line_error(generate.main, argv, bad_files)


@pytest.mark.parametrize("main,argv,fragment", [
    (benchmark.main, ["--only=fast"], "unknown benchmark row(s) fast; choose from: nanogpt, budget, cpu"),
    (benchmark.main, ["--only=,"], "unknown benchmark row(s) (none given)"),
    (benchmark.main, ["--device=cuda"], "benchmark.py measures the CPU quality bar"),
    (benchmark.main, ["--seed=1.5"], "argument --seed: invalid int value: '1.5'"),
    (benchmark.main, ["--extra=--n_layer=0"], "invalid config: n_layer (0) must be > 0"),
    (benchmark.main, ["--extra=--max_iter=5"], "unrecognized arguments: --max_iter=5"),
    (benchmark.main, ["--nope"], "unrecognized arguments: --nope"),
    (download_data.main, ["--dest={folder}"], "is a folder; give the file to write"),
    (download_data.main, ["--dest={folder}/x.txt", "--source={folder}/missing.txt"], "--source file not found"),
    (download_data.main, ["--force=yes"], "ignored explicit argument 'yes'"),
])
def test_benchmark_and_download_bad_flags(main, argv, fragment, bad_files):
    assert fragment in one_line_error(main, argv, bad_files)


def test_every_runnable_file_answers_help_and_test_model_still_runs_its_demo():
    here = "phase1_foundation/project1_minimal_gpt"
    for name in ("benchmark.py", "download_data.py", "test_model.py"):
        assert_help_works(f"{here}/{name}", "usage:")
    res = run_script(f"{here}/test_model.py", timeout=300)
    assert res.returncode == 0 and b"1. Initial loss" in res.stdout and b"5. " in res.stdout, res.stderr[-2000:]
    bad = run_script(f"{here}/generate.py", "--top_k", "0")  # a real process: exit 2, one line, no usage dump
    assert assert_one_line_error(bad) == "error: argument --top_k: expected an integer > 0, got '0' " \
                                         "(see --help)"


# ---- the real data set (skipped until download_data.py has run) ----------------------------------------
needs_data = pytest.mark.skipif(not data.DATA_PATH.is_file(),
                                reason="data/shakespeare.txt absent; run project 1's download_data.py first")


@needs_data
def test_real_data_vocab_and_split():
    text = data.load_text()
    chars = data.build_vocab(text)
    assert len(text) == 1_115_394 and len(chars) == 65
    tr, va = data.split_data(torch.arange(len(text)))
    assert (len(tr), len(va)) == (1_003_854, 111_540)


@needs_data
@pytest.mark.slow
def test_cpu_preset_learns_in_one_minute(tmp_path):
    summary = train.main([f"--out_dir={tmp_path}", "--device=cpu", "--time_budget_s=60", "--no_progress"])
    assert summary["val_loss"] < 2.1, summary["val_loss"]


# ---- run as a script: validation examples for learners ----------------------------------------------------
def _demo() -> None:
    torch.manual_seed(0)
    print("1. Initial loss of an untrained 65-character model (should be near ln 65 = 4.174):")
    model = GPT(GPTConfig(vocab_size=65, block_size=32))
    _, loss = model(torch.randint(0, 65, (8, 32)), torch.randint(0, 65, (8, 32)))
    print(f"   loss = {loss.item():.4f}\n")

    print("2. The two attention paths and nn.MultiheadAttention on the same weights:")
    m = tiny_model(bias=True)
    randomize(m, 0.3)
    attn, x = m.transformer.h[0].attn, torch.randn(2, 16, 32)
    attn.attn_impl = "manual"
    a = attn(x)
    attn.attn_impl = "sdpa"
    b = attn(x)
    mha = torch.nn.MultiheadAttention(32, 2, batch_first=True)
    with torch.no_grad():
        mha.in_proj_weight.copy_(attn.c_attn.weight)
        mha.in_proj_bias.copy_(attn.c_attn.bias)
        mha.out_proj.weight.copy_(attn.c_proj.weight)
        mha.out_proj.bias.copy_(attn.c_proj.bias)
    c = mha(x, x, x, attn_mask=torch.triu(torch.ones(16, 16, dtype=torch.bool), 1), need_weights=False)[0]
    print(f"   max |manual - sdpa| = {(a - b).abs().max():.2e}   max |sdpa - nn.MultiheadAttention| = "
          f"{(b - c).abs().max():.2e}\n")

    print("3. Causality: change token 5, the logits at positions 0-4 do not move:")
    m = m.eval()
    idx = torch.randint(0, 11, (1, 16))
    other = idx.clone()
    other[0, 5] = (idx[0, 5] + 1) % 11
    d = (m(idx)[0] - m(other)[0]).abs().amax(-1)[0]
    print("   max |logit change| per position:", " ".join(f"{v:.0e}" for v in d.tolist()), "\n")

    print("4. Sampling filters on probabilities [0.5, 0.2, 0.15, 0.1, 0.05]:")
    logits = torch.tensor([0.5, 0.2, 0.15, 0.1, 0.05]).log()
    for name, out in [("top_k=2", top_k_filter(logits, 2)), ("top_p=0.8", top_p_filter(logits, 0.8)),
                      ("temperature=0.5", apply_temperature(logits, 0.5))]:
        print(f"   {name:<16} -> probabilities {[round(p, 3) for p in F.softmax(out, -1).tolist()]}")
    print()

    ckpt = data.DEFAULT_OUT_DIR / "ckpt.pt"
    if ckpt.is_file():
        model, chars = training.load_model(ckpt, torch.device("cpu"))
        print(f"5. A sample from your trained model ({ckpt}):\n")
        print("ROMEO:" + generate_text(model, chars, "ROMEO:", 200, temperature=0.8, seed=0))
    else:
        print(f"5. (no trained model yet at {ckpt}; run train.py, then this script shows a sample)")


if __name__ == "__main__":
    run_demo(_demo, __doc__)
