"""The DDPM families' timestep bias (generator.timestep_bias_*): which training timesteps are drawn, per sample."""

from __future__ import annotations

import pytest
import torch
from diffusers import DDPMScheduler

from cycletune.models.ddpm_process import DDPMProcess, TimestepBias
from cycletune.models.generators.sd3 import flow_matching_process
from cycletune.models.randomness import DrawKey
from cycletune.train.config import GeneratorSettings

KEY = DrawKey(seed=3, step=7)
IDS = [f"sample-{index}" for index in range(4000)]
NO_BIAS = TimestepBias()


def _process(bias: TimestepBias = NO_BIAS) -> DDPMProcess:
    return DDPMProcess(DDPMScheduler(num_train_timesteps=1000), timestep_bias=bias)


def test_no_bias_is_the_uniform_draw_of_before() -> None:
    """strategy none keeps diffusers' uniform integers, so existing runs draw exactly what they drew."""
    torch.testing.assert_close(
        _process().draw_timesteps(KEY, IDS[:64], "timestep", "cpu"), KEY.randint(IDS[:64], "timestep", 1000)
    )


@pytest.mark.parametrize(
    ("bias", "biased"),
    [
        (TimestepBias("later", multiplier=3.0, portion=0.25), range(750, 1000)),
        (TimestepBias("earlier", multiplier=3.0, portion=0.25), range(0, 250)),
        (TimestepBias("range", multiplier=3.0, begin=900, end=1000), range(900, 1000)),
    ],
)
def test_biased_steps_are_drawn_multiplier_times_as_often(bias: TimestepBias, biased: range) -> None:
    """The biased share is multiplier * n / (multiplier * n + rest); 4,000 draws pin it to about +-0.03."""
    drawn = _process(bias).draw_timesteps(KEY, IDS, "timestep", "cpu")
    share = sum(int(step) in biased for step in drawn) / len(drawn)
    expected = 3 * len(biased) / (3 * len(biased) + 1000 - len(biased))
    assert share == pytest.approx(expected, abs=0.03)
    assert int(drawn.min()) >= 0 and int(drawn.max()) < 1000


def test_biased_draws_are_per_sample_and_respect_below() -> None:
    process = _process(TimestepBias("later", multiplier=9.0, portion=0.1))
    batch = process.draw_timesteps(KEY, IDS[:6], "timestep", "cpu")
    regrouped = process.draw_timesteps(KEY, [IDS[5], IDS[1]], "timestep", "cpu")
    torch.testing.assert_close(regrouped, batch[[5, 1]])
    assert process.draw_timesteps(KEY, IDS[:500], "timestep", "cpu", below=300).max() < 300


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        (
            {"timestep_bias_strategy": "range", "timestep_bias_begin": 900, "timestep_bias_end": 1200},
            "0 <= begin",
        ),
        (
            {"timestep_bias_strategy": "range", "timestep_bias_begin": 500, "timestep_bias_end": 400},
            "0 <= begin",
        ),
        ({"timestep_bias_strategy": "later", "timestep_bias_portion": 0.0001}, "timestep_bias_portion"),
    ],
)
def test_bad_bias_settings_name_the_key(overrides: dict, message: str) -> None:
    options = GeneratorSettings(pretrained_model_name_or_path="x", **overrides).family_options()
    with pytest.raises(ValueError, match=message):
        _process(options.timestep_bias)


def test_flow_matching_families_refuse_the_bias() -> None:
    """Refused before the checkpoint is read: SD3 and Flux set their density with weighting_scheme."""
    options = GeneratorSettings(
        pretrained_model_name_or_path="x", timestep_bias_strategy="later"
    ).family_options()
    with pytest.raises(ValueError, match=r"generator\.weighting_scheme"):
        flow_matching_process("never/read", revision=None, options=options, patch_size=2)
