"""Periodic validation: held-out losses with fixed noise, plus sample captions and images for the tracker."""

from __future__ import annotations

from typing import Any

import torch

from losses.randomness import DrawKey
from losses.supervised import caption_terms, denoise_terms
from models.captioner import Captioner
from models.generator import Generator
from train.config import Config
from train.tracking import ValidationRow

# Update index reserved for validation draws: the same noise at every validation, so curves compare.
VALIDATION_UPDATE = -1


@torch.no_grad()
def validate(
    captioner: Captioner, generator: Generator, batch: dict[str, Any], config: Config
) -> tuple[dict[str, float], list[ValidationRow]]:
    """Losses on a fixed batch (unweighted, no caption dropout) and one caption and one image per sample."""
    was_training = captioner.training, generator.training
    captioner.eval()
    generator.eval()
    key = DrawKey(config.seed, VALIDATION_UPDATE)
    caption_settings = config.captioner.model_copy(update={"caption_loss_weight": 1.0})
    generator_settings = config.generator.model_copy(
        update={"caption_dropout": 0.0, "denoise_loss_weight": 1.0}
    )
    metrics = {
        "validation/caption_ce": caption_terms(captioner, batch, caption_settings)["caption_ce"].item(),
        "validation/denoise": denoise_terms(generator, batch, generator_settings, key)["denoise"].item(),
    }
    captions = [options[0] for options in captioner.generate(batch["pixels"], num_beams=3)]
    images = generator.sample(
        batch["captions"],
        num_inference_steps=config.train.validation_inference_steps,
        guidance_scale=config.train.validation_guidance_scale,
        generator=torch.Generator().manual_seed(config.seed),
    )
    rows = [
        ValidationRow(sample_id, pixels, reference, caption, image)
        for sample_id, pixels, reference, caption, image in zip(
            batch["ids"], batch["pixels"], batch["captions"], captions, images, strict=True
        )
    ]
    captioner.train(was_training[0])
    generator.train(was_training[1])
    return metrics, rows
