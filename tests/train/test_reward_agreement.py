"""make reward-agreement (train/cli/reward_agreement.py): the cheap caption reward's grid against sampling."""

from __future__ import annotations

import json

import torch

from cycletune.models.generator import Generator
from cycletune.models.randomness import DrawKey
from cycletune.models.scoring import caption_scores
from cycletune.train.cli import reward_agreement
from cycletune.train.cli.reward_agreement import frontier, likelihood, shapes_candidates


def _point(speedup: float, rho: float) -> dict:
    return {"speedup": speedup, "rho": {"value": rho}}


def test_frontier_keeps_the_undominated_fastest_first() -> None:
    points = [_point(10, 0.5), _point(20, 0.4), _point(5, 0.45), _point(2, 0.8), _point(20, 0.4)]
    assert frontier(points) == [1, 4, 0, 3]  # (5, 0.45) is beaten by (10, 0.5) on both


def test_shared_noise_is_caption_scores_and_independent_noise_draws_per_candidate(tiny_models) -> None:
    generator = Generator.from_pretrained(str(tiny_models.pixel_generator))
    found = shapes_candidates(2, 3, seed=103, resolution=generator.resolution)
    assert [len(group) for group in found.groups] == [3, 3] and found.groups[0][0] != found.groups[1][0]
    settings = {"num_timesteps": 2, "timestep_range": "high", "seed": 5}
    with torch.no_grad():
        shared = likelihood(generator, found, noise="shared", **settings)
        independent = likelihood(generator, found, noise="independent", **settings)
        expected = -caption_scores(
            generator, found.pixels, found.groups, key=DrawKey(5, 0), ids=found.ids, num_timesteps=2,
            timestep_range=(0.5, 1.0),
        )  # fmt: skip
        alone = -caption_scores(
            generator, found.pixels[1:], [[found.groups[1][2]]], key=DrawKey(5, 0), ids=[f"{found.ids[1]}#2"],
            num_timesteps=2, timestep_range=(0.5, 1.0),
        )  # fmt: skip
    torch.testing.assert_close(shared, expected)
    torch.testing.assert_close(independent[1, 2], alone[0, 0])
    assert not torch.allclose(independent, shared)


def test_the_study_writes_its_grid_frontier_and_table(tiny_models, tmp_path, capsys) -> None:
    results = tmp_path / "results"
    arguments = ["--generator", str(tiny_models.pixel_generator), "--results", str(results), "--images", "3"]
    arguments += ["--candidates", "3", "--timesteps", "1", "4", "--ranges", "all", "--repeats", "1"]
    arguments += ["--sampling-steps", "2"]
    assert reward_agreement.main(arguments) == 0
    stored = json.loads((results / "reward_agreement.json").read_text())
    assert [(s["num_timesteps"], s["noise"]) for s in stored["settings"]] == [
        (1, "shared"), (1, "independent"), (4, "shared"), (4, "independent"),
    ]  # fmt: skip
    assert stored["default"] == 2 and stored["frontier"] and (results / "reward_agreement.png").is_file()
    for setting in stored["settings"]:
        rho = setting["rho"]
        assert setting["ms"] > 0 and setting["speedup"] == stored["sampling"]["ms"] / setting["ms"]
        assert -1 <= rho["value"] <= 1 and (
            rho["ci_low"] <= rho["value"] <= rho["ci_high"] or rho["ci_low"] != rho["ci_low"]
        )
    table = capsys.readouterr().out
    assert "| default | 4 | all | shared |" in table and "| sampling vs itself |" in table
