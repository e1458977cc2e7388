"""What one update of each phase computes: the named loss terms for the model being trained.

Both functions share one signature (trained model, frozen partner, batch, config, draw key) so the recipe
can look them up by phase. The partner is unused by the supervised terms; the cycle terms route through it.
"""

from __future__ import annotations

from typing import Any

import torch

from losses.randomness import DrawKey
from losses.supervised import caption_terms, denoise_terms
from train.config import Config


def captioner_phase(
    captioner: torch.nn.Module,
    generator: torch.nn.Module,
    batch: dict[str, Any],
    config: Config,
    key: DrawKey,
) -> dict[str, torch.Tensor]:
    return caption_terms(captioner, batch, config.captioner)


def generator_phase(
    generator: torch.nn.Module,
    captioner: torch.nn.Module,
    batch: dict[str, Any],
    config: Config,
    key: DrawKey,
) -> dict[str, torch.Tensor]:
    return denoise_terms(generator, batch, config.generator, key)


PHASE_LOSSES = {"captioner": captioner_phase, "generator": generator_phase}
