"""Stochastic sampling chains and their transition log-probabilities: what a DDPO-style objective trains.

A ChainPolicy is the stochastic form of a family's sampler, each step x_t -> x_{t-1} a Gaussian
N(mu_theta(x_t, t), sigma_t^2 I) with noise level eta, and at eta = 0 the deterministic step of
models/image_sampling.py's loop. `chain_policy` picks it by the generator's noise process: DDIM for the DDPM
families (DDIMPolicy below: mean and sigma exactly as diffusers' DDIMScheduler.step computes them, formulas
(12) and (16) of the DDIM paper; eta = 1 is DDPM-like), the SDE form of the Euler sampler for the
flow-matching families (models/flow_sde_policy.py). Everything else here is one code path for both.
`sample_chain` runs a chain under no_grad with noise the caller draws (per sample id, so chains are
reproducible and shard-independent) and records every latent and transition log-probability; `transition`
recomputes chosen transitions with gradient under the current denoiser. Per-sample timesteps let one denoiser
call recompute transitions from different points of different chains.

Log-probabilities (and the KL between two policies) are MEANS over the latent's dimensions, as in DDPO: a sum
over C*H*W dimensions (16,384 for SD at 512 px) would scale every log-ratio by that count, so a ratio
exp(logp_new - logp_old) would leave a clip range of 1e-4 at the slightest change.
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Protocol

import torch
from diffusers import DDIMScheduler, SchedulerMixin
from torch.utils.checkpoint import checkpoint

from cycletune.models.flow_matching import FlowMatchingProcess
from cycletune.models.flow_sde_policy import FlowSDEPolicy
from cycletune.models.generator import Generator
from cycletune.models.noise_process import NoiseProcess


@dataclass(frozen=True)
class Conditioning:
    """What the denoiser reads besides the latents: each chain's caption states [N, L, D], and with
    classifier-free guidance (guidance_scale > 1) the unconditional states of the same shape
    (generator.unconditional: the empty caption's, or SDXL's zeros)."""

    context: torch.Tensor
    guidance_scale: float = 1.0
    uncond: torch.Tensor | None = None

    def __post_init__(self) -> None:
        if self.guidance_scale > 1.0 and (self.uncond is None or self.uncond.shape != self.context.shape):
            raise ValueError(
                f"guidance_scale={self.guidance_scale} > 1 needs uncond states of shape "
                f"{tuple(self.context.shape)}"
            )

    def denoiser_context(self, dtype: torch.dtype) -> torch.Tensor:
        """The context generator.guided_prediction takes: [uncond; cond] when guided."""
        guided = self.guidance_scale > 1.0
        return (torch.cat([self.uncond, self.context]) if guided else self.context).to(dtype)


class ChainPolicy(Protocol):
    """One sampling run's schedule and the Gaussian of each of its transitions."""

    @property
    def timesteps(self) -> torch.Tensor:
        """[S] on the CPU, first (noisiest) step first: the values the denoiser is called with."""
        ...

    @property
    def stochastic_steps(self) -> list[int]:
        """Indices of the steps with sigma > 0: the only ones with a log-probability."""
        ...

    def gaussian(
        self, latents: torch.Tensor, timesteps: torch.Tensor, prediction: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Mean [N, C, H, W] and sigma [N] of each sample's next latent, given the denoiser's (guided)
        prediction at the latents [N, C, H, W] and per-sample `timesteps` [N] of this schedule."""
        ...


@dataclass(frozen=True)
class DDIMPolicy:
    """The DDIM schedule of one sampling run and its noise level eta: the Gaussian of every transition.
    `process` is the DDPM objective the prediction belongs to (epsilon or v)."""

    scheduler: DDIMScheduler
    eta: float
    process: NoiseProcess

    @property
    def timesteps(self) -> torch.Tensor:
        """[S] on the CPU, first (noisiest) step first."""
        return self.scheduler.timesteps

    def coefficients(self, timesteps: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """alpha_bar_t, alpha_bar_prev and sigma_t [N] of each sample's transition from `timesteps` [N].

        As DDIMScheduler.step: the previous timestep is t - num_train_timesteps // S, below 0 the final
        alpha_bar; sigma_t = eta * sqrt((1 - a_prev) / (1 - a_t) * (1 - a_t / a_prev)).
        """
        config, device = self.scheduler.config, timesteps.device
        alphas = self.scheduler.alphas_cumprod.to(device)
        previous = timesteps - config.num_train_timesteps // self.scheduler.num_inference_steps
        alpha_bar = alphas[timesteps]
        final = self.scheduler.final_alpha_cumprod.to(device, alphas.dtype)
        alpha_bar_prev = torch.where(previous >= 0, alphas[previous.clamp(min=0)], final)
        variance = (1 - alpha_bar_prev) / (1 - alpha_bar) * (1 - alpha_bar / alpha_bar_prev)
        return alpha_bar, alpha_bar_prev, self.eta * variance.sqrt()

    @property
    def stochastic_steps(self) -> list[int]:
        """Indices of the steps with sigma > 0: the only ones with a log-probability. With set_alpha_to_one
        (DDIM's default) the last step lands on alpha_bar = 1 and is deterministic whatever eta is."""
        sigmas = self.coefficients(self.timesteps)[2]
        return [index for index, sigma in enumerate(sigmas.tolist()) if sigma > 0]

    def gaussian(
        self, latents: torch.Tensor, timesteps: torch.Tensor, prediction: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """DDIMScheduler.step's mean sqrt(a_prev) x0 + sqrt(1 - a_prev - sigma^2) epsilon, x0 clipped as its
        config says."""
        alpha_bar, alpha_bar_prev, sigma = (_per_sample(c, latents) for c in self.coefficients(timesteps))
        x0 = self.process.predict_x0(latents, timesteps, prediction)
        if self.process.prediction_type == "epsilon":
            epsilon = prediction
        else:
            epsilon = alpha_bar.sqrt() * prediction + (1 - alpha_bar).sqrt() * latents
        config = self.scheduler.config
        if config.clip_sample:
            x0 = x0.clamp(-config.clip_sample_range, config.clip_sample_range)
        mean = alpha_bar_prev.sqrt() * x0 + (1 - alpha_bar_prev - sigma**2).sqrt() * epsilon
        return mean, sigma.flatten()


def _sampler(generator: Generator, num_inference_steps: int, eta: float) -> SchedulerMixin:
    """The scheduler of the generator's sampling loop (its noise process's), which a policy with noise
    level eta makes stochastic."""
    if eta < 0:
        raise ValueError(f"eta={eta} must be >= 0")
    return generator.process.sampler(num_inference_steps, generator.latent_shape(1), "cpu")


def ddim_policy(generator: Generator, num_inference_steps: int, eta: float) -> DDIMPolicy:
    """The generator's DDIM sampler (its noise process's, as its sampling loop) with noise level eta."""
    scheduler = _sampler(generator, num_inference_steps, eta)
    if not isinstance(scheduler, DDIMScheduler):
        raise ValueError(
            f"stochastic DDIM chains need a DDPM-family generator (SD 1.x/2.x, SDXL); {generator.spec.name} "
            f"samples with {type(scheduler).__name__}"
        )
    if scheduler.config.thresholding:
        raise ValueError("DDIM chains do not support the scheduler's dynamic thresholding")
    return DDIMPolicy(scheduler, eta, generator.process)


def chain_policy(generator: Generator, num_inference_steps: int, eta: float) -> ChainPolicy:
    """The stochastic form of the generator's own sampler, by its noise process: DDIM (DDPM families) or
    the Euler sampler's SDE (flow-matching families)."""
    if isinstance(generator.process, FlowMatchingProcess):
        return FlowSDEPolicy(_sampler(generator, num_inference_steps, eta), eta)
    return ddim_policy(generator, num_inference_steps, eta)


def _per_sample(values: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """[N] -> [N, 1, ...] broadcasting against the latents `like`."""
    return values.view(-1, *([1] * (like.ndim - 1)))


def transition_mean(
    generator: Generator,
    policy: ChainPolicy,
    latents: torch.Tensor,
    timesteps: torch.Tensor,
    conditioning: Conditioning,
    *,
    checkpointed: bool = False,
) -> tuple[torch.Tensor, torch.Tensor]:
    """The Gaussian of each sample's next latent: mean [N, C, H, W] (float32) and sigma [N].

    One denoiser call (both CFG branches batched when guided) at per-sample `timesteps` [N]; `checkpointed`
    recomputes it in backward instead of keeping its activations.
    """
    timesteps = timesteps.to(latents.device)
    context = conditioning.denoiser_context(generator.dtype)
    args = (latents, timesteps, context, conditioning.guidance_scale)
    if checkpointed:
        prediction = checkpoint(generator.guided_prediction, *args, use_reentrant=False)
    else:
        prediction = generator.guided_prediction(*args)
    return policy.gaussian(latents, timesteps, prediction)


def gaussian_logprob(sample: torch.Tensor, mean: torch.Tensor, sigma: torch.Tensor) -> torch.Tensor:
    """log N(sample; mean, sigma^2 I) [N], the mean over the sample's dimensions; sigma [N] must be > 0."""
    sigma = _per_sample(sigma, sample)
    density = -((sample - mean) ** 2) / (2 * sigma**2) - sigma.log() - 0.5 * math.log(2 * math.pi)
    return density.flatten(1).mean(dim=1)


def gaussian_kl(mean: torch.Tensor, base_mean: torch.Tensor, sigma: torch.Tensor) -> torch.Tensor:
    """KL(N(mean, sigma^2 I) || N(base_mean, sigma^2 I)) [N]: ||mean - base_mean||^2 / (2 sigma^2), averaged
    over the dimensions like gaussian_logprob."""
    return ((mean - base_mean) ** 2).flatten(1).mean(dim=1) / (2 * sigma**2)


@dataclass(frozen=True)
class Chain:
    """What sample_chain recorded: latents [S + 1, N, C, H, W] from x_T to x_0 (float32), and each step's
    transition log-probability [S, N] (0 on deterministic steps, those not in policy.stochastic_steps)."""

    latents: torch.Tensor
    logprobs: torch.Tensor


@torch.no_grad()
def sample_chain(
    generator: Generator,
    policy: ChainPolicy,
    conditioning: Conditioning,
    initial: torch.Tensor,
    noise: torch.Tensor,
) -> Chain:
    """Run the policy from `initial` [N, C, H, W], adding noise [N, S, C, H, W] (one draw per sample and step)
    times sigma_t at each step, as DDIMScheduler.step does with its variance_noise.

    Both samplers' initial noise sigma and model-input scaling are 1, so the latents go to the denoiser as
    they are.
    """
    steps = len(policy.timesteps)
    if noise.shape[:2] != (initial.shape[0], steps) or noise.shape[2:] != initial.shape[1:]:
        raise ValueError(
            f"noise shape {tuple(noise.shape)} != [N, S, ...] = "
            f"{(initial.shape[0], steps, *initial.shape[1:])}"
        )
    latents = initial.to(generator.device, torch.float32)
    noise = noise.to(latents)
    stochastic = set(policy.stochastic_steps)
    chain, logprobs = [latents], []
    for index, t in enumerate(policy.timesteps):
        mean, sigma = transition_mean(generator, policy, latents, t.expand(len(latents)), conditioning)
        latents = mean + _per_sample(sigma, mean) * noise[:, index]
        logprobs.append(gaussian_logprob(latents, mean, sigma) if index in stochastic else sigma * 0)
        chain.append(latents)
    return Chain(torch.stack(chain), torch.stack(logprobs))


@dataclass(frozen=True)
class Transition:
    """One recomputed transition per sample: its log-probability [N] (with gradient), mean and sigma [N]."""

    logprob: torch.Tensor
    mean: torch.Tensor
    sigma: torch.Tensor


def transition(
    generator: Generator,
    policy: ChainPolicy,
    latents: torch.Tensor,
    timesteps: torch.Tensor,
    following: torch.Tensor,
    conditioning: Conditioning,
) -> Transition:
    """log p(following | latents) under the current denoiser, with gradient: x_t [N, C, H, W] at per-sample
    `timesteps` [N] to the recorded x_{t-1} `following`. The denoiser call is checkpointed, so a caller
    looping over transitions keeps only their inputs and outputs until backward, not each call's
    activations."""
    mean, sigma = transition_mean(generator, policy, latents, timesteps, conditioning, checkpointed=True)
    return Transition(gaussian_logprob(following, mean, sigma), mean, sigma)


@contextmanager
def base_policy(generator: Generator) -> Iterator[None]:
    """Run the denoiser without its LoRA adapters (the policy training started from, e.g. for a KL term).

    peft's disable/enable toggle the adapters' requires_grad as a side effect; the flags are restored as
    they were, so a frozen or partially trained model stays as the trainer set it.
    """
    denoiser = generator.denoiser
    if not getattr(denoiser, "peft_config", None):
        raise ValueError(
            "the generator's denoiser has no LoRA adapters to disable (full fine-tuning keeps no copy of "
            "the base model)"
        )
    flags = [param.requires_grad for param in denoiser.parameters()]
    denoiser.disable_adapters()
    try:
        yield
    finally:
        denoiser.enable_adapters()
        for param, flag in zip(denoiser.parameters(), flags, strict=True):
            param.requires_grad_(flag)
