"""Only the main process validates; afterwards every rank's models are in the same modes, submodule by
submodule (a rank in another mode would run other dropout masks and checkpointing: silently other math)."""

from __future__ import annotations

import json
import os
from pathlib import Path
from types import SimpleNamespace

import pytest
from accelerate import Accelerator, debug_launcher
from accelerate.utils import extract_model_from_parallel, gather_object
from cycle_runs import tiny_config

from models.modes import module_modes
from train.builders import build_validation_batch
from train.config import PHASES
from train.cycle import build_run, maybe_validate
from train.tracking import StepLog

pytestmark = pytest.mark.slow


def _modes_on_each_rank() -> None:
    """Build the run as the recipe does, validate as it does at a validation step, gather every rank's modes."""
    out = Path(os.environ["MODES_OUT"])
    tiny_models = SimpleNamespace(**json.loads(os.environ["TINY_MODELS"]))
    config = tiny_config(tiny_models, *json.loads(os.environ["OVERRIDES"]))
    accelerator = Accelerator(cpu=True)
    run = build_run(config, accelerator)
    run.logs = (StepLog(out.parent / "samples.jsonl", 0), StepLog(out.parent / "metrics.jsonl", 0))

    def modes() -> dict[str, dict[str, bool]]:
        return {phase: module_modes(extract_model_from_parallel(run.models[phase])) for phase in PHASES}

    before = modes()
    run.state.step = config.train.validation_steps
    maybe_validate(run, build_validation_batch(config) if accelerator.is_main_process else None)
    gathered = gather_object([{"before": before, "after": modes()}])
    if accelerator.is_main_process:
        out.write_text(json.dumps(gathered))


def test_modes_are_equal_on_both_ranks_after_a_validation(tiny_models, tmp_path: Path, monkeypatch) -> None:
    overrides = [
        f"output_dir={tmp_path}",
        "captioner.gradient_checkpointing=true",
        "captioner.lora.dropout=0.1",
        "train.validation_steps=1",
        "evaluation.validation_metrics=[]",
    ]
    models = {"captioner": str(tiny_models.captioner), "generator": str(tiny_models.generator)}
    monkeypatch.setenv("MODES_OUT", str(tmp_path / "modes.json"))
    monkeypatch.setenv("TINY_MODELS", json.dumps(models))
    monkeypatch.setenv("OVERRIDES", json.dumps(overrides))
    debug_launcher(_modes_on_each_rank, num_processes=2)
    ranks = json.loads((tmp_path / "modes.json").read_text())
    assert len(ranks) == 2
    assert ranks[0]["after"] == ranks[1]["after"], "rank 0 validated and came back in other modes"
    assert ranks[0]["after"] == ranks[0]["before"]
    for phase in PHASES:  # built in train mode: the trained model's dropout and checkpointing act
        assert all(ranks[1]["after"][phase].values()), phase
