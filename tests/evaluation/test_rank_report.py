"""Rank-vs-quality report: per-rank means and bootstrap intervals, quality judged per candidate, and the whole
report (CSV, markdown, PNG) on the shapes world with tiny models in both directions."""

from __future__ import annotations

import csv
import math
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from cycletune.data.images import load_pixels, to_tensor
from cycletune.data.shapes import Scene, describe, render
from cycletune.data.sources import shapes
from cycletune.evaluation.candidates import CaptionSampling, generate_images
from cycletune.evaluation.rank_report import Bootstrap, candidate_quality, rank_quality, rank_report
from cycletune.evaluation.ranking import Ranking, RerankSettings, rank_images, rerank_captions
from cycletune.evaluation.rankings_file import RankingWriter, read_rankings
from cycletune.evaluation.similarity import text_similarity_measure
from cycletune.models.sampling_settings import SamplingSettings
from cycletune.train.queries import image_queries, text_queries

SCENE = Scene("circle", "red", "large", "center")
OTHER_COLOUR = Scene("circle", "blue", "large", "center")
FAST = RerankSettings(SamplingSettings(num_beams=2, num_inference_steps=2), score_timesteps=2)


def test_rank_means_follow_the_ranks_and_intervals_bracket_them() -> None:
    quality = np.array([[1.0, 0.0, 0.5], [0.0, 1.0, 0.5], [1.0, 0.2, 0.4]])
    ranks = np.array([[0, 1, 2], [1, 0, 2], [0, 2, 1]])
    points = rank_quality(quality, ranks, "m", Bootstrap(500, seed=1))
    assert [point.rank for point in points] == [0, 1, 2] and all(point.queries == 3 for point in points)
    assert [point.mean for point in points] == pytest.approx([1.0, 0.4 / 3, 0.4])
    assert points[0].ci_low == points[0].ci_high == 1.0  # every query's rank 0 scores 1: no spread
    assert all(point.ci_low <= point.mean <= point.ci_high for point in points)
    assert points[1].ci_high > points[1].ci_low
    assert rank_quality(quality, ranks, "m", Bootstrap(500, seed=1)) == points
    with pytest.raises(ValueError, match=r"permutation of 0\.\.2"):
        rank_quality(quality, np.array([[0, 0, 2], [1, 0, 2], [0, 2, 1]]), "m")
    with pytest.raises(ValueError, match="finite"):
        rank_quality(np.full((1, 2), np.inf), np.array([[0, 1]]), "m")


def _stored(tmp_path: Path, ranking: Ranking) -> Path:
    with RankingWriter(tmp_path, "test") as writer:
        writer.write(ranking)
    return tmp_path / "rankings.jsonl"


def _synthetic(mode: str, captions: list[str], images: torch.Tensor, **fields) -> Ranking:
    count = len(captions)
    return Ranking(
        mode=mode,
        query_id="q",
        captions=captions,
        images=images,
        kinds=["sample"] * count,
        scores={"m": [0.0] * count},
        ranks={"m": list(range(count))},
        higher_is_better={"m": True},
        primary="m",
        **fields,
    )


def _pixels(scene: Scene) -> torch.Tensor:
    return to_tensor(render(scene, 32, seed=0), 32)


def test_caption_quality_reads_each_candidate_against_the_references(tmp_path: Path) -> None:
    captions = [describe(SCENE, 1), describe(OTHER_COLOUR), "nothing at all"]
    ranking = _synthetic(
        "captions",
        captions,
        torch.rand(3, 3, 8, 8),
        query_text=None,
        query_image=torch.rand(3, 8, 8),
        references=[describe(SCENE, 1)],
    )
    stored = read_rankings(_stored(tmp_path / "one", ranking))
    assert candidate_quality(stored, "shapes_accuracy").tolist() == [[1.0, 0.75, 0.0]]
    second = _synthetic(
        "captions",
        [describe(OTHER_COLOUR)] * 3,
        torch.rand(3, 3, 8, 8),
        query_text=None,
        query_image=None,
        references=[describe(OTHER_COLOUR)],
    )
    with RankingWriter(tmp_path / "two", "test") as writer:
        writer.write(ranking)
        writer.write(second)
    cider = candidate_quality(read_rankings(tmp_path / "two" / "rankings.jsonl"), "cider_d")
    assert cider.shape == (2, 3) and cider[0, 0] == pytest.approx(10.0)  # CIDEr-D is scaled by 10
    assert cider[0, 0] > max(cider[0, 1:])
    with pytest.raises(ValueError, match="unknown quality metric 'psnr' for captions"):
        candidate_quality(stored, "psnr")


def test_image_quality_reads_each_candidate_against_the_text_or_its_paired_image(tmp_path: Path) -> None:
    images = torch.stack([_pixels(SCENE), _pixels(OTHER_COLOUR)])
    ranking = _synthetic(
        "images",
        ["", ""],
        images,
        query_text=describe(SCENE, 2),
        query_image=None,
        reference_image=_pixels(SCENE),
    )
    stored = read_rankings(_stored(tmp_path, ranking))
    assert candidate_quality(stored, "shapes_accuracy").tolist() == [[1.0, 0.75]]
    mse = candidate_quality(stored, "mse")
    assert mse[0, 0] == pytest.approx(0.0, abs=1e-6) and mse[0, 1] > 0.01


def _assert_report(points, files, measures: set[str], candidates: int) -> None:
    assert {point.measure for point in points} == measures
    assert all(math.isfinite(value) for p in points for value in (p.mean, p.ci_low, p.ci_high))
    with files.csv.open() as handle:
        rows = list(csv.DictReader(handle))
    assert len(rows) == len(measures) * candidates and rows[0].keys() >= {"measure", "rank", "mean", "ci_low"}
    assert files.markdown.read_text().count("\n| ") == len(rows) + 1  # header + one line per point
    with Image.open(files.plot) as plot:
        assert plot.format == "PNG" and plot.width > 300


def test_report_on_the_shapes_world_with_tiny_models(
    frozen_captioner, frozen_generator, tmp_path: Path
) -> None:
    records, _ = shapes(num_samples=4, seed=5)
    queries = image_queries(records)
    pixels = load_pixels([query.image for query in queries], frozen_generator.resolution)
    rankings = rerank_captions(
        frozen_captioner,
        frozen_generator,
        pixels,
        [query.id for query in queries],
        candidate_sampling=CaptionSampling(num_beams=2, num_samples=2, max_new_tokens=8),
        settings=FAST,
    )
    with RankingWriter(tmp_path / "captions", "captions") as writer:
        for query, ranking in zip(queries, rankings, strict=True):
            ranking.references = list(query.references)
            writer.write(ranking)
    for metric in ("cider_d", "shapes_accuracy"):
        points, files = rank_report(tmp_path / "captions" / "rankings.jsonl", metric, bootstrap_samples=200)
        _assert_report(points, files, {"reconstruction_mse", "denoise_loss"}, candidates=4)
        assert files.plot.parent.name == f"report_{metric}"

    prompts = text_queries(records[:3])
    texts, ids = [query.text for query in prompts], [query.id for query in prompts]
    images = generate_images(
        frozen_generator,
        texts,
        ids,
        num_images=3,
        seed=FAST.sampling.seed,
        num_inference_steps=FAST.sampling.num_inference_steps,
        guidance_scale=FAST.sampling.guidance_scale,
    )
    rankings = rank_images(
        frozen_captioner, texts, ids, images, similarity=text_similarity_measure("token_f1"), settings=FAST
    )
    with RankingWriter(tmp_path / "images", "images") as writer:
        for query, ranking in zip(prompts, rankings, strict=True):
            ranking.reference_image = load_pixels([query.image], frozen_generator.resolution)[0]
            writer.write(ranking)
    for metric in ("shapes_accuracy", "ssim"):
        points, files = rank_report(
            tmp_path / "images" / "rankings.jsonl", metric, tmp_path / metric, bootstrap_samples=200
        )
        _assert_report(points, files, {"recaption_token_f1", "caption_nll"}, candidates=3)
