"""The extra memory of one call: the peak of the bytes PyTorch's allocator hands out while it runs.

WHY NOT tracemalloc OR RSS: tracemalloc sees Python's allocations only, not the buffers PyTorch's C++ allocator
takes from the system; the process's resident size (RSS) moves with glibc's caching (freed memory is often kept)
and with every other thread. What the claim "the T x T matrix is never stored" is about is the tensors the
computation allocates, kernels' scratch buffers included.

HOW: torch.profiler with profile_memory=True records every allocation and free of PyTorch's allocators, with its
size and time (the events its memory timeline is built from). Summing them in time order gives the bytes held
by the call at every moment; the peak of that sum is the call's extra memory: its temporaries and its output
(the output is still held when the call returns), not the inputs, which existed before. On CUDA the allocator's
own counter gives the same (torch.cuda.max_memory_allocated, minus what was allocated before).
The profiler's start and stop print lines on stderr (kineto's logging); those are silenced, the call is not.
"""

from __future__ import annotations

import contextlib
import os
import sys
from collections.abc import Callable
from typing import Any

import torch
from torch.profiler import ProfilerActivity, profile


@contextlib.contextmanager
def _quiet_stderr_fd():
    """File descriptor 2 to /dev/null for a moment (C++ logging bypasses sys.stderr)."""
    sys.stderr.flush()
    saved, devnull = os.dup(2), os.open(os.devnull, os.O_WRONLY)
    os.dup2(devnull, 2)
    try:
        yield
    finally:
        os.dup2(saved, 2)
        os.close(saved)
        os.close(devnull)


def _allocation_events(prof: profile) -> list[tuple[int, int]]:
    """(time ns, bytes: + allocated, - freed) of every CPU allocator event the profiler recorded."""
    from torch._C._profiler import _EventType  # the event kinds of the profiler's result tree

    events, stack = [], list(prof.profiler.kineto_results.experimental_event_tree())
    while stack:
        e = stack.pop()
        if e.tag == _EventType.Allocation and e.extra_fields.device.type == "cpu":
            events.append((e.start_time_ns, e.extra_fields.alloc_size))
        stack.extend(e.children)
    return sorted(events)


def peak_cpu_bytes(fn: Callable[[], Any]) -> tuple[int, Any]:
    """(the peak bytes held by what fn allocates on the CPU while it runs, fn's result)."""
    prof = profile(activities=[ProfilerActivity.CPU], profile_memory=True)
    with _quiet_stderr_fd():
        prof.start()
    try:
        out = fn()
    finally:
        with _quiet_stderr_fd():
            prof.stop()
    held = peak = 0
    for _, size in _allocation_events(prof):
        held += size
        peak = max(peak, held)
    return peak, out


def peak_cuda_bytes(fn: Callable[[], Any], device: torch.device | str = "cuda") -> tuple[int, Any]:
    """The same on a CUDA device, from the caching allocator's counters."""
    torch.cuda.synchronize(device)
    before = torch.cuda.memory_allocated(device)
    torch.cuda.reset_peak_memory_stats(device)
    out = fn()
    torch.cuda.synchronize(device)
    return torch.cuda.max_memory_allocated(device) - before, out


def peak_bytes(fn: Callable[[], Any], device: torch.device | str = "cpu") -> tuple[int, Any]:
    """(peak extra bytes of fn on `device`, fn's result)."""
    if torch.device(device).type == "cuda":
        return peak_cuda_bytes(fn, device)
    return peak_cpu_bytes(fn)
