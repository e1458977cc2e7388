"""Frozen-encoder cache: the same loss as without it for the same draws, hits counted, memory bounded,
and switched off wherever reuse would be wrong."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from cycletune.losses.supervised import denoise_terms
from cycletune.models.cache import FrozenEncoderCache
from cycletune.models.generator import Generator
from cycletune.models.randomness import DrawKey
from cycletune.train.builders import build_encoder_cache, build_generator
from cycletune.train.config import Config, GeneratorSettings, load_config

CONFIGS = Path(__file__).resolve().parents[2] / "configs"
CAPTIONS = ["a small red circle in the top left", "a large blue square in the center", "a green triangle"]


def _config(tiny_models, *overrides: str) -> Config:
    return load_config(
        CONFIGS / "tiny.yaml",
        [f"generator.pretrained_model_name_or_path={tiny_models.generator}", *overrides],
    )


@pytest.fixture(scope="module")
def lora_generator(tiny_models) -> Generator:
    """The generator as the trainer builds it (LoRA on the UNet), adapters moved off zero so the UNet matters."""
    generator, names = build_generator(_config(tiny_models).generator)
    with torch.no_grad():
        for name, param in generator.named_parameters():
            if name in names:
                param.add_(torch.randn(param.shape, generator=torch.Generator().manual_seed(1)) * 0.05)
    return generator


def _batch(size: int = 3) -> dict:
    pixels = torch.rand(3, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    return {
        "kind": "paired",
        "ids": ["a", "b", "c"][:size],
        "captions": CAPTIONS[:size],
        "pixels": pixels[:size],
    }


def _loss(
    generator: Generator, batch: dict, cache: FrozenEncoderCache | None, update: int, dropout: float
) -> torch.Tensor:
    """The trainer's supervised generator loss for `update`'s draws, with or without the cache."""
    settings = GeneratorSettings(
        pretrained_model_name_or_path="unused", caption_dropout=dropout, snr_gamma=5.0
    )
    generator.encoder_cache = cache
    try:
        return denoise_terms(generator, batch, settings, DrawKey(0, update))["denoise"]
    finally:
        generator.encoder_cache = None


@pytest.mark.parametrize("sample", range(3))
def test_a_cached_step_gives_exactly_the_uncached_loss_for_the_same_draws(lora_generator, sample) -> None:
    batch = {key: value[sample : sample + 1] if key != "kind" else value for key, value in _batch().items()}
    cache = FrozenEncoderCache(text=True, images=True)
    # Updates 0-4 with 50% caption dropout: both the caption and "" go through the cache.
    for update in range(5):
        uncached = _loss(lora_generator, batch, None, update, dropout=0.5)
        cached = _loss(lora_generator, batch, cache, update, dropout=0.5)
        assert torch.equal(cached, uncached), f"update {update}: {cached.item()} != {uncached.item()}"
    stats = cache.stats()
    assert stats["image_misses"] == 1 and stats["image_hits"] == 4
    assert stats["text_entries"] == 2 and stats["text_hits"] == 3, "caption and '' once each, then hits"


def test_a_cached_batch_matches_the_uncached_one_and_its_latents_are_each_images_own(lora_generator) -> None:
    batch, cache = _batch(), FrozenEncoderCache(text=True, images=True)
    for update in range(2):
        uncached = _loss(lora_generator, batch, None, update, dropout=0.0)
        cached = _loss(lora_generator, batch, cache, update, dropout=0.0)
        # A batched VAE convolution rounds differently from a single image's (the cache encodes one at a time).
        torch.testing.assert_close(cached, uncached, rtol=1e-6, atol=0)
    noise = torch.randn(3, *lora_generator.latent_shape(1)[1:], generator=torch.Generator().manual_seed(2))
    latents = cache.image_latents(lora_generator, batch["pixels"], batch["ids"], noise)
    for row in range(3):
        alone = lora_generator.encode_images(batch["pixels"][row : row + 1], noise[row : row + 1])
        assert torch.equal(latents[row : row + 1], alone)
    assert cache.stats()["image_hits"] == 6 and cache.stats()["image_misses"] == 3


def test_entries_are_stored_on_cpu_in_the_encoders_dtype_and_latents_are_fresh_draws(tiny_models) -> None:
    generator, _ = build_generator(_config(tiny_models).generator, mixed_precision="bf16")
    cache = FrozenEncoderCache(text=True, images=True)
    batch = _batch(2)
    states = cache.text_states(generator, batch["captions"])
    first = cache.image_latents(generator, batch["pixels"], batch["ids"], torch.randn(2, 4, 16, 16))
    second = cache.image_latents(generator, batch["pixels"], batch["ids"], torch.randn(2, 4, 16, 16))
    stored = [*cache._text_states.values(), *(e.mean for e in cache._image_entries.values())]
    assert all(t.device.type == "cpu" and t.dtype == torch.bfloat16 for t in stored)
    assert states.dtype == torch.bfloat16 and first.dtype == torch.float32
    assert not torch.equal(first, second), "each call samples the posterior with its own noise"


def test_memory_cap_is_respected_and_uncached_entries_still_compute_right(lora_generator) -> None:
    probe = FrozenEncoderCache(text=True, images=True)
    probe.text_states(lora_generator, CAPTIONS[:1])
    one_caption = probe.bytes_used
    cache = FrozenEncoderCache(text=True, images=False, max_bytes=2 * one_caption)
    for _ in range(2):
        states = cache.text_states(lora_generator, CAPTIONS)
    assert cache.text_entries == 2 and cache.bytes_used <= cache.max_bytes
    assert cache.stats()["not_stored"] == 2, "the third caption missed twice and was never stored"
    expected = lora_generator.encode_text(lora_generator.tokenize(CAPTIONS[2:]))
    assert torch.equal(states[2:], expected)


def test_an_id_that_comes_back_with_other_pixels_is_recomputed(lora_generator) -> None:
    cache = FrozenEncoderCache(text=False, images=True)
    batch = _batch(1)
    cache.image_latents(lora_generator, batch["pixels"], batch["ids"], None)
    flipped = batch["pixels"].flip(-1)
    latents = cache.image_latents(lora_generator, flipped, batch["ids"], None)
    assert torch.equal(latents, lora_generator.encode_images(flipped))
    assert cache.stats()["image_stale"] == 1 and cache.image_entries == 1


def test_text_side_refuses_a_text_encoder_that_trains(lora_generator) -> None:
    cache = FrozenEncoderCache(text=True, images=False)
    lora_generator.text_encoder.requires_grad_(True)
    try:
        with pytest.raises(ValueError, match="text encoder trains"):
            cache.text_states(lora_generator, CAPTIONS)
    finally:
        lora_generator.text_encoder.requires_grad_(False)


@pytest.mark.parametrize(
    ("overrides", "pixel_space", "expected"),
    [
        ((), False, (True, True)),
        (("generator.train_mode=full",), False, (False, True)),
        (("data.random_flip=true",), False, (True, False)),
        ((), True, (True, False)),
        (("generator.train_mode=full", "data.random_flip=true"), False, None),
        (("generator.cache_frozen_encoders=false",), False, None),
    ],
    ids=["default", "text-encoder-trains", "random-flip", "no-vae", "both-off", "disabled"],
)
def test_builder_turns_each_side_off_where_reuse_is_invalid(
    tiny_models, lora_generator, overrides, pixel_space, expected
) -> None:
    generator = Generator.from_pretrained(str(tiny_models.pixel_generator)) if pixel_space else lora_generator
    cache = build_encoder_cache(_config(tiny_models, *overrides), generator)
    assert (cache if cache is None else (cache.text, cache.images)) == expected


def test_without_an_image_side_the_generator_encodes_images_itself(tiny_models) -> None:
    generator = Generator.from_pretrained(str(tiny_models.pixel_generator))
    generator.encoder_cache = FrozenEncoderCache(text=True, images=False)
    batch = _batch(2)
    latents = generator.data_latents(batch["pixels"], None, batch["ids"])
    assert torch.equal(latents, generator.encode_images(batch["pixels"]))
    assert generator.encoder_cache.image_entries == 0
