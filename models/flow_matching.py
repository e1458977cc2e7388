"""The rectified-flow objective of the transformer families (SD3, Flux), as diffusers' SD3/Flux LoRA trainers
define it: x_t = (1 - s) x0 + s noise, the model predicts the velocity noise - x0, and sampling walks
FlowMatchEulerDiscreteScheduler's Euler steps from s = 1 to s = 0.

Timesteps are the floats s * num_train_timesteps the schedule lists (Flux's transformer wants them divided by
1000 again; that is its caller's business). Training draws positions of the checkpoint's training schedule,
which already carries the family's shift: SD3's static `shift` bends it towards noise, while Flux's
(use_dynamic_shifting) is the plain linear one, because its shift depends on the image size and is applied
only when sampling.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch
from diffusers import FlowMatchEulerDiscreteScheduler
from diffusers.pipelines.flux.pipeline_flux import calculate_shift
from diffusers.training_utils import compute_density_for_timestep_sampling, compute_loss_weighting_for_sd3

from cycletune.models.device_transfer import to_device
from cycletune.models.randomness import DrawKey

WEIGHTING_SCHEMES = ("logit_normal", "mode", "cosmap", "sigma_sqrt", "none")


class FlowMatchingProcess:
    """models/noise_process.NoiseProcess on a FlowMatchEulerDiscreteScheduler.

    `weighting_scheme`, `logit_mean`, `logit_std`, `mode_scale` are the diffusers trainers' flags, with their
    meaning: "logit_normal" and "mode" shape the timestep density, "cosmap" and "sigma_sqrt" weight the loss
    (over uniform draws), "none" does neither. `patch_size` is how many latent cells per side one transformer
    token covers (Flux packs 2x2 cells: 2; SD3: its transformer's patch_size); Flux's sampling shift grows
    with the resulting token count.
    """

    def __init__(
        self,
        scheduler: FlowMatchEulerDiscreteScheduler,
        *,
        patch_size: int,
        weighting_scheme: str = "none",
        logit_mean: float = 0.0,
        logit_std: float = 1.0,
        mode_scale: float = 1.29,
    ) -> None:
        if weighting_scheme not in WEIGHTING_SCHEMES:
            raise ValueError(f"weighting_scheme {weighting_scheme!r} is not one of {WEIGHTING_SCHEMES}")
        self.config = scheduler.config
        self.patch_size = patch_size
        self.weighting_scheme = weighting_scheme
        self.logit_mean = logit_mean
        self.logit_std = logit_std
        self.mode_scale = mode_scale
        # From a fresh copy: a pipeline's scheduler that has sampled holds its inference timesteps instead.
        self.train_timesteps = FlowMatchEulerDiscreteScheduler.from_config(self.config).timesteps

    @property
    def num_train_timesteps(self) -> int:
        return self.config.num_train_timesteps

    @property
    def prediction_type(self) -> str:
        return "flow_matching"

    def draw_timesteps(
        self,
        key: DrawKey,
        ids: Sequence[str],
        purpose: str,
        device: torch.device | str,
        *,
        below: int | None = None,
    ) -> torch.Tensor:
        """u in [0, 1) from the weighting scheme's density per sample, mapped to a schedule position as the
        trainers do (index = floor(u * length)).

        `below` narrows the positions to those whose timestep is < below (a tail of the descending schedule)
        and maps u onto that tail the same way, so the density keeps its shape over the allowed positions and
        each sample still costs one draw.
        """
        first = 0 if below is None else int((self.train_timesteps >= below).sum())
        allowed = len(self.train_timesteps) - first
        if allowed == 0:
            raise ValueError(f"no training timestep is below {below} (smallest: {self.train_timesteps[-1]})")
        u = torch.cat(
            [
                compute_density_for_timestep_sampling(
                    self.weighting_scheme,
                    batch_size=1,
                    logit_mean=self.logit_mean,
                    logit_std=self.logit_std,
                    mode_scale=self.mode_scale,
                    generator=generator,
                )
                for generator in key.generators(ids, purpose)
            ]
        )
        # u may round to exactly 1 ("mode" maps a draw of 0 there), which would index past the end.
        indices = first + (u * allowed).long().clamp(max=allowed - 1)
        return to_device(self.train_timesteps[indices], device)

    def timesteps_at(self, fractions: torch.Tensor) -> torch.Tensor:
        ascending = self.train_timesteps.flip(0).to(fractions.device)
        return ascending[(fractions * len(ascending)).long().clamp(max=len(ascending) - 1)]

    def pure_noise_timesteps(self, batch_size: int, device: torch.device | str) -> torch.Tensor:
        return torch.full((batch_size,), self.train_timesteps[0].item(), device=device)

    def _sigmas(self, timesteps: torch.Tensor, ndim: int = 1) -> torch.Tensor:
        """s = t / num_train_timesteps in float32, shaped [B, 1, ...] to broadcast over `ndim`-dim latents."""
        sigmas = timesteps.float() / self.num_train_timesteps
        return sigmas.view(-1, *([1] * (ndim - 1)))

    def add_noise(self, latents: torch.Tensor, noise: torch.Tensor, timesteps: torch.Tensor) -> torch.Tensor:
        sigmas = self._sigmas(timesteps, latents.ndim).to(latents.dtype)
        return (1 - sigmas) * latents + sigmas * noise

    def target(self, latents: torch.Tensor, noise: torch.Tensor, timesteps: torch.Tensor) -> torch.Tensor:
        return noise - latents

    def predict_x0(
        self, noisy: torch.Tensor, timesteps: torch.Tensor, prediction: torch.Tensor
    ) -> torch.Tensor:
        """x_t - s * v: one Euler step from s straight to 0; in at least float32 (float64 stays float64)."""
        dtype = torch.promote_types(torch.promote_types(noisy.dtype, prediction.dtype), torch.float32)
        sigmas = self._sigmas(timesteps, noisy.ndim).to(dtype)
        return noisy.to(dtype) - sigmas * prediction.to(dtype)

    def loss_weights(self, timesteps: torch.Tensor, snr_gamma: float | None) -> torch.Tensor:
        """The library's weighting of the scheme; ones for the schemes that only shape the density ("none",
        "logit_normal", "mode"), which leaves the mean unweighted."""
        if snr_gamma is not None:
            raise ValueError(
                "generator.snr_gamma (Min-SNR) weights the DDPM objective; flow-matching generators weight "
                "their loss with weighting_scheme instead: unset generator.snr_gamma"
            )
        return compute_loss_weighting_for_sd3(self.weighting_scheme, self._sigmas(timesteps))

    def sampler(
        self, num_inference_steps: int, latent_shape: Sequence[int], device: torch.device | str
    ) -> FlowMatchEulerDiscreteScheduler:
        """Fresh per call (set_timesteps mutates it), with the timesteps the family's pipeline sets.

        Dynamic shifting (Flux) shifts linspace(1, 1/n, n) by mu, which grows linearly with the latent's token
        count between the config's base and max sequence lengths: bigger images spend more steps at high
        noise. Otherwise (SD3) the config's static shift applies to the default schedule.
        """
        scheduler = FlowMatchEulerDiscreteScheduler.from_config(self.config)
        if not self.config.use_dynamic_shifting:
            scheduler.set_timesteps(num_inference_steps, device=device)
            return scheduler
        height, width = latent_shape[-2:]
        image_seq_len = (height // self.patch_size) * (width // self.patch_size)
        mu = calculate_shift(
            image_seq_len,
            self.config.base_image_seq_len,
            self.config.max_image_seq_len,
            self.config.base_shift,
            self.config.max_shift,
        )
        sigmas = np.linspace(1.0, 1 / num_inference_steps, num_inference_steps)
        scheduler.set_timesteps(sigmas=sigmas, device=device, mu=mu)
        return scheduler
