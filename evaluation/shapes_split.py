"""The shapes demo's test split and what it measures on a captioner-generator pair.

The demo's data are one fixed split of the shapes world (data/shapes.py): the configs draw the paired set
(seen colour-shape combinations only), the unpaired image and caption sets and the validation set from
their own seeds; the test split here uses two more seeds, one per part, and is read only for final numbers.

Per part (seen / unseen combinations; the designed split has three parts) a pair of models gets:
- caption attribute accuracy, exact and per attribute (the captioner's caption of a test image, parsed);
- image attribute accuracy, exact and per attribute (the oracle's reading of the image drawn from a test
  caption);
- I2T2I image similarity: SSIM between a test image and the image drawn from the captioner's caption of it;
- T2I2T text similarity: CIDEr-D between a test caption and the captioner's caption of the image drawn
  from it.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import torch

from cycletune.data import sources
from cycletune.data.batching import batched
from cycletune.data.images import load_pixels
from cycletune.evaluation.image_metrics import ssim
from cycletune.evaluation.metric_settings import EvaluationSettings
from cycletune.evaluation.sample_metrics import (
    MetricNeeds,
    SampleBatch,
    compute_metrics,
    draw_images,
    sample_batch,
)
from cycletune.models.captioner import Captioner
from cycletune.models.generator import Generator
from cycletune.models.sampling_settings import SamplingSettings

# Seeds of the test parts; the configs' paired (100), image-only (101), text-only (102) and validation
# (103) sets use the ones below them. Tuning uses the validation seed, split the same way.
TEST_SEEDS = {"seen": 104, "unseen": 105}
VALIDATION_SEEDS = {"seen": 103, "unseen": 103}
PARTS = tuple(TEST_SEEDS)
# The designed split's test parts (data/shapes.py): the seen combinations both models were trained on, the
# ones only the captioner was (the generator never drew their colour), and the unseen ones of the main split.
DESIGNED_TEST_SEEDS = {"generator_seen": 106, "captioner_only": 107, "unseen": 105}
TEST_SPLITS = {"main": TEST_SEEDS, "designed": DESIGNED_TEST_SEEDS}
# Parts whose combinations at least one of the models never saw paired: the contact sheet marks them.
HELD_OUT_PARTS = frozenset({"unseen", "captioner_only"})
_METRICS = ("shapes_caption_accuracy", "shapes_image_accuracy", "recaption_cider_d")


@dataclass(frozen=True)
class TestSplit:
    """Test images and their captions, per part."""

    pixels: dict[str, torch.Tensor]
    captions: dict[str, list[str]]
    ids: dict[str, list[str]]


@dataclass(frozen=True)
class PairResults:
    """A pair's metrics ("unseen/caption_exact", ...) and what it made, per part, for the contact sheet."""

    metrics: dict[str, float]
    captions: dict[str, list[str]]
    images: dict[str, torch.Tensor]


def load_test_split(
    samples_per_part: int, resolution: int = 32, seeds: Mapping[str, int] = TEST_SEEDS
) -> TestSplit:
    """Render `samples_per_part` scenes of each part named in `seeds`, with its seed (the main test split by
    default; VALIDATION_SEEDS for tuning decisions, DESIGNED_TEST_SEEDS for the designed split)."""
    pixels, captions, ids = {}, {}, {}
    for part, seed in seeds.items():
        records, _ = sources.shapes(samples_per_part, seed=seed, resolution=resolution, combinations=part)
        pixels[part] = load_pixels([record.image for record in records], resolution)
        captions[part] = [record.caption for record in records]
        ids[part] = [record.id for record in records]
    return TestSplit(pixels, captions, ids)


@torch.no_grad()
def evaluate_pair(
    captioner: Captioner,
    generator: Generator,
    split: TestSplit,
    sampling: SamplingSettings,
    *,
    batch_size: int = 32,
) -> PairResults:
    """Every demo metric of one captioner-generator pair on each part of the test split."""
    metrics: dict[str, float] = {}
    captions: dict[str, list[str]] = {}
    images: dict[str, torch.Tensor] = {}
    needs = MetricNeeds(captions=True, images=True, recaptions=True)
    for part in split.ids:
        batches: list[SampleBatch] = []
        similarities: list[torch.Tensor] = []
        for indices in batched(range(len(split.ids[part])), batch_size):
            ids = [split.ids[part][index] for index in indices]
            pixels = split.pixels[part][indices].to(captioner.device)
            batch = sample_batch(
                captioner,
                generator,
                ids,
                pixels,
                [[split.captions[part][i]] for i in indices],
                needs,
                sampling,
            )
            batches.append(batch)
            similarities.append(_i2t2i_similarity(generator, ids, pixels, batch.captions, sampling))
        results = compute_metrics(_METRICS, batches, EvaluationSettings(), captioner.device)
        for name, result in results.items():
            metrics[f"{part}/{_short_name(name)}"] = result.value
        metrics[f"{part}/i2t2i_ssim"] = torch.cat(similarities).mean().item()
        captions[part] = [caption for batch in batches for caption in batch.captions]
        images[part] = torch.cat([batch.generated.float().cpu() for batch in batches])
    return PairResults(metrics, captions, images)


def _i2t2i_similarity(
    generator: Generator,
    ids: Sequence[str],
    pixels: torch.Tensor,
    captions: list[str],
    sampling: SamplingSettings,
) -> torch.Tensor:
    """SSIM of each image and the image drawn from its caption (the same per-id noise as for T2I)."""
    reconstruction = draw_images(generator, ids, captions, sampling)
    return ssim(pixels.float().cpu(), reconstruction.float().cpu().clamp(0, 1))


def _short_name(name: str) -> str:
    """Table names: shapes_caption_accuracy -> caption_exact, ..._colour -> caption_colour, and so on."""
    if name == "recaption_cider_d":
        return "t2i2t_cider_d"
    side = "caption" if name.startswith("shapes_caption_accuracy") else "image"
    attribute = name.removeprefix(f"shapes_{side}_accuracy").lstrip("_")
    return f"{side}_{attribute or 'exact'}"
