"""The DDPM objective of the UNet families (SD 1.x/2.x, SDXL): epsilon- or v-prediction on a discrete
1000-step schedule, as diffusers' text-to-image trainers define it, and the DDIM sampler every loop runs."""

from __future__ import annotations

from collections.abc import Sequence

import torch
from diffusers import DDIMScheduler, DDPMScheduler
from diffusers.training_utils import compute_snr

from cycletune.models.randomness import DrawKey

PREDICTION_TYPES = ("epsilon", "v_prediction")


class DDPMProcess:
    """models/noise_process.NoiseProcess on a DDPMScheduler (the forward process training draws from)."""

    def __init__(self, scheduler: DDPMScheduler, *, pixel_space: bool = False) -> None:
        """`pixel_space`: the model denoises RGB pixels in [-1, 1] (no VAE), so sampling clips each x0
        estimate there."""
        if scheduler.config.prediction_type not in PREDICTION_TYPES:
            raise ValueError(
                f"scheduler prediction_type {scheduler.config.prediction_type!r} is not one of {PREDICTION_TYPES}"
            )
        self.scheduler = scheduler
        self.pixel_space = pixel_space

    @classmethod
    def from_pretrained(
        cls, name_or_path: str, *, revision: str | None, prediction_type: str | None, pixel_space: bool
    ) -> DDPMProcess:
        """Whatever sampler the checkpoint ships (PNDM for SD 1.x, Euler for SDXL), training needs the DDPM
        forward process: read from the same scheduler config, with any prediction_type override."""
        if prediction_type is not None and prediction_type not in PREDICTION_TYPES:
            raise ValueError(f"prediction_type {prediction_type!r} is not one of {PREDICTION_TYPES}")
        overrides = {} if prediction_type is None else {"prediction_type": prediction_type}
        scheduler = DDPMScheduler.from_pretrained(
            name_or_path, subfolder="scheduler", revision=revision, **overrides
        )
        return cls(scheduler, pixel_space=pixel_space)

    @property
    def num_train_timesteps(self) -> int:
        return self.scheduler.config.num_train_timesteps

    @property
    def prediction_type(self) -> str:
        return self.scheduler.config.prediction_type

    def draw_timesteps(
        self,
        key: DrawKey,
        ids: Sequence[str],
        purpose: str,
        device: torch.device | str,
        *,
        below: int | None = None,
    ) -> torch.Tensor:
        """Uniform integers in [0, below or num_train_timesteps), as diffusers' trainers draw them."""
        return key.randint(ids, purpose, below or self.num_train_timesteps, device)

    def timesteps_at(self, fractions: torch.Tensor) -> torch.Tensor:
        length = self.num_train_timesteps
        return (fractions * length).long().clamp(max=length - 1)

    def pure_noise_timesteps(self, batch_size: int, device: torch.device | str) -> torch.Tensor:
        return torch.full((batch_size,), self.num_train_timesteps - 1, device=device, dtype=torch.long)

    def add_noise(self, latents: torch.Tensor, noise: torch.Tensor, timesteps: torch.Tensor) -> torch.Tensor:
        return self.scheduler.add_noise(latents, noise, timesteps)

    def target(self, latents: torch.Tensor, noise: torch.Tensor, timesteps: torch.Tensor) -> torch.Tensor:
        if self.prediction_type == "epsilon":
            return noise
        return self.scheduler.get_velocity(latents, noise, timesteps)

    def predict_x0(
        self, noisy: torch.Tensor, timesteps: torch.Tensor, prediction: torch.Tensor
    ) -> torch.Tensor:
        """Inverts add_noise given the prediction; in at least float32 (float64 stays float64, for gradcheck)."""
        timesteps = timesteps.to(self.scheduler.alphas_cumprod.device)
        dtype = torch.promote_types(torch.promote_types(noisy.dtype, prediction.dtype), torch.float32)
        alpha_bar = self.scheduler.alphas_cumprod[timesteps].to(noisy.device, dtype)
        alpha_bar = alpha_bar.view(-1, *([1] * (noisy.ndim - 1)))
        noisy, prediction = noisy.to(dtype), prediction.to(dtype)
        if self.prediction_type == "epsilon":
            return (noisy - (1 - alpha_bar).sqrt() * prediction) / alpha_bar.sqrt()
        return alpha_bar.sqrt() * noisy - (1 - alpha_bar).sqrt() * prediction

    def loss_weights(self, timesteps: torch.Tensor, snr_gamma: float | None) -> torch.Tensor | None:
        """Min-SNR-gamma (Hang et al. 2023) in the form of diffusers' trainers, or None without snr_gamma.

        epsilon: min(snr, gamma) / snr, written as min(gamma / snr, 1) so a zero-terminal-SNR step gives 1
        instead of 0/0; v-prediction: min(snr, gamma) / (snr + 1).
        """
        if snr_gamma is None:
            return None
        snr = compute_snr(self.scheduler, timesteps)
        if self.prediction_type == "epsilon":
            return (snr_gamma / snr).clamp(max=1.0)
        return snr.clamp(max=snr_gamma) / (snr + 1)

    def sampler(
        self, num_inference_steps: int, latent_shape: Sequence[int], device: torch.device | str
    ) -> DDIMScheduler:
        """DDIM (eta 0 unless a caller's step says otherwise), fresh per call since set_timesteps mutates it.

        Pixel-space samples live in [-1, 1], so each step's x0 estimate is clipped there (as in DDPM), which
        keeps an imperfect model's samples from saturating. StableDiffusionPipeline rewrites clip_sample to
        False in saved configs, hence set here; latent models keep their config's value.
        """
        pixel_space = {"clip_sample": True} if self.pixel_space else {}
        scheduler = DDIMScheduler.from_config(self.scheduler.config, **pixel_space)
        scheduler.set_timesteps(num_inference_steps, device=device)
        return scheduler
