"""Supervised terms on paired data: caption cross-entropy (captioner) and denoising loss (generator).

Each function takes the plain (unwrapped) model; the trainer runs the whole phase computation inside the
DDP wrapper's forward (models/computation.py). Each returns a dict of named, already-weighted scalar
terms, so trackers show every term by name.
"""

from __future__ import annotations

from typing import Any

import torch

from losses.randomness import DrawKey
from models.captioner import Captioner
from models.generator import Generator
from train.config import CaptionerSettings, GeneratorSettings

Batch = dict[str, Any]


def caption_terms(captioner: Captioner, batch: Batch, settings: CaptionerSettings) -> dict[str, torch.Tensor]:
    """Teacher-forced caption cross-entropy, mean over samples of each sample's mean token loss."""
    tokens = captioner.tokenize(batch["captions"])
    per_sample = captioner.caption_loss(batch["pixels"], **tokens, label_smoothing=settings.label_smoothing)
    return {"caption_ce": settings.caption_loss_weight * per_sample.mean()}


def drop_captions(captions: list[str], ids: list[str], probability: float, key: DrawKey) -> list[str]:
    """Replace a per-sample-random share of captions with "" (the unconditional branch of CFG)."""
    if probability <= 0:
        return captions
    keep = key.rand(ids, "caption_dropout") >= probability
    return [caption if kept else "" for caption, kept in zip(captions, keep.tolist(), strict=True)]


def denoise_terms(
    generator: Generator, batch: Batch, settings: GeneratorSettings, key: DrawKey
) -> dict[str, torch.Tensor]:
    """The standard diffusion objective on the pair, with per-sample noise, timesteps and caption dropout.

    The frozen encoders' outputs come from the generator's encoder cache when one is attached
    (models/cache.py); the draws are the same either way.
    """
    ids, pixels = batch["ids"], batch["pixels"]
    captions = drop_captions(batch["captions"], ids, settings.caption_dropout, key)
    latent_shape = generator.latent_shape(1)[1:]
    noise = key.randn(ids, "noise", latent_shape, pixels.device)
    if settings.noise_offset > 0:
        offset = key.randn(ids, "noise_offset", (latent_shape[0], 1, 1), pixels.device)
        noise = noise + settings.noise_offset * offset
    num_timesteps = generator.noise_scheduler.config.num_train_timesteps
    vae_noise = key.randn(ids, "vae_noise", latent_shape, pixels.device)
    per_sample = generator.latent_denoise_loss(
        generator.data_latents(pixels, vae_noise, ids),
        generator.encode_captions(captions),
        noise=noise,
        timesteps=key.randint(ids, "timestep", num_timesteps, pixels.device),
        snr_gamma=settings.snr_gamma,
    )
    return {"denoise": settings.denoise_loss_weight * per_sample.mean()}
