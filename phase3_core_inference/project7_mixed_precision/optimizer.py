"""AdamW for weights stored in low precision: fp32 arithmetic, and three ways to store the new weight.

PAPERS
    Loshchilov & Hutter, 2019, "Decoupled Weight Decay Regularization": AdamW (project 3's optimizer).
    Kalamkar et al., 2019, "A Study of BFLOAT16 for Deep Learning Training": bf16 trains like fp32 *with fp32
        master weights*; the weights themselves need the precision.
    Zamirai et al., 2020, "Revisiting BFloat16 Training": with the weights in bf16, round-to-nearest throws away
        every update smaller than half a unit in the last place (ulp) of the weight; stochastic rounding or Kahan
        summation in the update bring pure bf16 training back to fp32's accuracy.

INTUITION
    A bf16 weight w = 0.02 has neighbours 2^-13 ~ 1.2e-4 apart. AdamW's step is about lr * m / sqrt(v): with
    lr = 3e-4 and a noisy gradient (|m| / sqrt(v) ~ 0.1) the step is 3e-5, under half the gap, and
    round-to-nearest gives back w unchanged, every step: the update is lost, not just imprecise. A gain of 1.0
    has neighbours 2^-7 apart and loses every step below 0.004; weight decay (lr * wd * w ~ 1e-4 * w) is lost
    always. The fixes keep what rounding dropped:
    - stochastic rounding: round up with probability (dropped part) / ulp. Each step is off by up to one ulp,
      but on average exactly right: a stream of tiny steps moves the weight by their sum (Gupta et al., 2015).
    - Kahan summation: keep the dropped part in a second bf16 tensor c, and add it to the next update. w + c
      carries ~16 bits of fraction, at 2 more bytes per weight (Kahan, 1965).

IMPLEMENTATION
    The moments m, v live in the parameter's dtype (bf16 for pure bf16: nothing is fp32 between steps); every step
    reads them and the weight into fp32, does AdamW's arithmetic in exactly the order of torch.optim.AdamW's
    single-tensor path (so with fp32 parameters this optimizer is bit-identical to it: test_mixed_precision.py),
    and writes the results back: m and v rounded to nearest, the weight by `rounding`:
      "nearest"     w = bf16(new)                                  (what plain pure-bf16 training does)
      "stochastic"  w = stochastic_round_bf16(new)                 (formats.py)
      "kahan"       the weight is w + c: new is computed from w + c; then w = bf16(new), c = bf16(new - w)
    `lost_update_stats` measures, on the steps it is asked to, what the store did with the update u = new - old:
    the share of elements with |u| below half an ulp of the stored weight (the updates round-to-nearest drops),
    and the share of the update that did not reach the weights, 1 - <a, u> / <u, u> with a the change of the
    effective weight (w, or w + c): ~ the lost share for "nearest", ~0 for "kahan", and ~0 on average for
    "stochastic" (its errors are random and cancel in the inner product over millions of elements).
"""

from __future__ import annotations

import torch

from course.errors import CourseError
from phase3_core_inference.project7_mixed_precision.formats import (
    get_format,
    stochastic_round_bf16,
    ulp,
)

__all__ = ["ROUNDINGS", "AdamW", "decay_groups", "store_"]

ROUNDINGS = ("nearest", "stochastic", "kahan")


def decay_groups(model: torch.nn.Module, weight_decay: float) -> list[dict]:
    """Project 1's AdamW groups (GPT.configure_optimizer): matrices decay, 1-D parameters (norm gains) do not."""
    params = [p for p in model.parameters() if p.requires_grad]  # a tied matrix appears once
    return [{"params": [p for p in params if p.dim() >= 2], "weight_decay": weight_decay},
            {"params": [p for p in params if p.dim() < 2], "weight_decay": 0.0}]


@torch.no_grad()
def store_(p: torch.Tensor, new: torch.Tensor, rounding: str, compensation: torch.Tensor | None = None,
           generator: torch.Generator | None = None) -> None:
    """Write the fp32 value `new` into the (low-precision) weight p by the rule `rounding` (in place).

    "kahan" needs `compensation`, a tensor like p holding what earlier stores could not keep; `new` must then have
    been computed from p + compensation (the effective weight), and the new remainder goes back into it.
    """
    if rounding == "nearest" or p.dtype == torch.float32:
        p.copy_(new)  # copy_ casts with round to nearest, ties to even (formats.encode, tested equal)
        if compensation is not None and p.dtype == torch.float32:
            compensation.zero_()
    elif rounding == "stochastic":
        if p.dtype != torch.bfloat16:
            raise CourseError(f"stochastic rounding is implemented for bf16 weights, not {p.dtype}")
        p.copy_(stochastic_round_bf16(new.contiguous(), generator))
    elif rounding == "kahan":
        if compensation is None:
            raise CourseError("Kahan summation needs a compensation buffer")
        p.copy_(new)
        compensation.copy_(new - p.float())  # exact in fp32: new and bf16(new) share their top bits
    else:
        raise CourseError(f"unknown rounding '{rounding}'; use one of {', '.join(ROUNDINGS)}")


class AdamW(torch.optim.Optimizer):
    """AdamW with fp32 arithmetic over weights and moments kept in the parameters' dtype.

    rounding: how a new weight is stored ("nearest", "stochastic", "kahan"; see the module docstring).
    generator: the random bits of stochastic rounding (seed it for a repeatable run).
    """

    def __init__(self, params, lr: float = 1e-3, betas: tuple[float, float] = (0.9, 0.999), eps: float = 1e-8,
                 weight_decay: float = 1e-2, rounding: str = "nearest", generator: torch.Generator | None = None):
        if rounding not in ROUNDINGS:
            raise CourseError(f"unknown rounding '{rounding}'; use one of {', '.join(ROUNDINGS)}")
        super().__init__(params, {"lr": lr, "betas": betas, "eps": eps, "weight_decay": weight_decay})
        self.rounding, self.generator = rounding, generator
        self.track_next_step = False   # set True before step() to collect lost_update_stats for that step
        self.lost_update_stats: dict | None = None

    def _init_state(self, p: torch.Tensor) -> dict:
        state = self.state[p]
        if not state:
            state["step"] = 0
            state["exp_avg"] = torch.zeros_like(p, memory_format=torch.preserve_format)
            state["exp_avg_sq"] = torch.zeros_like(p, memory_format=torch.preserve_format)
            if self.rounding == "kahan":
                state["compensation"] = torch.zeros_like(p, memory_format=torch.preserve_format)
        return state

    @torch.no_grad()
    def step(self, closure=None):
        if closure is not None:
            raise CourseError("this AdamW takes no closure")
        track = self.track_next_step
        totals = {"elements": 0, "below_half_ulp": 0, "dot_au": 0.0, "dot_uu": 0.0}
        for group in self.param_groups:
            lr, wd, eps = group["lr"], group["weight_decay"], group["eps"]
            beta1, beta2 = group["betas"]
            for p in group["params"]:
                if p.grad is None:
                    continue
                state = self._init_state(p)
                comp = state.get("compensation")
                state["step"] += 1
                step = state["step"]
                grad = p.grad.float()
                exp_avg, exp_avg_sq = state["exp_avg"].float(), state["exp_avg_sq"].float()  # the same tensors if fp32
                old = p.float() if comp is None else p.float() + comp.float()   # the effective weight
                new = old.clone() if track or p.dtype == torch.float32 else old
                # torch.optim.AdamW's single-tensor path, op for op (bit-identical in fp32)
                new.mul_(1 - lr * wd)
                exp_avg.lerp_(grad, 1 - beta1)
                exp_avg_sq.mul_(beta2).addcmul_(grad, grad, value=1 - beta2)
                bias_correction1 = 1 - beta1 ** step
                bias_correction2 = 1 - beta2 ** step
                step_size = lr / bias_correction1
                denom = (exp_avg_sq.sqrt() / bias_correction2 ** 0.5).add_(eps)
                new.addcdiv_(exp_avg, denom, value=-step_size)
                if exp_avg.data_ptr() != state["exp_avg"].data_ptr():  # low-precision state: round it back
                    state["exp_avg"].copy_(exp_avg)
                    state["exp_avg_sq"].copy_(exp_avg_sq)
                store_(p, new, self.rounding, comp, self.generator)
                if track:
                    self._track(totals, p, comp, old, new)
        self.track_next_step = False
        if track:
            n, uu = totals["elements"], totals["dot_uu"]
            self.lost_update_stats = {"below_half_ulp": totals["below_half_ulp"] / max(n, 1),
                                      "lost_share": 1.0 - totals["dot_au"] / uu if uu > 0 else 0.0}

    @staticmethod
    def _track(totals: dict, p: torch.Tensor, comp: torch.Tensor | None, old: torch.Tensor, new: torch.Tensor):
        intended = (new - old).double()
        applied = ((p.float() if comp is None else p.float() + comp.float()) - old).double()
        half_ulp = ulp(p, get_format(p.dtype)).double() / 2
        totals["elements"] += p.numel()
        totals["below_half_ulp"] += int(((intended.abs() < half_ulp) & (intended != 0)).sum())
        totals["dot_au"] += float((applied * intended).sum())
        totals["dot_uu"] += float((intended * intended).sum())
