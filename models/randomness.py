"""Per-sample randomness: every random draw of a loss is a function of (seed, step, sample id, purpose).

Why: a resumed run, a run split over more processes, and a one-process run on the union of the ranks'
batches must all draw the same noise for the same sample, so no generator state has to be carried across
ranks or checkpoints. The cost (one tiny CPU generator per sample) is negligible next to a model forward.
"""

from __future__ import annotations

import hashlib
from collections.abc import Sequence
from dataclasses import dataclass

import torch

from cycletune.models.device_transfer import to_device


@dataclass(frozen=True)
class DrawKey:
    """Where in training a batch's random draws happen."""

    seed: int
    step: int
    micro_batch: int = 0

    def sample_seed(self, sample_id: str, purpose: str) -> int:
        text = f"{self.seed}/{self.step}/{self.micro_batch}/{purpose}/{sample_id}"
        return int.from_bytes(hashlib.blake2b(text.encode(), digest_size=8).digest(), "little") >> 1

    def generators(self, sample_ids: Sequence[str], purpose: str) -> list[torch.Generator]:
        return [torch.Generator().manual_seed(self.sample_seed(sid, purpose)) for sid in sample_ids]

    def randn(
        self,
        sample_ids: Sequence[str],
        purpose: str,
        shape: Sequence[int],
        device: torch.device | str = "cpu",
        dtype: torch.dtype = torch.float32,
    ) -> torch.Tensor:
        """Standard normal draws of `shape` per sample, stacked to [B, *shape]."""
        draws = [torch.randn(tuple(shape), generator=g) for g in self.generators(sample_ids, purpose)]
        return to_device(torch.stack(draws), device, dtype)

    def rand(
        self, sample_ids: Sequence[str], purpose: str, device: torch.device | str = "cpu"
    ) -> torch.Tensor:
        """One uniform [0, 1) draw per sample, shape [B]."""
        draws = [torch.rand((), generator=g) for g in self.generators(sample_ids, purpose)]
        return to_device(torch.stack(draws), device)

    def randint(
        self, sample_ids: Sequence[str], purpose: str, high: int, device: torch.device | str = "cpu"
    ) -> torch.Tensor:
        """One integer in [0, high) per sample, shape [B]."""
        draws = [torch.randint(high, (), generator=g) for g in self.generators(sample_ids, purpose)]
        return to_device(torch.stack(draws), device)

    def uniform(self, purpose: str) -> float:
        """One uniform [0, 1) draw for the whole batch, the same on every rank (no sample id involved)."""
        return torch.rand((), generator=torch.Generator().manual_seed(self.sample_seed("", purpose))).item()
