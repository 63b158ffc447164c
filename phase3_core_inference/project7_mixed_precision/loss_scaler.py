"""A dynamic loss scaler written from scratch, with torch.amp.GradScaler's semantics step for step.

PAPER
    Micikevicius et al., 2018, "Mixed Precision Training": fp16 gradients of a real network are mostly tiny
    (in their SSD example 67% of the activation gradients were below fp16's smallest subnormal 2^-24 and became 0).
    Multiplying the loss by S before backward shifts every gradient up by log2(S) binades, into fp16's range;
    dividing the fp32 master gradients by S afterwards gives the true gradient back. Dynamic scaling picks S
    without tuning: grow it while it is safe, shrink it when a gradient overflows to inf.

INTUITION
    The chain rule is linear in the loss: d(S * L)/dw = S * dL/dw, so the scale is exact bookkeeping, not an
    approximation, as long as nothing overflows. An overflow shows up as inf or NaN in some gradient; that step's
    update would be garbage, so it is skipped and S is halved. After `growth_interval` clean steps in a row, S is
    doubled again, so it hovers just under the largest value the gradients tolerate.

IMPLEMENTATION (the GradScaler contract, which test_mixed_precision.py checks against torch.amp.GradScaler on a
scripted run with injected inf/NaN gradients: same scales, same skipped steps, bit-identical parameters)
    scale(loss)        loss * S (S is a float32 value, init_scale rounded to float32)
    unscale_(opt)      every grad of opt *= float32(1 / S) (the reciprocal taken in float64, as GradScaler does),
                       and remember whether any grad held inf or NaN; at most once per optimizer per step, so
                       clipping (which must see the true gradients) can run between unscale_ and step
    step(opt)          unscale_ if not done yet; call opt.step() unless inf/NaN was found (then `skipped` is True)
    update()           inf/NaN found: S = float32(S * backoff_factor), the run of clean steps restarts at 0;
                       otherwise one more clean step; at growth_interval of them S = float32(S * growth_factor)
                       (unless that is inf: S never grows past float32's range) and the count restarts
WHY Python numbers and not device tensors: GradScaler keeps S on the GPU so that scale() and unscale_() never
    wait for it; step() still reads found_inf with .item(), as this class does. Here S is a plain float so the
    arithmetic can be read. One difference on purpose: a fused optimizer (AdamW(fused=True)) gets GradScaler's
    found_inf and grad_scale tensors and unscales inside its own kernel; this class always unscales first.
"""

from __future__ import annotations

import math

import torch

from course.errors import ConfigError

__all__ = ["LossScaler", "check_scaler_args", "float32"]


def float32(value: float) -> float:
    """value rounded to the nearest float32 (overflow gives inf), as a Python float: GradScaler's scale is float32."""
    return torch.tensor(value, dtype=torch.float64).to(torch.float32).item()


def check_scaler_args(init_scale: float, growth_factor: float, backoff_factor: float, growth_interval: int) -> list[str]:
    """One message per invalid setting (GradScaler itself refuses growth <= 1 and backoff >= 1; we also refuse a
    backoff <= 0, which would make the scale 0 or negative)."""
    errors = []
    if not (isinstance(init_scale, (int, float)) and math.isfinite(init_scale) and init_scale > 0):
        errors.append(f"init_scale ({init_scale}) must be a finite number > 0")
    if not (isinstance(growth_factor, (int, float)) and math.isfinite(growth_factor) and growth_factor > 1):
        errors.append(f"growth_factor ({growth_factor}) must be > 1 (the scale must be able to grow back)")
    if not (isinstance(backoff_factor, (int, float)) and 0 < backoff_factor < 1):
        errors.append(f"backoff_factor ({backoff_factor}) must be in (0, 1) (an overflow must shrink the scale)")
    if not (isinstance(growth_interval, int) and not isinstance(growth_interval, bool) and growth_interval >= 1):
        errors.append(f"growth_interval ({growth_interval}) must be an integer >= 1")
    return errors


class LossScaler:
    """Dynamic loss scaling for fp16 training (the API of torch.amp.GradScaler: scale, unscale_, step, update)."""

    def __init__(self, init_scale: float = 2.0 ** 16, growth_factor: float = 2.0, backoff_factor: float = 0.5,
                 growth_interval: int = 2000, enabled: bool = True):
        errors = check_scaler_args(init_scale, growth_factor, backoff_factor, growth_interval) if enabled else []
        if errors:
            raise ConfigError("invalid loss scaler: " + "; ".join(errors))
        self.enabled = enabled
        self.scale_value = float32(init_scale)
        self.growth_factor, self.backoff_factor, self.growth_interval = growth_factor, backoff_factor, growth_interval
        self.growth_tracker = 0          # clean steps in a row since the last growth or backoff
        self.skipped = False             # whether the last step() skipped the optimizer
        self._stage: dict[int, str] = {}            # id(optimizer) -> "unscaled" | "stepped" (absent: ready)
        self._found_inf: dict[int, torch.Tensor] = {}  # id(optimizer) -> 0-dim float tensor, > 0 if inf/NaN seen

    def get_scale(self) -> float:
        return self.scale_value if self.enabled else 1.0

    def scale(self, loss: torch.Tensor) -> torch.Tensor:
        return loss * self.scale_value if self.enabled else loss

    @torch.no_grad()
    def unscale_(self, optimizer: torch.optim.Optimizer) -> None:
        """Divide optimizer's gradients by the scale (in place) and check them for inf/NaN."""
        if not self.enabled:
            return
        stage = self._stage.get(id(optimizer))
        if stage == "unscaled":
            raise RuntimeError("unscale_() has already been called on this optimizer since the last update()")
        if stage == "stepped":
            raise RuntimeError("unscale_() is being called after step()")
        inv_scale = float32(1.0 / self.scale_value)  # float64 reciprocal, rounded once to float32
        found_inf = None
        for group in optimizer.param_groups:
            for p in group["params"]:
                if p.grad is None:
                    continue
                if p.grad.dtype == torch.float16:
                    # GradScaler refuses too: an fp16 grad times 1/S can underflow all over again
                    raise ValueError("unscale_ needs fp32 (master) gradients, got fp16 ones")
                bad = (~torch.isfinite(p.grad)).any().float()
                found_inf = bad if found_inf is None else torch.maximum(found_inf, bad)
                p.grad.mul_(inv_scale)  # grads with inf are multiplied too: the step is skipped anyway
        if found_inf is None:
            raise RuntimeError("no gradients to unscale: call backward() on the scaled loss first")
        self._found_inf[id(optimizer)] = found_inf
        self._stage[id(optimizer)] = "unscaled"

    def step(self, optimizer: torch.optim.Optimizer, *args, **kwargs):
        """unscale_ (unless done), then optimizer.step() unless a gradient held inf/NaN; returns step()'s value."""
        if not self.enabled:
            self.skipped = False
            return optimizer.step(*args, **kwargs)
        if self._stage.get(id(optimizer)) == "stepped":
            raise RuntimeError("step() has already been called since the last update()")
        if id(optimizer) not in self._stage:
            self.unscale_(optimizer)
        retval = None
        # .item() waits for the device: the one synchronisation per step that deciding to skip needs
        self.skipped = bool(self._found_inf[id(optimizer)].item())
        if not self.skipped:
            retval = optimizer.step(*args, **kwargs)
        self._stage[id(optimizer)] = "stepped"
        return retval

    def update(self) -> None:
        """Back off after an overflow, grow after growth_interval clean steps; then start a new step."""
        if not self.enabled:
            return
        if not self._found_inf:
            raise RuntimeError("update() without a step(): no inf checks were recorded")
        found_inf = any(bool(t.item()) for t in self._found_inf.values())
        if found_inf:
            self.scale_value = float32(self.scale_value * self.backoff_factor)
            self.growth_tracker = 0
        else:
            self.growth_tracker += 1
            if self.growth_tracker == self.growth_interval:
                grown = float32(self.scale_value * self.growth_factor)
                if math.isfinite(grown):  # never past float32's largest number
                    self.scale_value = grown
                self.growth_tracker = 0
        self._stage.clear()
        self._found_inf.clear()

    # ---- checkpoints (GradScaler's keys) ------------------------------------------------------------------
    def state_dict(self) -> dict:
        if not self.enabled:
            return {}
        return {"scale": self.scale_value, "growth_factor": self.growth_factor, "backoff_factor": self.backoff_factor,
                "growth_interval": self.growth_interval, "_growth_tracker": self.growth_tracker}

    def load_state_dict(self, state: dict) -> None:
        if not self.enabled:
            return
        errors = check_scaler_args(state["scale"], state["growth_factor"], state["backoff_factor"],
                                   state["growth_interval"])
        if errors:
            raise ConfigError("invalid loss scaler state: " + "; ".join(errors))
        self.scale_value = float32(state["scale"])
        self.growth_factor, self.backoff_factor = state["growth_factor"], state["backoff_factor"]
        self.growth_interval, self.growth_tracker = state["growth_interval"], state["_growth_tracker"]
