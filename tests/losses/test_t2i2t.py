"""text -> image -> caption cycle terms on tiny models: gradient routing, what is decoded, and randomness."""

from __future__ import annotations

from typing import Any

import pytest
import torch

from cycletune.losses.t2i2t import T2I2T_MODES, T2I2TSettings, T2I2TStep, one_step, sample
from cycletune.models.captioner import Captioner
from cycletune.models.generator import Generator
from cycletune.models.lora import add_generator_lora, frozen, prepare_trainable
from cycletune.models.randomness import DrawKey
from cycletune.models.tiny import TINY_GENERATORS

CAPTIONS = ["a red circle at the top", "a small blue square", "a large green triangle in the corner"]
IDS = ["sample-0", "sample-1", "sample-2"]
KEY = DrawKey(seed=0, step=7)
ONE_STEP = T2I2TSettings(mode="one_step")
SAMPLE = T2I2TSettings(mode="sample", num_inference_steps=3, grad_steps=2)
GUIDED_SAMPLE = T2I2TSettings(mode="sample", num_inference_steps=2, grad_steps=1, guidance_scale=3.0)


@pytest.fixture
def generator(generator: Generator) -> Generator:
    """The fresh tiny generator with UNet LoRA prepared as the trainer does (VAE and text encoder frozen)."""
    add_generator_lora(generator, rank=4, alpha=4.0)
    prepare_trainable(generator, train_mode="lora")
    return generator


def _paired_batch(size: int = 3) -> dict[str, Any]:
    pixels = torch.rand(size, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    return {"ids": IDS[:size], "captions": CAPTIONS[:size], "pixels": pixels}


def _text_batch(size: int = 3) -> dict[str, Any]:
    return {"ids": IDS[:size], "captions": CAPTIONS[:size]}


def _rows(batch: dict[str, Any], row: int) -> dict[str, Any]:
    return {name: value[row : row + 1] for name, value in batch.items()}


class _UnetCalls:
    """Records each UNet call's positional inputs and output, to rebuild what a loss did from outside."""

    def __init__(self, generator: Generator) -> None:
        self.calls: list[tuple[tuple[torch.Tensor, ...], torch.Tensor]] = []
        self._handle = generator.unet.register_forward_hook(self._record)

    def _record(self, module: torch.nn.Module, args: tuple[Any, ...], output: Any) -> None:
        self.calls.append((tuple(arg.detach() for arg in args), output.sample.detach()))

    def remove(self) -> None:
        self._handle.remove()


@pytest.mark.parametrize(
    ("settings", "batch"),
    [(ONE_STEP, _paired_batch()), (SAMPLE, _text_batch()), (GUIDED_SAMPLE, _text_batch(2))],
    ids=["one_step", "sample", "sample_guided"],
)
def test_gradient_reaches_unet_lora_and_no_captioner_parameter(
    generator: Generator, captioner: Captioner, settings: T2I2TSettings, batch: dict[str, Any]
) -> None:
    """The partner takes gradients (as the trainer's models do before the phase freezes one); only frozen()
    keeps them out, while the gradient still passes through it into the UNet."""
    assert all(param.requires_grad for param in captioner.parameters())
    with frozen(captioner):
        output = T2I2T_MODES.modes[settings.mode].loss(T2I2TStep(generator, captioner, batch, KEY), settings)
    assert output.loss.ndim == 0 and torch.isfinite(output.loss)
    assert output.metrics == {"caption_ce": pytest.approx(output.loss.item())}
    output.loss.backward()
    lora = {name: param for name, param in generator.unet.named_parameters() if "lora_" in name}
    assert lora and all(
        param.grad is not None and torch.isfinite(param.grad).all() for param in lora.values()
    )
    # LoRA B starts at zero (so A's first gradient is zero too); every B must get a gradient.
    assert all(param.grad.abs().sum() > 0 for name, param in lora.items() if "lora_B" in name)
    leaked = [name for name, param in captioner.named_parameters() if param.grad is not None]
    assert not leaked, f"captioner parameters got a gradient: {leaked[:3]}"
    assert all(param.requires_grad for param in captioner.parameters()), "frozen() must restore the flags"
    frozen_parts = [*generator.vae.parameters(), *generator.text_encoder.parameters()]
    assert all(param.grad is None for param in frozen_parts)


def test_one_step_decodes_the_unets_x0_estimate_from_the_drawn_timesteps(
    generator: Generator, frozen_captioner: Captioner
) -> None:
    """The loss is the caption loss of predict_x0(UNet output), not of the clean latents, at t < max."""
    batch, settings = _paired_batch(), T2I2TSettings(mode="one_step", max_timestep=50)
    recorder = _UnetCalls(generator)
    with torch.no_grad():
        loss = one_step(T2I2TStep(generator, frozen_captioner, batch, KEY), settings).loss
        recorder.remove()
        [((noisy, timesteps, _), prediction)] = recorder.calls
        x0 = generator.predict_x0(noisy, timesteps, prediction)
        expected = frozen_captioner.caption_loss(
            generator.decode_latents(x0), **frozen_captioner.tokenize(CAPTIONS)
        )
        assert (timesteps < 50).all()
        assert torch.equal(loss, expected.mean())
    # The paper's code decoded the clean latents, a loss the UNet could not change. A random tiny captioner
    # hardly looks at the image (whole-image changes move its loss by ~1e-3), hence the small threshold,
    # still 20 float32 steps away from a deterministic recomputation's exact equality.
    with torch.no_grad():
        before = one_step(T2I2TStep(generator, frozen_captioner, batch, KEY), ONE_STEP).loss
        generator.unet.conv_out.bias.add_(1.0)  # shifts every predicted noise, so every x0 estimate
        after = one_step(T2I2TStep(generator, frozen_captioner, batch, KEY), ONE_STEP).loss
    assert (before - after).abs() > 1e-5


@pytest.mark.parametrize("settings", [SAMPLE, GUIDED_SAMPLE], ids=["unguided", "guided"])
def test_sample_scores_the_ddim_sample_of_its_drawn_noise(
    generator: Generator, frozen_captioner: Captioner, settings: T2I2TSettings
) -> None:
    batch = _text_batch(2)
    recorder = _UnetCalls(generator)
    with torch.no_grad():
        loss = sample(T2I2TStep(generator, frozen_captioner, batch, KEY), settings).loss
    recorder.remove()
    (first_input, _, _), _ = recorder.calls[0]
    initial = first_input[: len(batch["ids"])]  # guided calls batch the [uncond, cond] copies
    pixels = generator.sample(
        batch["captions"],
        num_inference_steps=settings.num_inference_steps,
        guidance_scale=settings.guidance_scale,
        latents=initial,
    )
    expected = frozen_captioner.caption_loss(pixels, **frozen_captioner.tokenize(batch["captions"])).mean()
    assert torch.equal(loss, expected)


def test_guided_sample_on_sdxl_steers_away_from_zeros(
    frozen_captioner: Captioner, tmp_path_factory: pytest.TempPathFactory
) -> None:
    """SDXL's checkpoint sets force_zeros_for_empty_prompt, so the unconditional half of each guided UNet
    call is zeros, as StableDiffusionXLPipeline guides with no negative prompt (not the empty caption)."""
    folder = TINY_GENERATORS["sdxl"](tmp_path_factory.mktemp("sdxl"), seed=0, resolution=16)
    generator = Generator.from_pretrained(str(folder))
    states: list[torch.Tensor] = []
    handle = generator.unet.register_forward_hook(lambda module, args, output: states.append(args[2]))
    with torch.no_grad():
        sample(T2I2TStep(generator, frozen_captioner, _text_batch(2), KEY), GUIDED_SAMPLE)
    handle.remove()
    assert len(states) == GUIDED_SAMPLE.num_inference_steps
    for unconditional, conditional in (call.chunk(2) for call in states):
        assert torch.equal(unconditional, torch.zeros_like(unconditional))
        assert conditional.abs().amax() > 0


@pytest.mark.parametrize(
    ("settings", "batch"),
    [(ONE_STEP, _paired_batch()), (ONE_STEP, _text_batch()), (SAMPLE, _text_batch())],
    ids=["one_step_paired", "one_step_text_only", "sample"],
)
def test_draws_are_per_sample_and_reproducible(
    generator: Generator, frozen_captioner: Captioner, settings: T2I2TSettings, batch: dict[str, Any]
) -> None:
    """A batch's loss is the mean of its samples' losses computed alone (batch 1 works; shards agree)."""
    mode = T2I2T_MODES.modes[settings.mode].loss
    with torch.no_grad():
        full = mode(T2I2TStep(generator, frozen_captioner, batch, KEY), settings).loss
        alone = [
            mode(T2I2TStep(generator, frozen_captioner, _rows(batch, row), KEY), settings).loss
            for row in range(3)
        ]
        again = mode(T2I2TStep(generator, frozen_captioner, batch, KEY), settings).loss
        next_update = mode(
            T2I2TStep(generator, frozen_captioner, batch, DrawKey(seed=0, step=8)), settings
        ).loss
    assert torch.allclose(full, torch.stack(alone).mean(), atol=1e-5)
    assert torch.equal(full, again)
    assert not torch.isclose(full, next_update, rtol=1e-6)


def test_one_step_on_captions_alone_decodes_the_first_sampling_step_from_pure_noise(
    generator: Generator, frozen_captioner: Captioner
) -> None:
    """No image to noise: the UNet sees the drawn noise at the last timestep, as the sampler's first step."""
    recorder = _UnetCalls(generator)
    with torch.no_grad():
        loss = one_step(T2I2TStep(generator, frozen_captioner, _text_batch(), KEY), ONE_STEP).loss
    recorder.remove()
    [((noisy, timesteps, _), prediction)] = recorder.calls
    last = generator.process.scheduler.config.num_train_timesteps - 1
    assert timesteps.tolist() == [last] * 3
    paired_noise = KEY.randn(IDS, "t2i2t_noise", generator.latent_shape(1)[1:], generator.device)
    assert torch.equal(noisy, paired_noise)  # the same per-sample draw a paired batch noises its image with
    x0 = generator.predict_x0(noisy, timesteps, prediction)
    with torch.no_grad():
        expected = frozen_captioner.caption_loss(
            generator.decode_latents(x0), **frozen_captioner.tokenize(CAPTIONS)
        )
    assert torch.equal(loss, expected.mean())


def test_bad_input_is_named(generator: Generator, frozen_captioner: Captioner) -> None:
    too_late = T2I2TSettings(mode="one_step", max_timestep=2000)
    with pytest.raises(ValueError, match="max_timestep=2000"):
        one_step(T2I2TStep(generator, frozen_captioner, _paired_batch(), KEY), too_late)
