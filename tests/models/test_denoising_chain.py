"""Stochastic DDIM chains: each transition is diffusers' DDIM step and its Gaussian, eta = 0 is the sampling
loop, recomputed transitions match the recorded ones, and the base policy is the UNet without its LoRA."""

from __future__ import annotations

import math

import pytest
import torch
from lora_weights import perturb_lora

from cycletune.models.denoising_chain import (
    Conditioning,
    base_policy,
    ddim_policy,
    gaussian_kl,
    gaussian_logprob,
    sample_chain,
    transition,
    transition_mean,
)
from cycletune.models.generator import Generator
from cycletune.models.lora import add_generator_lora, frozen, prepare_trainable

CAPTIONS = ["a red circle at the top", "a small blue square"]
STEPS = 4


def _randn(shape: tuple[int, ...], seed: int) -> torch.Tensor:
    return torch.randn(shape, generator=torch.Generator().manual_seed(seed))


def _conditioning(generator: Generator, guidance_scale: float = 1.0) -> Conditioning:
    with torch.no_grad():
        context = generator.encode_text(generator.tokenize(CAPTIONS))
        uncond = generator.encode_text(generator.tokenize([""] * len(CAPTIONS)))
    return Conditioning(context, guidance_scale, uncond if guidance_scale > 1 else None)


def _lora_generator(generator: Generator) -> tuple[Generator, list[str]]:
    """The trainer's LoRA generator, its adapters non-zero so that they change the UNet's output."""
    add_generator_lora(generator, rank=4, alpha=4.0)
    names = prepare_trainable(generator, train_mode="lora")
    perturb_lora(generator, names, seed=1, scale=0.1, replace=False)
    return generator, names


@pytest.fixture(params=["latent-epsilon", "latent-v_prediction", "pixel-epsilon"])
def any_generator(request, tiny_models) -> Generator:
    """Both prediction types, and pixel space, whose DDIM clips each x0 estimate."""
    space, prediction_type = request.param.split("-")
    folder = tiny_models.generator if space == "latent" else tiny_models.pixel_generator
    return Generator.from_pretrained(str(folder), prediction_type=prediction_type)


def test_a_transition_is_diffusers_ddim_step_and_its_gaussian(any_generator: Generator) -> None:
    """Per-sample timesteps in one call: each sample's mean + sigma * noise is DDIMScheduler.step with that
    variance_noise, sigma is formula (16), and the log-probability is the written-out Gaussian density."""
    generator, eta = any_generator, 0.7
    policy = ddim_policy(generator, STEPS, eta)
    conditioning = _conditioning(generator)
    latents = _randn(generator.latent_shape(2), seed=2)
    noise = _randn(generator.latent_shape(2), seed=3)
    timesteps = policy.timesteps[[0, 2]]
    with torch.no_grad():
        mean, sigma = transition_mean(generator, policy, latents, timesteps, conditioning)
    following = mean + sigma.view(-1, 1, 1, 1) * noise
    scheduler = generator.process.sampler(STEPS, generator.latent_shape(1), "cpu")
    alphas = scheduler.alphas_cumprod
    for row, t in enumerate(timesteps.tolist()):
        with torch.no_grad():
            prediction = generator.unet(latents[row : row + 1], t, conditioning.context[row : row + 1]).sample
        step = scheduler.step(
            prediction, t, latents[row : row + 1], eta=eta, variance_noise=noise[row : row + 1]
        )
        torch.testing.assert_close(following[row : row + 1], step.prev_sample, rtol=1e-5, atol=1e-5)
        previous = t - 1000 // STEPS
        a_t, a_prev = alphas[t], alphas[previous]
        expected_sigma = eta * math.sqrt((1 - a_prev) / (1 - a_t) * (1 - a_t / a_prev))
        assert sigma[row].item() == pytest.approx(expected_sigma, rel=1e-5)
    density = (
        -0.5 * ((following - mean) / sigma.view(-1, 1, 1, 1)) ** 2
        - torch.log(sigma.view(-1, 1, 1, 1) * math.sqrt(2 * math.pi))
    ).mean(dim=(1, 2, 3))
    torch.testing.assert_close(gaussian_logprob(following, mean, sigma), density)


@pytest.mark.parametrize("guidance_scale", [1.0, 2.5])
def test_at_eta_zero_the_chain_is_the_ddim_sampling_loop(generator: Generator, guidance_scale: float) -> None:
    conditioning = _conditioning(generator, guidance_scale)
    initial = _randn(generator.latent_shape(2), seed=4)
    policy = ddim_policy(generator, STEPS, eta=0.0)
    assert policy.stochastic_steps == []
    noise = _randn((2, STEPS, *generator.latent_shape(1)[1:]), seed=5)  # times sigma = 0
    chain = sample_chain(generator, policy, conditioning, initial, noise)
    with torch.no_grad():
        final = generator.sample_with_grad(
            conditioning.context,
            initial,
            num_inference_steps=STEPS,
            grad_steps=0,
            guidance_scale=guidance_scale,
            uncond_hidden_states=conditioning.uncond,
        )
    assert chain.latents.shape == (STEPS + 1, *initial.shape)
    assert torch.equal(chain.latents[0], initial)
    torch.testing.assert_close(chain.latents[-1], final, rtol=1e-5, atol=1e-5)
    assert torch.equal(chain.logprobs, torch.zeros(STEPS, 2))


@pytest.mark.parametrize("guidance_scale", [1.0, 2.5])
def test_recomputed_transitions_match_the_recorded_ones_with_gradient(
    generator: Generator, guidance_scale: float
) -> None:
    generator, names = _lora_generator(generator)
    conditioning = _conditioning(generator, guidance_scale)
    policy = ddim_policy(generator, STEPS, eta=1.0)
    # The tiny scheduler sets alpha to one: the last step lands on alpha_bar = 1 and has no noise.
    assert policy.stochastic_steps == [0, 1, 2]
    noise = _randn((2, STEPS, *generator.latent_shape(1)[1:]), seed=6)
    chain = sample_chain(generator, policy, conditioning, _randn(generator.latent_shape(2), seed=7), noise)
    assert not chain.latents.requires_grad and not chain.logprobs.requires_grad
    assert torch.equal(chain.logprobs[-1], torch.zeros(2)) and (chain.logprobs[:-1] != 0).all()
    # Each sample its own step (0 and 2), in one call.
    steps, rows = torch.tensor([0, 2]), torch.arange(2)
    recomputed = transition(
        generator,
        policy,
        chain.latents[steps, rows],
        policy.timesteps[steps],
        chain.latents[steps + 1, rows],
        conditioning,
    )
    torch.testing.assert_close(recomputed.logprob.detach(), chain.logprobs[steps, rows], rtol=1e-6, atol=1e-6)
    recomputed.logprob.sum().backward()
    grads = [param.grad for name, param in generator.named_parameters() if name in names]
    assert all(grad is not None for grad in grads) and sum(grad.abs().sum() for grad in grads) > 0


def test_base_policy_runs_without_the_adapters_and_restores_them(generator: Generator, tiny_models) -> None:
    plain = Generator.from_pretrained(str(tiny_models.generator))
    generator, names = _lora_generator(generator)
    policy, conditioning = ddim_policy(generator, STEPS, eta=1.0), _conditioning(generator)
    latents, timesteps = _randn(generator.latent_shape(2), seed=8), policy.timesteps[[1, 1]]
    with torch.no_grad():
        adapted, sigma = transition_mean(generator, policy, latents, timesteps, conditioning)
        with base_policy(generator):
            base, _ = transition_mean(generator, policy, latents, timesteps, conditioning)
        without_lora, _ = transition_mean(plain, policy, latents, timesteps, conditioning)
        again, _ = transition_mean(generator, policy, latents, timesteps, conditioning)
    torch.testing.assert_close(base, without_lora)
    assert torch.equal(again, adapted) and not torch.allclose(base, adapted)
    assert all(param.requires_grad == (name in names) for name, param in generator.named_parameters())
    # peft's enable_adapters would make the adapters trainable again, even in a model frozen as a partner.
    with frozen(generator):
        with base_policy(generator):
            pass
        assert not any(param.requires_grad for param in generator.parameters())
    # The exact KL of two Gaussians with the same sigma, per dimension, as torch's.
    reference = torch.distributions.kl_divergence(
        torch.distributions.Normal(adapted, sigma.view(-1, 1, 1, 1)),
        torch.distributions.Normal(base, sigma.view(-1, 1, 1, 1)),
    ).mean(dim=(1, 2, 3))
    torch.testing.assert_close(gaussian_kl(adapted, base, sigma), reference)
    with pytest.raises(ValueError, match="no LoRA adapters"), base_policy(plain):
        pass


def test_bad_input_is_named(generator: Generator) -> None:
    policy = ddim_policy(generator, STEPS, eta=1.0)
    initial = _randn(generator.latent_shape(2), seed=9)
    with pytest.raises(ValueError, match="noise shape"):
        sample_chain(generator, policy, _conditioning(generator), initial, initial)
    with pytest.raises(ValueError, match="eta=-1"):
        ddim_policy(generator, STEPS, eta=-1.0)
    with pytest.raises(ValueError, match="uncond"):
        Conditioning(initial, guidance_scale=2.0)
