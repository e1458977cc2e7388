"""make reward-learning (train/cli/reward_learning.py): the T2I2T reward arm against its weight-0 control."""

from __future__ import annotations

import json
import math
from pathlib import Path

from cycle_runs import REPO

from cycletune.evaluation.shapes_split import load_test_split
from cycletune.models.captioner import Captioner
from cycletune.models.generator import Generator
from cycletune.train.cli import reward_learning
from cycletune.train.cli.reward_learning import ARM_OVERRIDES, GENERATOR_ONLY, held_out_scores
from cycletune.train.cli.shapes_base import DEFAULT_CONFIG
from cycletune.train.config import load_config


def test_the_arms_differ_only_in_the_reward_weight() -> None:
    control, reward = (
        load_config(REPO / DEFAULT_CONFIG, [*GENERATOR_ONLY, *ARM_OVERRIDES[arm]]) for arm in ARM_OVERRIDES
    )
    assert (reward.cycle.t2i2t.weight, control.cycle.t2i2t.weight) == (1.0, 0.0)
    assert reward.cycle.t2i2t.mode == "reward" and reward.cycle.i2t2i.mode == "none"
    assert reward.train.schedule == ["generator"] and reward.data.text_only_ratio == 1.0
    assert reward.model_dump(exclude={"cycle"}) == control.model_dump(exclude={"cycle"})
    assert reward.cycle.t2i2t.model_dump(exclude={"weight"}) == control.cycle.t2i2t.model_dump(
        exclude={"weight"}
    )


def test_held_out_scores_draw_the_same_chains_for_every_arm(tiny_models) -> None:
    """The arms are compared on common random numbers: scoring a model twice gives the same numbers, and a
    different generator gets other images from the same noise."""
    config = load_config(REPO / DEFAULT_CONFIG, [*GENERATOR_ONLY, "cycle.t2i2t.num_inference_steps=2"])
    captioner = Captioner.from_pretrained(str(tiny_models.captioner))
    generator = Generator.from_pretrained(str(tiny_models.pixel_generator))
    split = load_test_split(3, generator.resolution)
    first = held_out_scores(generator, captioner, split, config)
    assert set(first) == {
        f"{part}/{m}" for part in ("seen", "unseen", "all") for m in ("reward", "image_exact")
    }
    assert first["all/reward"] == (first["seen/reward"] + first["unseen/reward"]) / 2
    assert all(math.isfinite(value) for value in first.values())
    assert first["seen/reward"] < 0 and 0 <= first["unseen/image_exact"] <= 1
    assert held_out_scores(generator, captioner, split, config) == first
    with_other_weights = Generator.from_pretrained(str(tiny_models.pixel_generator))
    for parameter in with_other_weights.denoiser.parameters():
        parameter.data.mul_(1.5)
    assert (
        held_out_scores(with_other_weights, captioner, split, config)["seen/reward"] != first["seen/reward"]
    )


def test_without_base_models_it_stops_before_training(tmp_path: Path, capsys) -> None:
    assert reward_learning.main(["--base", str(tmp_path), "--out", str(tmp_path / "out")]) == 2
    assert "run `make base` first" in capsys.readouterr().err
    assert not (tmp_path / "out").exists()


def test_the_committed_results_compare_every_seed_with_its_control() -> None:
    stored = json.loads((REPO / reward_learning.DEFAULT_RESULTS).read_text())
    seeds = stored["settings"]["seeds"]
    assert len(seeds) >= 3 and stored["settings"]["split"] == "test"
    for metric, difference in stored["reward_minus_control"].items():
        expected = [
            stored["per_seed"][str(s)]["reward"][metric] - stored["per_seed"][str(s)]["control"][metric]
            for s in seeds
        ]
        assert difference["differences"] == expected, metric
