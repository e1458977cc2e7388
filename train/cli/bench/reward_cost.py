"""The cost of reward scoring: likelihood scores (what I2T2I reward uses) vs sampling + image similarity."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from cycletune.models.generator import Generator
from cycletune.models.sampling_settings import SamplingSettings
from cycletune.train.cli.bench.measure import timed
from cycletune.train.cli.bench.stats_ratios import mean_spearman, median
from cycletune.train.cli.reward_agreement import likelihood as likelihood_scores
from cycletune.train.cli.reward_agreement import sampled_similarity, shapes_candidates


def reward_cost(
    generator_dir: Path,
    resolution: int,
    *,
    images: int = 4,
    candidates: int = 8,
    score_timesteps: int = 4,
    sampling_steps: int = SamplingSettings.num_inference_steps,
    guidance_scale: float = SamplingSettings.guidance_scale,
    repeats: int = 3,
    seed: int = 0,
) -> dict[str, Any]:
    """Likelihood scoring (models/scoring.caption_scores, what I2T2I reward uses) vs sampling an image per
    candidate and scoring its similarity to the real image (negative pixel MSE, i.e. PSNR order), on the same
    candidates: the time of each and the mean per-image Spearman correlation of their rankings.

    Candidates of image i: its own shapes-world caption and candidates - 1 captions of other scenes. Both
    scorers use common random numbers per image (the same noise for all its candidates).
    """
    generator = Generator.from_pretrained(str(generator_dir), resolution=resolution)
    generator.requires_grad_(False)
    found = shapes_candidates(images, candidates, seed=seed, resolution=resolution)

    def likelihood() -> torch.Tensor:
        return likelihood_scores(
            generator, found, num_timesteps=score_timesteps, timestep_range="all", noise="shared", seed=seed
        )

    def sampled() -> torch.Tensor:
        return sampled_similarity(
            generator, found, seed=seed, steps=sampling_steps, guidance_scale=guidance_scale
        )

    results: dict[str, Any] = {}
    for name, scorer in (("likelihood", likelihood), ("sampling", sampled)):
        scores = scorer()  # warm-up, and the scores compared below
        seconds = [timed(scorer, "cpu") for _ in range(repeats)]
        results[name] = {"median_ms": 1000 * median(seconds), "scores": scores.tolist()}
    results["speed_ratio"] = results["sampling"]["median_ms"] / results["likelihood"]["median_ms"]
    results["spearman"] = mean_spearman(results["likelihood"]["scores"], results["sampling"]["scores"])
    own_first = [group.index(max(group)) == 0 for group in results["likelihood"]["scores"]]
    results["likelihood_top1_is_true_caption"] = sum(own_first) / len(own_first)
    results["setup"] = {
        "generator": str(generator_dir),
        "images": images,
        "candidates": candidates,
        "score_timesteps": score_timesteps,
        "sampling_steps": sampling_steps,
        "guidance_scale": guidance_scale,
    }
    return results
