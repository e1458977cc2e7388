"""Reconstruction reranking: the caption that rebuilds its image best, the image whose re-caption recovers
its text.

The paper's two findings, as tools. Each direction has an expensive ranking that closes the cycle and a cheap
one that does not sample:
- best caption for an image: N candidate captions (beam search and/or nucleus sampling); a reconstruction
  sampled from each and compared with the image (pixel MSE by default, LPIPS or an embedding cosine when
  their weights are given); cheaply, the frozen generator's denoising loss of the image given each caption
  (models.scoring.caption_scores, the scoring reward training uses);
- best image for a text: N generated images; each re-captioned and the re-caption compared with the text
  (SBERT when available, else exact-token F1; CIDEr-D or CLIP on request); cheaply, the captioner's
  teacher-forced loss of the text given each image.

Every draw comes from DrawKey(seed) per query id, and the candidates of one query share their noise (common
random numbers): a ranking compares the candidates rather than their noise, and a query ranks the same in
any batch. RankingWriter stores rankings as a JSONL (one row per candidate) plus PNGs and an HTML contact
sheet.
"""

from __future__ import annotations

import html
import json
import logging
import math
import re
from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image
from torch import Tensor

from evaluation.availability import MetricUnavailable, option_path
from evaluation.image_metrics import (
    ImageMetricOptions,
    embedding_similarity,
    load_image_encoder,
    load_lpips,
    lpips_distance,
    psnr,
    ssim,
)
from evaluation.text import (
    TextMetricOptions,
    load_clip_text_encoder,
    load_sbert,
    recaption_cider,
    text_similarity,
)
from models.captioner import Captioner
from models.generator import Generator
from models.randomness import DrawKey
from models.scoring import caption_scores

logger = logging.getLogger(__name__)

IMAGE_SIMILARITIES = ("mse", "psnr", "ssim", "lpips", "clip_image_similarity", "dino_similarity")
TEXT_SIMILARITIES = ("sbert_similarity", "clip_text_similarity", "cider_d", "token_f1")
# All reranking draws use this update index of DrawKey: reranking is not a training step.
RERANK_UPDATE = 0
RANKINGS_FILE = "rankings.jsonl"
CONTACT_SHEET_FILE = "index.html"
IMAGES_FOLDER = "images"


@dataclass(frozen=True)
class Similarity:
    """A per-pair score (two pixels01 batches, or two lists of texts) -> [N], and which way is better."""

    name: str
    score: Callable[[Any, Any], Tensor]
    higher_is_better: bool


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


@dataclass(frozen=True)
class RerankSettings:
    """Sampling and scoring knobs shared by both directions."""

    seed: int = 0
    num_inference_steps: int = 20
    guidance_scale: float = 3.0
    # Noise draws averaged by the cheap caption ranking (the generator's denoising loss).
    score_timesteps: int = 4
    # Beam width of the re-captions in the image direction.
    recaption_beams: int = 3


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


# ------------------------------------------------------------------------------------------- similarities


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


# ------------------------------------------------------------------------------------------------ candidates


def nucleus_captions(
    captioner: Captioner,
    pixels01: Tensor,
    ids: Sequence[str],
    *,
    count: int,
    top_p: float,
    temperature: float = 1.0,
    seed: int = 0,
    max_new_tokens: int | None = None,
    prompt: str | None = None,
) -> list[list[str]]:
    """`count` nucleus-sampled captions per image, drawn per id from `seed`: the same in any batch."""
    steps = max_new_tokens or captioner.max_length
    key = DrawKey(seed, RERANK_UPDATE)
    uniforms = torch.stack(
        [torch.rand((count, steps), generator=g) for g in key.generators(ids, "rerank/sampling")]
    )
    sampled = captioner.sample_captions(
        pixels01, uniforms=uniforms, top_p=top_p, temperature=temperature, prompt=prompt
    )
    return sampled.captions


def candidate_captions(
    captioner: Captioner, pixels01: Tensor, ids: Sequence[str], sampling: CaptionSampling, seed: int = 0
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
    seed: int = 0,
    num_inference_steps: int = 20,
    guidance_scale: float = 3.0,
) -> Tensor:
    """[T, num_images, 3, H, W] pixels01: each text's images from its own initial noise, drawn per id."""
    if num_images < 1:
        raise ValueError(f"num_images must be at least 1, got {num_images}")
    _check_queries(texts, ids)
    latent_shape = generator.latent_shape(1)[1:]
    key = DrawKey(seed, RERANK_UPDATE)
    latents = key.randn(ids, "rerank/images", (num_images, *latent_shape), generator.device).flatten(0, 1)
    images = generator.sample(
        [text for text in texts for _ in range(num_images)],
        num_inference_steps=num_inference_steps,
        guidance_scale=guidance_scale,
        latents=latents,
    )
    return images.view(len(texts), num_images, *images.shape[1:])


# ---------------------------------------------------------------------------------------------------- ranking


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
    _check_queries(pixels01, ids)
    denoise = caption_scores(
        generator,
        pixels01,
        candidates,
        key=DrawKey(settings.seed, RERANK_UPDATE),
        ids=ids,
        num_timesteps=settings.score_timesteps,
        purpose="rerank/denoise_loss",
    )
    count = len(candidates[0])
    latents = DrawKey(settings.seed, RERANK_UPDATE).randn(
        ids, "rerank/reconstruction", generator.latent_shape(1)[1:], generator.device
    )
    reconstructions = generator.sample(
        [caption for group in candidates for caption in group],
        num_inference_steps=settings.num_inference_steps,
        guidance_scale=settings.guidance_scale,
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
    sampling: CaptionSampling = CaptionSampling(),
    similarity: Similarity | None = None,
    settings: RerankSettings = RerankSettings(),
) -> list[Ranking]:
    """The best caption per image: the captioner's candidates, ranked by rank_captions."""
    candidates = candidate_captions(captioner, pixels01, ids, sampling, settings.seed)
    return rank_captions(
        generator, pixels01, ids, candidates, similarity=similarity, settings=settings, kinds=sampling.kinds
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
    _check_queries(texts, ids)
    if images.ndim != 5 or images.shape[0] != len(texts):
        raise ValueError(f"images must be [T={len(texts)}, N, 3, H, W], got {tuple(images.shape)}")
    count = images.shape[1]
    flat = images.flatten(0, 1).to(captioner.device)
    recaptions = [group[0] for group in captioner.generate(flat, num_beams=settings.recaption_beams)]
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


def rerank_images(
    captioner: Captioner,
    generator: Generator,
    texts: Sequence[str],
    ids: Sequence[str],
    *,
    num_images: int = 4,
    similarity: Similarity | None = None,
    settings: RerankSettings = RerankSettings(),
) -> list[Ranking]:
    """The best image per text: num_images generations per text, ranked by rank_images."""
    images = generate_images(
        generator,
        texts,
        ids,
        num_images=num_images,
        seed=settings.seed,
        num_inference_steps=settings.num_inference_steps,
        guidance_scale=settings.guidance_scale,
    )
    return rank_images(captioner, texts, ids, images, similarity=similarity, settings=settings)


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


def _check_queries(queries: Sequence[Any] | Tensor, ids: Sequence[str]) -> None:
    if isinstance(ids, str) or len(ids) != len(queries):
        raise ValueError(f"{len(queries)} queries need {len(queries)} ids, got {ids!r}")
    if len(set(ids)) != len(ids):
        raise ValueError(f"query ids must be distinct (each seeds its own draws), got {list(ids)}")


def _words(text: str) -> list[str]:
    return re.findall(r"[a-z0-9]+", text.lower())


# ----------------------------------------------------------------------------------------- JSONL and HTML


@dataclass(frozen=True)
class StoredRanking:
    """A Ranking read back from rankings.jsonl: image paths instead of tensors."""

    mode: str
    query_id: str
    query_text: str | None
    query_image: Path | None
    captions: list[str]
    images: list[Path]
    scores: dict[str, list[float]]
    ranks: dict[str, list[int]]
    higher_is_better: dict[str, bool]
    primary: str
    references: list[str]
    reference_image: Path | None


class RankingWriter:
    """Writes rankings as they come: PNGs under images/, one JSONL row per candidate, and at close an HTML
    contact sheet (index.html, relative links, candidates in primary-rank order) that a person can open."""

    def __init__(self, out_dir: Path, title: str) -> None:
        self.out_dir = Path(out_dir)
        (self.out_dir / IMAGES_FOLDER).mkdir(parents=True, exist_ok=True)
        self.title = title
        self.jsonl_path = self.out_dir / RANKINGS_FILE
        self.html_path = self.out_dir / CONTACT_SHEET_FILE
        self._jsonl = self.jsonl_path.open("w", encoding="utf-8")
        self._sections: list[str] = []

    def __enter__(self) -> RankingWriter:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    def write(self, ranking: Ranking) -> None:
        query = len(self._sections)
        stem = f"q{query:05d}"
        query_image = self._save(ranking.query_image, f"{stem}.png")
        reference_image = self._save(ranking.reference_image, f"{stem}_reference.png")
        candidate_images = [
            self._save(image, f"{stem}_c{index:02d}.png") for index, image in enumerate(ranking.images)
        ]
        for index, (caption, image) in enumerate(zip(ranking.captions, candidate_images, strict=True)):
            row = {
                "mode": ranking.mode,
                "query": query,
                "query_id": ranking.query_id,
                "query_text": ranking.query_text,
                "query_image": query_image,
                "references": ranking.references,
                "reference_image": reference_image,
                "candidate": index,
                "kind": ranking.kinds[index],
                "caption": caption,
                "image": image,
                "scores": {name: values[index] for name, values in ranking.scores.items()},
                "ranks": {name: values[index] for name, values in ranking.ranks.items()},
                "higher_is_better": ranking.higher_is_better,
                "primary": ranking.primary,
            }
            self._jsonl.write(json.dumps(row) + "\n")
        self._jsonl.flush()
        self._sections.append(_html_section(ranking, query_image, reference_image, candidate_images))

    def close(self) -> None:
        if self._jsonl.closed:
            return
        self._jsonl.close()
        self.html_path.write_text(_html_page(self.title, self._sections), encoding="utf-8")

    def _save(self, image: Tensor | None, name: str) -> str | None:
        """Save an image as a PNG under images/; returns its path relative to the output folder."""
        if image is None:
            return None
        relative = f"{IMAGES_FOLDER}/{name}"
        save_png(image, self.out_dir / relative)
        return relative


def save_png(pixels01: Tensor, path: Path) -> None:
    """Save one [3, H, W] pixels01 image as an 8-bit PNG."""
    array = (
        (pixels01.detach().float().clamp(0, 1) * 255).round().to(torch.uint8).permute(1, 2, 0).cpu().numpy()
    )
    Image.fromarray(np.ascontiguousarray(array)).save(path)


def read_rankings(path: Path) -> list[StoredRanking]:
    """The rankings in a rankings.jsonl, queries in file order; image paths resolved against its folder."""
    path = Path(path)
    folder = path.parent
    rows_by_query: dict[int, list[dict[str, Any]]] = {}
    for line_number, line in enumerate(path.read_text(encoding="utf-8").splitlines(), start=1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
            rows_by_query.setdefault(int(row["query"]), []).append(row)
        except (json.JSONDecodeError, KeyError, TypeError, ValueError) as error:
            raise ValueError(f"{path}:{line_number}: not a rankings row ({error})") from error

    def resolved(relative: str | None) -> Path | None:
        return None if relative is None else folder / relative

    stored = []
    for query, rows in rows_by_query.items():
        rows.sort(key=lambda row: row["candidate"])
        first = rows[0]
        try:
            stored.append(
                StoredRanking(
                    mode=first["mode"],
                    query_id=first["query_id"],
                    query_text=first["query_text"],
                    query_image=resolved(first["query_image"]),
                    captions=[row["caption"] for row in rows],
                    images=[folder / row["image"] for row in rows],
                    scores={name: [row["scores"][name] for row in rows] for name in first["scores"]},
                    ranks={name: [row["ranks"][name] for row in rows] for name in first["ranks"]},
                    higher_is_better=first["higher_is_better"],
                    primary=first["primary"],
                    references=first["references"],
                    reference_image=resolved(first["reference_image"]),
                )
            )
        except KeyError as error:
            raise ValueError(f"{path}: query {query} rows lack the field {error}") from error
    return stored


_STYLE = """
body { font-family: sans-serif; margin: 1.5em; }
section { margin-bottom: 2em; border-bottom: 1px solid #ccc; padding-bottom: 1em; }
.row { display: flex; flex-wrap: wrap; gap: 0.8em; align-items: flex-start; }
figure { margin: 0; width: 12em; font-size: 0.85em; }
figure img { width: 12em; image-rendering: pixelated; border: 3px solid transparent; }
figure.best img { border-color: #2a2; }
figure.query img { border-color: #888; }
table { border-collapse: collapse; } td { padding: 0 0.4em 0 0; }
"""


def _html_section(
    ranking: Ranking, query_image: str | None, reference_image: str | None, candidate_images: list[str]
) -> str:
    escape = html.escape
    figures = []
    if query_image is not None:
        figures.append(
            f'<figure class="query"><img src="{escape(query_image)}" alt="query">'
            "<figcaption>query</figcaption></figure>"
        )
    if reference_image is not None:
        figures.append(
            f'<figure class="query"><img src="{escape(reference_image)}" alt="reference">'
            "<figcaption>reference image</figcaption></figure>"
        )
    order = sorted(range(len(ranking.captions)), key=lambda index: ranking.ranks[ranking.primary][index])
    for index in order:
        rows = "".join(
            f"<tr><td>{escape(name)}</td><td>{ranking.scores[name][index]:.4g}</td>"
            f"<td>rank {ranking.ranks[name][index]}</td></tr>"
            for name in ranking.scores
        )
        best = ' class="best"' if index == ranking.best else ""
        figures.append(
            f'<figure{best}><img src="{escape(candidate_images[index])}" alt="candidate {index}">'
            f"<figcaption><b>{escape(ranking.captions[index])}</b> <i>({escape(ranking.kinds[index])})</i>"
            f"<table>{rows}</table></figcaption></figure>"
        )
    heading = escape(ranking.query_id) + (f": {escape(ranking.query_text)}" if ranking.query_text else "")
    references = (
        "<p>references: " + " | ".join(escape(text) for text in ranking.references) + "</p>"
        if ranking.references
        else ""
    )
    return f'<section><h2>{heading}</h2>{references}<div class="row">{"".join(figures)}</div></section>'


def _html_page(title: str, sections: list[str]) -> str:
    return (
        f'<!DOCTYPE html>\n<html><head><meta charset="utf-8"><title>{html.escape(title)}</title>'
        f"<style>{_STYLE}</style></head><body><h1>{html.escape(title)}</h1>"
        "<p>Candidates in order of the first measure; the best has a green frame.</p>"
        + "\n".join(sections)
        + "</body></html>\n"
    )
