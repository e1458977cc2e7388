"""Rank-vs-quality report: is the candidate a ranking puts first also the best one by an independent metric?

The paper's analysis, on any reranking run (evaluation/rankings_file.py's rankings.jsonl): for each ranking measure
and each rank r = 0..N-1, the mean quality of the candidates at rank r across queries, with a bootstrap
confidence interval (queries resampled with replacement, the same resample for every rank, so the ranks'
intervals are comparable). Quality is judged against what the query is known to be:
- captions mode (candidate captions of an image): CIDEr-D against the image's reference captions, or shapes
  attribute accuracy (the caption parsed against the scene its references describe);
- images mode (candidate images of a text): the oracle's attribute accuracy of the image against the scene
  the text describes (shapes world), or an image similarity to the text's paired reference image.
Writes a CSV and a markdown table and a PNG plot (matplotlib, Agg backend).
"""

from __future__ import annotations

import csv
from collections.abc import Sequence
from dataclasses import asdict, dataclass, fields
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from cycletune.data.images import load_rgb, to_tensor
from cycletune.data.oracle import read_scene
from cycletune.data.shapes import Scene, SceneAttributes, parse
from cycletune.evaluation.captions import per_sample_cider
from cycletune.evaluation.image_metrics import ImageMetricOptions
from cycletune.evaluation.rankings_file import StoredRanking, read_rankings
from cycletune.evaluation.similarity import IMAGE_SIMILARITIES, image_similarity

CAPTION_QUALITY = ("cider_d", "shapes_accuracy")
IMAGE_QUALITY = ("shapes_accuracy", *IMAGE_SIMILARITIES)
_ATTRIBUTES = tuple(field.name for field in fields(Scene))


@dataclass(frozen=True)
class RankPoint:
    """Mean quality of the candidates a measure put at `rank`, with its bootstrap confidence interval."""

    measure: str
    rank: int
    mean: float
    ci_low: float
    ci_high: float
    queries: int


@dataclass(frozen=True)
class ReportFiles:
    csv: Path
    markdown: Path
    plot: Path


def rank_quality(
    quality: np.ndarray,
    ranks: np.ndarray,
    measure: str,
    *,
    bootstrap_samples: int = 1000,
    confidence: float = 0.95,
    seed: int = 0,
) -> list[RankPoint]:
    """Per rank, the mean over queries of the quality [Q, N] of the candidate with that rank [Q, N].

    The interval is the percentile bootstrap over queries: each resample reweights the queries by
    multinomial counts, and every rank's mean uses the same weights.
    """
    quality, ranks = np.asarray(quality, dtype=np.float64), np.asarray(ranks)
    if quality.ndim != 2 or quality.shape != ranks.shape or quality.shape[0] == 0:
        raise ValueError(
            f"quality {quality.shape} and ranks {ranks.shape} must be the same [queries, candidates]"
        )
    if not np.isfinite(quality).all():
        raise ValueError(f"quality values must be finite (measure {measure})")
    queries, candidates = quality.shape
    if not (np.sort(ranks, axis=1) == np.arange(candidates)).all():
        raise ValueError(
            f"each query's ranks must be a permutation of 0..{candidates - 1} (measure {measure})"
        )
    if not 0 < confidence < 1:
        raise ValueError(f"confidence must lie in (0, 1), got {confidence}")
    by_rank = np.take_along_axis(quality, np.argsort(ranks, axis=1), axis=1)  # [Q, N], column r = rank r
    rng = np.random.default_rng(seed)
    weights = rng.multinomial(queries, np.full(queries, 1 / queries), size=bootstrap_samples) / queries
    resampled = weights @ by_rank  # [B, N]
    tail = (1 - confidence) / 2 * 100
    low, high = np.percentile(resampled, [tail, 100 - tail], axis=0)
    means = by_rank.mean(axis=0)
    return [
        RankPoint(measure, rank, float(means[rank]), float(low[rank]), float(high[rank]), queries)
        for rank in range(candidates)
    ]


def candidate_quality(
    rankings: Sequence[StoredRanking], metric: str, options: ImageMetricOptions | None = None
) -> np.ndarray:
    """Quality [Q, N] of every candidate of every query by `metric` (see the module docstring)."""
    if not rankings:
        raise ValueError("no rankings to report on")
    modes = {ranking.mode for ranking in rankings}
    if len(modes) != 1:
        raise ValueError(f"rankings mix modes {sorted(modes)}; report one reranking run at a time")
    mode = modes.pop()
    known = CAPTION_QUALITY if mode == "captions" else IMAGE_QUALITY
    if metric not in known:
        raise ValueError(f"unknown quality metric {metric!r} for {mode} rankings; known: {list(known)}")
    if mode == "captions":
        return _caption_quality(rankings, metric)
    return _image_quality(rankings, metric, options)


def _caption_quality(rankings: Sequence[StoredRanking], metric: str) -> np.ndarray:
    missing = [ranking.query_id for ranking in rankings if not ranking.references]
    if missing:
        raise ValueError(
            f"{metric} needs reference captions, and queries {missing[:5]} have none: rerank an input that "
            "has captions (a config's data, or an image folder with metadata.jsonl)"
        )
    if metric == "cider_d":
        scores = per_sample_cider(
            {index: list(ranking.references) for index, ranking in enumerate(rankings)},
            {index: list(ranking.captions) for index, ranking in enumerate(rankings)},
        )
        return np.array([scores[index] for index in range(len(rankings))])
    return np.array(
        [
            [
                _attribute_match(parse(caption), _scene(ranking.references, ranking.query_id))
                for caption in ranking.captions
            ]
            for ranking in rankings
        ]
    )


def _image_quality(
    rankings: Sequence[StoredRanking], metric: str, options: ImageMetricOptions | None
) -> np.ndarray:
    if metric == "shapes_accuracy":
        return np.array(
            [
                [
                    _attribute_match(
                        read_scene(load_rgb(image)), _scene([ranking.query_text], ranking.query_id)
                    )
                    for image in ranking.images
                ]
                for ranking in rankings
            ]
        )
    similarity = image_similarity(metric, options)
    rows = []
    for ranking in rankings:
        if ranking.reference_image is None:
            raise ValueError(
                f"{metric} compares each image with the text's paired image, and query {ranking.query_id!r} "
                "has none: rerank a config's paired data, or use shapes_accuracy"
            )
        candidates = torch.stack([_square_pixels(image) for image in ranking.images])
        reference = _square_pixels(ranking.reference_image)[None]
        if reference.shape[-2:] != candidates.shape[-2:]:
            reference = F.interpolate(reference, size=candidates.shape[-2:], mode="bilinear", antialias=True)
        rows.append(
            similarity.score(reference.expand_as(candidates).contiguous(), candidates).double().cpu().numpy()
        )
    return np.stack(rows)


def _square_pixels(file: Path) -> torch.Tensor:
    """A saved (square) rerank PNG as pixels01 at its own size."""
    image = load_rgb(file)
    return to_tensor(image, min(image.size))


def _scene(texts: Sequence[str | None], query_id: str) -> Scene:
    for text in texts:
        scene = parse(text or "").scene
        if scene is not None:
            return scene
    raise ValueError(
        f"shapes_accuracy needs shapes-world texts, and query {query_id!r} ({list(texts)}) does not name a "
        "shape, colour, size and position"
    )


def _attribute_match(reading: SceneAttributes, scene: Scene) -> float:
    """Share of the four attributes read right: finer-grained per candidate than all-correct."""
    return sum(getattr(reading, name) == getattr(scene, name) for name in _ATTRIBUTES) / len(_ATTRIBUTES)


def write_report(points: Sequence[RankPoint], out_dir: Path, *, metric: str, title: str) -> ReportFiles:
    """rank_quality.csv, rank_quality.md and rank_quality.png in out_dir."""
    out_dir.mkdir(parents=True, exist_ok=True)
    files = ReportFiles(
        out_dir / "rank_quality.csv", out_dir / "rank_quality.md", out_dir / "rank_quality.png"
    )
    columns = [field.name for field in fields(RankPoint)]
    with files.csv.open("w", newline="", encoding="utf-8") as handle:
        writer = csv.DictWriter(handle, fieldnames=columns)
        writer.writeheader()
        writer.writerows(asdict(point) for point in points)
    lines = [
        f"# {title}",
        "",
        f"Mean {metric} of the candidate at each rank (0 = best), with its bootstrap confidence interval.",
        "",
        "| ranked by | rank | mean | CI low | CI high | queries |",
        "|---|---:|---:|---:|---:|---:|",
        *(
            f"| {p.measure} | {p.rank} | {p.mean:.4f} | {p.ci_low:.4f} | {p.ci_high:.4f} | {p.queries} |"
            for p in points
        ),
    ]
    files.markdown.write_text("\n".join(lines) + "\n", encoding="utf-8")
    _plot(points, files.plot, metric=metric, title=title)
    return files


def _plot(points: Sequence[RankPoint], path: Path, *, metric: str, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    measures = list(dict.fromkeys(point.measure for point in points))
    figure, axes = plt.subplots(figsize=(6, 4))
    for offset, measure in enumerate(measures):
        series = [point for point in points if point.measure == measure]
        shift = (offset - (len(measures) - 1) / 2) * 0.08
        axes.errorbar(
            [point.rank + shift for point in series],
            [point.mean for point in series],
            yerr=[
                [point.mean - point.ci_low for point in series],
                [point.ci_high - point.mean for point in series],
            ],
            marker="o",
            capsize=3,
            label=f"ranked by {measure}",
        )
    axes.set_xlabel("rank (0 = best)")
    axes.set_ylabel(f"mean {metric}")
    axes.set_xticks(sorted({point.rank for point in points}))
    axes.set_title(title)
    axes.legend()
    figure.tight_layout()
    figure.savefig(path, dpi=120)
    plt.close(figure)


def rank_report(
    rankings_path: Path,
    metric: str,
    out_dir: Path | None = None,
    *,
    bootstrap_samples: int = 1000,
    confidence: float = 0.95,
    seed: int = 0,
    options: ImageMetricOptions | None = None,
) -> tuple[list[RankPoint], ReportFiles]:
    """The whole report on a rankings.jsonl: each candidate's quality, per-rank means for every measure."""
    rankings = read_rankings(rankings_path)
    quality = candidate_quality(rankings, metric, options)
    points = []
    for measure in rankings[0].ranks:
        ranks = np.array([ranking.ranks[measure] for ranking in rankings])
        points.extend(
            rank_quality(
                quality, ranks, measure, bootstrap_samples=bootstrap_samples, confidence=confidence, seed=seed
            )
        )
    mode = rankings[0].mode
    title = f"{'caption' if mode == 'captions' else 'image'} {metric} by rank ({len(rankings)} queries)"
    files = write_report(
        points, out_dir or Path(rankings_path).parent / f"report_{metric}", metric=metric, title=title
    )
    return points, files
