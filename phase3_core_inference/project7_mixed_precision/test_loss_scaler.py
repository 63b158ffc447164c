"""LossScaler against torch.amp.GradScaler (device 'cpu'): the same scripted run, with inf/NaN gradients injected
at chosen steps, must give the same scale at every step, the same skipped steps and bit-identical parameters.

Run as a script: prints the scale trajectory of a scripted run, ours beside GradScaler's.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from course.cli import run_demo
from course.errors import ConfigError
from phase3_core_inference.project7_mixed_precision.loss_scaler import LossScaler

# step -> (parameter index, value written into one element of its gradient after backward)
INJECT = {2: (0, float("inf")), 3: (1, float("nan")), 4: (2, float("-inf")), 9: (3, float("inf")),
          10: (0, float("nan")), 17: (1, float("inf"))}


def _setup(seed: int, opt_kind: str):
    torch.manual_seed(seed)
    model = torch.nn.Sequential(torch.nn.Linear(6, 12), torch.nn.Tanh(), torch.nn.Linear(12, 3))
    twin = torch.nn.Sequential(torch.nn.Linear(6, 12), torch.nn.Tanh(), torch.nn.Linear(12, 3))
    twin.load_state_dict(model.state_dict())

    def opt(m):
        if opt_kind == "sgd":
            return torch.optim.SGD(m.parameters(), lr=0.05, momentum=0.9, foreach=False)
        return torch.optim.AdamW(m.parameters(), lr=1e-2, weight_decay=0.1, foreach=False)

    return model, opt(model), twin, opt(twin)


def scripted_run(scaler, model, opt, batches, inject, clip: bool) -> list[tuple]:
    """One trajectory: per step (scale used, scale after update, growth tracker, stepped?, parameters)."""
    out = []
    params = list(model.parameters())
    for step, (x, y) in enumerate(batches):
        opt.zero_grad(set_to_none=True)
        loss = F.mse_loss(model(x), y)
        scaler.scale(loss).backward()
        if step in inject:
            i, value = inject[step]
            with torch.no_grad():
                params[i].grad.view(-1)[step % params[i].numel()] = value
        if clip:
            scaler.unscale_(opt)  # the true gradients, before clipping
            torch.nn.utils.clip_grad_norm_(model.parameters(), 0.5)
        before = [p.detach().clone() for p in params]
        used = scaler.get_scale()
        scaler.step(opt)
        stepped = any(not torch.equal(b, p) for b, p in zip(before, params))
        scaler.update()
        tracker = scaler._get_growth_tracker() if isinstance(scaler, torch.amp.GradScaler) else scaler.growth_tracker
        out.append((used, scaler.get_scale(), tracker, stepped, [p.detach().clone() for p in params]))
    return out


@pytest.mark.parametrize("opt_kind", ["sgd", "adamw"])
@pytest.mark.parametrize("clip", [False, True], ids=["no_clip", "unscale_then_clip"])
@pytest.mark.parametrize("init_scale,growth,backoff,interval", [
    (2.0 ** 16, 2.0, 0.5, 3),          # GradScaler's factors, a short growth interval
    (1000.7, 3.0, 0.3, 2),             # factors whose products must be rounded to float32 the same way
    (2.0 ** 125, 2.0, 0.5, 1),         # scaled grads overflow fp32 by themselves; growth stops short of inf
])
def test_scaler_equals_grad_scaler(opt_kind, clip, init_scale, growth, backoff, interval):
    seed = torch.seed() % 2 ** 31  # fresh weights and data each run
    gen = torch.Generator().manual_seed(seed)
    batches = [(torch.randn(16, 6, generator=gen), torch.randn(16, 3, generator=gen)) for _ in range(24)]
    model, opt, twin, twin_opt = _setup(seed, opt_kind)
    kw = {"init_scale": init_scale, "growth_factor": growth, "backoff_factor": backoff, "growth_interval": interval}
    ours = scripted_run(LossScaler(**kw), model, opt, batches, INJECT, clip)
    theirs = scripted_run(torch.amp.GradScaler("cpu", **kw), twin, twin_opt, batches, INJECT, clip)
    for step, (a, b) in enumerate(zip(ours, theirs)):
        assert a[:4] == b[:4], f"step {step} (seed {seed}): ours {a[:4]}, GradScaler {b[:4]}"
        assert all(torch.equal(p, q) for p, q in zip(a[4], b[4])), f"parameters differ after step {step}"
    skipped = [s for s, r in enumerate(ours) if not r[3]]
    assert set(INJECT) <= set(skipped)  # every injected step was skipped (and, at 2^125, some overflowed)
    assert len({r[0] for r in ours}) > 2  # the scale moved both ways


def test_state_dict_equals_grad_scaler_and_round_trips():
    ours, theirs = LossScaler(init_scale=512.0, growth_interval=2), torch.amp.GradScaler("cpu", init_scale=512.0,
                                                                                          growth_interval=2)
    w = torch.nn.Parameter(torch.ones(3))
    for s in (ours, theirs):
        opt = torch.optim.SGD([w], lr=0.1)
        for _ in range(3):
            s.scale(w.sum()).backward()
            s.step(opt)
            s.update()
            opt.zero_grad()
    assert ours.state_dict() == theirs.state_dict()
    again = LossScaler()
    again.load_state_dict(ours.state_dict())
    assert again.state_dict() == ours.state_dict()


def test_unscale_twice_or_after_step_is_refused():
    s = LossScaler()
    w = torch.nn.Parameter(torch.ones(2))
    opt = torch.optim.SGD([w], lr=0.1)
    s.scale(w.sum()).backward()
    s.unscale_(opt)
    with pytest.raises(RuntimeError, match="already been called"):
        s.unscale_(opt)
    s.step(opt)
    with pytest.raises(RuntimeError, match="after step"):
        s.unscale_(opt)
    s.update()
    torch.testing.assert_close(w.detach(), torch.full((2,), 0.9))  # the unscaled gradient (1, 1) was applied


@pytest.mark.parametrize("kwargs,message", [
    ({"growth_factor": 1.0}, "growth_factor (1.0) must be > 1"),
    ({"growth_factor": 0.5}, "growth_factor (0.5) must be > 1"),
    ({"backoff_factor": 1.0}, "backoff_factor (1.0) must be in (0, 1)"),
    ({"backoff_factor": 0.0}, "backoff_factor (0.0) must be in (0, 1)"),
    ({"backoff_factor": -0.5}, "backoff_factor (-0.5) must be in (0, 1)"),
    ({"init_scale": float("inf")}, "init_scale (inf) must be a finite number > 0"),
    ({"growth_interval": 0}, "growth_interval (0) must be an integer >= 1"),
])
def test_bad_settings_are_one_clear_error(kwargs, message):
    with pytest.raises(ConfigError) as e:
        LossScaler(**kwargs)
    assert message in str(e.value) and "\n" not in str(e.value)


def _demo() -> None:
    gen = torch.Generator().manual_seed(0)
    batches = [(torch.randn(16, 6, generator=gen), torch.randn(16, 3, generator=gen)) for _ in range(20)]
    kw = {"init_scale": 1024.0, "growth_factor": 2.0, "backoff_factor": 0.5, "growth_interval": 3}
    model, opt, twin, twin_opt = _setup(0, "adamw")
    ours = scripted_run(LossScaler(**kw), model, opt, batches, INJECT, clip=True)
    theirs = scripted_run(torch.amp.GradScaler("cpu", **kw), twin, twin_opt, batches, INJECT, clip=True)
    print("step  injected  scale (ours)  scale (GradScaler)  stepped   parameters equal")
    for step, (a, b) in enumerate(zip(ours, theirs)):
        inj = str(INJECT[step][1]) if step in INJECT else ""
        same = all(torch.equal(p, q) for p, q in zip(a[4], b[4]))
        print(f"{step:>4}  {inj:>8}  {a[0]:>12g}  {b[0]:>18g}  {a[3]!s:>7}   {same}")


if __name__ == "__main__":
    run_demo(_demo, __doc__)
