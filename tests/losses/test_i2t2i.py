"""image -> caption -> image cycle terms on the tiny models: gradients against finite differences, gradient
routing (captioner LoRA only, through the frozen generator), per-sample reproducibility, the reward loss."""

from __future__ import annotations

import pytest
import torch

from cycletune.losses.advantages import group_advantages
from cycletune.losses.cycle_modes import CycleOutput
from cycletune.losses.i2t2i import (
    I2T2I_MODES,
    I2T2ISettings,
    I2T2IStep,
    candidate_rewards,
    reconstruction_loss,
    sample_candidates,
    soft,
    soft_token_probs,
)
from cycletune.models.caption_decoding import IGNORE_INDEX
from cycletune.models.captioner import Captioner
from cycletune.models.captioners.smolvlm import SmolVLMSpec
from cycletune.models.generator import Generator
from cycletune.models.generator_bridge import GeneratorBridge
from cycletune.models.lora import add_captioner_lora, frozen, prepare_trainable
from cycletune.models.randomness import DrawKey
from cycletune.models.scoring import caption_scores

KEY = DrawKey(seed=11, step=5, micro_batch=1)
CAPTIONS = ["a small red circle at the top", "a big blue square", "a green triangle on the left"]
MAX_LENGTH = 6


def _add_lora(captioner: Captioner) -> list[str]:
    """peft initialises LoRA A from the global RNG: seed it, so results do not depend on earlier tests."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        add_captioner_lora(captioner, rank=4, alpha=4.0)
    return prepare_trainable(captioner, train_mode="lora")


def _captioner(tiny_models, *, lora: bool = True) -> Captioner:
    captioner = Captioner.from_pretrained(str(tiny_models.captioner), max_length=12)
    if lora:
        names = _add_lora(captioner)
        params = dict(captioner.named_parameters())
        with torch.no_grad():  # stand-in for training: LoRA B starts at zero, which would zero A's gradient
            for name in names:
                params[name].add_(
                    0.05 * torch.randn(params[name].shape, generator=torch.Generator().manual_seed(0))
                )
    return captioner


@pytest.fixture
def captioner(tiny_models) -> Captioner:
    return _captioner(tiny_models)


@pytest.fixture(scope="module")
def bridge(frozen_captioner: Captioner, frozen_generator: Generator) -> GeneratorBridge:
    return GeneratorBridge.build(frozen_captioner.tokenizer, frozen_generator)


def _batch(size: int) -> dict:
    pixels = torch.rand(size, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    return {"ids": [f"sample-{i}" for i in range(size)], "pixels": pixels, "captions": CAPTIONS[:size]}


def _settings(mode: str, **overrides) -> I2T2ISettings:
    defaults = {"num_timesteps": 2, "max_length": MAX_LENGTH, "num_candidates": 3, "reward_timesteps": 2}
    return I2T2ISettings(mode=mode, **{**defaults, **overrides})


def _cycle(
    captioner: Captioner,
    generator: Generator,
    batch: dict,
    settings: I2T2ISettings,
    bridge: GeneratorBridge,
    key: DrawKey = KEY,
) -> CycleOutput:
    """settings.mode's loss on the batch (without the batch-kind and bridge checks of I2T2I_MODES.run)."""
    return I2T2I_MODES.modes[settings.mode].loss(
        I2T2IStep(captioner, generator, batch, key, bridge), settings
    )


def _lora_grads(captioner: Captioner) -> dict[str, torch.Tensor | None]:
    return {name: param.grad for name, param in captioner.named_parameters() if "lora_" in name}


@pytest.fixture(scope="module")
def smolvlm_folder(tmp_path_factory: pytest.TempPathFactory):
    return SmolVLMSpec.save_tiny(tmp_path_factory.mktemp("smolvlm"))


@pytest.mark.parametrize("family", ["blip", "smolvlm"])
def test_soft_loss_gradient_matches_finite_differences_in_its_logits(
    request: pytest.FixtureRequest, tiny_models, family: str
) -> None:
    """float64 gradcheck of the soft cycle loss w.r.t. the captioner's logits, every random draw fixed by the key.

    The whole path (softmax, bridge, text encoder, UNet, MSE) runs in float64. A full Jacobian over all V * L
    logits would take thousands of UNet calls, so the check perturbs 12 of them (the 4 likeliest tokens at
    3 caption positions, where the gradient is largest) and holds the rest fixed. SmolVLM's rows start with
    a chat-template prefix of image tokens and a prompt, and its pieces are byte-level BPE (`Ġ` starts a
    word): the soft caption is the rows from the prefix's last slot on.
    """
    folder = tiny_models.captioner if family == "blip" else request.getfixturevalue("smolvlm_folder")
    captioner = Captioner.from_pretrained(str(folder), max_length=12)
    generator = Generator.from_pretrained(str(tiny_models.generator)).requires_grad_(False).double()
    bridge = GeneratorBridge.build(captioner.tokenizer, generator, source_vocab_size=captioner.vocab_size)
    batch, temperature = _batch(2), 0.8
    tokens = captioner.tokenize(batch["captions"])
    logits = (
        captioner.logits(batch["pixels"], tokens["input_ids"], tokens["attention_mask"]).detach().double()
    )
    caption_ids, caption_mask = (
        captioner.caption_part(tokens[key]) for key in ("input_ids", "attention_mask")
    )

    def loss_of(logits: torch.Tensor) -> torch.Tensor:
        probs = soft_token_probs(captioner.caption_part(logits), caption_ids, temperature)
        return reconstruction_loss(
            generator, bridge, batch["pixels"], batch["ids"], probs, caption_mask, num_timesteps=2, key=KEY
        ).mean()

    # soft() is exactly this function of the captioner's teacher-forced logits.
    output = soft(
        I2T2IStep(captioner, generator, batch, KEY, bridge), _settings("soft", temperature=temperature)
    )
    assert torch.allclose(output.loss.double(), loss_of(logits), atol=1e-6)

    positions = captioner.caption_start + torch.tensor([1, 2, 3])
    vocab = logits[0, positions].topk(4, dim=-1).indices  # [3, 4]
    rows, columns = positions[:, None].expand_as(vocab), vocab

    def loss_of_slice(values: torch.Tensor) -> torch.Tensor:
        perturbed = logits.clone()
        perturbed[0, rows, columns] = values
        return loss_of(perturbed)

    chosen = logits[0, rows, columns].clone().requires_grad_(True)
    assert torch.autograd.grad(loss_of_slice(chosen), chosen)[0].abs().max() > 1e-8, "no gradient to check"
    assert torch.autograd.gradcheck(loss_of_slice, (chosen,), eps=1e-6, atol=1e-9, rtol=1e-4)


@pytest.mark.parametrize(
    ("mode", "overrides"),
    [("soft", {}), ("gumbel", {"temperature": 0.7}), ("reward", {}), ("reward", {"kl_weight": 0.1})],
)
def test_gradient_reaches_the_captioner_lora_and_no_generator_parameter(
    captioner, generator, bridge, mode, overrides
) -> None:
    """The partner takes gradients (as the trainer's models do before the phase freezes one); only frozen()
    keeps them out, while soft and gumbel still backpropagate through it into the captioner."""
    assert all(param.requires_grad for param in generator.parameters())
    with frozen(generator):
        output = _cycle(captioner, generator, _batch(2), _settings(mode, **overrides), bridge)
    assert output.loss.ndim == 0 and torch.isfinite(output.loss)
    # Metrics stay on the device (no host sync mid-step) and carry no graph.
    assert all(value.ndim == 0 and not value.requires_grad for value in output.metrics.values())
    output.loss.backward()
    grads = _lora_grads(captioner)
    assert grads and all(grad is not None and torch.isfinite(grad).all() for grad in grads.values())
    assert sum(float(grad.abs().sum()) for grad in grads.values()) > 0
    assert all(param.grad is None for name, param in captioner.named_parameters() if "lora_" not in name)
    leaked = [name for name, param in generator.named_parameters() if param.grad is not None]
    assert not leaked, f"generator parameters got a gradient: {leaked[:3]}"
    assert all(param.requires_grad for param in generator.parameters()), "frozen() must restore the flags"


@pytest.mark.parametrize("mode", ["soft", "gumbel", "reward"])
def test_each_sample_draws_its_own_randomness(captioner, frozen_generator, bridge, mode) -> None:
    """A batch's loss is the mean of its samples' losses computed alone: results do not depend on sharding."""
    settings = _settings(mode, kl_weight=0.1 if mode == "reward" else 0.0)
    batch = _batch(2)
    together = _cycle(captioner, frozen_generator, batch, settings, bridge)
    again = _cycle(captioner, frozen_generator, batch, settings, bridge)
    assert torch.equal(together.loss, again.loss) and together.metrics == again.metrics
    singles = [{name: value[i : i + 1] for name, value in batch.items()} for i in range(2)]
    alone = torch.stack(
        [_cycle(captioner, frozen_generator, single, settings, bridge).loss for single in singles]
    )
    if mode != "reward":
        assert torch.allclose(together.loss, alone.mean(), rtol=1e-4)
    else:
        # Checked per piece instead: the loss is a function of each image's own candidates, rewards and
        # log-probs, but its advantages divide by a small scale (advantage_std_floor, 5e-3), which magnifies
        # the 1-ulp differences of a batched UNet call beyond a tolerance worth stating on the loss.
        sampled = sample_candidates(captioner, batch["pixels"], batch["ids"], settings, KEY)
        rewards = candidate_rewards(
            frozen_generator, batch["pixels"], batch["ids"], sampled.captions, settings, KEY
        )
        logprobs = captioner.sequence_logprobs(batch["pixels"], **sampled.tokens).view(2, -1)
        for i, single in enumerate(singles):
            sampled_alone = sample_candidates(captioner, single["pixels"], single["ids"], settings, KEY)
            assert sampled_alone.captions[0] == sampled.captions[i]
            rewards_alone = candidate_rewards(
                frozen_generator, single["pixels"], single["ids"], sampled_alone.captions, settings, KEY
            )
            assert torch.allclose(rewards_alone[0], rewards[i], rtol=0, atol=1e-6)
            logprobs_alone = captioner.sequence_logprobs(single["pixels"], **sampled_alone.tokens)
            assert torch.allclose(logprobs_alone, logprobs[i], atol=1e-4)
    other_key = _cycle(captioner, frozen_generator, batch, settings, bridge, key=DrawKey(seed=11, step=6))
    assert not torch.equal(other_key.loss, together.loss)


@pytest.mark.parametrize("reduction", ["sum", "mean"])
def test_reward_loss_is_the_group_baseline_policy_gradient(
    captioner, frozen_generator, bridge, reduction
) -> None:
    batch, settings = _batch(2), _settings("reward", num_candidates=4, logprob_reduction=reduction)
    output = _cycle(captioner, frozen_generator, batch, settings, bridge)

    sampled = sample_candidates(captioner, batch["pixels"], batch["ids"], settings, KEY)
    assert [len(per_image) for per_image in sampled.captions] == [4, 4]
    rewards = candidate_rewards(
        frozen_generator, batch["pixels"], batch["ids"], sampled.captions, settings, KEY
    )
    advantages = group_advantages(rewards, settings.advantage_std_floor)
    logprobs = captioner.sequence_logprobs(batch["pixels"], **sampled.tokens)
    if reduction == "mean":
        logprobs = logprobs / (sampled.tokens["labels"][:, 1:] != IGNORE_INDEX).sum(dim=1)
    assert torch.allclose(output.loss, -(advantages.flatten() * logprobs).mean(), atol=1e-6)
    assert output.metrics["reward_mean"] == pytest.approx(rewards.mean().item())


def test_advantages_ignore_reward_gaps_within_the_rewards_noise(captioner, frozen_generator) -> None:
    """The random tiny generator ignores captions: its rewards for 4 captions differ only by the noise of the
    reward_timesteps draws (std ~1e-3). Those gaps get small advantages; gaps of a real preference get the
    usual unit-scale (standardised) ones."""
    batch, settings = _batch(3), _settings("reward", num_candidates=4)
    sampled = sample_candidates(captioner, batch["pixels"], batch["ids"], settings, KEY)
    noise_only = candidate_rewards(
        frozen_generator, batch["pixels"], batch["ids"], sampled.captions, settings, KEY
    )
    assert (noise_only.std(dim=1) > 0).all(), "distinct captions should still score differently"
    # Without the floor every group's advantages have std 1; here std_K r / floor, about 0.3.
    noise_scale = group_advantages(noise_only, settings.advantage_std_floor).std(dim=1, correction=0)
    assert noise_scale.max() < 0.5, noise_scale
    preferred = noise_only + torch.tensor([0.0, 0.05, 0.1, 0.2])  # gaps far above the floor
    advantages = group_advantages(preferred, settings.advantage_std_floor)
    torch.testing.assert_close(advantages.std(dim=1, correction=0), torch.ones(3))
    assert (advantages.argsort(dim=1) == torch.arange(4)).all()
    identical = group_advantages(torch.full((1, 4), -0.3), settings.advantage_std_floor)
    assert torch.equal(identical, torch.zeros(1, 4))


def test_kl_gradient_is_the_score_function_gradient_of_the_kl(captioner, frozen_generator, bridge) -> None:
    """kl_weight adds exactly kl_weight * mean_i (d_i - mean_K d) * grad log p_i, d = log p - log p_base (the
    summed log-likelihoods of the sampled candidates): it pulls the adapted captioner back to the base."""
    # A large weight, so the KL part is not lost in the reward part's gradient (the adapters moved little).
    batch, kl_weight = _batch(2), 50.0
    settings = _settings("reward", num_candidates=4)
    params = [param for name, param in captioner.named_parameters() if "lora_" in name]

    def lora_gradient(loss: torch.Tensor) -> torch.Tensor:
        return torch.cat([grad.flatten() for grad in torch.autograd.grad(loss, params)])

    def reward_loss(weight: float) -> torch.Tensor:
        return _cycle(
            captioner, frozen_generator, batch, settings.model_copy(update={"kl_weight": weight}), bridge
        ).loss

    with_kl = lora_gradient(reward_loss(kl_weight))
    added = with_kl - lora_gradient(reward_loss(0.0))
    sampled = sample_candidates(captioner, batch["pixels"], batch["ids"], settings, KEY)
    logprobs = captioner.sequence_logprobs(batch["pixels"], **sampled.tokens)
    with torch.no_grad(), captioner.adapters_disabled():
        base = captioner.sequence_logprobs(batch["pixels"], **sampled.tokens)
    log_ratio = (logprobs.detach() - base).view(2, 4)
    weights = (log_ratio - log_ratio.mean(dim=1, keepdim=True)).flatten()
    expected = kl_weight * lora_gradient((weights * logprobs).mean())
    assert expected.abs().max() > 0.1 * with_kl.abs().max(), "the KL part should be a sizeable share"
    # `added` is a difference of two float32 gradients, each a sum of a few hundred terms accurate to about
    # 1e-7 relative; 1e-5 of the larger gradient bounds that rounding.
    torch.testing.assert_close(added, expected, rtol=0, atol=1e-5 * float(with_kl.abs().max()))


def test_kl_term_is_zero_at_the_base_model_and_grows_with_the_adapters(
    tiny_models, frozen_generator, bridge
) -> None:
    captioner = Captioner.from_pretrained(str(tiny_models.captioner), max_length=12)
    names = _add_lora(captioner)
    batch = _batch(2)
    plain = _cycle(captioner, frozen_generator, batch, _settings("reward"), bridge)
    at_base = _cycle(captioner, frozen_generator, batch, _settings("reward", kl_weight=0.5), bridge)
    assert at_base.metrics["kl"] == 0.0  # fresh LoRA (B = 0) is the base model
    assert torch.allclose(at_base.loss, plain.loss)

    params = dict(captioner.named_parameters())
    with torch.no_grad():
        for name in names:
            params[name].add_(
                0.2 * torch.randn(params[name].shape, generator=torch.Generator().manual_seed(0))
            )
    moved = _cycle(captioner, frozen_generator, batch, _settings("reward", kl_weight=0.5), bridge)
    assert moved.metrics["kl"] != 0.0


def test_kl_penalty_needs_a_lora_captioner(tiny_models, frozen_generator, bridge) -> None:
    full = _captioner(tiny_models, lora=False)
    with pytest.raises(ValueError, match="kl_weight > 0 needs a LoRA captioner"):
        _cycle(full, frozen_generator, _batch(1), _settings("reward", kl_weight=0.1), bridge)


def test_reward_timesteps_come_from_the_configured_span_of_the_schedule(frozen_generator) -> None:
    """cycle.i2t2i.reward_timestep_range reaches the scorer: the rewards are caption_scores over that span
    (the same draws), and differ from the whole schedule's."""
    batch = _batch(2)
    captions = [["a big blue square", "a small red circle"]] * 2
    noisy_half = _settings("reward", reward_timestep_range=(0.5, 1.0))
    rewards = candidate_rewards(frozen_generator, batch["pixels"], batch["ids"], captions, noisy_half, KEY)
    expected = -caption_scores(
        frozen_generator, batch["pixels"], captions, key=KEY, ids=batch["ids"], num_timesteps=2,
        purpose="i2t2i/reward", timestep_range=(0.5, 1.0),
    )  # fmt: skip
    torch.testing.assert_close(rewards, expected)
    whole = candidate_rewards(
        frozen_generator, batch["pixels"], batch["ids"], captions, _settings("reward"), KEY
    )
    assert not torch.allclose(rewards, whole)
    with pytest.raises(ValueError, match="reward_timestep_range"):
        _settings("reward", reward_timestep_range=(0.7, 0.2))
