"""The generator's differentiable pieces for the T2I2T cycle: x0 estimates and DRaFT-K DDIM sampling."""

from __future__ import annotations

from collections.abc import Callable

import pytest
import torch
from diffusers import DDIMScheduler

from cycletune.models.generator import Generator

CAPTIONS = ["a red circle at the top", "a small blue square"]
STEPS, GRAD_STEPS = 3, 2


def _noise(generator: Generator, batch_size: int, seed: int) -> torch.Tensor:
    return torch.randn(generator.latent_shape(batch_size), generator=torch.Generator().manual_seed(seed))


def _contexts(generator: Generator, captions: list[str]) -> tuple[torch.Tensor, torch.Tensor]:
    """Text and empty-caption embeddings, as constants: these tests are about the sampling loop."""
    with torch.no_grad():
        return (
            generator.encode_text(generator.tokenize(captions)),
            generator.encode_text(generator.tokenize([""] * len(captions))),
        )


def _flat(tensors: list[torch.Tensor]) -> torch.Tensor:
    return torch.cat([tensor.flatten() for tensor in tensors])


def _reference_ddim(
    generator: Generator,
    context: torch.Tensor,
    uncond: torch.Tensor,
    latents: torch.Tensor,
    guidance_scale: float,
) -> torch.Tensor:
    """DRaFT-K written out step by step: separate guided UNet calls, autograd on only the last steps."""
    scheduler = DDIMScheduler.from_config(generator.process.scheduler.config)
    scheduler.set_timesteps(STEPS)
    for index, t in enumerate(scheduler.timesteps):
        with torch.set_grad_enabled(index >= STEPS - GRAD_STEPS):
            prediction = generator.unet(latents, t, context).sample
            if guidance_scale > 1:
                unconditional = generator.unet(latents, t, uncond).sample
                prediction = unconditional + guidance_scale * (prediction - unconditional)
            latents = scheduler.step(prediction, t, latents).prev_sample
    return latents


@pytest.mark.parametrize("prediction_type", ["epsilon", "v_prediction"])
def test_predict_x0_inverts_add_noise(tiny_models, prediction_type: str) -> None:
    generator = Generator.from_pretrained(str(tiny_models.generator), prediction_type=prediction_type)
    latents, noise = _noise(generator, 4, seed=0), _noise(generator, 4, seed=1)
    timesteps = torch.tensor([0, 250, 700, 999])
    noisy = generator.process.scheduler.add_noise(latents, noise, timesteps)
    if prediction_type == "epsilon":
        target = noise
    else:
        target = generator.process.scheduler.get_velocity(latents, noise, timesteps)
    x0 = generator.predict_x0(noisy, timesteps, target)
    assert x0.dtype == torch.float32
    assert torch.allclose(x0, latents, atol=1e-5)
    # Any other prediction gives another estimate: the x0 depends on what the UNet says.
    assert not torch.allclose(generator.predict_x0(noisy, timesteps, target + 0.1), latents, atol=1e-2)


@pytest.mark.parametrize("guidance_scale", [1.0, 2.5])
def test_sample_with_grad_equals_no_grad_sampler(generator: Generator, guidance_scale: float) -> None:
    latents = _noise(generator, 2, seed=2)
    context, uncond = _contexts(generator, CAPTIONS)
    final = generator.sample_with_grad(
        context,
        latents,
        num_inference_steps=STEPS,
        grad_steps=GRAD_STEPS,
        guidance_scale=guidance_scale,
        uncond_hidden_states=uncond,
    )
    assert final.requires_grad and final.dtype == torch.float32
    pixels = generator.decode_latents(final).detach()
    expected = generator.sample(
        CAPTIONS, num_inference_steps=STEPS, guidance_scale=guidance_scale, latents=latents
    )
    assert torch.allclose(pixels, expected, atol=1e-6)


@pytest.mark.parametrize("guidance_scale", [1.0, 2.5])
def test_gradient_flows_through_only_the_last_steps(generator: Generator, guidance_scale: float) -> None:
    """Checkpointed and plain recording both equal a hand-written DRaFT-K; the early steps get no graph."""
    context, uncond = _contexts(generator, CAPTIONS)
    weights = torch.randn(generator.latent_shape(2), generator=torch.Generator().manual_seed(3))
    params = [param for param in generator.unet.parameters() if param.requires_grad]

    def gradients(run: Callable[[torch.Tensor], torch.Tensor]) -> tuple[torch.Tensor, list[torch.Tensor]]:
        initial = _noise(generator, 2, seed=4).requires_grad_()
        final = run(initial)
        grads = torch.autograd.grad((final * weights).sum(), [initial, *params], allow_unused=True)
        return final.detach(), list(grads)

    def ours(checkpointing: bool) -> tuple[torch.Tensor, list[torch.Tensor]]:
        return gradients(
            lambda initial: generator.sample_with_grad(
                context,
                initial,
                num_inference_steps=STEPS,
                grad_steps=GRAD_STEPS,
                guidance_scale=guidance_scale,
                uncond_hidden_states=uncond,
                gradient_checkpointing=checkpointing,
            )
        )

    reference_final, reference_grads = gradients(
        lambda initial: _reference_ddim(generator, context, uncond, initial, guidance_scale)
    )
    assert reference_grads[0] is None  # the no-grad steps cut the graph to the initial noise
    for checkpointing in (True, False):
        final, grads = ours(checkpointing)
        assert torch.allclose(final, reference_final, atol=1e-5)
        assert grads[0] is None
        assert any(grad.abs().sum() > 0 for grad in grads[1:])
        # As one vector: single near-cancelling entries differ by float32 reordering (batched CFG branches).
        difference = _flat(grads[1:]) - _flat(reference_grads[1:])
        assert difference.norm() <= 1e-5 * _flat(reference_grads[1:]).norm()


def test_all_steps_recorded_reach_the_initial_noise(generator: Generator) -> None:
    context, _ = _contexts(generator, CAPTIONS)
    initial = _noise(generator, 2, seed=5).requires_grad_()
    final = generator.sample_with_grad(context, initial, num_inference_steps=2, grad_steps=2)
    final.sum().backward()
    assert initial.grad is not None and initial.grad.abs().sum() > 0


def test_sample_with_grad_rejects_bad_input(generator: Generator) -> None:
    context, uncond = _contexts(generator, CAPTIONS)
    latents = _noise(generator, 2, seed=6)
    with pytest.raises(ValueError, match="latents shape"):
        generator.sample_with_grad(context, latents[:1], num_inference_steps=2, grad_steps=1)
    with pytest.raises(ValueError, match="grad_steps=3"):
        generator.sample_with_grad(context, latents, num_inference_steps=2, grad_steps=3)
    with pytest.raises(ValueError, match="needs uncond_hidden_states"):
        generator.sample_with_grad(context, latents, num_inference_steps=2, grad_steps=1, guidance_scale=3.0)
    with pytest.raises(ValueError, match="uncond_hidden_states shape"):
        generator.sample_with_grad(
            context,
            latents,
            num_inference_steps=2,
            grad_steps=1,
            guidance_scale=3.0,
            uncond_hidden_states=uncond[:1],
        )


def test_pixel_space_sampling_clips_each_x0_estimate_to_the_pixel_range(tiny_models) -> None:
    """Without a VAE the samples are pixels: DDIM clips its x0 estimates to [-1, 1], so the final sample
    (the last x0 estimate) cannot saturate; with a VAE, latents are left unclipped."""
    pixel_generator = Generator.from_pretrained(str(tiny_models.pixel_generator))
    with torch.no_grad():
        pixel_generator.unet.conv_out.bias.fill_(5.0)  # a badly trained model: predictions far out of range
    context, _ = _contexts(pixel_generator, CAPTIONS)
    final = pixel_generator.sample_with_grad(
        context, _noise(pixel_generator, 2, seed=4), num_inference_steps=STEPS, grad_steps=0
    )
    assert final.abs().max() <= 1.0 + 1e-5
    latent_generator = Generator.from_pretrained(str(tiny_models.generator))
    with torch.no_grad():
        latent_generator.unet.conv_out.bias.fill_(5.0)
    context, _ = _contexts(latent_generator, CAPTIONS)
    final = latent_generator.sample_with_grad(
        context, _noise(latent_generator, 2, seed=4), num_inference_steps=STEPS, grad_steps=0
    )
    assert final.abs().max() > 1.5
