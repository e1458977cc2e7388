"""What a cycle mode returns: its unweighted loss and the metrics worth logging beside it."""

from __future__ import annotations

from dataclasses import dataclass, field

import torch


@dataclass
class CycleOutput:
    loss: torch.Tensor
    metrics: dict[str, float] = field(default_factory=dict)
