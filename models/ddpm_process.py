"""The DDPM objective of the UNet families (SD 1.x/2.x, SDXL): epsilon- or v-prediction on a discrete
1000-step schedule, as diffusers' text-to-image trainers define it, and the DDIM sampler every loop runs."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
from diffusers import DDIMScheduler, DDPMScheduler
from diffusers.training_utils import compute_snr

from cycletune.models.device_transfer import to_device
from cycletune.models.randomness import DrawKey

PREDICTION_TYPES = ("epsilon", "v_prediction")
TIMESTEP_BIAS_STRATEGIES = ("none", "earlier", "later", "range")


@dataclass(frozen=True)
class TimestepBias:
    """Draw some training timesteps more often than others, as diffusers' SDXL trainer's --timestep_bias_*
    flags do: `multiplier` times the weight on the first (`earlier`) or last (`later`) `portion` of the
    schedule, or on [begin, end) (`range`).

    `later` favours the noisiest steps, the only ones where a sample's layout is still open: there the
    caption alone must say where things go (Min-SNR weighting, by contrast, all but removes them).
    """

    strategy: str = "none"
    multiplier: float = 1.0
    begin: int = 0
    end: int = 1000
    portion: float = 0.25

    def weights(self, num_train_timesteps: int) -> torch.Tensor | None:
        """Unnormalised sampling weight per timestep; None for the plain uniform draw."""
        if self.strategy not in TIMESTEP_BIAS_STRATEGIES:
            raise ValueError(
                f"timestep_bias_strategy {self.strategy!r} is not one of {TIMESTEP_BIAS_STRATEGIES}"
            )
        if self.strategy == "none":
            return None
        if self.multiplier <= 0:
            raise ValueError(f"timestep_bias_multiplier must be > 0, got {self.multiplier}")
        if self.strategy == "range":
            if not 0 <= self.begin < self.end <= num_train_timesteps:
                raise ValueError(
                    f"timestep_bias_begin={self.begin}, timestep_bias_end={self.end}: need "
                    f"0 <= begin < end <= {num_train_timesteps} (the scheduler's num_train_timesteps)"
                )
            biased = slice(self.begin, self.end)
        else:
            count = int(self.portion * num_train_timesteps)
            if not 0 < count <= num_train_timesteps:
                raise ValueError(
                    f"timestep_bias_portion={self.portion} selects {count} of {num_train_timesteps} timesteps"
                )
            biased = (
                slice(0, count) if self.strategy == "earlier" else slice(num_train_timesteps - count, None)
            )
        weights = torch.ones(num_train_timesteps, dtype=torch.float64)
        weights[biased] *= self.multiplier
        return weights


class DDPMProcess:
    """models/noise_process.NoiseProcess on a DDPMScheduler (the forward process training draws from)."""

    def __init__(
        self,
        scheduler: DDPMScheduler,
        *,
        pixel_space: bool = False,
        timestep_bias: TimestepBias = TimestepBias(),
    ) -> None:
        """`pixel_space`: the model denoises RGB pixels in [-1, 1] (no VAE), so sampling clips each x0
        estimate there. `timestep_bias`: which training timesteps to draw more often (uniform by default)."""
        if scheduler.config.prediction_type not in PREDICTION_TYPES:
            raise ValueError(
                f"scheduler prediction_type {scheduler.config.prediction_type!r} is not one of {PREDICTION_TYPES}"
            )
        self.scheduler = scheduler
        self.pixel_space = pixel_space
        self.timestep_weights = timestep_bias.weights(scheduler.config.num_train_timesteps)

    @classmethod
    def from_pretrained(
        cls,
        name_or_path: str,
        *,
        revision: str | None,
        prediction_type: str | None,
        pixel_space: bool,
        timestep_bias: TimestepBias = TimestepBias(),
    ) -> DDPMProcess:
        """Whatever sampler the checkpoint ships (PNDM for SD 1.x, Euler for SDXL), training needs the DDPM
        forward process: read from the same scheduler config, with any prediction_type override."""
        if prediction_type is not None and prediction_type not in PREDICTION_TYPES:
            raise ValueError(f"prediction_type {prediction_type!r} is not one of {PREDICTION_TYPES}")
        overrides = {} if prediction_type is None else {"prediction_type": prediction_type}
        scheduler = DDPMScheduler.from_pretrained(
            name_or_path, subfolder="scheduler", revision=revision, **overrides
        )
        return cls(scheduler, pixel_space=pixel_space, timestep_bias=timestep_bias)

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
        """Integers in [0, below or num_train_timesteps): uniform, as diffusers' trainers draw them, or by the
        timestep bias's weights (restricted to the allowed range)."""
        high = below or self.num_train_timesteps
        if self.timestep_weights is None:
            return key.randint(ids, purpose, high, device)
        weights = self.timestep_weights[:high]
        draws = [
            torch.multinomial(weights, 1, generator=generator)[0]
            for generator in key.generators(ids, purpose)
        ]
        return to_device(torch.stack(draws), device)

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
