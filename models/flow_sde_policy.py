"""The SDE form of the flow-matching Euler sampler (SD3, Flux): the stochastic policy their reward chains
sample and models/denoising_chain.py trains, as the Flow-GRPO paper (Liu et al., "Flow-GRPO: Training Flow
Matching Models via Online RL") makes its deterministic sampler stochastic without changing its marginals.

Why it keeps the marginals: along x_s = (1 - s) x0 + s noise (s = 1 pure noise) the velocity
v = E[noise - x0 | x_s] drives the probability-flow ODE dx = v ds. For any g(s) >= 0 the SDE
dx = (v - g^2 / 2 * score) ds + g dw, run from s = 1 down to 0, has the same marginals: in the Fokker-Planck
equation the score term's drift cancels the diffusion g adds. The score follows from v, since
E[noise | x_s] = x_s + (1 - s) v gives score = -(x_s + (1 - s) v) / s. One Euler-Maruyama step ds = dt < 0 is
then the Gaussian
    mean = x (1 + g^2 / (2 s) dt) + v (1 + g^2 (1 - s) / (2 s)) dt,    sigma = g sqrt(-dt),
with Flow-GRPO's g = eta sqrt(s / (1 - s)): noise in proportion to the noise level, and at eta = 0 the step is
FlowMatchEulerDiscreteScheduler.step's x + v dt. At s = 1 that g is infinite, so there (as in Flow-GRPO) the
schedule's second sigma stands in for s in 1 - s. Every step, the last (to s = 0) included, is stochastic
when eta > 0.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from diffusers import FlowMatchEulerDiscreteScheduler


@dataclass(frozen=True)
class FlowSDEPolicy:
    """The Euler schedule of one sampling run (sigmas with the family's shift) and its noise level eta."""

    scheduler: FlowMatchEulerDiscreteScheduler
    eta: float

    @property
    def timesteps(self) -> torch.Tensor:
        """[S] on the CPU, first (noisiest, s = 1) step first: s * num_train_timesteps, as the model takes
        them."""
        return self.scheduler.timesteps

    def coefficients(
        self, timesteps: torch.Tensor, dtype: torch.dtype = torch.float32
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """s, the next step's s and the SDE's g [N] of each sample's step from `timesteps` [N] (values of
        this schedule), on their device, computed in `dtype`.

        The sigmas are the scheduler's own (looked up by step, not t / 1000, which rounds differently), so
        eta = 0 is its Euler step exactly.
        """
        device = timesteps.device
        matches = timesteps[:, None] == self.scheduler.timesteps.to(device)[None, :]
        if not matches.any(dim=1).all():
            raise ValueError(f"timesteps {timesteps.tolist()} are not all steps of this Euler schedule")
        steps = matches.int().argmax(dim=1)
        sigmas = self.scheduler.sigmas.to(device, dtype)
        sigma, sigma_next = sigmas[steps], sigmas[steps + 1]
        below_one = torch.where(sigma == 1, sigmas[1], sigma)
        return sigma, sigma_next, self.eta * (sigma / (1 - below_one)).sqrt()

    @property
    def stochastic_steps(self) -> list[int]:
        """Indices of the steps with sigma > 0: all of them when eta > 0, none at eta = 0."""
        sigma, sigma_next, g = self.coefficients(self.timesteps)
        return [index for index, std in enumerate((g * (sigma - sigma_next).sqrt()).tolist()) if std > 0]

    def gaussian(
        self, latents: torch.Tensor, timesteps: torch.Tensor, prediction: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Mean [N, C, H, W] and sigma [N] of the Euler-Maruyama step (module docstring) given the velocity
        `prediction`, in the latents' dtype. The latents are unpacked (Flux packs its tokens inside
        predict)."""
        sigma, sigma_next, g = (
            coefficient.view(-1, *([1] * (latents.ndim - 1)))
            for coefficient in self.coefficients(timesteps, latents.dtype)
        )
        dt = sigma_next - sigma
        latents_scale = 1 + g**2 / (2 * sigma) * dt
        velocity_scale = (1 + g**2 * (1 - sigma) / (2 * sigma)) * dt
        mean = latents * latents_scale + prediction * velocity_scale
        return mean, (g * (-dt).sqrt()).flatten()
