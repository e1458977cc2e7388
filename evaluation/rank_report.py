"""Rank-vs-quality report: is the candidate a ranking puts first also the best one by an independent metric?

The paper's analysis, on any reranking run (evaluation/rankings_file.py's rankings.jsonl): for each ranking measure
and each rank r = 0..N-1, the mean quality of the candidates at rank r across queries, with a bootstrap
confidence interval (queries resampled with replacement, the same resample for every rank, so the ranks'
intervals are comparable). Quality is judged against what the query is known to be:
- captions mode (candidate captions of an image): CIDEr-D against the image's reference captions, or shapes
  attribute accuracy (the caption parsed against the scene its references describe);
- images mode (candidate images of a text): the oracle's attribute accuracy of the image against the scene
  the text describes (shapes world), or an image similarity to the text's paired reference image.
Shapes attribute accuracy comes as `shapes_accuracy` (the share of the four attributes right) and
`shapes_exact` (all four right). Writes a CSV and a markdown table and a PNG plot (matplotlib, Agg backend).

Beside the per-rank means: the top-1 pick against a random pick (whose expected quality is the query's mean
over its candidates), and the Spearman correlation of a measure's score with quality. Every interval of one
call resamples the queries with the same draws (Bootstrap), so paired statistics stay paired.
"""

from __future__ import annotations

import csv
import math
from collections.abc import Callable, Sequence
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

# Per candidate, from its four attribute hits [..., 4]: the share right (finer-grained) or all four right.
SHAPES_QUALITY: dict[str, Callable[[np.ndarray], np.ndarray]] = {
    "shapes_accuracy": lambda hits: hits.mean(axis=-1),
    "shapes_exact": lambda hits: hits.all(axis=-1).astype(np.float64),
}
CAPTION_QUALITY = ("cider_d", *SHAPES_QUALITY)
IMAGE_QUALITY = (*SHAPES_QUALITY, *IMAGE_SIMILARITIES)
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
class Estimate:
    """A statistic over queries and its percentile bootstrap interval."""

    value: float
    ci_low: float
    ci_high: float

    def text(self, signed: bool = False) -> str:
        """'0.690 [0.625, 0.750]' (signed: '+0.060 [+0.009, +0.108]'), as results tables print it."""
        number = "{:+.3f}" if signed else "{:.3f}"
        return f"{number.format(self.value)} [{number.format(self.ci_low)}, {number.format(self.ci_high)}]"


@dataclass(frozen=True)
class TopPick:
    """What picking a measure's top-ranked candidate gains over picking one at random, per query averaged:
    the random pick's expected quality is the query's mean over its candidates, and `gain` is the paired
    difference top-1 - random, with its own interval (narrower than the two intervals suggest)."""

    measure: str
    top1: Estimate
    random: Estimate
    gain: Estimate
    queries: int


@dataclass(frozen=True)
class ScoreCorrelation:
    """Spearman's rho between a measure's score (signed so that higher means better-ranked) and quality.

    `pooled`: over every candidate of every query, so it mixes in differences between queries (an image that
    is hard to caption may also be hard to rebuild). `within_query`: the mean of each query's own rho, the
    one a ranking acts on; a query whose candidates all share one quality (or one score) has no rho and is
    left out, and `within_queries` counts those that have one.
    """

    measure: str
    pooled: Estimate
    within_query: Estimate
    within_queries: int
    queries: int


@dataclass(frozen=True)
class ReportFiles:
    csv: Path
    markdown: Path
    plot: Path


@dataclass(frozen=True)
class Bootstrap:
    """How intervals are drawn: how many resamples of the queries, their coverage, and the seed; one seed
    gives the same resamples to every statistic, so differences between them stay paired."""

    samples: int = 1000
    confidence: float = 0.95
    seed: int = 0

    def weights(self, queries: int) -> np.ndarray:
        """[samples, queries] resampling weights: each query's multinomial count in a resample, / queries."""
        rng = np.random.default_rng(self.seed)
        return rng.multinomial(queries, np.full(queries, 1 / queries), size=self.samples) / queries


def _percentile_interval(resampled: np.ndarray, confidence: float) -> tuple[np.ndarray, np.ndarray]:
    """Percentile bootstrap bounds over axis 0 of the resampled statistics."""
    if not 0 < confidence < 1:
        raise ValueError(f"confidence must lie in (0, 1), got {confidence}")
    tail = (1 - confidence) / 2 * 100
    low, high = np.percentile(resampled, [tail, 100 - tail], axis=0)
    return low, high


def _checked(quality: np.ndarray, ranks: np.ndarray, measure: str) -> tuple[np.ndarray, np.ndarray]:
    """quality [Q, N] as floats and ranks [Q, N], each query's ranks a permutation of 0..N-1."""
    quality, ranks = np.asarray(quality, dtype=np.float64), np.asarray(ranks)
    if quality.ndim != 2 or quality.shape != ranks.shape or quality.shape[0] == 0:
        raise ValueError(
            f"quality {quality.shape} and ranks {ranks.shape} must be the same [queries, candidates]"
        )
    if not np.isfinite(quality).all():
        raise ValueError(f"quality values must be finite (measure {measure})")
    if not (np.sort(ranks, axis=1) == np.arange(quality.shape[1])).all():
        raise ValueError(
            f"each query's ranks must be a permutation of 0..{quality.shape[1] - 1} (measure {measure})"
        )
    return quality, ranks


def rank_quality(
    quality: np.ndarray, ranks: np.ndarray, measure: str, bootstrap: Bootstrap = Bootstrap()
) -> list[RankPoint]:
    """Per rank, the mean over queries of the quality [Q, N] of the candidate with that rank [Q, N].

    The interval is the percentile bootstrap over queries: each resample reweights the queries by
    multinomial counts, and every rank's mean uses the same weights.
    """
    quality, ranks = _checked(quality, ranks, measure)
    queries, candidates = quality.shape
    by_rank = np.take_along_axis(quality, np.argsort(ranks, axis=1), axis=1)  # [Q, N], column r = rank r
    low, high = _percentile_interval(bootstrap.weights(queries) @ by_rank, bootstrap.confidence)  # [B, N]
    means = by_rank.mean(axis=0)
    return [
        RankPoint(measure, rank, float(means[rank]), float(low[rank]), float(high[rank]), queries)
        for rank in range(candidates)
    ]


def top_pick(
    quality: np.ndarray, ranks: np.ndarray, measure: str, bootstrap: Bootstrap = Bootstrap()
) -> TopPick:
    """The top-1 candidate's mean quality against a random pick's, and their paired difference."""
    quality, ranks = _checked(quality, ranks, measure)
    top1 = np.take_along_axis(quality, np.argmin(ranks, axis=1)[:, None], axis=1)[:, 0]
    per_query = np.stack([top1, quality.mean(axis=1), top1 - quality.mean(axis=1)], axis=1)  # [Q, 3]
    resampled = bootstrap.weights(len(quality)) @ per_query
    top1_estimate, random, gain = (
        _estimate(float(per_query[:, column].mean()), resampled[:, column], bootstrap.confidence)
        for column in range(3)
    )
    return TopPick(measure, top1_estimate, random, gain, len(quality))


def score_correlation(
    scores: np.ndarray,
    quality: np.ndarray,
    measure: str,
    *,
    higher_is_better: bool,
    bootstrap: Bootstrap = Bootstrap(),
) -> ScoreCorrelation:
    """Spearman's rho (ties get average ranks) of scores [Q, N] with quality [Q, N], pooled and within
    query (see ScoreCorrelation); both intervals resample whole queries, as rank_quality does."""
    scores, quality = np.asarray(scores, dtype=np.float64), np.asarray(quality, dtype=np.float64)
    if scores.shape != quality.shape or scores.ndim != 2 or not np.isfinite(scores).all():
        raise ValueError(f"scores {scores.shape} must be finite and shaped as quality {quality.shape}")
    signed = scores if higher_is_better else -scores
    queries = len(scores)
    weights = bootstrap.weights(queries)
    drawn = np.stack(
        [np.repeat(np.arange(queries), count) for count in np.rint(weights * queries).astype(int)]
    )
    resampled = _spearman_rows(signed[drawn].reshape(len(drawn), -1), quality[drawn].reshape(len(drawn), -1))
    # A resample whose candidates all share one quality (or one score) has no rho: left out.
    pooled = _estimate(
        float(_spearman_rows(signed.reshape(1, -1), quality.reshape(1, -1))[0]),
        resampled[np.isfinite(resampled)],
        bootstrap.confidence,
    )
    rhos = _spearman_rows(signed, quality)
    varies = np.isfinite(rhos)
    kept = weights[:, varies]
    has_rho = kept.sum(axis=1) > 0  # a resample that drew no query with a rho has no mean: left out
    within = _estimate(
        float(rhos[varies].mean()) if varies.any() else math.nan,
        (kept[has_rho] @ rhos[varies]) / kept[has_rho].sum(axis=1),
        bootstrap.confidence,
    )
    return ScoreCorrelation(measure, pooled, within, int(varies.sum()), queries)


def _spearman_rows(first: np.ndarray, second: np.ndarray) -> np.ndarray:
    """Spearman's rho of each row of `first` with the same row of `second` [R, M] -> [R]: the Pearson
    correlation of their ranks (ties averaged, as scipy's spearmanr); NaN where a row is constant."""
    from scipy.stats import rankdata

    first, second = (rankdata(values, axis=1) for values in (first, second))
    first, second = (ranks - ranks.mean(axis=1, keepdims=True) for ranks in (first, second))
    with np.errstate(invalid="ignore", divide="ignore"):
        return (first * second).sum(axis=1) / np.sqrt((first**2).sum(axis=1) * (second**2).sum(axis=1))


def _estimate(value: float, resampled: np.ndarray, confidence: float) -> Estimate:
    if resampled.size == 0:  # no resample defines the statistic
        return Estimate(value, math.nan, math.nan)
    low, high = _percentile_interval(resampled, confidence)
    return Estimate(value, float(low), float(high))


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
    if metric in SHAPES_QUALITY:
        return SHAPES_QUALITY[metric](attribute_hits(rankings))
    if metric == "cider_d":
        return _cider_quality(rankings)
    return _image_similarity_quality(rankings, metric, options)


def attribute_hits(rankings: Sequence[StoredRanking]) -> np.ndarray:
    """[Q, N, 4] booleans: which of shape, colour, size and position each candidate gets right.

    A caption is parsed and judged against the scene its image's references describe; an image is read by
    the oracle and judged against the scene its text describes.
    """
    if rankings and rankings[0].mode == "captions":
        _require_references(rankings, "shapes accuracy")
        readings = [[parse(caption) for caption in ranking.captions] for ranking in rankings]
        scenes = [_scene(ranking.references, ranking.query_id) for ranking in rankings]
    else:
        readings = [[read_scene(load_rgb(image)) for image in ranking.images] for ranking in rankings]
        scenes = [_scene([ranking.query_text], ranking.query_id) for ranking in rankings]
    return np.array(
        [[_hits(reading, scene) for reading in row] for row, scene in zip(readings, scenes, strict=True)],
        dtype=bool,
    ).reshape(len(rankings), -1, len(_ATTRIBUTES))


def _require_references(rankings: Sequence[StoredRanking], metric: str) -> None:
    missing = [ranking.query_id for ranking in rankings if not ranking.references]
    if missing:
        raise ValueError(
            f"{metric} needs reference captions, and queries {missing[:5]} have none: rerank an input that "
            "has captions (a config's data, or an image folder with metadata.jsonl)"
        )


def _cider_quality(rankings: Sequence[StoredRanking]) -> np.ndarray:
    _require_references(rankings, "cider_d")
    scores = per_sample_cider(
        {index: list(ranking.references) for index, ranking in enumerate(rankings)},
        {index: list(ranking.captions) for index, ranking in enumerate(rankings)},
    )
    return np.array([scores[index] for index in range(len(rankings))])


def _image_similarity_quality(
    rankings: Sequence[StoredRanking], metric: str, options: ImageMetricOptions | None
) -> np.ndarray:
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


def _hits(reading: SceneAttributes, scene: Scene) -> list[bool]:
    return [getattr(reading, name) == getattr(scene, name) for name in _ATTRIBUTES]


def write_report(
    points: Sequence[RankPoint],
    out_dir: Path,
    *,
    metric: str,
    title: str,
    random: Estimate | None = None,
) -> ReportFiles:
    """rank_quality.csv, rank_quality.md and rank_quality.png in out_dir (with the random pick's line)."""
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
    plot_rank_quality([RankPanel(metric, points, random)], files.plot, title=title)
    return files


@dataclass(frozen=True)
class RankPanel:
    """One plot panel: per-rank quality of each measure under one metric, and the random pick's line."""

    metric: str
    points: Sequence[RankPoint]
    random: Estimate | None = None


def plot_rank_quality(panels: Sequence[RankPanel], path: Path, *, title: str) -> None:
    """Panels side by side: mean quality by rank with interval bars, the random pick as a band."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, all_axes = plt.subplots(1, len(panels), figsize=(6 * len(panels), 4), squeeze=False)
    for axes, panel in zip(all_axes[0], panels, strict=True):
        measures = list(dict.fromkeys(point.measure for point in panel.points))
        for offset, measure in enumerate(measures):
            series = [point for point in panel.points if point.measure == measure]
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
        if panel.random is not None:
            axes.axhline(panel.random.value, color="grey", linestyle="--", label="random pick")
            axes.axhspan(panel.random.ci_low, panel.random.ci_high, color="grey", alpha=0.2)
        axes.set_xlabel("rank (0 = best)")
        axes.set_ylabel(f"mean {panel.metric}")
        axes.set_xticks(sorted({point.rank for point in panel.points}))
        axes.legend()
    figure.suptitle(title)
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
    bootstrap = Bootstrap(bootstrap_samples, confidence, seed)
    ranks = {
        measure: np.array([ranking.ranks[measure] for ranking in rankings]) for measure in rankings[0].ranks
    }
    points = [
        point
        for measure, order in ranks.items()
        for point in rank_quality(quality, order, measure, bootstrap)
    ]
    primary = rankings[0].primary
    # A random pick does not depend on the ranking: the same under every measure.
    random = top_pick(quality, ranks[primary], primary, bootstrap).random
    mode = rankings[0].mode
    title = f"{'caption' if mode == 'captions' else 'image'} {metric} by rank ({len(rankings)} queries)"
    files = write_report(
        points,
        out_dir or Path(rankings_path).parent / f"report_{metric}",
        metric=metric,
        title=title,
        random=random,
    )
    return points, files
