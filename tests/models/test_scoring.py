"""Caption scoring by the frozen generator's denoising loss: common random numbers, per-image draws,
stratified timesteps, and that a generator which learnt two pairs prefers the right caption."""

from __future__ import annotations

import pytest
import torch

from cycletune.models.generator import Generator
from cycletune.models.randomness import DrawKey
from cycletune.models.scoring import DenoiseDraws, caption_scores, grouped_denoise_loss
from cycletune.models.tiny import save_tiny_generator

KEY = DrawKey(seed=7, step=3)


def _pixels(batch: int) -> torch.Tensor:
    return torch.rand(batch, 3, 32, 32, generator=torch.Generator().manual_seed(0))


def test_identical_candidates_score_identically_and_each_image_draws_its_own_noise(frozen_generator) -> None:
    pixels01 = _pixels(2)
    candidates = [
        ["a red circle", "a blue square", "a red circle"],
        ["a green triangle", "a green triangle", "a small shape at the top"],
    ]
    scores = caption_scores(
        frozen_generator, pixels01, candidates, key=KEY, ids=["img-0", "img-1"], num_timesteps=3
    )
    assert scores.shape == (2, 3) and scores.dtype == torch.float32 and not scores.requires_grad
    assert torch.allclose(scores[0, 0], scores[0, 2], rtol=0, atol=1e-6)
    assert torch.allclose(scores[1, 0], scores[1, 1], rtol=0, atol=1e-6)
    assert not torch.allclose(scores[0, 0], scores[0, 1], rtol=0, atol=1e-6)  # the caption does matter

    # An image scores the same in any batch (per-id draws), and differently under another key.
    alone = caption_scores(
        frozen_generator, pixels01[1:], candidates[1:], key=KEY, ids=["img-1"], num_timesteps=3
    )
    assert torch.allclose(alone[0], scores[1], rtol=0, atol=1e-5)
    other_key = caption_scores(
        frozen_generator,
        pixels01,
        candidates,
        key=DrawKey(seed=8, step=3),
        ids=["img-0", "img-1"],
        num_timesteps=3,
    )
    assert not torch.allclose(other_key, scores, rtol=0, atol=1e-4)


def test_ragged_or_mismatched_candidates_are_named(frozen_generator) -> None:
    pixels01 = _pixels(2)
    with pytest.raises(ValueError, match=r"candidates\[1\] has 1 captions"):
        caption_scores(frozen_generator, pixels01, [["a", "b"], ["c"]], key=KEY, ids=["x", "y"])
    with pytest.raises(ValueError, match="2 images need 2 candidate lists and ids"):
        caption_scores(frozen_generator, pixels01, [["a", "b"]], key=KEY, ids=["x", "y"])


def test_draws_are_stratified_over_the_schedule_and_per_sample(frozen_generator) -> None:
    draws = DenoiseDraws.draw(frozen_generator, KEY, ["a", "b", "c"], "scoring-test", num_timesteps=4)
    assert draws.timesteps.shape == (3, 4) and draws.noise.shape == (
        3,
        4,
        *frozen_generator.latent_shape(1)[1:],
    )
    stratum = draws.timesteps // 250  # 1000 training timesteps, 4 strata
    assert torch.equal(stratum, torch.arange(4).expand(3, -1))
    alone = DenoiseDraws.draw(frozen_generator, KEY, ["c"], "scoring-test", num_timesteps=4)
    for field in ("noise", "timesteps", "vae_noise"):
        assert torch.equal(getattr(alone, field)[0], getattr(draws, field)[2])
    assert not torch.equal(draws.noise[0], draws.noise[1])


def test_a_timestep_range_stratifies_within_it(frozen_generator) -> None:
    """(0.5, 1.0): 4 strata of 125 steps each over the noisier half of the 1000-step schedule."""
    draws = DenoiseDraws.draw(
        frozen_generator, KEY, ["a", "b"], "scoring-test", num_timesteps=4, timestep_range=(0.5, 1.0)
    )
    assert torch.equal((draws.timesteps - 500) // 125, torch.arange(4).expand(2, -1))
    with pytest.raises(ValueError, match="timestep_range"):
        DenoiseDraws.draw(
            frozen_generator, KEY, ["a"], "scoring-test", num_timesteps=1, timestep_range=(0.6, 0.2)
        )


def test_grouped_loss_is_the_generator_loss_row_by_row_in_any_chunking(frozen_generator) -> None:
    draws = DenoiseDraws.draw(frozen_generator, KEY, ["a", "b"], "grouped-test", num_timesteps=2)
    latents = frozen_generator.encode_images(_pixels(2), draws.vae_noise)
    contexts = frozen_generator.encode_text(
        frozen_generator.tokenize(["one", "two", "three", "four", "five", "six"])
    )
    contexts.requires_grad_(True)
    grouped = grouped_denoise_loss(frozen_generator, latents, contexts, draws)
    assert grouped.shape == (2, 3)
    chunked = grouped_denoise_loss(frozen_generator, latents, contexts, draws, max_rows=5)
    assert torch.allclose(chunked, grouped, atol=1e-6)
    image, group = 1, 2
    direct = frozen_generator.denoise(
        latents[image].expand(2, -1, -1, -1),
        contexts[image * 3 + group].expand(2, -1, -1),
        noise=draws.noise[image],
        timesteps=draws.timesteps[image],
    ).loss.mean()
    assert torch.allclose(grouped[image, group], direct, atol=1e-6)
    (grad,) = torch.autograd.grad(grouped[image, group], contexts)
    assert grad[image * 3 + group].abs().sum() > 0
    assert grad[: image * 3 + group].abs().sum() == 0 and grad[image * 3 + group + 1 :].abs().sum() == 0


def test_a_generator_that_learnt_two_pairs_scores_the_right_caption_far_lower(tmp_path) -> None:
    """Overfit a tiny pixel-space generator to two image-caption pairs, then rank both captions per image.

    v-prediction: at high noise its target is mostly -x0, which only the caption can tell apart. With an
    epsilon target two memorised images are told apart by the noisy image itself at all but the very
    highest timesteps, so the caption barely changes the loss and learning to use it takes far longer.
    """
    path = save_tiny_generator(tmp_path / "generator", resolution=8, with_vae=False)
    generator = Generator.from_pretrained(str(path), prediction_type="v_prediction")
    pixels01 = torch.zeros(2, 3, 8, 8)
    pixels01[0, 0] = 1.0  # red
    pixels01[1, 2] = 1.0  # blue
    captions = ["a red picture", "a blue square"]
    optimizer = torch.optim.AdamW(generator.parameters(), lr=2e-3)
    input_ids = generator.tokenize(captions * 4)
    draws = torch.Generator().manual_seed(0)
    for _ in range(60):
        loss = generator.denoise_loss(
            pixels01.repeat(4, 1, 1, 1),
            input_ids,
            noise=torch.randn(generator.latent_shape(8), generator=draws),
            timesteps=torch.randint(0, 1000, (8,), generator=draws),
        ).mean()
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    scores = caption_scores(
        generator, pixels01, [captions, captions], key=KEY, ids=["red", "blue"], num_timesteps=8
    )
    right, wrong = scores.diagonal(), scores.flip(1).diagonal()
    # Margin: the wrong caption's denoising loss is at least 3x the right one's (about 10x seen here).
    assert (wrong > 3 * right).all(), scores
