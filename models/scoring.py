"""How well a caption explains an image, judged by a frozen generator: its denoising loss on the image.

One scoring function serves reward training (losses/i2t2i.py), evaluation reranking and benchmarks, so they
all rank captions the same way. Scores use common random numbers: every candidate caption of an image is
judged on the same VAE sample, noise and timesteps, so their differences come from the captions alone, not
from the noise (which varies far more than the caption effect at any one timestep).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch

from cycletune.models.generator import Generator
from cycletune.models.randomness import DrawKey


@dataclass(frozen=True)
class DenoiseDraws:
    """Per-image randomness of a denoising loss averaged over several noise draws.

    noise [B, N, *latent], timesteps [B, N] (long), vae_noise [B, *latent].
    """

    noise: torch.Tensor
    timesteps: torch.Tensor
    vae_noise: torch.Tensor

    @classmethod
    def draw(
        cls,
        generator: Generator,
        key: DrawKey,
        ids: Sequence[str],
        purpose: str,
        num_timesteps: int,
        device: torch.device | str = "cpu",
        timestep_range: tuple[float, float] = (0.0, 1.0),
    ) -> DenoiseDraws:
        """N draws per image from `key`; timesteps stratified: draw j lies in the j-th of N equal slices of
        `timestep_range` (fractions of the schedule, 0 the cleanest step).

        Stratifying spreads the few draws over the schedule (a plain uniform pair can land both near t=0,
        where every caption scores alike), which lowers the variance of their mean.
        """
        if num_timesteps < 1:
            raise ValueError(f"num_timesteps must be at least 1, got {num_timesteps}")
        low, high = timestep_range
        if not 0.0 <= low < high <= 1.0:
            raise ValueError(f"timestep_range must satisfy 0 <= low < high <= 1, got {timestep_range}")
        latent_shape = generator.latent_shape(1)[1:]
        offsets = torch.stack(
            [torch.rand(num_timesteps, generator=g) for g in key.generators(ids, f"{purpose}/t")]
        )
        strata = torch.arange(num_timesteps)
        timesteps = generator.process.timesteps_at(low + (high - low) * (strata + offsets) / num_timesteps)
        return cls(
            noise=key.randn(ids, f"{purpose}/noise", (num_timesteps, *latent_shape), device),
            timesteps=timesteps.to(device),
            vae_noise=key.randn(ids, f"{purpose}/vae_noise", latent_shape, device),
        )


def grouped_denoise_loss(
    generator: Generator,
    latents: torch.Tensor,
    contexts: torch.Tensor,
    draws: DenoiseDraws,
    *,
    max_rows: int | None = None,
) -> torch.Tensor:
    """Denoising loss [B, G] of each image's latents under each of its G text contexts, averaged over draws.

    contexts [B * G, T, D] holds image i's G contexts consecutively. All G contexts of an image share its
    noise and timesteps (common random numbers). The B * G * N rows go through the UNet in one batch, or in
    chunks of at most max_rows to bound memory; differentiable unless the caller disables grad.
    """
    batch, draws_per_image = draws.timesteps.shape
    if latents.shape[0] != batch or contexts.shape[0] % batch:
        raise ValueError(
            f"{latents.shape[0]} latents and {contexts.shape[0]} contexts do not match {batch} images' draws"
        )
    groups = contexts.shape[0] // batch
    rows = (batch, groups, draws_per_image)
    row_latents = latents[:, None, None].expand(*rows, *latents.shape[1:]).flatten(0, 2)
    row_noise = draws.noise[:, None].expand(*rows, *draws.noise.shape[2:]).flatten(0, 2)
    row_timesteps = draws.timesteps[:, None].expand(*rows).flatten()
    row_contexts = contexts.view(batch, groups, 1, *contexts.shape[1:]).expand(*rows, *contexts.shape[1:])
    row_contexts = row_contexts.flatten(0, 2)
    chunk = max_rows or row_latents.shape[0]
    losses = [
        generator.denoise(
            row_latents[start : start + chunk],
            row_contexts[start : start + chunk],
            noise=row_noise[start : start + chunk],
            timesteps=row_timesteps[start : start + chunk],
        ).loss
        for start in range(0, row_latents.shape[0], chunk)
    ]
    return torch.cat(losses).view(rows).mean(dim=2)


@torch.no_grad()
def caption_scores(
    generator: Generator,
    pixels01: torch.Tensor,
    candidates: Sequence[Sequence[str]],
    *,
    key: DrawKey,
    ids: Sequence[str],
    num_timesteps: int = 4,
    purpose: str = "caption_scores",
    max_rows: int | None = None,
    timestep_range: tuple[float, float] = (0.0, 1.0),
) -> torch.Tensor:
    """The generator's denoising loss [B, K] of each image given each of its K candidate captions.

    Lower is better. `ids` name the images for `key` (any distinct strings, e.g. dataset ids), so an image's
    scores do not depend on which batch it is scored in. Each image is encoded once and each caption once;
    the UNet sees all B * K * num_timesteps rows in one batch (or chunks of max_rows). `timestep_range`: the
    share of the schedule the draws are spread over (DenoiseDraws.draw).
    """
    batch = pixels01.shape[0]
    if len(candidates) != batch or len(ids) != batch:
        raise ValueError(
            f"{batch} images need {batch} candidate lists and ids, got {len(candidates)} and {len(ids)}"
        )
    per_image = len(candidates[0])
    for index, group in enumerate(candidates):
        if len(group) != per_image or not group:
            raise ValueError(
                f"candidates[{index}] has {len(group)} captions; every image needs the same number (>= 1), "
                f"candidates[0] has {per_image}"
            )
        if not all(isinstance(caption, str) for caption in group):
            raise ValueError(f"candidates[{index}] holds a non-string caption: {list(group)!r}")
    draws = DenoiseDraws.draw(generator, key, ids, purpose, num_timesteps, pixels01.device, timestep_range)
    latents = generator.encode_images(pixels01, draws.vae_noise)
    contexts = generator.encode_text(
        generator.tokenize([caption for group in candidates for caption in group])
    )
    return grouped_denoise_loss(generator, latents, contexts, draws, max_rows=max_rows)
