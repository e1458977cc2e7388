"""The config's evaluation section: which metrics validation logs and where the metrics find their weights.

The metrics own their settings; train/config.py composes this section into the run's Config (`evaluation:`).
Each weight setting has the name of the metric option it fills, so the options are built by name.
"""

# A pydantic model copies its mutable defaults per instance; ruff cannot see that through an imported base.
# ruff: noqa: RUF012

from __future__ import annotations

from dataclasses import fields
from typing import Any, Literal

import torch
from pydantic import Field

from cycletune.evaluation.image_metrics import ImageMetricOptions
from cycletune.evaluation.text import TextMetricOptions
from cycletune.losses.settings import Strict


class EvaluationSettings(Strict):
    """Metrics for validation and `python -m train.cli.evaluate`; weights only from local paths (never a hub)."""

    # Metric names logged at every validation (see evaluation/: e.g. bleu_4, cider_d, psnr, lpips, fid,
    # sbert_similarity, shapes_caption_accuracy, shapes_image_accuracy). Empty: losses and samples only.
    validation_metrics: list[str] = []
    fid_feature_weights: str | None = None
    fid_inception_dim: int = 2048
    kid_subset_size: int = Field(1000, ge=2)
    kid_subsets: int = Field(100, ge=1)
    clip_image_encoder: str | None = None
    dino_image_encoder: str | None = None
    lpips_backbone_weights: str | None = None
    lpips_net: Literal["alex", "vgg", "squeeze"] = "alex"
    sbert_model: str | None = None
    clip_text_encoder: str | None = None


def image_options(settings: EvaluationSettings, device: str | torch.device = "cpu") -> ImageMetricOptions:
    return ImageMetricOptions(**_named_in(ImageMetricOptions, settings), device=device)


def text_options(settings: EvaluationSettings, device: str | torch.device = "cpu") -> TextMetricOptions:
    return TextMetricOptions(**_named_in(TextMetricOptions, settings), device=device)


def _named_in(options_type: type, settings: EvaluationSettings) -> dict[str, Any]:
    """The settings that `options_type` has a field of the same name for."""
    names = {field.name for field in fields(options_type)}
    return {name: value for name, value in settings if name in names}
