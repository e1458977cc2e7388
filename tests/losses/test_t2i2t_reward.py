"""The T2I2T reward mode on tiny models: gradient routing, the policy gradient and KL it computes, its sign,
per-sample draws, the ratio clip, its settings, and the recipe training with it on paired and text-only
data."""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

import pytest
import torch
from cycle_runs import run_recipe_in_process, sample_log, tiny_overrides
from lora_weights import perturb_lora
from pydantic import ValidationError

from cycletune.losses.advantages import group_advantages
from cycletune.losses.cycle_modes import CycleOutput, CycleStep
from cycletune.losses.t2i2t import T2I2T_MODES, T2I2TSettings
from cycletune.losses.t2i2t_reward import chain_ids, chosen_steps, likelihood_rewards, sample_chains
from cycletune.models.captioner import Captioner
from cycletune.models.denoising_chain import (
    Chain,
    base_policy,
    ddim_policy,
    gaussian_kl,
    sample_chain,
    transition,
    transition_mean,
)
from cycletune.models.generator import Generator
from cycletune.models.lora import add_generator_lora, frozen, prepare_trainable
from cycletune.models.randomness import DrawKey
from cycletune.models.tiny import TINY_GENERATORS

CAPTIONS = ["a red circle at the top", "a small blue square", "a large green triangle in the corner"]
IDS = ["sample-0", "sample-1", "sample-2"]
KEY = DrawKey(seed=0, step=3)
# 3 DDIM steps of which the tiny scheduler's first 2 are stochastic (the last lands on alpha_bar = 1).
SETTINGS = T2I2TSettings(mode="reward", num_images=2, num_inference_steps=3, train_timesteps=0.5)


# The tests parametrized over families: the tiny SD generator's DDIM chains, and the flow-matching families'
# SDE form of their Euler sampler (models/flow_sde_policy.py).
FAMILIES = ["sd", "sd3", "flux"]


@pytest.fixture(scope="module")
def flow_generator_folders(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("reward_flow_generators")
    return {
        family: TINY_GENERATORS[family](root / family, seed=0, resolution=16)
        for family in ("sd3", "flux", "sdxl")
    }


@pytest.fixture
def generator(request: pytest.FixtureRequest, generator: Generator, flow_generator_folders) -> Generator:
    """The trainer's LoRA generator, its adapters perturbed: a policy that differs from the base denoiser.
    The tiny SD one, or the family a test names by indirect parametrization."""
    family = getattr(request, "param", "sd")
    if family != "sd":
        generator = Generator.from_pretrained(str(flow_generator_folders[family]))
    add_generator_lora(generator, rank=4, alpha=4.0)
    names = prepare_trainable(generator, train_mode="lora")
    perturb_lora(generator, names, seed=2, scale=0.1, replace=False)
    return generator


def _lora(generator: Generator) -> dict[str, torch.nn.Parameter]:
    return {name: param for name, param in generator.named_parameters() if "lora_" in name}


def _text_batch(size: int = 2) -> dict[str, Any]:
    return {"kind": "text_only", "ids": IDS[:size], "captions": CAPTIONS[:size]}


def _run(
    generator: Generator, captioner: Captioner, batch: dict[str, Any], settings: T2I2TSettings
) -> CycleOutput:
    with frozen(captioner):
        return T2I2T_MODES.run(settings, CycleStep(generator, captioner, batch, KEY))


def _flat_grad(generator: Generator) -> torch.Tensor:
    return torch.cat([param.grad.flatten() for param in _lora(generator).values()])


@pytest.mark.parametrize("generator", FAMILIES, indirect=True)
@pytest.mark.parametrize("kind", ["paired", "text_only"])
def test_only_the_generator_lora_learns_and_the_captioner_stays_as_it_was(
    generator: Generator, captioner: Captioner, kind: str
) -> None:
    """Paired batches' images are ignored; the KL's adapter toggling leaves the trainable flags as they
    were."""
    batch = _text_batch() | {"kind": kind}
    if kind == "paired":
        batch["pixels"] = torch.rand(2, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    before = {name: param.detach().clone() for name, param in captioner.named_parameters()}
    settings = SETTINGS.model_copy(update={"kl_weight": 0.1})
    output = _run(generator, captioner, batch, settings)
    assert output.loss.ndim == 0 and torch.isfinite(output.loss)
    assert set(output.metrics) == {"reward_mean", "reward_std", "clip_fraction", "kl"}
    assert all(value.ndim == 0 and not value.requires_grad for value in output.metrics.values())
    output.loss.backward()
    lora = _lora(generator)
    assert all(param.grad is not None and torch.isfinite(param.grad).all() for param in lora.values())
    assert all(param.requires_grad for param in lora.values())
    assert all(param.grad is None for name, param in generator.named_parameters() if name not in lora)
    assert all(param.grad is None for param in captioner.parameters())
    assert all(torch.equal(param, before[name]) for name, param in captioner.named_parameters())


def test_gradient_is_the_advantage_weighted_score_plus_the_kl_gradient(
    generator: Generator, frozen_captioner: Captioner
) -> None:
    """On-policy the ratio is 1 (nothing clipped) and its gradient is grad log p: the loss's gradient is that
    of -mean(A log p) + kl_weight * mean(KL) over each chain's chosen transitions, written out here."""
    batch = _text_batch()
    settings = SETTINGS.model_copy(update={"kl_weight": 0.5, "train_timesteps": 1.0})
    output = _run(generator, frozen_captioner, batch, settings)
    output.loss.backward()
    ours = _flat_grad(generator)
    generator.zero_grad()

    policy, conditioning, chain = sample_chains(generator, batch["captions"], batch["ids"], settings, KEY)
    repeated = [caption for caption in batch["captions"] for _ in range(2)]
    rewards = likelihood_rewards(generator, frozen_captioner, chain.latents[-1], repeated).view(2, 2)
    advantages = group_advantages(rewards, settings.advantage_std_floor).flatten()
    steps = chosen_steps(KEY, chain_ids(batch["ids"], 2), policy, settings.train_timesteps)
    assert steps.shape == (4, 2)  # all 3 steps asked for; the last one is deterministic
    rows, scores, kls = torch.arange(4), [], []
    for index in steps.T:
        latents, timesteps = chain.latents[index, rows], policy.timesteps[index]
        current = transition(
            generator, policy, latents, timesteps, chain.latents[index + 1, rows], conditioning
        )
        with torch.no_grad(), base_policy(generator):
            base_mean, _ = transition_mean(generator, policy, latents, timesteps, conditioning)
        scores.append(advantages * current.logprob)
        kls.append(gaussian_kl(current.mean, base_mean, current.sigma))
    kl = torch.cat(kls)
    (-torch.cat(scores).mean() + settings.kl_weight * kl.mean()).backward()
    reference = _flat_grad(generator)
    assert (ours - reference).norm() <= 1e-4 * reference.norm()
    assert output.metrics["clip_fraction"] == 0
    torch.testing.assert_close(output.metrics["kl"], kl.mean().detach())
    torch.testing.assert_close(output.metrics["reward_mean"], rewards.mean())


@pytest.mark.parametrize("generator", FAMILIES, indirect=True)
def test_an_update_makes_the_better_chain_likelier_and_the_worse_one_less_likely(
    generator: Generator, frozen_captioner: Captioner
) -> None:
    """Two chains of one caption whose rewards differ (floor far below their gap, so advantages are +-1):
    a few SGD steps on the LoRA raise the log-probability of the better chain's transitions and lower the
    worse one's, as recomputed on the chains recorded before the update."""
    batch = _text_batch(1)
    settings = SETTINGS.model_copy(update={"train_timesteps": 1.0, "advantage_std_floor": 1e-9})
    policy, conditioning, chain = sample_chains(generator, batch["captions"], batch["ids"], settings, KEY)
    rewards = likelihood_rewards(generator, frozen_captioner, chain.latents[-1], batch["captions"] * 2)
    assert rewards[0] != rewards[1]
    better, worse = (0, 1) if rewards[0] > rewards[1] else (1, 0)

    def chain_logprobs() -> torch.Tensor:
        """log p of each chain's stochastic transitions under the current weights, summed over steps."""
        with torch.no_grad():
            return sum(
                transition(
                    generator,
                    policy,
                    chain.latents[step],
                    policy.timesteps[[step, step]],
                    chain.latents[step + 1],
                    conditioning,
                ).logprob
                for step in policy.stochastic_steps
            )

    before = chain_logprobs()
    torch.testing.assert_close(before, chain.logprobs.sum(dim=0))
    optimizer = torch.optim.SGD(_lora(generator).values(), lr=0.05)
    for _ in range(3):
        optimizer.zero_grad()
        _run(generator, frozen_captioner, batch, settings).loss.backward()
        optimizer.step()
    after = chain_logprobs()
    assert after[better] > before[better] and after[worse] < before[worse], (before, after)


def test_each_caption_draws_its_own_chains_whatever_the_batch(
    generator: Generator, frozen_captioner: Captioner
) -> None:
    """Chains, chosen transitions and rewards of a caption do not depend on its batch, so the batch's gradient
    is the mean of its captions' gradients computed alone (shards agree); another update draws others."""
    batch = _text_batch(3)
    policy, _, chain = sample_chains(generator, batch["captions"], batch["ids"], SETTINGS, KEY)
    steps = chosen_steps(KEY, chain_ids(batch["ids"], 2), policy, SETTINGS.train_timesteps)
    repeated = [caption for caption in batch["captions"] for _ in range(2)]
    rewards = likelihood_rewards(generator, frozen_captioner, chain.latents[-1], repeated)
    _run(generator, frozen_captioner, batch, SETTINGS).loss.backward()
    together = _flat_grad(generator)
    alone = []
    for row in range(3):
        rows = slice(2 * row, 2 * row + 2)
        single = {"kind": "text_only", "ids": IDS[row : row + 1], "captions": CAPTIONS[row : row + 1]}
        _, _, single_chain = sample_chains(generator, single["captions"], single["ids"], SETTINGS, KEY)
        torch.testing.assert_close(single_chain.latents, chain.latents[:, rows])
        torch.testing.assert_close(single_chain.logprobs, chain.logprobs[:, rows])
        single_steps = chosen_steps(KEY, chain_ids(single["ids"], 2), policy, SETTINGS.train_timesteps)
        assert torch.equal(single_steps, steps[rows])
        single_rewards = likelihood_rewards(
            generator, frozen_captioner, single_chain.latents[-1], repeated[rows]
        )
        torch.testing.assert_close(single_rewards, rewards[rows], rtol=0, atol=1e-6)
        generator.zero_grad()
        _run(generator, frozen_captioner, single, SETTINGS).loss.backward()
        alone.append(_flat_grad(generator))
    # The random captioner's rewards of a caption's images differ by ~1e-4, so the ~1e-7 float32 differences
    # of a batched call shift the advantages by ~1e-3 relative: the pieces above are compared tightly, the
    # gradient they make within a relative tolerance.
    mean_alone = torch.stack(alone).mean(dim=0)
    assert (together - mean_alone).norm() <= 1e-2 * together.norm()
    _, _, next_update = sample_chains(generator, batch["captions"], batch["ids"], SETTINGS, DrawKey(0, 4))
    assert not torch.allclose(next_update.latents[-1], chain.latents[-1])


def test_ratios_beyond_the_clip_range_count_only_where_they_lose(
    generator: Generator, frozen_captioner: Captioner, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Recorded log-probabilities 0.5 lower make every ratio e^0.5, far above 1 + clip_range: a positive
    advantage then counts as A (1 + clip_range) (clipped, no gradient), a negative one as A r."""
    settings = SETTINGS.model_copy(update={"advantage_std_floor": 1e-9})

    def lower_recorded_logprobs(*args: Any) -> Chain:
        recorded = sample_chain(*args)
        return Chain(recorded.latents, recorded.logprobs - 0.5)

    monkeypatch.setattr("cycletune.losses.t2i2t_reward.sample_chain", lower_recorded_logprobs)
    output = _run(generator, frozen_captioner, _text_batch(), settings)
    _, _, chain = sample_chains(generator, CAPTIONS[:2], IDS[:2], settings, KEY)
    repeated = [caption for caption in CAPTIONS[:2] for _ in range(2)]
    rewards = likelihood_rewards(generator, frozen_captioner, chain.latents[-1], repeated).view(2, 2)
    advantages = group_advantages(rewards, settings.advantage_std_floor).flatten()
    ratio = math.exp(0.5)
    expected = -torch.where(advantages > 0, advantages * (1 + settings.clip_range), advantages * ratio).mean()
    torch.testing.assert_close(output.loss.detach(), expected, rtol=1e-4, atol=1e-6)
    assert output.metrics["clip_fraction"] == 1


def test_lora_dropout_moves_the_ratio_off_one_and_the_clip_catches_it(
    tiny_models, frozen_captioner: Captioner
) -> None:
    """Sampling and recomputing draw different dropout masks: with the DDPO clip of 1e-4 most ratios are
    clipped; a wide clip range clips none."""
    generator = Generator.from_pretrained(str(tiny_models.generator))
    add_generator_lora(generator, rank=4, alpha=4.0, dropout=0.5)
    perturb_lora(generator, prepare_trainable(generator, train_mode="lora"), seed=2, scale=0.3, replace=False)
    generator.train()
    torch.manual_seed(0)
    narrow = _run(generator, frozen_captioner, _text_batch(), SETTINGS).metrics["clip_fraction"]
    wide = SETTINGS.model_copy(update={"clip_range": 10.0})
    assert (
        narrow > 0.5 and _run(generator, frozen_captioner, _text_batch(), wide).metrics["clip_fraction"] == 0
    )


@pytest.mark.parametrize("generator", ["sd", "sdxl"], indirect=True)
def test_guided_chains_steer_away_from_what_the_family_pipeline_does(generator: Generator) -> None:
    """CFG's unconditional states: the empty caption's for SD; zeros for SDXL, whose checkpoint sets
    force_zeros_for_empty_prompt (as StableDiffusionXLPipeline guides with no negative prompt)."""
    settings = SETTINGS.model_copy(update={"guidance_scale": 2.0})
    with torch.no_grad():
        _, conditioning, _ = sample_chains(generator, CAPTIONS[:2], IDS[:2], settings, KEY)
        empty = generator.encode_text(generator.tokenize([""] * 4))
    expected = torch.zeros_like(empty) if generator.spec.name == "sdxl" else empty
    assert torch.equal(conditioning.uncond, expected)


def test_chosen_transitions_are_a_share_of_the_stochastic_steps(generator: Generator) -> None:
    policy = ddim_policy(generator, 10, eta=1.0)
    assert policy.stochastic_steps == list(range(9))
    ids = chain_ids(IDS, 4)
    steps = chosen_steps(KEY, ids, policy, 0.25)
    assert steps.shape == (12, 2)  # the whole part of 0.25 * 10
    assert all(len(set(row)) == 2 and max(row) < 9 for row in steps.tolist())
    assert len({tuple(row) for row in steps.tolist()}) > 1, "each chain draws its own"
    assert chosen_steps(KEY, ids, policy, 0.01).shape == (12, 1)
    assert chosen_steps(KEY, ids, policy, 1.0).shape == (12, 9)
    with pytest.raises(ValueError, match="none of the 1 DDIM steps is stochastic"):
        chosen_steps(KEY, ids, ddim_policy(generator, 1, eta=1.0), 1.0)


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        ({"num_images": 1}, "num_images"),
        ({"eta": 0.0}, "eta"),
        ({"clip_range": 0.0}, "clip_range"),
        ({"train_timesteps": 1.5}, "train_timesteps"),
        ({"train_timesteps": 0.0}, "train_timesteps"),
        ({"share_denoise_pass": True}, "mode 'reward' makes its own images"),
    ],
)
def test_settings_refuse_what_the_mode_cannot_do(overrides: dict[str, Any], message: str) -> None:
    with pytest.raises(ValidationError, match=message):
        T2I2TSettings(mode="reward", **overrides)


@pytest.mark.slow
@pytest.mark.parametrize("reward", ["likelihood", "cider_d"])
def test_the_recipe_trains_the_generator_with_it_on_paired_and_text_only_batches(
    tiny_models, tmp_path: Path, reward: str
) -> None:
    """Half the generator's micro-batches from captions alone: the seeded mix gives two paired updates, then
    two text-only ones, each logging the reward term and its metrics (cider_d: the trainer builds its scorer,
    tests/losses/test_t2i2t_cider_reward.py)."""
    output_dir = tmp_path / "run"
    overrides = [
        *tiny_overrides(tiny_models, output_dir),
        "cycle.t2i2t.mode=reward",
        f"cycle.t2i2t.reward={reward}",
        "cycle.t2i2t.num_images=2",
        "cycle.t2i2t.num_inference_steps=3",
        "data.text_only=[{type: shapes, num_samples: 16, seed: 8}]",
        "data.text_only_ratio=0.5",
        "train.schedule=[generator]",
        "train.max_train_steps=4",
    ]
    assert run_recipe_in_process(["--config", "configs/tiny.yaml", *overrides]) == 0
    text_only = [all(sid.startswith("shapes:8:") for sid in entry["ids"]) for entry in sample_log(output_dir)]
    assert text_only == [False, False, True, True]
    metrics = [json.loads(line) for line in (output_dir / "metrics.jsonl").read_text().splitlines()]
    names = ("t2i2t_reward", "t2i2t_reward/reward_mean", "t2i2t_reward/clip_fraction")
    logged = [[entry[f"generator/{name}"] for name in names] for entry in metrics if "generator/lr" in entry]
    assert len(logged) == 4 and all(math.isfinite(value) for values in logged for value in values)
