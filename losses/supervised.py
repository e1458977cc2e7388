"""Supervised terms on paired data: caption cross-entropy (captioner) and denoising loss (generator).

Each function takes the plain (unwrapped) model; the trainer runs the whole phase computation inside the
DDP wrapper's forward (models/forward_routing.py). Each returns a dict of named, already-weighted scalar
terms, so trackers show every term by name.
"""

from __future__ import annotations

from typing import Any, NamedTuple

import torch
from pydantic import Field

from cycletune.losses.settings import Strict
from cycletune.models.captioner import Captioner
from cycletune.models.device_transfer import to_device
from cycletune.models.generator import DenoiseOutput, Generator
from cycletune.models.randomness import DrawKey

Batch = dict[str, Any]


class CaptionLossSettings(Strict):
    """What the caption cross-entropy reads (the run's captioner section carries these keys)."""

    label_smoothing: float = Field(0.0, ge=0, lt=1)
    caption_loss_weight: float = Field(1.0, ge=0)


class DenoiseLossSettings(Strict):
    """What the denoising loss reads (the run's generator section carries these keys)."""

    snr_gamma: float | None = Field(None, gt=0)
    noise_offset: float = Field(0.0, ge=0)
    # Share of captions replaced by "" so the generator learns the unconditional branch of CFG.
    caption_dropout: float = Field(0.1, ge=0, le=1)
    denoise_loss_weight: float = Field(1.0, ge=0)


def caption_terms(
    captioner: Captioner, batch: Batch, settings: CaptionLossSettings
) -> dict[str, torch.Tensor]:
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


class DenoisePass(NamedTuple):
    """The denoising term and the UNet call behind it, which a one-step cycle term may decode instead of
    making a second call (cycle.t2i2t.share_denoise_pass)."""

    terms: dict[str, torch.Tensor]
    output: DenoiseOutput
    timesteps: torch.Tensor
    # [B] bool: the UNet saw the sample's caption (caption dropout did not blank it).
    captioned: torch.Tensor


def denoise_terms(
    generator: Generator, batch: Batch, settings: DenoiseLossSettings, key: DrawKey
) -> dict[str, torch.Tensor]:
    """The standard diffusion objective on the pair, with per-sample noise, timesteps and caption dropout."""
    return denoise_pass(generator, batch, settings, key).terms


def denoise_pass(
    generator: Generator, batch: Batch, settings: DenoiseLossSettings, key: DrawKey
) -> DenoisePass:
    """`denoise_terms` with its UNet call kept.

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
    vae_noise = key.randn(ids, "vae_noise", latent_shape, pixels.device)
    timesteps = generator.process.draw_timesteps(key, ids, "timestep", pixels.device)
    output = generator.denoise(
        generator.data_latents(pixels, vae_noise, ids),
        generator.encode_captions(captions),
        noise=noise,
        timesteps=timesteps,
        snr_gamma=settings.snr_gamma,
    )
    captioned = to_device(torch.tensor([caption != "" for caption in captions]), pixels.device)
    terms = {"denoise": settings.denoise_loss_weight * output.loss.mean()}
    return DenoisePass(terms, output, timesteps, captioned)
