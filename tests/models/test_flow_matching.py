"""The rectified-flow process of SD3 and Flux against the hand-written formulas and diffusers' own pieces:
the training density, the loss weighting, and the pipelines' sampling schedules."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from diffusers import FlowMatchEulerDiscreteScheduler, FluxPipeline
from diffusers.pipelines.flux import pipeline_flux
from diffusers.pipelines.stable_diffusion_3 import pipeline_stable_diffusion_3
from diffusers.training_utils import compute_density_for_timestep_sampling, compute_loss_weighting_for_sd3

from cycletune.models.flow_matching import FlowMatchingProcess
from cycletune.models.randomness import DrawKey

KEY = DrawKey(seed=7, step=3)
IDS = [f"img-{index}" for index in range(64)]


def _sd3_scheduler() -> FlowMatchEulerDiscreteScheduler:
    return FlowMatchEulerDiscreteScheduler(shift=3.0)


def _flux_scheduler() -> FlowMatchEulerDiscreteScheduler:
    return FlowMatchEulerDiscreteScheduler(
        shift=3.0,
        use_dynamic_shifting=True,
        base_shift=0.5,
        max_shift=1.15,
        base_image_seq_len=256,
        max_image_seq_len=4096,
    )


def _randn(shape: tuple[int, ...], seed: int) -> torch.Tensor:
    return torch.randn(shape, generator=torch.Generator().manual_seed(seed))


@pytest.fixture(params=["sd3", "flux"])
def process(request) -> FlowMatchingProcess:
    if request.param == "sd3":
        return FlowMatchingProcess(_sd3_scheduler(), patch_size=2)
    return FlowMatchingProcess(_flux_scheduler(), patch_size=2)


def test_noising_target_and_x0_are_the_rectified_flow_formulas(process: FlowMatchingProcess) -> None:
    """Each sample uses its own s = t / 1000: x_t = (1 - s) x0 + s n, target n - x0, x0 = x_t - s v."""
    latents, noise, velocity = (_randn((2, 4, 3, 3), seed) for seed in (1, 2, 3))
    timesteps = torch.tensor([250.0, 900.0])
    noisy = process.add_noise(latents, noise, timesteps)
    predicted = process.predict_x0(noisy, timesteps, velocity)
    for index, sigma in enumerate((0.25, 0.9)):
        torch.testing.assert_close(noisy[index], (1 - sigma) * latents[index] + sigma * noise[index])
        torch.testing.assert_close(predicted[index], noisy[index] - sigma * velocity[index])
    torch.testing.assert_close(process.target(latents, noise, timesteps), noise - latents)
    assert process.predict_x0(noisy.half(), timesteps, velocity.half()).dtype == torch.float32


def test_the_target_velocity_recovers_the_clean_latents(process: FlowMatchingProcess) -> None:
    latents, noise = _randn((3, 4, 5, 5), 4), _randn((3, 4, 5, 5), 5)
    timesteps = process.draw_timesteps(KEY, IDS[:3], "noise", "cpu")
    noisy = process.add_noise(latents, noise, timesteps)
    recovered = process.predict_x0(noisy, timesteps, process.target(latents, noise, timesteps))
    torch.testing.assert_close(recovered, latents)


def test_draws_are_per_sample_id() -> None:
    """A sample's timestep depends on its id and the purpose only, not on the batch it is drawn with."""
    process = FlowMatchingProcess(_sd3_scheduler(), patch_size=2, weighting_scheme="logit_normal")
    batch = process.draw_timesteps(KEY, IDS[:4], "noise", "cpu")
    torch.testing.assert_close(process.draw_timesteps(KEY, IDS[:4], "noise", "cpu"), batch)
    regrouped = process.draw_timesteps(KEY, [IDS[9], IDS[2], IDS[0]], "noise", "cpu")
    torch.testing.assert_close(regrouped[1:], batch[[2, 0]])
    assert not torch.equal(process.draw_timesteps(KEY, IDS[:4], "other", "cpu"), batch)
    assert len(set(batch.tolist())) == 4


@pytest.mark.parametrize("scheme", ["logit_normal", "mode", "none"])
@pytest.mark.parametrize("make_scheduler", [_sd3_scheduler, _flux_scheduler])
def test_draws_follow_the_library_density_and_schedule(scheme: str, make_scheduler) -> None:
    """u from compute_density_for_timestep_sampling with the sample's generator, then the trainers' mapping
    timesteps[(u * 1000).long()] on the checkpoint's training schedule."""
    scheduler = make_scheduler()
    process = FlowMatchingProcess(
        scheduler, patch_size=2, weighting_scheme=scheme, logit_mean=0.3, logit_std=1.4, mode_scale=1.1
    )
    generators = KEY.generators(IDS[:8], "noise")
    u = torch.cat(
        [
            compute_density_for_timestep_sampling(
                scheme, 1, logit_mean=0.3, logit_std=1.4, mode_scale=1.1, generator=generator
            )
            for generator in generators
        ]
    )
    expected = scheduler.timesteps[(u * scheduler.config.num_train_timesteps).long()]
    torch.testing.assert_close(process.draw_timesteps(KEY, IDS[:8], "noise", "cpu"), expected)


def test_draws_use_the_training_schedule_of_a_scheduler_that_has_sampled() -> None:
    used = _sd3_scheduler()
    used.set_timesteps(4)
    fresh = FlowMatchingProcess(_sd3_scheduler(), patch_size=2)
    torch.testing.assert_close(
        FlowMatchingProcess(used, patch_size=2).draw_timesteps(KEY, IDS, "noise", "cpu"),
        fresh.draw_timesteps(KEY, IDS, "noise", "cpu"),
    )


def test_below_keeps_draws_under_it_and_spreads_them_over_the_allowed_tail(
    process: FlowMatchingProcess,
) -> None:
    unbounded = process.draw_timesteps(KEY, IDS, "noise", "cpu")
    bounded = process.draw_timesteps(KEY, IDS, "noise", "cpu", below=300)
    assert unbounded.max() >= 300
    assert bounded.max() < 300
    assert bounded.min() < 60 and bounded.max() > 240
    assert bounded.unique().numel() > 50
    with pytest.raises(ValueError, match="below"):
        process.draw_timesteps(KEY, IDS, "noise", "cpu", below=1)


def test_schedule_positions_and_pure_noise(process: FlowMatchingProcess) -> None:
    """Fraction 0 is the least noisy training timestep, fractions near 1 the noisiest; pure noise is s = 1."""
    timesteps = process.timesteps_at(torch.tensor([[0.0, 0.5], [0.9999, 0.25]]))
    assert timesteps.shape == (2, 2)
    assert timesteps[0, 0] == process.train_timesteps.min()
    assert timesteps[1, 0] == process.train_timesteps.max() == 1000.0
    assert timesteps[0, 0] < timesteps[1, 1] < timesteps[0, 1] < timesteps[1, 0]
    start = process.pure_noise_timesteps(3, "cpu")
    assert start.tolist() == [1000.0] * 3
    noise = _randn((3, 4, 2, 2), 6)
    torch.testing.assert_close(process.add_noise(_randn((3, 4, 2, 2), 7), noise, start), noise)


@pytest.mark.parametrize("scheme", ["cosmap", "sigma_sqrt", "none"])
def test_loss_weights_are_the_library_weighting(scheme: str) -> None:
    process = FlowMatchingProcess(_sd3_scheduler(), patch_size=2, weighting_scheme=scheme)
    timesteps = torch.tensor([100.0, 500.0, 950.0])
    expected = compute_loss_weighting_for_sd3(scheme, torch.tensor([0.1, 0.5, 0.95]))
    torch.testing.assert_close(process.loss_weights(timesteps, None), expected)


def test_min_snr_and_unknown_schemes_are_refused() -> None:
    with pytest.raises(ValueError, match=r"generator\.snr_gamma"):
        FlowMatchingProcess(_sd3_scheduler(), patch_size=2).loss_weights(torch.tensor([500.0]), 5.0)
    with pytest.raises(ValueError, match="weighting_scheme"):
        FlowMatchingProcess(_sd3_scheduler(), patch_size=2, weighting_scheme="min_snr")


def test_flux_sampler_is_the_pipeline_schedule_shifted_for_the_token_count() -> None:
    """FluxPipeline: sigmas linspace(1, 1/n, n), mu from the packed latents' sequence length."""
    process, steps = FlowMatchingProcess(_flux_scheduler(), patch_size=2), 6
    for height, width in ((64, 64), (32, 48)):
        latents = torch.zeros(1, 16, height, width)
        packed = FluxPipeline._pack_latents(latents, 1, 16, height, width)
        reference = _flux_scheduler()
        config = reference.config
        mu = pipeline_flux.calculate_shift(
            packed.shape[1],
            config.base_image_seq_len,
            config.max_image_seq_len,
            config.base_shift,
            config.max_shift,
        )
        expected, _ = pipeline_flux.retrieve_timesteps(
            reference, steps, "cpu", sigmas=np.linspace(1.0, 1 / steps, steps), mu=mu
        )
        sampler = process.sampler(steps, latents.shape, "cpu")
        torch.testing.assert_close(sampler.timesteps, expected)
        torch.testing.assert_close(sampler.sigmas, reference.sigmas)
    assert not torch.allclose(
        process.sampler(steps, (1, 16, 64, 64), "cpu").timesteps,
        process.sampler(steps, (1, 16, 32, 48), "cpu").timesteps,
    )


def test_sd3_sampler_is_the_pipeline_default_schedule() -> None:
    process, reference = FlowMatchingProcess(_sd3_scheduler(), patch_size=2), _sd3_scheduler()
    expected, _ = pipeline_stable_diffusion_3.retrieve_timesteps(reference, 7, "cpu")
    sampler = process.sampler(7, (1, 16, 32, 32), "cpu")
    torch.testing.assert_close(sampler.timesteps, expected)
    torch.testing.assert_close(sampler.sigmas, reference.sigmas)


def test_euler_sampling_with_the_exact_velocity_lands_on_the_clean_latents(
    process: FlowMatchingProcess,
) -> None:
    shape = (2, 4, 8, 8)
    clean, noise = _randn(shape, 8), _randn(shape, 9)
    scheduler, latents = process.sampler(5, shape, "cpu"), noise
    for timestep in scheduler.timesteps:
        latents = scheduler.step(noise - clean, timestep, latents).prev_sample
    torch.testing.assert_close(latents, clean, atol=1e-5, rtol=0)


def test_names_of_the_objective() -> None:
    process = FlowMatchingProcess(FlowMatchEulerDiscreteScheduler(num_train_timesteps=500), patch_size=1)
    assert process.prediction_type == "flow_matching"
    assert process.num_train_timesteps == 500
