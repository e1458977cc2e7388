"""Launched on 2 processes by tests/train/test_rank_modes.py: builds the run as the recipe does, validates as
it does at a validation step (main process only), and writes every rank's submodule modes before and after.

    accelerate launch ... tests/support/rank_modes_probe.py OUT.json CONFIG.yaml [overrides]
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

from accelerate import Accelerator
from accelerate.utils import extract_model_from_parallel, gather_object

from cycletune.models.modes import module_modes
from cycletune.train.builders import build_validation_batch
from cycletune.train.config import PHASES, load_config
from cycletune.train.run import build_run, validate_run
from cycletune.train.run_dir import RunDir
from cycletune.train.tracking import StepLog


def main(out: Path, config_file: str, overrides: list[str]) -> None:
    config = load_config(config_file, overrides)
    accelerator = Accelerator()
    run = build_run(config, accelerator)
    run_dir = RunDir(out.parent)
    run.logs = (StepLog(run_dir.samples_log, 0), StepLog(run_dir.metrics_log, 0))

    def modes() -> dict[str, dict[str, bool]]:
        return {phase: module_modes(extract_model_from_parallel(run.models[phase])) for phase in PHASES}

    before = modes()
    run.state.step = config.train.validation_steps
    validate_run(run, build_validation_batch(config) if accelerator.is_main_process else None)
    gathered = gather_object([{"rank": accelerator.process_index, "before": before, "after": modes()}])
    if accelerator.is_main_process:
        out.write_text(json.dumps(gathered))


if __name__ == "__main__":
    main(Path(sys.argv[1]), sys.argv[2], sys.argv[3:])
