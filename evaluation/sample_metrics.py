"""What the metrics compare, drawn from a captioner-generator pair, and every metric over it.

Validation (train/validation.py), `python -m train.cli.evaluate` and the shapes demo's test split
(evaluation/shapes_split.py) all caption images and draw images here and score them with compute_metrics, so
a metric means the same in each. The metrics are named as in evaluation/ (caption metrics such as bleu_4 and
cider_d, image metrics such as psnr, lpips and fid), plus text reconstruction as sbert_similarity,
clip_text_similarity and recaption_cider_d, and the shapes world's shapes_caption_accuracy and
shapes_image_accuracy.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from cycletune.data.oracle import attribute_accuracy, read_scenes
from cycletune.data.shapes import Scene, SceneAttributes, parse
from cycletune.evaluation.availability import MetricResult, check_metric_names
from cycletune.evaluation.captions import CAPTION_METRICS, caption_metrics
from cycletune.evaluation.image_metrics import IMAGE_METRICS, image_metrics
from cycletune.evaluation.metric_settings import EvaluationSettings, image_options, text_options
from cycletune.evaluation.text import text_metrics
from cycletune.models.captioner import Captioner
from cycletune.models.generator import Generator
from cycletune.models.randomness import DrawKey
from cycletune.models.sampling_settings import SamplingSettings

# Update index reserved for validation draws: the same noise at every validation, so curves compare.
VALIDATION_STEP = -1

# Text reconstruction metrics under their validation names -> their names in evaluation.text.
TEXT_RECONSTRUCTION_METRICS = {
    "sbert_similarity": "sbert_similarity",
    "clip_text_similarity": "clip_text_similarity",
    "recaption_cider_d": "cider_d",
}
SHAPES_METRICS = ("shapes_caption_accuracy", "shapes_image_accuracy")
VALIDATION_METRICS = (*CAPTION_METRICS, *IMAGE_METRICS, *TEXT_RECONSTRUCTION_METRICS, *SHAPES_METRICS)
# CIDEr-D's idf is zero for a single sample: these need at least two.
CORPUS_METRICS = frozenset({"cider_d", "recaption_cider_d"})


@dataclass(frozen=True)
class MetricNeeds:
    """Which generated outputs the requested metrics compare."""

    captions: bool
    images: bool
    recaptions: bool

    @classmethod
    def of(cls, names: Iterable[str]) -> MetricNeeds:
        names = set(names)
        recaptions = bool(names & set(TEXT_RECONSTRUCTION_METRICS))
        return cls(
            captions=bool(names & {*CAPTION_METRICS, "shapes_caption_accuracy"}),
            images=recaptions or bool(names & {*IMAGE_METRICS, "shapes_image_accuracy"}),
            recaptions=recaptions,
        )


@dataclass
class SampleBatch:
    """One batch of what the metrics compare: originals with their references, and what the models made.

    Each image's first reference is the prompt its generated image came from; a re-caption is the
    captioner's caption of that generated image.
    """

    pixels: torch.Tensor
    references: list[list[str]]
    captions: list[str] | None = None
    generated: torch.Tensor | None = None
    recaptions: list[str] | None = None

    @property
    def prompts(self) -> list[str]:
        return [references[0] for references in self.references]


@torch.no_grad()
def sample_batch(
    captioner: Captioner,
    generator: Generator,
    ids: Sequence[str],
    pixels01: torch.Tensor,
    references: list[list[str]],
    needs: MetricNeeds,
    settings: SamplingSettings,
) -> SampleBatch:
    """Caption the images and draw an image per first reference, as far as `needs` asks.

    The initial noise of each generated image is drawn per sample id, so a sample gets the same image in
    any batch and at every validation.
    """
    if not all(references):
        raise ValueError("every image needs at least one reference caption")
    batch = SampleBatch(pixels01, references)
    if needs.captions:
        batch.captions = [
            options[0] for options in captioner.generate(pixels01, num_beams=settings.num_beams)
        ]
    if needs.images:
        batch.generated = draw_images(generator, ids, batch.prompts, settings)
    if needs.recaptions:
        recaptions = captioner.generate(batch.generated.to(captioner.device), num_beams=settings.num_beams)
        batch.recaptions = [options[0] for options in recaptions]
    return batch


@torch.no_grad()
def draw_images(
    generator: Generator, ids: Sequence[str], prompts: list[str], settings: SamplingSettings
) -> torch.Tensor:
    """One image per prompt, from initial noise drawn per sample id (the same in any batch); pixels01."""
    latents = DrawKey(settings.seed, VALIDATION_STEP).randn(
        ids, "validation/latents", generator.latent_shape(1)[1:], generator.device
    )
    return generator.sample(
        prompts,
        num_inference_steps=settings.num_inference_steps,
        guidance_scale=settings.guidance_scale,
        latents=latents,
    )


class _Collected:
    """The text side of every batch (and the oracle's readings of generated images), kept while the image
    metrics stream the pixels through once."""

    def __init__(self, read_images: bool) -> None:
        self.read_images = read_images
        self.references: list[list[str]] = []
        self.prompts: list[str] = []
        self.captions: list[str] = []
        self.recaptions: list[str] = []
        self.image_readings: list[SceneAttributes] = []

    def add(self, batch: SampleBatch) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Keep the batch's texts; return its (reference, generated) pixel pair at the reference size."""
        self.references.extend(batch.references)
        self.prompts.extend(batch.prompts)
        self.captions.extend(batch.captions or [])
        self.recaptions.extend(batch.recaptions or [])
        generated = batch.generated
        if generated is None:
            return batch.pixels, None
        generated = generated.float().cpu()
        if self.read_images:
            self.image_readings.extend(read_scenes(generated))
        if generated.shape[-2:] != batch.pixels.shape[-2:]:
            generated = F.interpolate(
                generated, size=batch.pixels.shape[-2:], mode="bilinear", antialias=True
            )
        return batch.pixels.float().cpu(), generated.clamp(0, 1)


def compute_metrics(
    names: Sequence[str],
    batches: Iterable[SampleBatch],
    settings: EvaluationSettings,
    device: str | torch.device = "cpu",
    announce: Callable[[str], None] | None = None,
) -> dict[str, MetricResult]:
    """Every requested metric over all batches; batches must carry what MetricNeeds.of(names) asks for.

    Shapes metrics add one result per attribute (shapes_caption_accuracy_colour, ...) after the all-correct
    one. `announce` is told which metrics are being computed before each group starts (some take minutes:
    the batches are drawn and captioned while the image metrics stream, CIDEr-D and SPICE run afterwards).
    """
    names = check_metric_names(names, VALIDATION_METRICS)
    announce = announce or (lambda message: None)
    collected = _Collected(read_images="shapes_image_accuracy" in names)
    pairs = (collected.add(batch) for batch in batches)  # collects the texts as the pixels stream past
    image_names = [name for name in names if name in IMAGE_METRICS]
    results: dict[str, MetricResult] = {}
    if image_names:
        announce(f"computing {', '.join(image_names)} as the batches are made")
        results.update(image_metrics(pairs, image_options(settings, device), image_names))
    else:
        announce("making the batches")
        deque(pairs, maxlen=0)
    caption_names = [name for name in names if name in CAPTION_METRICS]
    if caption_names:
        announce(f"computing {', '.join(caption_names)}")
        results.update(
            caption_metrics(
                dict(enumerate(collected.references)), dict(enumerate(collected.captions)), caption_names
            )
        )
    text_names = [name for name in names if name in TEXT_RECONSTRUCTION_METRICS]
    if text_names:
        announce(f"computing {', '.join(text_names)}")
        text_results = text_metrics(
            collected.prompts,
            collected.recaptions,
            text_options(settings, device),
            [TEXT_RECONSTRUCTION_METRICS[name] for name in text_names],
        )
        for name in text_names:
            result = text_results[TEXT_RECONSTRUCTION_METRICS[name]]
            results[name] = MetricResult(name, result.value, result.skipped_reason)
    if "shapes_caption_accuracy" in names:
        scenes = [_scene(references, index) for index, references in enumerate(collected.references)]
        readings = [parse(caption) for caption in collected.captions]
        results.update(_accuracy_results("shapes_caption_accuracy", readings, scenes))
    if "shapes_image_accuracy" in names:
        scenes = [_scene([prompt], index) for index, prompt in enumerate(collected.prompts)]
        results.update(_accuracy_results("shapes_image_accuracy", collected.image_readings, scenes))
    return {key: results[key] for key in _ordered_keys(names, results)}


def _scene(references: Sequence[str], index: int) -> Scene:
    """The shapes-world scene a sample's references describe (its first fully readable one)."""
    for reference in references:
        scene = parse(reference).scene
        if scene is not None:
            return scene
    raise ValueError(
        f"shapes metrics need shapes-world captions, but sample {index}'s references {list(references)} "
        "do not name a shape, colour, size and position"
    )


def _accuracy_results(
    name: str, readings: Sequence[SceneAttributes], scenes: Sequence[Scene]
) -> dict[str, MetricResult]:
    accuracy = attribute_accuracy(readings, scenes)
    results = {name: MetricResult(name, accuracy.pop("all"))}
    for attribute, value in accuracy.items():
        results[f"{name}_{attribute}"] = MetricResult(f"{name}_{attribute}", value)
    return results


def _ordered_keys(names: Sequence[str], results: dict[str, MetricResult]) -> list[str]:
    """Requested order, each metric's extra results (kid_std, per-attribute accuracies) right after it."""
    ordered = []
    for name in names:
        ordered.extend(key for key in results if key == name or key.startswith(f"{name}_"))
    return list(dict.fromkeys(ordered))
