"""validate() leaves every submodule in the mode it found it (rank 0 trains on like the ranks that did not
validate), and cached decoding keeps its history with gradient checkpointing on, before and after it."""

from __future__ import annotations

from collections.abc import Callable

import pytest
import torch
from cycle_runs import tiny_config

from cycletune.models.captioner import Captioner
from cycletune.models.modes import module_modes
from cycletune.train.builders import build_captioner, build_generator, build_validation_batch
from cycletune.train.validation import validate

MAX_NEW_TOKENS = 8


@pytest.fixture
def config(tiny_models):
    return tiny_config(
        tiny_models, "captioner.gradient_checkpointing=true", "evaluation.validation_metrics=[]"
    )


def _pixels() -> torch.Tensor:
    return torch.rand(3, 3, 32, 32, generator=torch.Generator().manual_seed(0))


def _greedy_gumbel(captioner: Captioner, pixels01: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Zero Gumbel noise: every step takes its logits' argmax. With gradient, as the i2t2i gumbel term runs."""
    noise = torch.zeros(pixels01.shape[0], MAX_NEW_TOKENS, captioner.vocab_size)
    probs, mask = captioner.gumbel_decode(
        pixels01, max_length=MAX_NEW_TOKENS, temperature=1.0, gumbel_noise=noise
    )
    return probs.argmax(dim=-1), mask


def _greedy_sampling(captioner: Captioner, pixels01: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """A nucleus of one token is the argmax (as the i2t2i reward term samples, without gradient)."""
    uniforms = torch.rand(pixels01.shape[0], 1, MAX_NEW_TOKENS, generator=torch.Generator().manual_seed(1))
    tokens = captioner.sample_captions(pixels01, uniforms=uniforms, top_p=1e-6).tokens
    return tokens["input_ids"], tokens["attention_mask"]


DECODERS = [_greedy_gumbel, _greedy_sampling]


def _assert_matches_teacher_forcing(
    captioner: Captioner, decode: Callable[[Captioner, torch.Tensor], tuple[torch.Tensor, torch.Tensor]]
) -> None:
    """Every greedily decoded token is the argmax of the teacher-forced logits at its position."""
    pixels01 = _pixels()
    input_ids, mask = decode(captioner, pixels01)
    with torch.no_grad():
        teacher = captioner.logits(pixels01, input_ids, mask)[:, :-1].argmax(dim=-1)
    decoded = mask[:, 1:].bool()
    assert input_ids.shape[1] > 2, "decoding should run several cached steps"
    assert torch.equal(input_ids[:, 1:][decoded], teacher[decoded]), f"{decode.__name__} lost its cache"


def test_cached_decoding_matches_teacher_forcing_with_checkpointing_before_and_after_validation(
    config,
) -> None:
    captioner, _ = build_captioner(config.captioner)
    generator, _ = build_generator(config.generator)
    captioner.train()
    generator.train()
    for decode in DECODERS:
        _assert_matches_teacher_forcing(captioner, decode)
    validate(captioner, generator, build_validation_batch(config), config)
    for decode in DECODERS:
        _assert_matches_teacher_forcing(captioner, decode)


def test_validate_runs_in_eval_and_restores_every_submodule_mode(config) -> None:
    captioner, _ = build_captioner(config.captioner)
    generator, _ = build_generator(config.generator)
    captioner.train()
    captioner.model.get_base_model().vision_model.eval()
    generator.train()
    generator.vae.eval()
    before = module_modes(captioner), module_modes(generator)
    seen = []
    hooks = [
        part.register_forward_pre_hook(lambda module, _: seen.append(module.training))
        for part in (captioner.model.get_base_model().text_decoder, generator.unet)
    ]
    validate(captioner, generator, build_validation_batch(config), config)
    for hook in hooks:
        hook.remove()
    assert seen and not any(seen), "validation must run in eval mode"
    assert (module_modes(captioner), module_modes(generator)) == before
