"""The training modes: fp32, fp32 master weights with fp16/bf16 compute copies by hand, autocast, pure bf16.

PAPERS
    Micikevicius et al., 2018, "Mixed Precision Training": keep an fp32 master copy of the weights; run forward
        and backward in fp16 on a cast copy; scale the loss so the fp16 gradients do not underflow; update the
        master weights in fp32 (small updates are not lost there).
    Kalamkar et al., 2019, "A Study of BFLOAT16 for Deep Learning Training": bf16 has fp32's exponent range, so
        the same recipe needs no loss scaling.
    Zamirai et al., 2020, "Revisiting BFloat16 Training": drop the master weights too (pure bf16: 2 bytes per
        weight, gradient and moment) and fix the update with stochastic rounding or Kahan summation (optimizer.py).

THE MODES (`MODES`; one `Trainer` runs any of them, one step at a time)
    fp32             everything fp32: the reference
    fp16_scaled      fp32 master weights + an fp16 copy for forward/backward (by hand, no autocast) + LossScaler
    fp16_unscaled    the same without loss scaling: the gradients that underflow in fp16 are simply 0
    bf16_master      fp32 master weights + a bf16 compute copy, by hand (no scaling: bf16 does not underflow)
    bf16_autocast    fp32 weights; torch.autocast runs the matmuls (and attention) in bf16 and keeps the rest fp32
    fp16_autocast    the same in fp16, with LossScaler
    bf16_pure        weights, gradients and AdamW's moments all bf16, round-to-nearest updates
    bf16_pure_sr     pure bf16, stochastically rounded weight updates
    bf16_pure_kahan  pure bf16, Kahan-compensated weight updates (one more bf16 tensor per weight)

BY HAND vs AUTOCAST
    The by-hand modes cast the whole model: every op of the compute copy (norm gains, residual adds, RoPE, the
    softmax inside attention) runs in the low precision, except what project 3's model itself does in fp32 (the
    RMSNorm statistics, the loss). Autocast casts only the ops on its lower-precision list (linear, matmul,
    scaled_dot_product_attention) and re-casts the fp32 weights at every use. Both keep fp32 weights for the update,
    so both train like fp32 to within low-precision rounding noise (test_mixed_precision.py measures how close).

WHY the master weights are a separate fp32 model and not a flat buffer: it keeps the code a reader can check
    against the paper's figure 1 (fp32 weights -> cast -> fp16 forward/backward -> fp16 grads -> fp32 grads ->
    update fp32 weights), and it lets project 3's fused AdamW update them unchanged.
"""

from __future__ import annotations

import contextlib
import copy
from dataclasses import dataclass

import torch

from course.errors import CourseError
from phase3_core_inference.project7_mixed_precision.loss_scaler import LossScaler
from phase3_core_inference.project7_mixed_precision.optimizer import AdamW, decay_groups

__all__ = ["MODES", "Mode", "Trainer", "check_device_supports", "gradient_underflow", "tensor_bytes"]


@dataclass(frozen=True)
class Mode:
    name: str
    weights: str                    # "fp32" | "master" (fp32 master + compute copy) | "autocast" | "pure"
    compute: torch.dtype            # the dtype forward and backward run in (their matmuls, for autocast)
    loss_scaling: bool = False
    rounding: str = "nearest"       # pure modes: how AdamW stores a new weight (optimizer.py)
    summary: str = ""


MODES: dict[str, Mode] = {m.name: m for m in (
    Mode("fp32", "fp32", torch.float32, summary="everything fp32"),
    Mode("fp16_scaled", "master", torch.float16, loss_scaling=True,
         summary="fp32 master weights, fp16 compute copy (by hand), dynamic loss scaling"),
    Mode("fp16_unscaled", "master", torch.float16, summary="fp32 master weights, fp16 compute copy, no loss scaling"),
    Mode("bf16_master", "master", torch.bfloat16, summary="fp32 master weights, bf16 compute copy (by hand)"),
    Mode("bf16_autocast", "autocast", torch.bfloat16, summary="fp32 weights, torch.autocast to bf16"),
    Mode("fp16_autocast", "autocast", torch.float16, loss_scaling=True,
         summary="fp32 weights, torch.autocast to fp16, dynamic loss scaling"),
    Mode("bf16_pure", "pure", torch.bfloat16, summary="bf16 weights, grads and AdamW state; round-to-nearest"),
    Mode("bf16_pure_sr", "pure", torch.bfloat16, rounding="stochastic",
         summary="pure bf16 with stochastically rounded updates"),
    Mode("bf16_pure_kahan", "pure", torch.bfloat16, rounding="kahan",
         summary="pure bf16 with Kahan-compensated updates"),
)}

_DTYPE_NAMES = {torch.float16: "fp16", torch.bfloat16: "bf16", torch.float32: "fp32"}


def _probe(dtype: torch.dtype, device: torch.device) -> None:
    """A linear layer and causal attention, forward and backward, in `dtype` on `device` (raises if unsupported)."""
    x = torch.randn(2, 4, 8, device=device, dtype=dtype, requires_grad=True)
    w = torch.randn(8, 8, device=device, dtype=dtype, requires_grad=True)
    h = (x @ w).view(2, 1, 4, 8)
    y = torch.nn.functional.scaled_dot_product_attention(h, h, h, is_causal=True)
    y.float().sum().backward()


def check_device_supports(dtype: torch.dtype, device: torch.device) -> None:
    """Refuse, in one line, a compute dtype the device cannot train in (a GPU without bf16, a backend without fp16)."""
    if dtype == torch.float32:
        return
    name = _DTYPE_NAMES.get(dtype, str(dtype))
    if device.type == "cuda" and dtype == torch.bfloat16 and not torch.cuda.is_bf16_supported():
        raise CourseError(f"bf16 is not supported on {torch.cuda.get_device_name(device)} (it needs compute "
                          "capability 8.0+); use --mode fp16_scaled or fp32")
    try:
        _probe(dtype, device)
    except (RuntimeError, TypeError, NotImplementedError) as e:
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        other = "bf16_autocast (or another bf16 mode)" if dtype == torch.float16 else "fp16_scaled"
        raise CourseError(f"{name} is not supported on {device.type} by this PyTorch ({first}); "
                          f"use --mode {other} or --mode fp32") from None


def tensor_bytes(tensors) -> int:
    """Bytes of the distinct tensors (a tied weight counted once)."""
    seen, total = set(), 0
    for t in tensors:
        if t is None or not isinstance(t, torch.Tensor) or t.data_ptr() in seen:
            continue
        seen.add(t.data_ptr())
        total += t.numel() * t.element_size()
    return total


class Trainer:
    """One training mode around a freshly initialised fp32 model: `step(x, y, lr)` is forward, backward, update.

    `model` is what holds the trained weights (the fp32 master for "master" modes, the bf16 model for "pure").
    """

    def __init__(self, model: torch.nn.Module, mode: Mode | str, *, weight_decay: float = 0.1,
                 betas: tuple[float, float] = (0.9, 0.95), grad_clip: float | None = 1.0,
                 scaler: LossScaler | None = None, generator: torch.Generator | None = None,
                 compute_dtype: torch.dtype | None = None, micro_batch_of: int = 1):
        """`scaler`: the LossScaler of a loss-scaling mode (a default one if None). `compute_dtype` overrides the
        mode's (tests run the by-hand master-weight machinery with an fp32 "compute copy").

        micro_batch_of = k > 1: backward runs as one of k micro-batches of a k times larger batch, as gradient
        accumulation does it: the loss is divided by k, so every per-token gradient in the backward pass is k times
        smaller (what fp16 sees in a real run's large batches); the fp32 gradient is multiplied back by k before
        clipping and the update, so everything except the low-precision backward is the k = 1 run.
        """
        if not (isinstance(micro_batch_of, int) and micro_batch_of >= 1):
            raise CourseError(f"micro_batch_of ({micro_batch_of}) must be an integer >= 1")
        self.micro_batch_of = micro_batch_of
        self.mode = MODES[mode] if isinstance(mode, str) else mode
        self.device = next(model.parameters()).device
        self.compute_dtype = compute_dtype or self.mode.compute
        self.grad_clip = grad_clip
        self.peak_state_bytes: dict[str, int] = {}  # weights + grads + optimizer state at their peak so far
        self.scaler = (scaler or LossScaler()) if self.mode.loss_scaling else None
        kind = self.mode.weights
        if kind == "pure":
            self.model = model.to(self.compute_dtype)
            self.optimizer = AdamW(decay_groups(self.model, weight_decay), lr=0.0, betas=betas,
                                   rounding=self.mode.rounding, generator=generator)
        else:
            self.model = model  # fp32: the weights the optimizer updates
            # project 3's optimizer: fused AdamW with its decay groups
            self.optimizer = model.configure_optimizer(weight_decay, 0.0, betas, self.device.type)
        self.compute_model = None
        if kind == "master":
            self.compute_model = copy.deepcopy(model).to(self.compute_dtype)
            for p in self.compute_model.parameters():
                p.requires_grad_(True)
            self._sync_compute_copy()

    # ---- the master-weight bookkeeping ------------------------------------------------------------------
    @torch.no_grad()
    def _sync_compute_copy(self) -> None:
        """fp32 master -> low-precision compute copy (copy_ rounds to nearest): after every update."""
        for pc, pm in zip(self.compute_model.parameters(), self.model.parameters()):
            pc.copy_(pm)

    def _grads_to_master(self) -> None:
        """Low-precision gradients -> fp32 .grad of the master weights (exact: fp32 holds every fp16/bf16 value)."""
        for pc, pm in zip(self.compute_model.parameters(), self.model.parameters()):
            pm.grad = None if pc.grad is None else pc.grad.float()

    def autocast(self):
        """The context forward runs in: torch.autocast for autocast modes, nothing otherwise."""
        if self.mode.weights == "autocast":
            return torch.autocast(self.device.type, dtype=self.compute_dtype)
        return contextlib.nullcontext()

    # ---- one step ----------------------------------------------------------------------------------------
    def step(self, x: torch.Tensor, y: torch.Tensor, lr: float, track_updates: bool = False) -> dict:
        """One optimizer step on batch (x, y); returns {"loss", "skipped", "scale", and lost-update stats}."""
        for group in self.optimizer.param_groups:
            group["lr"] = lr
        fwd = self.compute_model if self.compute_model is not None else self.model
        with self.autocast():
            _, loss = fwd(x, y)
        weighted = loss / self.micro_batch_of if self.micro_batch_of > 1 else loss
        (self.scaler.scale(weighted) if self.scaler else weighted).backward()
        if self.compute_model is not None:
            self._grads_to_master()
        now = self.state_bytes()  # after backward every gradient is alive (and, from step 2 on, the moments)
        if now["total"] > self.peak_state_bytes.get("total", 0):
            self.peak_state_bytes = now
        if self.compute_model is not None:
            self.compute_model.zero_grad(set_to_none=True)
        if self.scaler:
            self.scaler.unscale_(self.optimizer)  # clip the true gradients, not the scaled ones
        if self.micro_batch_of > 1:
            with torch.no_grad():
                for p in self.model.parameters():
                    if p.grad is not None:
                        p.grad.mul_(self.micro_batch_of)
        if self.grad_clip:
            torch.nn.utils.clip_grad_norm_(self.model.parameters(), self.grad_clip)
        if isinstance(self.optimizer, AdamW):
            self.optimizer.track_next_step = track_updates
        skipped = False
        if self.scaler:
            self.scaler.step(self.optimizer)
            skipped = self.scaler.skipped
            scale = self.scaler.get_scale()
            self.scaler.update()
        else:
            self.optimizer.step()
            scale = 1.0
        self.optimizer.zero_grad(set_to_none=True)
        if self.compute_model is not None and not skipped:
            self._sync_compute_copy()
        out = {"loss": loss.detach(), "skipped": skipped, "scale": scale}
        if track_updates and isinstance(self.optimizer, AdamW) and self.optimizer.lost_update_stats:
            out.update(self.optimizer.lost_update_stats)
        return out

    # ---- what the weights are, and what they cost -------------------------------------------------------------
    def fp32_state_dict(self) -> dict[str, torch.Tensor]:
        """The trained weights as fp32 (bf16 -> fp32 is exact): evaluation uses these for every mode."""
        return {k: v.float() for k, v in self.model.state_dict().items()}

    def state_bytes(self) -> dict[str, int]:
        """Bytes of weights (master + compute copy), gradients (every .grad alive now) and optimizer state."""
        models = [self.model] + ([self.compute_model] if self.compute_model is not None else [])
        params = [p for m in models for p in m.parameters()]
        opt_tensors = [t for s in self.optimizer.state.values() for t in s.values() if isinstance(t, torch.Tensor)]
        out = {"weights": tensor_bytes(params), "grads": tensor_bytes(p.grad for p in params),
               "optimizer": tensor_bytes(opt_tensors)}
        out["total"] = sum(out.values())
        return out


# ---- what fp16 does to gradients ---------------------------------------------------------------------------
def gradient_underflow(model: torch.nn.Module, x: torch.Tensor, y: torch.Tensor, scale: float,
                       loss_weight: float = 1.0) -> dict:
    """The weight gradients of one batch in fp32, and in an fp16 compute copy without and with loss scaling.

    loss_weight = 1/k makes every per-token gradient k times smaller: the gradients of this batch as one of k
    micro-batches of a k times larger batch (gradient accumulation divides each micro-batch's loss by k), which is
    how the gradients of a real run's million-token batches look to fp16.

    Returns the fp32 gradients (flat, float64), and the share of the non-zero fp32 gradient elements that came
    out of the fp16 backward as exactly 0: `underflow_unscaled`, `underflow_scaled` (the fp16 gradients of the
    scaled loss, divided by `scale` in fp32). Underflow happens all along the backward pass (activation
    gradients too), so these are measured, not predicted from the fp32 values.
    """
    def grads(m: torch.nn.Module, s: float) -> list[torch.Tensor]:
        m.zero_grad(set_to_none=True)
        _, loss = m(x, y)
        (loss * (loss_weight * s)).backward()
        return [p.grad.float().flatten() / s for p in m.parameters()]

    ref = torch.cat(grads(model, 1.0))
    half = copy.deepcopy(model).half()
    unscaled = torch.cat(grads(half, 1.0))
    scaled = torch.cat(grads(half, scale))
    model.zero_grad(set_to_none=True)
    nonzero = ref != 0
    share = lambda g: float(((g == 0) & nonzero).sum() / nonzero.sum())
    return {"grads": ref.double(), "underflow_unscaled": share(unscaled), "underflow_scaled": share(scaled),
            "overflow_scaled": float((~torch.isfinite(scaled)).float().mean()), "scale": scale,
            "loss_weight": loss_weight}
