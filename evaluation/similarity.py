"""The measures that rank candidates: how close a reconstruction is to its image, a re-caption to its text.

Image measures compare two pixels01 batches (pixel MSE needs no weights; LPIPS and embedding cosines need
local weights), text measures two lists of texts (SBERT when available, else exact-token F1; CIDEr-D or CLIP
on request). Each is a Similarity: a per-pair score and which way is better.
"""

from __future__ import annotations

import logging
import re
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor

from cycletune.evaluation.availability import MetricUnavailable, option_path
from cycletune.evaluation.image_metrics import (
    ImageMetricOptions,
    embedding_similarity,
    load_image_encoder,
    load_lpips,
    lpips_distance,
    psnr,
    ssim,
)
from cycletune.evaluation.text import (
    TextMetricOptions,
    load_clip_text_encoder,
    load_sbert,
    recaption_cider,
    text_similarity,
)

logger = logging.getLogger(__name__)

IMAGE_SIMILARITIES = ("mse", "psnr", "ssim", "lpips", "clip_image_similarity", "dino_similarity")
TEXT_SIMILARITIES = ("sbert_similarity", "clip_text_similarity", "cider_d", "token_f1")


@dataclass(frozen=True)
class Similarity:
    """A per-pair score (two pixels01 batches, or two lists of texts) -> [N], and which way is better."""

    name: str
    score: Callable[[Any, Any], Tensor]
    higher_is_better: bool


def pixel_mse(references: Tensor, generated: Tensor) -> Tensor:
    """Per-pair mean squared pixel error; the always-available reconstruction similarity (lower is better)."""
    if references.shape != generated.shape:
        raise ValueError(
            f"mse needs same-shape pairs, got {tuple(references.shape)} and {tuple(generated.shape)}"
        )
    return ((references.float() - generated.float().to(references.device)) ** 2).mean(dim=(1, 2, 3))


def image_similarity(name: str, options: ImageMetricOptions | None = None) -> Similarity:
    """The named image similarity; weight-needing ones load from the paths in `options`.

    A weight path left unset raises MetricUnavailable naming its option.
    """
    options = options or ImageMetricOptions()
    if name == "mse":
        return Similarity(name, pixel_mse, higher_is_better=False)
    if name == "psnr":
        return Similarity(name, psnr, higher_is_better=True)
    if name == "ssim":
        return Similarity(name, ssim, higher_is_better=True)
    if name == "lpips":
        model = load_lpips(options.lpips_backbone_weights, options.lpips_net, options.device)
        return Similarity(name, lpips_distance(model), higher_is_better=False)
    if name in ("clip_image_similarity", "dino_similarity"):
        option = "clip_image_encoder" if name == "clip_image_similarity" else "dino_image_encoder"
        source = getattr(options, option)
        if not callable(source):
            folder = option_path(f"evaluation.{option}", source, "a local image encoder folder")
            source = load_image_encoder(folder, options.device)
        return Similarity(name, embedding_similarity(source), higher_is_better=True)
    raise ValueError(f"unknown image similarity {name!r}; known: {list(IMAGE_SIMILARITIES)}")


def token_f1(texts: list[str], others: list[str]) -> Tensor:
    """F1 of the shared lower-cased word tokens of each pair: the text similarity that needs no weights."""
    scores = []
    for text, other in zip(texts, others, strict=True):
        words, other_words = Counter(_words(text)), Counter(_words(other))
        if not words or not other_words:
            scores.append(float(words == other_words))
            continue
        shared = sum((words & other_words).values())
        scores.append(2 * shared / (sum(words.values()) + sum(other_words.values())))
    return torch.tensor(scores, dtype=torch.float64)


def text_similarity_measure(name: str, options: TextMetricOptions | None = None) -> Similarity:
    """The named text similarity between a text and a re-caption.

    "auto" is SBERT when its model loads (the packaged all-MiniLM-L6-v2 or evaluation.sbert_model), else
    token_f1, so a ranking always runs. cider_d takes its idf from the texts scored together (one batch).
    """
    options = options or TextMetricOptions()
    if name == "auto":
        try:
            return text_similarity_measure("sbert_similarity", options)
        except MetricUnavailable as reason:
            logger.warning("SBERT unavailable (%s); ranking re-captions by token_f1", reason)
            return text_similarity_measure("token_f1", options)
    if name == "sbert_similarity":
        source = options.sbert_model
        encoder = source if callable(source) else load_sbert(source, options.device)
        return Similarity(name, text_similarity(encoder, options.batch_size), higher_is_better=True)
    if name == "clip_text_similarity":
        source = options.clip_text_encoder
        if not callable(source):
            folder = option_path(
                "evaluation.clip_text_encoder", source, "a local CLIP or CLIP text encoder folder"
            )
            source = load_clip_text_encoder(folder, options.device)
        return Similarity(name, text_similarity(source, options.batch_size), higher_is_better=True)
    if name == "cider_d":
        return Similarity(name, recaption_cider, higher_is_better=True)
    if name == "token_f1":
        return Similarity(name, token_f1, higher_is_better=True)
    raise ValueError(f"unknown text similarity {name!r}; known: {['auto', *TEXT_SIMILARITIES]}")


def _words(text: str) -> list[str]:
    return re.findall(r"[a-z0-9]+", text.lower())
