"""One optimizer update after the micro-batches' backward passes: clip, step unless non-finite, schedule."""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from accelerate import Accelerator


@dataclass(frozen=True)
class UpdateResult:
    grad_norm: float
    skipped: bool


def optimizer_update(
    accelerator: Accelerator,
    optimizer: torch.optim.Optimizer,
    scheduler: torch.optim.lr_scheduler.LRScheduler,
    max_grad_norm: float | None,
    nonfinite_loss: bool,
) -> UpdateResult:
    """Clip the (already all-reduced) gradients for real and step; a non-finite loss or norm skips the step.

    Every rank sees the same all-reduced gradients and the same `nonfinite_loss` (reduced by the caller),
    so all ranks skip together. Under fp16 the optimizer is still called: the GradScaler must see the
    inf gradients to lower its scale, and it skips the step itself.
    """
    # Exactly what the optimizer steps; no walk over the (mostly frozen) model every update.
    parameters = [param for group in optimizer.param_groups for param in group["params"]]
    grad_norm = accelerator.clip_grad_norm_(parameters, max_grad_norm or math.inf)
    finite = not nonfinite_loss and bool(torch.isfinite(grad_norm))
    if finite or accelerator.scaler is not None:
        optimizer.step()
    skipped = not finite or accelerator.optimizer_step_was_skipped
    scheduler.step()
    optimizer.zero_grad(set_to_none=True)
    return UpdateResult(grad_norm=float(grad_norm), skipped=skipped)
