"""text -> image -> caption `reward` mode: a DDPO-style policy gradient on the generator's sampling chains.

Where one_step and sample backpropagate through the frozen captioner and the VAE decoder, this mode needs only
their forward passes: each caption gets G stochastic chains of the generator's own sampler
(models/denoising_chain.py: DDIM for the DDPM families, the Euler sampler's SDE for the flow-matching ones),
their images are scored by the frozen captioner (cycle.t2i2t.reward: its caption likelihood, or the CIDEr-D of
its greedy re-caption against the caption), and the generator is trained to make the better-scored
chains' transitions likelier. The mode is registered in losses/t2i2t.py's T2I2T_MODES, whose T2I2TSettings
holds its knobs.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Protocol

import torch

from cycletune.losses.advantages import group_advantages
from cycletune.losses.cycle_modes import CaptionScorer, CycleOutput, CycleStep
from cycletune.models.captioner import Captioner
from cycletune.models.denoising_chain import (
    Chain,
    ChainPolicy,
    Conditioning,
    base_policy,
    chain_policy,
    gaussian_kl,
    sample_chain,
    transition,
    transition_mean,
)
from cycletune.models.device_transfer import to_device
from cycletune.models.generator import Generator
from cycletune.models.randomness import DrawKey


class RewardSettings(Protocol):
    """The cycle.t2i2t knobs this mode reads (declared and validated in losses/t2i2t.py's T2I2TSettings)."""

    num_images: int
    num_inference_steps: int
    guidance_scale: float
    eta: float
    train_timesteps: float
    clip_range: float
    kl_weight: float
    advantage_std_floor: float
    reward: str


def chain_ids(ids: Sequence[str], num_images: int) -> list[str]:
    """One id per chain, image index g of sample id s named "s/g": the key draws each chain's noise by it, so
    a caption's chains do not depend on which other captions share its batch."""
    return [f"{sample_id}/{image}" for sample_id in ids for image in range(num_images)]


def sample_chains(
    generator: Generator,
    captions: list[str],
    ids: Sequence[str],
    settings: RewardSettings,
    key: DrawKey,
) -> tuple[ChainPolicy, Conditioning, Chain]:
    """settings.num_images stochastic chains per caption (no grad), caption i's chains consecutive.

    The conditioning keeps the text encoder's graph (it trains under full fine-tuning) for the recomputed
    transitions; the chains themselves are sampled without one.
    """
    policy = chain_policy(generator, settings.num_inference_steps, settings.eta)
    per_chain = chain_ids(ids, settings.num_images)
    shape, device = generator.latent_shape(1)[1:], generator.device
    steps = len(policy.timesteps)
    initial = key.randn(per_chain, "t2i2t/reward_initial", shape, device)
    noise = key.randn(per_chain, "t2i2t/reward_step", (steps, *shape), device)
    states = generator.encode_captions(captions)
    uncond = generator.unconditional(states) if settings.guidance_scale > 1.0 else None
    conditioning = Conditioning(
        states.repeat_interleave(settings.num_images, dim=0),
        settings.guidance_scale,
        None if uncond is None else uncond.repeat_interleave(settings.num_images, dim=0),
    )
    return policy, conditioning, sample_chain(generator, policy, conditioning, initial, noise)


@torch.no_grad()
def likelihood_rewards(
    generator: Generator, captioner: Captioner, latents: torch.Tensor, captions: list[str]
) -> torch.Tensor:
    """Reward [N] of each chain's final latents: minus the frozen captioner's length-normalised NLL of its
    caption on the decoded image (caption_loss is the mean over the caption's tokens)."""
    return -captioner.caption_loss(generator.decode_latents(latents), **captioner.tokenize(captions))


@torch.no_grad()
def recaption_rewards(
    generator: Generator,
    captioner: Captioner,
    scorer: CaptionScorer,
    latents: torch.Tensor,
    captions: list[str],
) -> torch.Tensor:
    """Reward [N] of each chain's final latents: the scorer's value (CIDEr-D) of the frozen captioner's greedy
    re-caption of the decoded image (captioner.max_length new tokens at most) against its caption. Greedy
    decoding draws nothing, so the reward is as deterministic as the chain."""
    recaptions = [texts[0] for texts in captioner.generate(generator.decode_latents(latents))]
    return torch.tensor(scorer(recaptions, captions), dtype=torch.float32, device=latents.device)


def chain_rewards(
    step: CycleStep[Generator, Captioner],
    settings: RewardSettings,
    latents: torch.Tensor,
    captions: list[str],
) -> torch.Tensor:
    """settings.reward's reward [N] of each chain's final latents, captions[i] being chain i's caption."""
    generator, captioner = step.trained, step.partner
    if settings.reward == "likelihood":
        return likelihood_rewards(generator, captioner, latents, captions)
    if step.caption_scorer is None:
        raise ValueError(
            f"cycle.t2i2t.reward={settings.reward!r} needs the trainer's caption scorer "
            "(train/builders.py build_caption_scorer); this step was given none"
        )
    return recaption_rewards(generator, captioner, step.caption_scorer, latents, captions)


def chosen_steps(key: DrawKey, ids: Sequence[str], policy: ChainPolicy, share: float) -> torch.Tensor:
    """[N, k] step indices (CPU) of the transitions each chain trains on, drawn per chain id without
    replacement from the stochastic steps (policy.stochastic_steps): k is the whole part of share * S as in
    DDPO's timestep_fraction, at least 1 and at most the stochastic steps' count."""
    candidates = torch.tensor(policy.stochastic_steps, dtype=torch.long)
    if len(candidates) == 0:
        raise ValueError(
            f"cycle.t2i2t.mode='reward': none of the {len(policy.timesteps)} DDIM steps is stochastic "
            "(the last one is deterministic when the scheduler sets alpha to one): raise num_inference_steps"
        )
    count = min(len(candidates), max(1, int(share * len(policy.timesteps))))
    return torch.stack(
        [
            candidates[torch.randperm(len(candidates), generator=g)[:count]]
            for g in key.generators(ids, "t2i2t/reward_timesteps")
        ]
    )


def reward(step: CycleStep[Generator, Captioner], settings: RewardSettings) -> CycleOutput:
    """Clipped policy gradient on G chains per caption, rewarded through the frozen captioner (chain_rewards).

    advantage A = group_advantages over each caption's G chains; for each chain's chosen transitions
    (chosen_steps), r = exp(log p_theta(x_{t-1} | x_t) - the log-probability recorded while sampling) and
    loss = -mean(min(A r, A clip(r, 1 - clip_range, 1 + clip_range))) + kl_weight * mean(KL), the KL being
    the exact Gaussian KL of each chosen transition to the base denoiser's (adapters off) at the same x_t.
    One update per sampled batch makes r = 1 up to float error and LoRA dropout (different masks while
    sampling and recomputing): with dropout the ratio strays beyond a 1e-4 clip range, and half of those
    samples (A r above the clipped value) then carry no gradient.

    Memory: the chains are sampled first without a graph; then each slot of chosen transitions (one per
    chain) is one checkpointed denoiser call over all chains, so the graph kept until backward is each
    slot's inputs and outputs, never a chain's activations.
    """
    generator, key = step.trained, step.key
    ids, captions = step.batch["ids"], step.batch["captions"]
    if settings.kl_weight > 0 and not getattr(generator.denoiser, "peft_config", None):
        raise ValueError(
            "cycle.t2i2t.kl_weight > 0 needs a LoRA generator (generator train_mode 'lora'): the KL term "
            "compares with the base model by disabling the adapters, and full fine-tuning keeps no base copy"
        )
    policy, conditioning, chain = sample_chains(generator, captions, ids, settings, key)
    repeated = [caption for caption in captions for _ in range(settings.num_images)]
    rewards = chain_rewards(step, settings, chain.latents[-1], repeated).view(len(ids), -1)
    advantages = group_advantages(rewards, settings.advantage_std_floor).flatten()
    chosen = chosen_steps(key, chain_ids(ids, settings.num_images), policy, settings.train_timesteps)
    rows = torch.arange(len(advantages), device=advantages.device)
    low, high = 1 - settings.clip_range, 1 + settings.clip_range
    objectives, clipped, kls = [], [], []
    for slot in chosen.T:
        index = to_device(slot, chain.latents.device)
        timesteps = policy.timesteps[slot]
        latents, following = chain.latents[index, rows], chain.latents[index + 1, rows]
        current = transition(generator, policy, latents, timesteps, following, conditioning)
        ratio = (current.logprob - chain.logprobs[index, rows]).exp()
        objectives.append(torch.minimum(advantages * ratio, advantages * ratio.clamp(low, high)))
        clipped.append(((ratio - 1).abs() > settings.clip_range).float().detach())
        if settings.kl_weight > 0:
            with torch.no_grad(), base_policy(generator):
                base_mean, _ = transition_mean(generator, policy, latents, timesteps, conditioning)
            kls.append(gaussian_kl(current.mean, base_mean, current.sigma))
    loss = -torch.cat(objectives).mean()
    metrics = {
        "reward_mean": rewards.mean(),
        "reward_std": rewards.std(dim=1, correction=0).mean(),
        "clip_fraction": torch.cat(clipped).mean(),
    }
    if settings.kl_weight > 0:
        kl = torch.cat(kls).mean()
        loss = loss + settings.kl_weight * kl
        metrics["kl"] = kl.detach()
    return CycleOutput(loss, metrics)
