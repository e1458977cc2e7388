"""The cost of reward scoring: likelihood scores (what I2T2I reward uses) vs sampling + image similarity."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from cycletune.data.sources import shapes as shapes_source
from cycletune.data.streams import Stream
from cycletune.models.generator import Generator
from cycletune.models.randomness import DrawKey
from cycletune.models.sampling_settings import SamplingSettings
from cycletune.models.scoring import caption_scores
from cycletune.train.cli.bench.measure import timed
from cycletune.train.cli.bench.stats_ratios import mean_spearman, median


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
    records, _ = shapes_source(num_samples=images * candidates, seed=seed, resolution=resolution)
    batch = Stream(records, batch_size=len(records), seed=seed, resolution=resolution).next()
    pixels, ids = batch["pixels"][:images], batch["ids"][:images]
    others = batch["captions"][images:]
    groups = [
        [batch["captions"][i], *others[i * (candidates - 1) : (i + 1) * (candidates - 1)]]
        for i in range(images)
    ]
    flat = [caption for group in groups for caption in group]
    initial = torch.randn(
        images, *generator.latent_shape(1)[1:], generator=torch.Generator().manual_seed(seed)
    )
    initial = initial.repeat_interleave(candidates, dim=0)

    def likelihood() -> torch.Tensor:
        scores = caption_scores(
            generator, pixels, groups, key=DrawKey(seed, 0), ids=ids, num_timesteps=score_timesteps
        )
        return -scores  # higher is better

    def sampled() -> torch.Tensor:
        made = generator.sample(
            flat, num_inference_steps=sampling_steps, guidance_scale=guidance_scale, latents=initial
        )
        references = pixels.repeat_interleave(candidates, dim=0)
        return -((made - references) ** 2).mean(dim=(1, 2, 3)).view(images, candidates)

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
