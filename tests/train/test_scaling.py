"""make scaling (train/cli/scaling.py): unpaired data as it grows against the same data paired."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from cycle_runs import REPO

from cycletune.train.cli import scaling
from cycletune.train.cli.scaling import arm_overrides, arms_for
from cycletune.train.cli.shapes_base import DEFAULT_CONFIG
from cycletune.train.config import load_config


@pytest.fixture(scope="module")
def cycle_config():
    return load_config(REPO / DEFAULT_CONFIG)


def arm_config(arm: str, cycle_config):
    paired = [source.model_dump(exclude_defaults=True) for source in cycle_config.data.paired]
    image_only = cycle_config.data.image_only[0].model_dump(exclude_defaults=True)
    return load_config(REPO / DEFAULT_CONFIG, arm_overrides(arm, paired, image_only))


def test_the_arms_are_control_every_unpaired_size_and_the_paired_sizes() -> None:
    assert arms_for([0, 500, 2000]) == [
        "control",
        "unpaired-0",
        "unpaired-500",
        "unpaired-2000",
        "paired-500",
        "paired-2000",
    ]


def test_unpaired_arms_grow_both_unpaired_sets_and_keep_the_rest(cycle_config) -> None:
    none = arm_config("unpaired-0", cycle_config)
    assert not none.data.image_only and not none.data.text_only and none.data.text_only_ratio == 0
    assert none.cycle == cycle_config.cycle
    grown = arm_config("unpaired-500", cycle_config)
    assert [source.num_samples for source in (*grown.data.image_only, *grown.data.text_only)] == [500, 500]
    assert grown.model_dump(exclude={"data"}) == cycle_config.model_dump(exclude={"data"})
    assert grown.data.paired == cycle_config.data.paired


def test_a_paired_arm_adds_the_unpaired_arms_images_with_their_captions(cycle_config) -> None:
    paired = arm_config("paired-500", cycle_config)
    unpaired = arm_config("unpaired-500", cycle_config)
    assert not paired.data.image_only and not paired.data.text_only
    assert paired.data.paired[: len(cycle_config.data.paired)] == cycle_config.data.paired
    # The same source, seed and count as the unpaired arm's images: the same records, captions kept.
    assert paired.data.paired[-1] == unpaired.data.image_only[0]
    assert paired.cycle == cycle_config.cycle and paired.train == cycle_config.train


def test_the_control_arm_is_supervised_only(cycle_config) -> None:
    control = arm_config("control", cycle_config)
    assert (control.cycle.i2t2i.mode, control.cycle.t2i2t.mode) == ("none", "none")
    assert control.data.paired == cycle_config.data.paired and not control.data.image_only


def test_an_unknown_arm_is_refused_by_name() -> None:
    with pytest.raises(ValueError, match="paired-0"):
        arm_overrides("paired-0", [], {})


def test_without_base_models_it_stops_before_training(tmp_path: Path, capsys) -> None:
    assert scaling.main(["--base", str(tmp_path), "--out", str(tmp_path / "out")]) == 2
    assert "run `make base` first" in capsys.readouterr().err


def test_the_committed_results_are_each_seeds_difference_from_its_control() -> None:
    stored = json.loads((REPO / scaling.DEFAULT_RESULTS / "scaling.json").read_text())
    seeds, arms = stored["settings"]["seeds"], stored["settings"]["arms"]
    assert len(seeds) >= 2 and set(stored["gain"]) == set(arms) - {"control"}
    for arm, gains in stored["gain"].items():
        for metric, gain in gains.items():
            per_seed = [
                stored["per_seed"][str(s)][arm][metric] - stored["per_seed"][str(s)]["control"][metric]
                for s in seeds
            ]
            assert gain["differences"] == per_seed, (arm, metric)
