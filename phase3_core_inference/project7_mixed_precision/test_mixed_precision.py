"""The training modes on tiny models: AdamW against torch's, the three weight stores on updates below half an ulp,
master weights by hand against plain fp32 (bit for bit) and against autocast (within a stated tolerance), what
each mode keeps in memory, and what fp16 does to gradients.

THE TOLERANCE of "by hand equals autocast" (test_master_weights_by_hand_follow_autocast): 0.02 nats at every step
of a 25-step run whose loss falls from 4.6 to 2.7. Both runs keep fp32 master weights; they differ only in which
ops round to the low precision (by hand: all of them; autocast: matmuls and attention). Each rounding is off by
at most half an eps (bf16: 2^-9 = 0.2% relative), and over 6 seeds the two curves stayed within 0.005 nats
(bf16) and 0.007 (fp16) of each other. A real precision bug is much larger: pure bf16 (updates lost) is 0.11
nats off fp32 on the same run, a compute copy that is never refreshed 1.9 nats; the test checks the first.

Run as a script: trains the tiny model in every mode and prints the loss curves' distance from fp32.
"""

from __future__ import annotations

import copy

import pytest
import torch

from course.cli import run_demo
from course.errors import CourseError
from phase1_foundation.project3_pretrain.testing import tiny_llama
from phase3_core_inference.project7_mixed_precision import mixed_precision
from phase3_core_inference.project7_mixed_precision.formats import BF16, ulp
from phase3_core_inference.project7_mixed_precision.mixed_precision import (
    MODES,
    Trainer,
    check_device_supports,
    gradient_underflow,
)
from phase3_core_inference.project7_mixed_precision.optimizer import (
    AdamW,
    decay_groups,
    store_,
)

TOL_NATS = 0.02


# ---- the optimizer ------------------------------------------------------------------------------------------
def _adamw_pair(dtype, seed, torch_kwargs):
    gen = torch.Generator().manual_seed(seed)
    w = torch.randn(300, 17, generator=gen).to(dtype)
    gain = (1 + 0.1 * torch.randn(17, generator=gen)).to(dtype)
    ours = [torch.nn.Parameter(w.clone()), torch.nn.Parameter(gain.clone())]
    theirs = [torch.nn.Parameter(w.clone()), torch.nn.Parameter(gain.clone())]
    groups = lambda ps: [{"params": [ps[0]], "weight_decay": 0.1}, {"params": [ps[1]], "weight_decay": 0.0}]
    o1 = AdamW(groups(ours), lr=1e-2, betas=(0.9, 0.95))
    o2 = torch.optim.AdamW(groups(theirs), lr=1e-2, betas=(0.9, 0.95), **torch_kwargs)
    for step in range(6):
        for p, q in zip(ours, theirs):
            g = torch.randn(p.shape, generator=gen).to(dtype)
            p.grad, q.grad = g.clone(), g.clone()
        for o in (o1, o2):
            for group in o.param_groups:
                group["lr"] = 1e-2 * (step + 1) / 6  # a warmup: the lr changes every step
        o1.step()
        o2.step()
    return ours, theirs, o1, o2


@pytest.mark.parametrize("dtype,torch_kwargs", [(torch.float32, {"foreach": False}),
                                                (torch.bfloat16, {"fused": True})], ids=["fp32", "bf16_fused"])
def test_adamw_is_bit_identical_to_torch(dtype, torch_kwargs):
    """fp32: torch's single-tensor AdamW, op for op. bf16: torch's fused AdamW, which also computes in fp32 and
    rounds each result once; so our "nearest" store is exactly what torch does to bf16 weights."""
    ours, theirs, o1, o2 = _adamw_pair(dtype, torch.seed() % 2 ** 31, torch_kwargs)
    for p, q in zip(ours, theirs):
        assert torch.equal(p, q)
        assert torch.equal(o1.state[p]["exp_avg"], o2.state[q]["exp_avg"])
        assert torch.equal(o1.state[p]["exp_avg_sq"], o2.state[q]["exp_avg_sq"])
        assert o1.state[p]["exp_avg"].dtype == dtype  # the moments live in the weights' dtype


def test_updates_below_half_an_ulp_are_lost_by_nearest_and_kept_by_the_fixes():
    gen = torch.Generator().manual_seed(torch.seed() % 2 ** 31)
    n, steps, delta = 50_000, 400, 3e-4  # bf16's half-ulp at 1.0 is 2^-8 = 0.0039: 13 times delta
    start = (1 + 0.5 * torch.rand(n, generator=gen)).bfloat16()
    target = start.double() + steps * delta
    results = {}
    for rounding in ("nearest", "stochastic", "kahan"):
        w = start.clone()
        comp = torch.zeros_like(w) if rounding == "kahan" else None
        for _ in range(steps):
            effective = w.float() + (comp.float() if comp is not None else 0)
            store_(w, effective + delta, rounding, comp, gen)
        results[rounding] = w.double() + (comp.double() if comp is not None else 0)
    assert torch.equal(results["nearest"], start.double())  # every single update was rounded away
    # w + c keeps the sum; c's own bf16 rounding (2^-9 of c, every step) drifts it by well under 1% of it
    assert (results["kahan"] - target).abs().max() < 0.01 * steps * delta
    # stochastic: each weight is off by a random walk of ~sqrt(steps * p(1-p)) ulps, the mean is right
    assert abs((results["stochastic"] - target).mean()) < 1e-3 < steps * delta / 10
    assert (results["stochastic"] - target).abs().max() < 30 * 2 ** -7  # ~8 sigma of the walk


def test_lost_update_statistics():
    """Half the weights near 1.0 (half-ulp 0.0039 > lr: lost), half near 0.001 (half-ulp 3.8e-6 < lr: kept);
    AdamW's first step moves every weight by ~lr."""
    gen = torch.Generator().manual_seed(torch.seed() % 2 ** 31)
    n = 100_000
    w0 = torch.cat([1 + 0.5 * torch.rand(n, generator=gen), 1e-3 * (1 + torch.rand(n, generator=gen))]).bfloat16()
    g = torch.randn(2 * n, generator=gen).bfloat16()
    stats = {}
    for rounding in ("nearest", "stochastic", "kahan"):
        p = torch.nn.Parameter(w0.clone())
        p.grad = g.clone()
        opt = AdamW([p], lr=1e-3, weight_decay=0.0, rounding=rounding, generator=gen)
        opt.track_next_step = True
        opt.step()
        stats[rounding] = opt.lost_update_stats
        if rounding == "nearest":
            assert torch.equal(p[:n], w0[:n]) and not torch.equal(p[n:], w0[n:])
    assert all(s["below_half_ulp"] == 0.5 for s in stats.values())
    assert abs(stats["nearest"]["lost_share"] - 0.5) < 0.01
    assert abs(stats["kahan"]["lost_share"]) < 0.01
    assert abs(stats["stochastic"]["lost_share"]) < 0.05  # unbiased: the random errors cancel in <a, u>


def test_ulp_of_bf16_weights():
    w = torch.tensor([1.0, 1.5, 0.02, -3.0, 0.0]).bfloat16()
    assert ulp(w.float(), BF16).tolist() == [2 ** -7, 2 ** -7, 2 ** -13, 2 ** -6, 2 ** -133]


# ---- the modes ---------------------------------------------------------------------------------------------
def _batches(seed: int, steps: int, vocab: int = 97):
    """A fixed small batch (the run memorises it: the loss falls fast, every step matters)."""
    data = torch.randint(0, vocab, (4, 33), generator=torch.Generator().manual_seed(seed + 100))
    return [(data[:, :-1], data[:, 1:])] * steps


def loss_curve(mode: str, seed: int = 0, steps: int = 25, lr: float = 3e-3, **kwargs) -> torch.Tensor:
    model = tiny_llama(seed, random_norms=False, block_size=32).train()
    trainer = Trainer(model, mode, grad_clip=1.0, generator=torch.Generator().manual_seed(seed), **kwargs)
    return torch.tensor([trainer.step(x, y, lr)["loss"].item() for x, y in _batches(seed, steps)])


@pytest.mark.parametrize("mode", ["bf16_master", "fp16_scaled", "fp16_unscaled"])
def test_master_weight_bookkeeping_with_an_fp32_compute_copy_is_plain_fp32_training(mode):
    """With the compute copy in fp32, the by-hand path (copy, backward on the copy, grads to the master, scale and
    unscale by a power of two, update, copy back) must reproduce plain fp32 training bit for bit."""
    seed = torch.seed() % 2 ** 31
    ref_model, model = tiny_llama(seed).train(), tiny_llama(seed).train()
    ref, hand = Trainer(ref_model, "fp32"), Trainer(model, mode, compute_dtype=torch.float32)
    for x, y in _batches(seed, 5):
        a, b = ref.step(x, y, 1e-2), hand.step(x, y, 1e-2)
        assert torch.equal(a["loss"], b["loss"])
    assert all(torch.equal(p, q) for p, q in zip(ref_model.parameters(), model.parameters()))
    assert all(torch.equal(p, q) for p, q in zip(model.parameters(), hand.compute_model.parameters()))


def test_micro_batch_weighting_is_exact_in_fp32_and_starves_unscaled_fp16():
    """loss / k before backward and grads * k after: exact in fp32 (k a power of two), so only the low-precision
    backward sees smaller gradients. At k = 2^12 most of the tiny model's fp16 gradients underflow without a loss
    scale, and the run learns visibly less than with one."""
    seed = torch.seed() % 1000
    ref_model, model = tiny_llama(seed).train(), tiny_llama(seed).train()
    ref, weighted = Trainer(ref_model, "fp32"), Trainer(model, "fp32", micro_batch_of=64)
    for x, y in _batches(seed, 4):
        assert torch.equal(ref.step(x, y, 1e-2)["loss"], weighted.step(x, y, 1e-2)["loss"])
    assert all(torch.equal(p, q) for p, q in zip(ref_model.parameters(), model.parameters()))
    fp32 = loss_curve("fp32", seed, micro_batch_of=2 ** 12)
    scaled = loss_curve("fp16_scaled", seed, micro_batch_of=2 ** 12)
    unscaled = loss_curve("fp16_unscaled", seed, micro_batch_of=2 ** 12)
    assert (scaled - fp32).abs().max() < TOL_NATS
    assert unscaled[-1] - fp32[-1] > 5 * TOL_NATS


@pytest.mark.parametrize("hand,auto", [("bf16_master", "bf16_autocast"), ("fp16_scaled", "fp16_autocast")])
def test_master_weights_by_hand_follow_autocast(hand, auto):
    seed = torch.seed() % 1000
    a, b, ref = loss_curve(hand, seed), loss_curve(auto, seed), loss_curve("fp32", seed)
    assert ref[-1] < ref[0] - 1.5  # the run learns
    assert (a - b).abs().max() < TOL_NATS, (a - b).abs().max()
    assert (a - ref).abs().max() < TOL_NATS and (b - ref).abs().max() < TOL_NATS


def test_pure_bf16_trails_fp32_beyond_the_tolerance_and_kahan_closes_the_gap():
    seed = torch.seed() % 1000
    ref, pure, kahan = loss_curve("fp32", seed), loss_curve("bf16_pure", seed), loss_curve("bf16_pure_kahan", seed)
    gap = (pure[-1] - ref[-1]).item()
    assert gap > 2 * TOL_NATS  # the tolerance above is tight enough to see lost updates
    assert abs((kahan[-1] - ref[-1]).item()) < 0.2 * gap


def test_each_mode_keeps_what_it_says_in_memory():
    n = tiny_llama().num_params()
    per_param = {}
    for name in MODES:
        trainer = Trainer(tiny_llama().train(), name)
        for x, y in _batches(0, 2):
            trainer.step(x, y, 1e-3)
        b = trainer.peak_state_bytes
        per_param[name] = (b["weights"] / n, b["grads"] / n, round(b["optimizer"] / n))  # fused AdamW: + step scalars
    assert per_param["fp32"] == (4, 4, 8) and per_param["bf16_autocast"] == (4, 4, 8)
    assert per_param["fp16_scaled"] == per_param["bf16_master"] == (6, 6, 8)  # fp32 master + 2-byte copy
    assert per_param["bf16_pure"] == per_param["bf16_pure_sr"] == (2, 2, 4)
    assert per_param["bf16_pure_kahan"] == (2, 2, 6)  # + the compensation
    t = Trainer(tiny_llama().train(), "bf16_pure")
    assert {p.dtype for p in t.model.parameters()} == {torch.bfloat16}
    assert isinstance(t.optimizer, AdamW) and len(t.optimizer.param_groups[0]["params"]) == len(
        decay_groups(t.model, 0.1)[0]["params"])


def test_loss_scaling_skips_overflowing_steps_and_keeps_the_weights():
    """fp16 with an absurd initial scale: the scaled gradients overflow, the steps are skipped (weights unchanged)
    and the scale backs off until it fits; the run then trains."""
    from phase3_core_inference.project7_mixed_precision.loss_scaler import LossScaler
    model = tiny_llama(3).train()
    start = copy.deepcopy(model.state_dict())
    trainer = Trainer(model, "fp16_scaled", scaler=LossScaler(init_scale=2.0 ** 40))
    outs = [trainer.step(x, y, 1e-3) for x, y in _batches(3, 30)]
    first_ok = next(i for i, o in enumerate(outs) if not o["skipped"])
    assert first_ok > 0 and all(o["skipped"] for o in outs[:first_ok])
    assert outs[first_ok]["scale"] == 2.0 ** (40 - first_ok)  # halved once per overflow
    if first_ok:
        trainer_b = Trainer(tiny_llama(3).train(), "fp16_scaled", scaler=LossScaler(init_scale=2.0 ** 40))
        for x, y in _batches(3, first_ok):
            trainer_b.step(x, y, 1e-3)
        assert all(torch.equal(v, start[k]) for k, v in trainer_b.model.state_dict().items())
    assert outs[-1]["loss"] < outs[first_ok]["loss"]


def test_gradient_underflow_measures_what_scaling_saves():
    model = tiny_llama(1)
    x, y = _batches(1, 1)[0]
    r = gradient_underflow(model, x, y, scale=2.0 ** 16, loss_weight=2.0 ** -14)  # per-token grads 2^14 x smaller
    assert r["underflow_unscaled"] > 0.05
    assert r["underflow_scaled"] < 0.001
    assert r["overflow_scaled"] == 0
    r = gradient_underflow(model, x, y, scale=2.0 ** 40)
    assert r["overflow_scaled"] > 0  # too large a scale overflows fp16's 65504


def test_a_device_without_the_dtype_is_one_clear_error(monkeypatch):
    check_device_supports(torch.float16, torch.device("cpu"))  # recent PyTorch trains fp16 on CPU (slowly)

    def no_half(dtype, device):
        raise RuntimeError("\"addmm_impl_cpu_\" not implemented for 'Half'\nmore lines")
    monkeypatch.setattr(mixed_precision, "_probe", no_half)
    with pytest.raises(CourseError) as e:
        check_device_supports(torch.float16, torch.device("cpu"))
    assert str(e.value) == ("fp16 is not supported on cpu by this PyTorch (\"addmm_impl_cpu_\" not implemented for "
                            "'Half'); use --mode bf16_autocast (or another bf16 mode) or --mode fp32")


def _demo() -> None:
    torch.set_num_threads(1)
    ref = loss_curve("fp32")
    print(f"tiny model, 25 steps memorising one batch at lr 3e-3; fp32 loss {ref[0]:.3f} -> {ref[-1]:.3f}")
    print(f"{'mode':<16} {'final loss':>10} {'max |loss - fp32|':>18}")
    for name in MODES:
        c = loss_curve(name)
        print(f"{name:<16} {c[-1]:>10.4f} {(c - ref).abs().max():>18.4f}")


if __name__ == "__main__":
    run_demo(_demo, __doc__)
