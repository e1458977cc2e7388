"""Run any computation on a model as that model's `forward`, so DDP sees it.

DistributedDataParallel all-reduces gradients only for work done inside the wrapper's forward, and allows
one forward per backward. A training phase uses its model several times (caption loss, soft-token logits,
free-running decoding, ...), so the trainer passes the whole phase computation as a function:
`ddp_model(lambda model: terms(model, ...))`. On a plain module the call is just `fn(model)`.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Self, TypeVar

import torch

T = TypeVar("T")


class RunsInForward(torch.nn.Module):
    """Base for the captioner and generator wrappers: forward(fn) returns fn(self)."""

    def forward(self, computation: Callable[[Self], T]) -> T:
        return computation(self)
