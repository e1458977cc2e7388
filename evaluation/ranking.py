"""Reconstruction reranking: the caption that rebuilds its image best, the image whose re-caption recovers
its text.

The paper's two findings, as tools. Each direction has an expensive ranking that closes the cycle and a cheap
one that does not sample:
- best caption for an image: N candidate captions (evaluation/candidates.py); a reconstruction sampled from
  each and compared with the image (evaluation/similarity.py: pixel MSE by default, LPIPS or an embedding
  cosine when their weights are given); cheaply, the frozen generator's denoising loss of the image given
  each caption (models.scoring.caption_scores, the scoring reward training uses);
- best image for a text: N generated images; each re-captioned and the re-caption compared with the text
  (SBERT when available, else exact-token F1; CIDEr-D or CLIP on request); cheaply, the captioner's
  teacher-forced loss of the text given each image.

The candidates of one query share their noise (common random numbers): a ranking compares the candidates
rather than their noise, and a query ranks the same in any batch. evaluation/rankings_file.py stores them.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor

from cycletune.evaluation.candidates import (
    RERANK_STEP,
    CaptionSampling,
    candidate_captions,
    check_query_ids,
)
from cycletune.evaluation.similarity import Similarity, image_similarity, text_similarity_measure
from cycletune.models.captioner import Captioner
from cycletune.models.generator import Generator
from cycletune.models.randomness import DrawKey
from cycletune.models.sampling_settings import SamplingSettings
from cycletune.models.scoring import caption_scores


@dataclass(frozen=True)
class RerankSettings:
    """How both directions sample (the seed of every draw, the images' sampler and the re-captions' beam
    width), and how the cheap caption ranking scores."""

    sampling: SamplingSettings = field(default_factory=SamplingSettings)
    # Noise draws averaged by the cheap caption ranking (the generator's denoising loss).
    score_timesteps: int = 4


@dataclass
class Ranking:
    """One query's N candidates, their score under each measure and their rank (0 = best) under each.

    Captions mode: the query is an image, `captions` are the candidates and `images` their reconstructions.
    Images mode: the query is a text, `images` are the candidates and `captions` their re-captions.
    `primary` names the measure that closes the cycle; the contact sheet orders candidates by it.
    """

    mode: str
    query_id: str
    query_text: str | None
    query_image: Tensor | None
    captions: list[str]
    images: Tensor
    kinds: list[str]
    scores: dict[str, list[float]]
    ranks: dict[str, list[int]]
    higher_is_better: dict[str, bool]
    primary: str
    # What the query is known to be, for quality reports (captions mode: reference captions; images mode:
    # the paired image); empty / None when the input has none.
    references: list[str] = field(default_factory=list)
    reference_image: Tensor | None = None

    @property
    def best(self) -> int:
        """Index of the candidate ranked first by the primary measure."""
        return self.ranks[self.primary].index(0)


def ranks_of(scores: Sequence[float], higher_is_better: bool) -> list[int]:
    """Rank of each score (0 = best); ties keep candidate order, so duplicates rank by position."""
    order = sorted(
        range(len(scores)), key=lambda index: -scores[index] if higher_is_better else scores[index]
    )
    ranks = [0] * len(scores)
    for rank, index in enumerate(order):
        ranks[index] = rank
    return ranks


@torch.no_grad()
def rank_captions(
    generator: Generator,
    pixels01: Tensor,
    ids: Sequence[str],
    candidates: Sequence[Sequence[str]],
    *,
    similarity: Similarity | None = None,
    settings: RerankSettings = RerankSettings(),
    kinds: Sequence[str] | None = None,
) -> list[Ranking]:
    """Rank each image's candidate captions by reconstruction similarity and by the denoising loss.

    An image's candidates are all reconstructed from the same initial noise, and the original is compared
    at the generator's resolution (resized as the generator sees it). Measures are named
    "reconstruction_<similarity>" and "denoise_loss".
    """
    similarity = similarity or image_similarity("mse")
    check_query_ids(pixels01, ids)
    denoise = caption_scores(
        generator,
        pixels01,
        candidates,
        key=DrawKey(settings.sampling.seed, RERANK_STEP),
        ids=ids,
        num_timesteps=settings.score_timesteps,
        purpose="rerank/denoise_loss",
    )
    count = len(candidates[0])
    latents = DrawKey(settings.sampling.seed, RERANK_STEP).randn(
        ids, "rerank/reconstruction", generator.latent_shape(1)[1:], generator.device
    )
    reconstructions = generator.sample(
        [caption for group in candidates for caption in group],
        num_inference_steps=settings.sampling.num_inference_steps,
        guidance_scale=settings.sampling.guidance_scale,
        latents=latents.repeat_interleave(count, dim=0),
    )
    originals = (generator.preprocess(pixels01.to(generator.device).float()) + 1) / 2
    reconstruction = similarity.score(originals.repeat_interleave(count, dim=0), reconstructions)
    measures = {
        f"reconstruction_{similarity.name}": (
            reconstruction.view(len(ids), count),
            similarity.higher_is_better,
        ),
        "denoise_loss": (denoise, False),
    }
    return [
        _ranking(
            "captions",
            query_id,
            measures,
            index,
            query_text=None,
            query_image=pixels01[index].cpu(),
            captions=list(candidates[index]),
            images=reconstructions.view(len(ids), count, *reconstructions.shape[1:])[index].cpu(),
            kinds=list(kinds) if kinds is not None else ["given"] * count,
        )
        for index, query_id in enumerate(ids)
    ]


def rerank_captions(
    captioner: Captioner,
    generator: Generator,
    pixels01: Tensor,
    ids: Sequence[str],
    *,
    candidate_sampling: CaptionSampling | None = None,
    similarity: Similarity | None = None,
    settings: RerankSettings = RerankSettings(),
) -> list[Ranking]:
    """The best caption per image: the captioner's candidates (default CaptionSampling()), ranked by
    rank_captions."""
    candidate_sampling = candidate_sampling or CaptionSampling()
    candidates = candidate_captions(captioner, pixels01, ids, candidate_sampling, settings.sampling.seed)
    return rank_captions(
        generator,
        pixels01,
        ids,
        candidates,
        similarity=similarity,
        settings=settings,
        kinds=candidate_sampling.kinds,
    )


@torch.no_grad()
def rank_images(
    captioner: Captioner,
    texts: Sequence[str],
    ids: Sequence[str],
    images: Tensor,
    *,
    similarity: Similarity | None = None,
    settings: RerankSettings = RerankSettings(),
) -> list[Ranking]:
    """Rank each text's candidate images ([T, N, 3, H, W]) by re-caption similarity and by the caption loss.

    Measures are named "recaption_<similarity>" and "caption_nll" (the captioner's mean token cross-entropy
    of the text given the image, teacher-forced).
    """
    similarity = similarity or text_similarity_measure("token_f1")
    check_query_ids(texts, ids)
    if images.ndim != 5 or images.shape[0] != len(texts):
        raise ValueError(f"images must be [T={len(texts)}, N, 3, H, W], got {tuple(images.shape)}")
    count = images.shape[1]
    flat = images.flatten(0, 1).to(captioner.device)
    recaptions = [group[0] for group in captioner.generate(flat, num_beams=settings.sampling.num_beams)]
    repeated = [text for text in texts for _ in range(count)]
    recaption = similarity.score(repeated, recaptions).view(len(texts), count)
    nll = captioner.caption_loss(flat, **captioner.tokenize(repeated)).view(len(texts), count)
    measures = {
        f"recaption_{similarity.name}": (recaption, similarity.higher_is_better),
        "caption_nll": (nll, False),
    }
    return [
        _ranking(
            "images",
            query_id,
            measures,
            index,
            query_text=texts[index],
            query_image=None,
            captions=recaptions[index * count : (index + 1) * count],
            images=images[index].cpu(),
            kinds=["sample"] * count,
        )
        for index, query_id in enumerate(ids)
    ]


def _ranking(
    mode: str,
    query_id: str,
    measures: dict[str, tuple[Tensor, bool]],
    index: int,
    **fields: Any,
) -> Ranking:
    """Query `index`'s row of every measure, with its ranks; the first measure is the primary one."""
    scores = {name: [float(value) for value in values[index]] for name, (values, _) in measures.items()}
    for name, values in scores.items():
        if any(math.isnan(value) for value in values):
            raise ValueError(f"{name} gave NaN for query {query_id!r}: {values}")
    return Ranking(
        mode=mode,
        query_id=query_id,
        scores=scores,
        ranks={name: ranks_of(scores[name], better) for name, (_, better) in measures.items()},
        higher_is_better={name: better for name, (_, better) in measures.items()},
        primary=next(iter(measures)),
        **fields,
    )
