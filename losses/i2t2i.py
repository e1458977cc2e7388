"""image -> caption -> image cycle terms: train the captioner through the frozen generator.

Three ways to carry the generator's judgement back to the captioner, one loss each, declared at the end in
I2T2I_MODES with the batches it trains on and whether it reads the vocabulary bridge (losses/cycle_modes.py):

- soft: teacher-forced on the batch's captions; the captioner's softmax at each position goes through the
  vocabulary bridge into the generator's text encoder, and the generator's denoising loss on the ORIGINAL
  image is backpropagated into the captioner (the paper's I2T2I term, with a better vocabulary map).
- gumbel: the captioner's own free-running caption, sampled with the straight-through Gumbel-softmax, takes
  the same path; needs only images.
- reward: K nucleus-sampled captions per image scored by the generator's denoising loss (models/scoring.py,
  no gradient through the generator), and a group-baseline policy gradient (SCST / GRPO style) on their
  log-likelihoods, optionally with a KL penalty towards the base captioner; needs only images.

The generator is frozen by the trainer but not detached: in soft and gumbel the gradient passes through its
UNet and text encoder. Every random draw comes from the step's key per sample id and purpose, so results do
not depend on how a batch is split over processes.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Literal

import torch
import torch.nn.functional as F
from pydantic import Field, field_validator

from cycletune.losses.advantages import group_advantages
from cycletune.losses.cycle_modes import OFF, CycleMode, CycleModes, CycleOutput, CycleStep
from cycletune.losses.settings import Strict
from cycletune.models.caption_decoding import IGNORE_INDEX, SampledCaptions
from cycletune.models.captioner import Captioner
from cycletune.models.device_transfer import to_device
from cycletune.models.generator import Generator
from cycletune.models.generator_bridge import GeneratorBridge
from cycletune.models.randomness import DrawKey
from cycletune.models.scoring import DenoiseDraws, caption_scores, grouped_denoise_loss

I2T2IStep = CycleStep[Captioner, Generator]


class I2T2ISettings(Strict):
    """image -> caption -> image: trains the captioner through the frozen generator."""

    # OFF or a mode of I2T2I_MODES.
    mode: str = OFF
    weight: float = Field(1.0, ge=0)
    # soft: temperature of the captioner's softmax; gumbel: the Gumbel-softmax temperature.
    temperature: float = Field(1.0, gt=0)
    # gumbel: free-running decode length (None: captioner.max_length).
    max_length: int | None = Field(None, ge=2)
    # soft / gumbel: noise draws averaged in the frozen generator's denoising loss.
    num_timesteps: int = Field(1, ge=1)
    # reward: K sampled captions per image, scored by the generator's denoising loss.
    num_candidates: int = Field(4, ge=2)
    # 1.0 keeps the policy gradient on-policy; a nucleus (< 1) samples off-policy and trained worse here.
    top_p: float = Field(1.0, gt=0, le=1)
    prompt: str | None = None
    reward_timesteps: int = Field(4, ge=1)
    # reward: the span of the schedule (fractions, 0 the cleanest step) the reward_timesteps are drawn from.
    # make reward-agreement found the noisy half, (0.5, 1.0), agrees best with sampling-based similarity.
    reward_timestep_range: tuple[float, float] = (0.0, 1.0)
    # reward: advantages are (r - mean_K r) / max(std_K r, floor), the floor in reward units (the generator's
    # denoising loss), so candidates whose rewards differ only by the noise of the reward_timesteps draws get
    # small advantages instead of unit-scale ones. Measured (std over 16 noise draws of each candidate's reward
    # minus its group mean, K = 4): tiny random models 1.0e-3 to 1.5e-3; shapes-base 1e-4 to 1.8e-3 on images
    # whose candidates differ by less than that noise, while images with really different candidates have a
    # group std of 1e-2 to 2e-2. 5e-3, about 3x the largest pure-noise std, keeps those at unit scale and shrinks
    # pure-noise groups to advantages of 0.3 or less. Other generators have other loss scales: measure theirs.
    advantage_std_floor: float = Field(5e-3, gt=0)
    logprob_reduction: Literal["sum", "mean"] = "mean"
    kl_weight: float = Field(0.0, ge=0)

    @field_validator("mode")
    @classmethod
    def _mode_is_declared(cls, mode: str) -> str:
        return I2T2I_MODES.check_name(mode)

    @field_validator("reward_timestep_range")
    @classmethod
    def _range_is_within_the_schedule(cls, span: tuple[float, float]) -> tuple[float, float]:
        low, high = span
        if not 0 <= low < high <= 1:
            raise ValueError(f"needs 0 <= low < high <= 1 (fractions of the schedule), got [{low}, {high}]")
        return span


def soft_token_probs(logits: torch.Tensor, input_ids: torch.Tensor, temperature: float) -> torch.Tensor:
    """Teacher-forced logits [B, L, V] -> the soft caption [B, L, V] the generator reads.

    Position 0 is the start token's one-hot; position i + 1 is softmax(logits[:, i] / temperature), as
    logits[:, i] predicts token i + 1.
    """
    start = F.one_hot(input_ids[:, :1], logits.shape[-1]).to(logits.dtype)
    return torch.cat([start, torch.softmax(logits[:, :-1] / temperature, dim=-1)], dim=1)


def reconstruction_loss(
    generator: Generator,
    bridge: GeneratorBridge,
    pixels01: torch.Tensor,
    ids: Sequence[str],
    probs: torch.Tensor,
    attention_mask: torch.Tensor,
    *,
    num_timesteps: int,
    key: DrawKey,
) -> torch.Tensor:
    """The generator's denoising loss [B] on each image given its soft caption, averaged over noise draws.

    Each text encoder runs once and the denoiser once (all num_timesteps draws of all images in one batch).
    The image latents are data, so they are encoded without grad.
    """
    contexts = bridge.encode(generator, probs, attention_mask)
    draws = DenoiseDraws.draw(generator, key, ids, "i2t2i", num_timesteps, pixels01.device)
    with torch.no_grad():
        latents = generator.encode_images(pixels01, draws.vae_noise)
    return grouped_denoise_loss(generator, latents, contexts, draws)[:, 0]


def _soft_caption_output(
    step: I2T2IStep, probs: torch.Tensor, attention_mask: torch.Tensor, settings: I2T2ISettings
) -> CycleOutput:
    """The frozen generator's denoising loss on the batch's images given their soft captions (the bridge's
    presence is checked by I2T2I_MODES.run)."""
    bridge, batch = step.bridge, step.batch
    loss = reconstruction_loss(
        step.partner,
        bridge,
        batch["pixels"],
        batch["ids"],
        probs,
        attention_mask,
        num_timesteps=settings.num_timesteps,
        key=step.key,
    ).mean()
    return CycleOutput(
        loss,
        {"denoise": loss.detach(), "bridge_mass": bridge.mass_coverage(probs, attention_mask)},
    )


def soft(step: I2T2IStep, settings: I2T2ISettings) -> CycleOutput:
    """Teacher-forced soft caption of the batch's captions -> frozen generator -> denoising loss."""
    captioner, batch = step.trained, step.batch
    tokens = captioner.tokenize(batch["captions"])
    logits = captioner.logits(batch["pixels"], tokens["input_ids"], tokens["attention_mask"]).float()
    # From the prefix's last slot on: the start slot, then the caption (a prompt is not part of the caption).
    caption_ids, caption_mask = (
        captioner.caption_part(tokens[key]) for key in ("input_ids", "attention_mask")
    )
    probs = soft_token_probs(captioner.caption_part(logits), caption_ids, settings.temperature)
    return _soft_caption_output(step, probs, caption_mask, settings)


def gumbel_noise(
    key: DrawKey, ids: Sequence[str], shape: Sequence[int], device: torch.device
) -> torch.Tensor:
    """Standard Gumbel draws [B, *shape] per sample: -log(E) with E ~ Exponential(1)."""
    draws = [
        -torch.empty(tuple(shape)).exponential_(generator=g).clamp_min(torch.finfo(torch.float32).tiny).log()
        for g in key.generators(ids, "i2t2i/gumbel")
    ]
    return to_device(torch.stack(draws), device)


def gumbel(step: I2T2IStep, settings: I2T2ISettings) -> CycleOutput:
    """The captioner's own straight-through Gumbel-softmax caption -> frozen generator -> denoising loss."""
    captioner, pixels, ids = step.trained, step.batch["pixels"], step.batch["ids"]
    max_length = settings.max_length or captioner.max_length
    noise = gumbel_noise(step.key, ids, (max_length, captioner.vocab_size), pixels.device)
    probs, attention_mask = captioner.gumbel_decode(
        pixels, max_length=max_length, temperature=settings.temperature, gumbel_noise=noise
    )
    output = _soft_caption_output(step, probs, attention_mask, settings)
    # Tokens after the start token, the end token included.
    output.metrics["length"] = attention_mask[:, 1:].sum(dim=1).float().mean()
    return output


def sample_candidates(
    captioner: Captioner, pixels01: torch.Tensor, ids: Sequence[str], settings: I2T2ISettings, key: DrawKey
) -> SampledCaptions:
    """settings.num_candidates nucleus-sampled captions per image, every choice drawn from `key` per id."""
    max_new_tokens = settings.max_length or captioner.max_length
    uniforms = torch.stack(
        [
            torch.rand((settings.num_candidates, max_new_tokens), generator=g)
            for g in key.generators(ids, "i2t2i/sampling")
        ]
    )
    return captioner.sample_captions(
        pixels01, uniforms=uniforms, top_p=settings.top_p, prompt=settings.prompt
    )


def candidate_rewards(
    generator: Generator,
    pixels01: torch.Tensor,
    ids: Sequence[str],
    captions: list[list[str]],
    settings: I2T2ISettings,
    key: DrawKey,
) -> torch.Tensor:
    """Reward [B, K] of each candidate: minus the frozen generator's denoising loss (no grad)."""
    return -caption_scores(
        generator,
        pixels01,
        captions,
        key=key,
        ids=ids,
        num_timesteps=settings.reward_timesteps,
        purpose="i2t2i/reward",
        timestep_range=settings.reward_timestep_range,
    )


def reward(step: I2T2IStep, settings: I2T2ISettings) -> CycleOutput:
    """Group-baseline policy gradient on K sampled captions per image, rewarded by -denoising loss.

    advantage = (r - mean_K r) / max(std_K r, settings.advantage_std_floor) per image (group_advantages);
    loss = -mean(advantage * log p(caption)), log p summed over tokens or averaged
    (settings.logprob_reduction). The KL penalty to the base captioner (adapters off) enters as its
    score-function gradient, (d - mean_K d) * log p with d = log p - log p_base summed over tokens: the plain
    `kl_weight * d` has zero expected gradient on samples from p (E_p[grad log p] = 0), so it would not
    regularise at all. The bridge is not used.
    """
    captioner, generator, key = step.trained, step.partner, step.key
    pixels, ids = step.batch["pixels"], step.batch["ids"]
    if settings.kl_weight > 0 and not captioner.has_adapters:
        raise ValueError(
            "cycle.i2t2i.kl_weight > 0 needs a LoRA captioner (captioner train_mode 'lora'): the KL term "
            "compares with the base model by disabling the adapters, and full fine-tuning keeps no base copy"
        )
    sampled = sample_candidates(captioner, pixels, ids, settings, key)
    rewards = candidate_rewards(generator, pixels, ids, sampled.captions, settings, key)
    advantages = group_advantages(rewards, settings.advantage_std_floor).flatten()
    logprobs = captioner.sequence_logprobs(pixels, **sampled.tokens)
    policy_logprobs = logprobs
    if settings.logprob_reduction == "mean":
        token_counts = (sampled.tokens["labels"][:, 1:] != IGNORE_INDEX).sum(dim=1).clamp(min=1)
        policy_logprobs = logprobs / token_counts
    loss = -(advantages.to(logprobs) * policy_logprobs).mean()
    metrics = {"reward_mean": rewards.mean(), "reward_std": rewards.std(dim=1, correction=0).mean()}
    if settings.kl_weight > 0:
        with torch.no_grad(), captioner.adapters_disabled():
            base_logprobs = captioner.sequence_logprobs(pixels, **sampled.tokens)
        log_ratio = (logprobs.detach() - base_logprobs).view_as(rewards)
        centred = (log_ratio - log_ratio.mean(dim=1, keepdim=True)).flatten()
        loss = loss + settings.kl_weight * (centred * logprobs).mean()
        metrics["kl"] = log_ratio.detach().mean()
    return CycleOutput(loss, metrics)


I2T2I_MODES = CycleModes(
    "i2t2i",
    {
        # Teacher-forced on the batch's captions, so only paired batches have what it reads.
        "soft": CycleMode(soft, batches=("paired",), needs_bridge=True),
        "gumbel": CycleMode(gumbel, batches=("paired", "image_only"), needs_bridge=True),
        "reward": CycleMode(reward, batches=("paired", "image_only")),
    },
)
