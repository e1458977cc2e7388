"""text -> image -> caption cycle terms: train the generator through the frozen captioner's caption loss.

Both modes make an image from the caption with gradient, decode it, and score it by the frozen captioner's
teacher-forced cross-entropy on that same caption; the gradient reaches the UNet through the captioner and
the VAE decoder (neither is updated: the trainer freezes the captioner, the VAE never trains). Every random
draw comes from the DrawKey, per sample id and purpose, so runs are reproducible and shard-independent.
Each mode is declared at the end, in T2I2T_MODES, with the batches it trains on (losses/cycle_modes.py).

- one_step: the paper's one scheduler step done right. The reference image is noised to a random timestep
  and the UNet's single prediction is turned into its clean-latent estimate (predict_x0), not the clean
  latents themselves as the paper's code did, so the decoded image depends on the UNet. Text-only batches
  start from pure noise at the last timestep instead (the sampler's first step). With share_denoise_pass,
  a paired batch's cycle term decodes the denoising term's own UNet call instead of making a second one.
- sample (any batch with captions, text-only included): DDIM from key-drawn noise, backpropagating through
  only the last grad_steps steps (DRaFT-K), with classifier-free guidance when guidance_scale > 1.
- reward (any batch with captions; paired batches' images are not used): DDPO-style policy gradient. G
  stochastic DDIM chains per caption, their images scored by the frozen captioner (its caption likelihood,
  or its re-caption's CIDEr-D) without any gradient through it or the decoder, group advantages, and a
  clipped importance-ratio loss on a share of each chain's transitions (losses/t2i2t_reward.py).
"""

from __future__ import annotations

from typing import Literal

import torch
from pydantic import Field, field_validator, model_validator

from cycletune.losses.cycle_modes import OFF, CycleMode, CycleModes, CycleOutput, CycleStep
from cycletune.losses.settings import Strict
from cycletune.losses.supervised import DenoisePass
from cycletune.losses.t2i2t_reward import reward
from cycletune.models.captioner import Captioner
from cycletune.models.generator import Generator

T2I2TStep = CycleStep[Generator, Captioner]


class T2I2TSettings(Strict):
    """text -> image -> caption: trains the generator through the frozen captioner."""

    # OFF or a mode of T2I2T_MODES.
    mode: str = OFF
    weight: float = Field(1.0, ge=0)
    # one_step: timesteps drawn from the family's training density below max_timestep (DDPM: uniform integers;
    # flow matching: s * 1000); None: the whole schedule.
    max_timestep: int | None = Field(None, ge=1)
    # one_step on paired batches: decode the denoising term's own UNet prediction instead of a second UNet
    # call (about half the phase's cost; same per-sample distribution; see one_step_on_denoise_pass).
    share_denoise_pass: bool = False
    # sample and reward: DDIM steps from pure noise; sample backpropagates through only the last grad_steps
    # (DRaFT-K).
    num_inference_steps: int = Field(10, ge=1)
    grad_steps: int = Field(1, ge=1)
    guidance_scale: float = Field(1.0, ge=0)
    # reward: G chains per caption, DDIM noise level eta (1: DDPM-like; 0 would make no step stochastic).
    num_images: int = Field(4, ge=2)
    eta: float = Field(1.0, gt=0)
    # reward: the share of each chain's num_inference_steps transitions trained on (whole part, at least 1),
    # drawn per chain; the DDPO ratio clip; the weight of the exact KL to the base UNet (adapters off).
    train_timesteps: float = Field(0.25, gt=0, le=1)
    clip_range: float = Field(1e-4, gt=0)
    kl_weight: float = Field(0.0, ge=0)
    # reward: likelihood, minus the frozen captioner's per-token caption NLL on the image (one teacher-forced
    # pass per image); cider_d, the CIDEr-D of its greedy re-caption against the caption, its idf from the
    # training captions (one decode of up to captioner.max_length tokens per image, and the PTB tokenizer's
    # Java call for captions not seen before; needs the [eval] extra, checked at start-up).
    reward: Literal["likelihood", "cider_d"] = "likelihood"
    # reward: advantages are (r - mean_G r) / max(std_G r, floor), the floor in reward units (likelihood:
    # nats per token; cider_d: CIDEr-D, 0 to 10). Neither reward has scoring noise (a deterministic captioner
    # pass per image), so the floor only keeps groups of near-identical images from unit-scale advantages.
    # Measured on shapes-base (G = 4, 10 steps, eta 1, 48 captions): likelihood group stds 0.02 to 0.7,
    # median 0.3; cider_d 0.02 to 3.9, median 0.8, and 0 where a group's re-captions are all alike (its
    # advantages are 0 whatever the floor). The one default suits both; random tiny models give likelihood
    # stds of about 1e-4, whose groups the floor shrinks 100-fold. Other captioners: measure theirs.
    advantage_std_floor: float = Field(1e-2, gt=0)

    @field_validator("mode")
    @classmethod
    def _mode_is_declared(cls, mode: str) -> str:
        return T2I2T_MODES.check_name(mode)

    @model_validator(mode="after")
    def _grad_steps_fit(self) -> T2I2TSettings:
        if self.grad_steps > self.num_inference_steps:
            raise ValueError("cycle.t2i2t.grad_steps cannot exceed cycle.t2i2t.num_inference_steps")
        # With mode none it is moot (a control arm turns the cycle off and keeps the rest of the config).
        if self.share_denoise_pass and self.mode in ("sample", "reward"):
            raise ValueError(
                "cycle.t2i2t.share_denoise_pass applies to mode 'one_step'; "
                f"mode {self.mode!r} makes its own images"
            )
        return self


def one_step(step: T2I2TStep, settings: T2I2TSettings) -> CycleOutput:
    """Caption loss of the image decoded from one UNet prediction's x0 estimate.

    On paired batches the reference image is noised to a timestep below max_timestep. A text-only batch
    has no image to noise, so its input is pure noise at the last training timestep: the sampler's own
    first step, whose x0 estimate is where a sample's layout (position, size) is decided. That also lets
    unpaired captions teach the generator at the cost of one UNet call.
    """
    generator, batch, key = step.trained, step.batch, step.key
    ids, captions = batch["ids"], batch["captions"]
    process = generator.process
    device, latent_shape = generator.device, generator.latent_shape(1)[1:]
    noise = key.randn(ids, "t2i2t_noise", latent_shape, device)
    if "pixels" in batch:
        # The reference latents are a fixed input here; the gradient path runs through the denoiser and decoder.
        with torch.no_grad():
            latents = generator.encode_images(
                batch["pixels"], key.randn(ids, "t2i2t_vae_noise", latent_shape, device)
            )
        timesteps = process.draw_timesteps(
            key, ids, "t2i2t_timestep", device, below=_max_timestep(generator, settings)
        )
        noisy = process.add_noise(latents, noise, timesteps)
    else:
        timesteps = process.pure_noise_timesteps(len(ids), device)
        noisy = noise
    prediction = generator.predict(noisy, timesteps, generator.encode_text(generator.tokenize(captions)))
    x0 = generator.predict_x0(noisy, timesteps, prediction)
    return _recaption_loss(generator, step.partner, x0, captions)


def one_step_on_denoise_pass(step: T2I2TStep, settings: T2I2TSettings, denoised: DenoisePass) -> CycleOutput:
    """one_step on a paired batch without a second UNet call: decode the denoising term's own prediction.

    The denoising term draws its noise and timesteps the way one_step does (uniform timesteps, standard
    normal noise), so each sample's cycle term has the same distribution as with its own call, for about
    half the cost (with generator.noise_offset > 0 the shared noise carries that offset too). Samples whose
    caption the denoising term dropped (their prediction is unconditional), and those at or above
    max_timestep, are left out of the mean; nothing is sliced, so the host never waits.
    """
    generator = step.trained
    counted = denoised.captioned & (denoised.timesteps < _max_timestep(generator, settings))
    output = denoised.output
    x0 = generator.predict_x0(output.noisy, denoised.timesteps, output.prediction)
    return _recaption_loss(generator, step.partner, x0, step.batch["captions"], counted.float())


def _max_timestep(generator: Generator, settings: T2I2TSettings) -> int:
    """one_step's timesteps are drawn below this (settings.max_timestep, or the whole schedule)."""
    num_train_timesteps = generator.process.num_train_timesteps
    max_timestep = settings.max_timestep or num_train_timesteps
    if max_timestep > num_train_timesteps:
        raise ValueError(
            f"cycle.t2i2t.max_timestep={max_timestep} exceeds the scheduler's {num_train_timesteps} timesteps"
        )
    return max_timestep


def sample(step: T2I2TStep, settings: T2I2TSettings) -> CycleOutput:
    """Caption loss of a DDIM sample for each caption, with gradient through its last grad_steps steps."""
    generator, ids, captions = step.trained, step.batch["ids"], step.batch["captions"]
    initial = step.key.randn(ids, "t2i2t_initial_latents", generator.latent_shape(1)[1:], generator.device)
    conditioning = generator.encode_text(generator.tokenize(captions))
    guided = settings.guidance_scale > 1.0
    final = generator.sample_with_grad(
        conditioning,
        initial,
        num_inference_steps=settings.num_inference_steps,
        grad_steps=settings.grad_steps,
        guidance_scale=settings.guidance_scale,
        uncond_hidden_states=generator.unconditional(conditioning) if guided else None,
    )
    return _recaption_loss(generator, step.partner, final, captions)


def _recaption_loss(
    generator: Generator,
    captioner: Captioner,
    latents: torch.Tensor,
    captions: list[str],
    weights: torch.Tensor | None = None,
) -> CycleOutput:
    """Decode with gradient and score by the frozen captioner (it resizes and normalises the pixels itself).

    `weights` [B] (0 or 1) choose which samples the mean counts (all by default).
    """
    per_sample = captioner.caption_loss(generator.decode_latents(latents), **captioner.tokenize(captions))
    if weights is None:
        weights = torch.ones_like(per_sample)
    loss = (per_sample * weights).sum() / weights.sum().clamp(min=1)
    return CycleOutput(loss=loss, metrics={"caption_ce": loss.detach()})


T2I2T_MODES = CycleModes(
    "t2i2t",
    {
        # A text-only batch has no image to noise: one_step starts from pure noise, as sample and reward do.
        "one_step": CycleMode(one_step, batches=("paired", "text_only")),
        "sample": CycleMode(sample, batches=("paired", "text_only")),
        "reward": CycleMode(reward, batches=("paired", "text_only")),
    },
)
