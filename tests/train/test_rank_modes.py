"""Only the main process validates; afterwards every rank's models are in the same modes, submodule by
submodule (a rank in another mode would run other dropout masks and checkpointing: silently other math)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from cycle_runs import TINY_CONFIG, launch_command, run_launched, tiny_overrides

from cycletune.train.config import PHASES

pytestmark = pytest.mark.slow


def test_modes_are_equal_on_both_ranks_after_a_validation(tiny_models, tmp_path: Path) -> None:
    out = tmp_path / "modes.json"
    overrides = [
        *tiny_overrides(tiny_models, tmp_path),
        "captioner.gradient_checkpointing=true",
        "captioner.lora.dropout=0.1",
        "train.validation_steps=1",
        "evaluation.validation_metrics=[]",
    ]
    probe = ["tests/support/rank_modes_probe.py", str(out), str(TINY_CONFIG), *overrides]
    run_launched(launch_command(probe, processes=2), ACCELERATE_USE_CPU="1")
    ranks = json.loads(out.read_text())
    assert sorted(rank["rank"] for rank in ranks) == [0, 1]
    assert ranks[0]["after"] == ranks[1]["after"], "rank 0 validated and came back in other modes"
    assert ranks[0]["after"] == ranks[0]["before"]
    for phase in PHASES:  # built in train mode: the trained model's dropout and checkpointing act
        assert all(ranks[1]["after"][phase].values()), phase
