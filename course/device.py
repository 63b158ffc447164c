"""Pick the compute device (cuda > mps > cpu) and seed every random number generator."""

from __future__ import annotations

import os
import platform
import random

import numpy as np
import torch

from course.errors import CourseError

DEVICE_CHOICES = ("auto", "cpu", "cuda", "mps")


def get_device(name: str = "auto") -> torch.device:
    """Return the requested device, or the best available one for "auto"."""
    name = (name or "auto").lower()
    mps_ok = hasattr(torch.backends, "mps") and torch.backends.mps.is_available()
    if name == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda")
        return torch.device("mps") if mps_ok else torch.device("cpu")
    kind = name.split(":")[0]
    if kind not in DEVICE_CHOICES:
        raise CourseError(f"unknown device '{name}'; use one of {', '.join(DEVICE_CHOICES)}")
    if kind == "cuda" and not torch.cuda.is_available():
        raise CourseError("--device cuda was asked for but no CUDA GPU is visible; use --device cpu or auto")
    if kind == "mps" and not mps_ok:
        raise CourseError("--device mps was asked for but MPS is not available; use --device cpu or auto")
    try:
        return torch.device(name)
    except RuntimeError:
        raise CourseError(f"invalid device '{name}'; use cpu, cuda, cuda:N, mps or auto") from None


def set_seed(seed: int) -> None:
    """Seed Python, NumPy and PyTorch (all devices) so a run can be repeated exactly."""
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)  # also seeds every CUDA device


def device_summary(device: torch.device) -> str:
    """A short human description of the device, for logs and results tables."""
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    if device.type == "mps":
        return "Apple MPS"
    return f"CPU ({torch.get_num_threads()} threads)"


def machine_summary() -> str:
    """The machine a benchmark ran on, for results tables: CPU model, cores, RAM, GPU if any, PyTorch."""
    cpu = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as f:
            cpu = next(line.split(":", 1)[1].strip() for line in f if line.startswith("model name"))
    except (OSError, StopIteration):
        pass
    parts = [f"{cpu}, {os.cpu_count()} cores"]
    try:
        parts.append(f"{os.sysconf('SC_PAGE_SIZE') * os.sysconf('SC_PHYS_PAGES') / 2**30:.0f} GiB RAM")
    except (ValueError, OSError, AttributeError):
        pass
    if torch.cuda.is_available():
        parts.append(torch.cuda.get_device_name(0))
    return ", ".join(parts) + f"; PyTorch {torch.__version__}"
