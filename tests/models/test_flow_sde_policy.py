"""The SDE form of the flow-matching Euler sampler (SD3, Flux): each transition is the Gaussian written out
below, eta = 0 is the family's own sampling loop, and with an exact velocity field the chain keeps the flow's
marginals. (reward() on these families: tests/losses/test_t2i2t_reward.py; the recipe: the family tests.)"""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch
from diffusers import FlowMatchEulerDiscreteScheduler

from cycletune.models.denoising_chain import (
    Conditioning,
    DDIMPolicy,
    chain_policy,
    gaussian_logprob,
    sample_chain,
)
from cycletune.models.flow_sde_policy import FlowSDEPolicy
from cycletune.models.generator import Generator
from cycletune.models.tiny import TINY_GENERATORS

CAPTIONS = ["a red circle at the top", "a small blue square"]
STEPS = 4


@pytest.fixture(scope="module")
def flow_folders(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """Tiny SD3 (static shift) and Flux (shift by the token count, 2x2 packing) generators at 16 px."""
    root = tmp_path_factory.mktemp("flow_sde")
    return {
        family: TINY_GENERATORS[family](root / family, seed=0, resolution=16) for family in ("sd3", "flux")
    }


@pytest.fixture(params=["sd3", "flux"])
def flow_generator(request: pytest.FixtureRequest, flow_folders: dict[str, Path]) -> Generator:
    return Generator.from_pretrained(str(flow_folders[request.param]))


def _randn(shape: tuple[int, ...], seed: int, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    return torch.randn(shape, generator=torch.Generator().manual_seed(seed), dtype=dtype)


def _conditioning(generator: Generator, guidance_scale: float = 1.0) -> Conditioning:
    with torch.no_grad():
        context = generator.encode_text(generator.tokenize(CAPTIONS))
        uncond = generator.encode_text(generator.tokenize([""] * len(CAPTIONS)))
    return Conditioning(context, guidance_scale, uncond if guidance_scale > 1 else None)


def test_a_transition_is_the_written_out_gaussian_in_float64(flow_generator: Generator) -> None:
    """Per-sample steps in one call, the first one at s = 1 (where the schedule's second sigma stands in for
    s in 1 - s): the log-probability of a draw is the Gaussian log-density of the Euler-Maruyama step."""
    generator, eta = flow_generator, 0.7
    policy = chain_policy(generator, STEPS, eta)
    assert isinstance(policy, FlowSDEPolicy) and policy.stochastic_steps == list(range(STEPS))
    sigmas = policy.scheduler.sigmas.tolist()
    assert sigmas[0] == 1 and sigmas[-1] == 0
    steps = [0, 2]
    timesteps = policy.timesteps[steps]
    latents = _randn(generator.latent_shape(2), seed=1, dtype=torch.float64)
    with torch.no_grad():
        context = _conditioning(generator).context
        velocity = generator.guided_prediction(latents, timesteps, context, 1.0).double()
    mean, sigma = policy.gaussian(latents, timesteps, velocity)
    following = mean + sigma.view(-1, 1, 1, 1) * _randn(
        generator.latent_shape(2), seed=2, dtype=torch.float64
    )
    logprob = gaussian_logprob(following, mean, sigma)
    assert logprob.dtype == torch.float64
    for row, step in enumerate(steps):
        s, s_next = sigmas[step], sigmas[step + 1]
        g = eta * math.sqrt(s / (1 - (sigmas[1] if s == 1 else s)))
        dt = s_next - s
        expected_mean = (
            latents[row] * (1 + g**2 / (2 * s) * dt) + velocity[row] * (1 + g**2 * (1 - s) / (2 * s)) * dt
        )
        std = g * math.sqrt(-dt)
        density = -((following[row] - expected_mean) ** 2) / (2 * std**2) - math.log(
            std * math.sqrt(2 * math.pi)
        )
        assert sigma[row].item() == pytest.approx(std, rel=1e-12)
        assert logprob[row].item() == pytest.approx(density.mean().item(), rel=1e-12)


@pytest.mark.parametrize("guidance_scale", [1.0, 2.5])
def test_at_eta_zero_each_step_is_the_familys_euler_step(
    flow_generator: Generator, guidance_scale: float
) -> None:
    """No step is stochastic, and each transition of the chain is, bit for bit, what the family's sampling
    loop (models/image_sampling.py) does there: FlowMatchEulerDiscreteScheduler.step's x + v dt, on the
    schedule with the family's shift."""
    generator = flow_generator
    conditioning = _conditioning(generator, guidance_scale)
    policy = chain_policy(generator, STEPS, eta=0.0)
    assert policy.stochastic_steps == []
    noise = _randn((2, STEPS, *generator.latent_shape(1)[1:]), seed=4)  # times sigma = 0
    chain = sample_chain(generator, policy, conditioning, _randn(generator.latent_shape(2), seed=3), noise)
    assert torch.equal(chain.logprobs, torch.zeros(STEPS, 2))
    scheduler = generator.process.sampler(STEPS, generator.latent_shape(1), "cpu")
    context = conditioning.denoiser_context(generator.dtype)
    for step, t in enumerate(scheduler.timesteps):
        with torch.no_grad():
            velocity = generator.guided_prediction(chain.latents[step], t, context, guidance_scale)
        euler = scheduler.step(velocity, t, chain.latents[step]).prev_sample
        assert torch.equal(chain.latents[step + 1], euler), step


@pytest.mark.parametrize("eta", [0.7, 1.0])
def test_with_the_exact_velocity_of_gaussian_data_the_chain_ends_on_the_data(eta: float) -> None:
    """Data N(m, c^2) per dimension: x_s = (1 - s) x0 + s noise is Gaussian, so the velocity
    E[noise - x0 | x_s] is known exactly. The SDE chain from pure noise ends with the data's mean and std,
    within the 50-step discretisation and 16,000 draws."""
    m, c = 0.5, 0.3

    def velocity(x: torch.Tensor, s: float) -> torch.Tensor:
        variance = (1 - s) ** 2 * c**2 + s**2
        return (s - (1 - s) * c**2) / variance * (x - (1 - s) * m) - m

    scheduler = FlowMatchEulerDiscreteScheduler()
    scheduler.set_timesteps(50)
    policy = FlowSDEPolicy(scheduler, eta)
    draws = torch.Generator().manual_seed(0)
    latents = torch.randn(4000, 1, 2, 2, generator=draws, dtype=torch.float64)
    for step, t in enumerate(policy.timesteps):
        s = scheduler.sigmas[step].item()
        mean, sigma = policy.gaussian(latents, t.expand(len(latents)), velocity(latents, s))
        latents = mean + sigma.view(-1, 1, 1, 1) * torch.randn(
            latents.shape, generator=draws, dtype=latents.dtype
        )
    assert latents.mean().item() == pytest.approx(m, abs=0.01)
    assert latents.std().item() == pytest.approx(c, rel=0.03)


def test_the_factory_picks_by_noise_process_and_bad_input_is_named(
    flow_generator: Generator, generator: Generator
) -> None:
    assert isinstance(chain_policy(generator, STEPS, 1.0), DDIMPolicy)
    with pytest.raises(ValueError, match="eta=-1"):
        chain_policy(flow_generator, STEPS, -1.0)
    policy = chain_policy(flow_generator, STEPS, 1.0)
    latents = _randn(flow_generator.latent_shape(1), seed=5)
    with pytest.raises(ValueError, match="not all steps of this Euler schedule"):
        policy.gaussian(latents, torch.tensor([500.0]), latents)
