"""The candidates a ranking chooses among: N captions of an image, N images of a text.

Captions: the top beams of one beam search, then nucleus samples. Images: one initial noise per candidate.
Every draw comes from DrawKey(seed) per query id, so a query gets the same candidates in any batch.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor

from cycletune.models.captioner import Captioner
from cycletune.models.generator import Generator
from cycletune.models.randomness import DrawKey
from cycletune.models.sampling_settings import SamplingSettings

RERANK_STEP = 0


@dataclass(frozen=True)
class CaptionSampling:
    """Which candidate captions to rank: the top num_beams beams of one beam search, then nucleus samples."""

    num_beams: int = 4
    num_samples: int = 4
    top_p: float = 0.9
    temperature: float = 1.0
    max_new_tokens: int | None = None
    prompt: str | None = None

    def __post_init__(self) -> None:
        if self.num_beams < 0 or self.num_samples < 0 or self.num_beams + self.num_samples < 1:
            raise ValueError(
                "need at least one candidate caption: "
                f"num_beams={self.num_beams}, num_samples={self.num_samples}"
            )

    @property
    def kinds(self) -> list[str]:
        """How each candidate was decoded, in candidate order."""
        return ["beam"] * self.num_beams + ["sample"] * self.num_samples


def nucleus_captions(
    captioner: Captioner,
    pixels01: Tensor,
    ids: Sequence[str],
    *,
    count: int,
    top_p: float,
    temperature: float = 1.0,
    seed: int = SamplingSettings.seed,
    max_new_tokens: int | None = None,
    prompt: str | None = None,
) -> list[list[str]]:
    """`count` nucleus-sampled captions per image, drawn per id from `seed`: the same in any batch."""
    steps = max_new_tokens or captioner.max_length
    key = DrawKey(seed, RERANK_STEP)
    uniforms = torch.stack(
        [torch.rand((count, steps), generator=g) for g in key.generators(ids, "rerank/sampling")]
    )
    sampled = captioner.sample_captions(
        pixels01, uniforms=uniforms, top_p=top_p, temperature=temperature, prompt=prompt
    )
    return sampled.captions


def candidate_captions(
    captioner: Captioner,
    pixels01: Tensor,
    ids: Sequence[str],
    sampling: CaptionSampling,
    seed: int = SamplingSettings.seed,
) -> list[list[str]]:
    """Per image, its beam candidates then its nucleus samples (sampling.kinds says which is which)."""
    groups: list[list[str]] = [[] for _ in ids]
    if sampling.num_beams:
        beams = captioner.generate(
            pixels01,
            num_beams=sampling.num_beams,
            num_return_sequences=sampling.num_beams,
            max_new_tokens=sampling.max_new_tokens,
            prompt=sampling.prompt,
        )
        groups = [group + candidates for group, candidates in zip(groups, beams, strict=True)]
    if sampling.num_samples:
        samples = nucleus_captions(
            captioner,
            pixels01,
            ids,
            count=sampling.num_samples,
            top_p=sampling.top_p,
            temperature=sampling.temperature,
            seed=seed,
            max_new_tokens=sampling.max_new_tokens,
            prompt=sampling.prompt,
        )
        groups = [group + candidates for group, candidates in zip(groups, samples, strict=True)]
    return groups


def generate_images(
    generator: Generator,
    texts: Sequence[str],
    ids: Sequence[str],
    *,
    num_images: int,
    seed: int = SamplingSettings.seed,
    num_inference_steps: int = SamplingSettings.num_inference_steps,
    guidance_scale: float = SamplingSettings.guidance_scale,
    negative_prompt: str | None = None,
    scheduler: str | None = None,
) -> Tensor:
    """[T, num_images, 3, H, W] pixels01: each text's images from its own initial noise, drawn per id.

    `negative_prompt` and `scheduler` are Generator.sample's; with a scheduler, the noise it adds at each
    step is drawn per image too, so an image is a function of its text's id and the seed in any batch.
    """
    if num_images < 1:
        raise ValueError(f"num_images must be at least 1, got {num_images}")
    check_query_ids(texts, ids)
    key = DrawKey(seed, RERANK_STEP)
    step_generators = None
    if scheduler is not None:
        step_generators = [
            key.generators([query_id], f"rerank/image_steps/{index}")[0]
            for query_id in ids
            for index in range(num_images)
        ]
    images = generator.sample(
        [text for text in texts for _ in range(num_images)],
        num_inference_steps=num_inference_steps,
        guidance_scale=guidance_scale,
        latents=initial_noise(generator, ids, num_images=num_images, seed=seed),
        negative_prompt=negative_prompt,
        scheduler=scheduler,
        step_generators=step_generators,
    )
    return images.view(len(texts), num_images, *images.shape[1:])


def initial_noise(generator: Generator, ids: Sequence[str], *, num_images: int, seed: int) -> Tensor:
    """[len(ids) * num_images, C, H, W]: the initial latents generate_images draws, each id's in a row."""
    latent_shape = generator.latent_shape(1)[1:]
    key = DrawKey(seed, RERANK_STEP)
    return key.randn(ids, "rerank/images", (num_images, *latent_shape), generator.device).flatten(0, 1)


def check_query_ids(queries: Sequence[Any] | Tensor, ids: Sequence[str]) -> None:
    if isinstance(ids, str) or len(ids) != len(queries):
        raise ValueError(f"{len(queries)} queries need {len(queries)} ids, got {ids!r}")
    if len(set(ids)) != len(ids):
        raise ValueError(f"query ids must be distinct (each seeds its own draws), got {list(ids)}")
