"""What a generator family's training objective is: how it noises latents, what its denoiser predicts, how
a prediction turns back into clean latents, and which sampler walks its schedule.

Two processes cover the families: DDPM (SD 1.x/2.x, SDXL: epsilon or v-prediction on a discrete schedule,
models/ddpm_process.py) and rectified flow (SD3, Flux: x_t = (1 - s) x0 + s noise, the model predicts
noise - x0, models/flow_matching.py). The losses, the cycle terms and the samplers call only this protocol,
so each family's formulas live in one place.

A timestep is the value the denoiser is called with, per sample [B]: an integer in [0, num_train_timesteps)
for DDPM, a float s * num_train_timesteps for flow matching. Larger means noisier for both.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Protocol

import torch
from diffusers import SchedulerMixin

from cycletune.models.randomness import DrawKey


class NoiseProcess(Protocol):
    """The training objective and sampler of one generator family (see the module docstring)."""

    @property
    def num_train_timesteps(self) -> int:
        """Length of the training schedule (1000 for every released family)."""
        ...

    @property
    def prediction_type(self) -> str:
        """ "epsilon", "v_prediction" (DDPM) or "flow_matching": for logs, errors and model cards."""
        ...

    def draw_timesteps(
        self,
        key: DrawKey,
        ids: Sequence[str],
        purpose: str,
        device: torch.device | str,
        *,
        below: int | None = None,
    ) -> torch.Tensor:
        """One training timestep per sample [B], from the family's training density, drawn from `key` per id.

        `below` keeps every timestep under that value (cycle.t2i2t.max_timestep); None is the whole schedule.
        """
        ...

    def timesteps_at(self, fractions: torch.Tensor) -> torch.Tensor:
        """The timesteps at schedule positions `fractions` in [0, 1) (0: least noise), any shape: stratified
        draws (reconstruction scoring) place their points along the schedule with this."""
        ...

    def pure_noise_timesteps(self, batch_size: int, device: torch.device | str) -> torch.Tensor:
        """[B] timesteps at which the noised latents are pure noise: where sampling starts."""
        ...

    def add_noise(self, latents: torch.Tensor, noise: torch.Tensor, timesteps: torch.Tensor) -> torch.Tensor:
        """x_t of clean latents [B, ...] with noise of the same shape at per-sample timesteps [B]."""
        ...

    def target(self, latents: torch.Tensor, noise: torch.Tensor, timesteps: torch.Tensor) -> torch.Tensor:
        """What the denoiser is trained to predict from add_noise(latents, noise, timesteps)."""
        ...

    def predict_x0(
        self, noisy: torch.Tensor, timesteps: torch.Tensor, prediction: torch.Tensor
    ) -> torch.Tensor:
        """The clean latents (float32) one prediction implies: what one-step cycle terms decode."""
        ...

    def loss_weights(self, timesteps: torch.Tensor, snr_gamma: float | None) -> torch.Tensor | None:
        """Per-sample weights [B] of the denoising loss (Min-SNR for DDPM, the density's weighting for flow
        matching), or None for an unweighted mean."""
        ...

    def sampler(
        self, num_inference_steps: int, latent_shape: Sequence[int], device: torch.device | str
    ) -> SchedulerMixin:
        """A fresh sampling scheduler with its timesteps set for `num_inference_steps` steps on `device`.

        Sampling loops start from standard normal latents of `latent_shape` [B, C, H, W] and call
        scheduler.step(prediction, t, latents) for each t in scheduler.timesteps (no input scaling: both
        DDIM and flow-matching Euler take the latents as they are).
        """
        ...
