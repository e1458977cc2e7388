"""Measuring one step: wall time with the accelerator drained, model FLOPs, peak memory."""

from __future__ import annotations

import resource
import time
from collections.abc import Callable

import torch
from torch.utils.flop_counter import FlopCounterMode


def synchronize(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def timed(step: Callable[[], None], device: str) -> float:
    """Wall seconds of one call, with the accelerator's queue drained before and after."""
    synchronize(device)
    started = time.perf_counter()
    step()
    synchronize(device)
    return time.perf_counter() - started


def step_flops(step: Callable[[], None]) -> int:
    """Model FLOPs of one step (forward, backward, recomputation) as torch's FLOP counter sees them, with
    torch.compile'd modules run eagerly: a compiled step does the same model work in kernels of its own,
    which the counter need not see as the operators it counts."""
    with torch.compiler.set_stance("force_eager"), FlopCounterMode(display=False) as counter:
        step()
    return int(counter.get_total_flops())


def peak_memory_mb(device: str) -> float:
    """Peak accelerator memory allocated (CUDA) or peak resident set size of this process (CPU)."""
    if device.startswith("cuda"):
        return torch.cuda.max_memory_allocated() / 2**20
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux reports KiB
