"""What one update of each phase computes: the named loss terms for the model being trained.

Both functions share one signature (trained model, frozen partner, batch, config, draw key) so the recipe
can look them up by phase. The partner is unused by the supervised terms; the cycle terms route through it.
"""

from __future__ import annotations

from typing import Any

import torch

from losses.randomness import DrawKey
from losses.supervised import caption_terms, denoise_terms
from models.captioner import Captioner
from models.generator import Generator
from train.config import Config


def captioner_phase(
    trained: Captioner, *, partner: Generator, batch: dict[str, Any], config: Config, key: DrawKey
) -> dict[str, torch.Tensor]:
    return caption_terms(trained, batch, config.captioner)


def generator_phase(
    trained: Generator, *, partner: Captioner, batch: dict[str, Any], config: Config, key: DrawKey
) -> dict[str, torch.Tensor]:
    return denoise_terms(trained, batch, config.generator, key)


PHASE_LOSSES = {"captioner": captioner_phase, "generator": generator_phase}
