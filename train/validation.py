"""Periodic validation: held-out losses with fixed noise, the configured metrics, sample captions and images.

The metrics are config.evaluation.validation_metrics, computed by evaluation/sample_metrics.py (which lists
the names). A metric whose weights are not configured is skipped with a logged message naming the option to
set. `python -m train.cli.evaluate` runs the same computation over a whole validation set.

The samples are drawn in batches of data.train_batch_size (what fits to train fits to sample), under a
progress bar on the main process (the one that validates) that is off when stderr is not a TTY, so log
files stay clean, and that clears itself, so the training bar and log lines read on unbroken. Every draw is
seeded per sample id, so the batching changes no sample.
"""

from __future__ import annotations

import logging
from typing import Any

import torch
from tqdm.auto import tqdm

from cycletune.evaluation.availability import check_metric_names, split_results
from cycletune.evaluation.sample_metrics import (
    CORPUS_METRICS,
    VALIDATION_METRICS,
    VALIDATION_STEP,
    MetricNeeds,
    SampleBatch,
    compute_metrics,
    sample_batch,
)
from cycletune.losses.supervised import caption_terms, denoise_terms
from cycletune.models.captioner import Captioner
from cycletune.models.generator import Generator
from cycletune.models.modes import eval_mode
from cycletune.models.randomness import DrawKey
from cycletune.models.sampling_settings import SamplingSettings
from cycletune.train.config import Config, ConfigError
from cycletune.train.tracking import ValidationRow

logger = logging.getLogger(__name__)


def check_validation_metrics(config: Config) -> list[str]:
    """config.evaluation.validation_metrics, checked; the trainer calls this at start-up to fail fast."""
    try:
        names = check_metric_names(config.evaluation.validation_metrics, VALIDATION_METRICS)
    except ValueError as error:
        raise ConfigError(f"evaluation.validation_metrics: {error}") from None
    corpus = sorted(CORPUS_METRICS & set(names))
    if corpus and config.train.num_validation_samples < 2:
        raise ConfigError(
            f"evaluation.validation_metrics: {corpus} need train.num_validation_samples >= 2 "
            f"(CIDEr-D's idf is zero for a single sample), got {config.train.num_validation_samples}"
        )
    return names


@torch.no_grad()
def validate(
    captioner: Captioner, generator: Generator, batch: dict[str, Any], config: Config
) -> tuple[dict[str, float], list[ValidationRow]]:
    """Losses on a fixed batch (unweighted, no caption dropout), the configured metrics, and one caption and
    one image per sample."""
    names = check_validation_metrics(config)
    # Eval mode inside; every submodule's own mode back after, so this rank trains on exactly like the others.
    with eval_mode(captioner, generator):
        key = DrawKey(config.seed, VALIDATION_STEP)
        caption_settings = config.captioner.model_copy(update={"caption_loss_weight": 1.0})
        generator_settings = config.generator.model_copy(
            update={"caption_dropout": 0.0, "denoise_loss_weight": 1.0}
        )
        metrics = {
            "validation/caption_ce": caption_terms(captioner, batch, caption_settings)["caption_ce"].item(),
            "validation/denoise": denoise_terms(generator, batch, generator_settings, key)["denoise"].item(),
        }
        samples = _sample_in_batches(captioner, generator, batch, config, names)
        if names:
            values, skipped = split_results(
                compute_metrics(names, samples, config.evaluation, batch["pixels"].device).values()
            )
            metrics |= {f"validation/{name}": value for name, value in values.items()}
            for message in skipped:
                logger.warning("validation: %s", message)
    captions = [caption for part in samples for caption in part.captions]
    generated = torch.cat([part.generated for part in samples])
    rows = [
        ValidationRow(sample_id, pixels, reference, caption, image)
        for sample_id, pixels, reference, caption, image in zip(
            batch["ids"], batch["pixels"], batch["captions"], captions, generated, strict=True
        )
    ]
    return metrics, rows


def _sample_in_batches(
    captioner: Captioner, generator: Generator, batch: dict[str, Any], config: Config, names: list[str]
) -> list[SampleBatch]:
    """A caption and an image (and its re-caption, if a metric needs it) per sample, data.train_batch_size
    samples at a time under a progress bar (see the module docstring)."""
    needs = MetricNeeds(captions=True, images=True, recaptions=MetricNeeds.of(names).recaptions)
    settings = SamplingSettings(
        seed=config.seed,
        num_inference_steps=config.train.validation_inference_steps,
        guidance_scale=config.train.validation_guidance_scale,
    )
    size = config.data.train_batch_size
    starts = range(0, len(batch["ids"]), size)
    return [
        sample_batch(
            captioner,
            generator,
            batch["ids"][start : start + size],
            batch["pixels"][start : start + size],
            [[caption] for caption in batch["captions"][start : start + size]],
            needs,
            settings,
        )
        for start in tqdm(starts, desc="validation", unit="batch", leave=False, disable=None)
    ]
