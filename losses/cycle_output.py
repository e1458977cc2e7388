"""What a cycle mode returns: its unweighted loss and the metrics worth logging beside it."""

from __future__ import annotations

from dataclasses import dataclass, field

import torch


@dataclass
class CycleOutput:
    loss: torch.Tensor
    # Detached 0-dim tensors (or floats): they stay on the device until the trainer logs them after the
    # backward pass, so computing a metric never makes the host wait for the GPU mid-step.
    metrics: dict[str, torch.Tensor | float] = field(default_factory=dict)
