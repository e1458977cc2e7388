"""The layout of a run folder (the config's output_dir): every name the trainer and the tools put there.

    {output_dir}/
      config.yaml               the resolved config, written when the run starts (a crashed run keeps it)
      checkpoint-{N}/           resumable state after N steps (train/checkpoint.py); it holds its own
                                config.yaml and {model}_trainable.safetensors, which also mark it as a
                                checkpoint; `.tmp-checkpoint-{N}/` while it is being written
      export/                   adapters in the formats other tools load (train/adapter_export.py)
      samples.jsonl             which sample ids trained each step (train/tracking.py StepLog)
      metrics.jsonl             every logged scalar, for curves without a tracker
      logs/                     TensorBoard events (report_to tensorboard / all)
      wandb/                    W&B's run files, made by W&B inside the folder given as its dir
    written by tools after training:
      validation_metrics.json   the base run's scores (train.cli.retrain_base)
      demo_run.json             the command and wall time of a demo arm (train.cli.demo)
      test_results.safetensors  a demo arm's test-split scores and images (train.cli.demo)

Every module that reads or writes one of these asks RunDir (or the constants below) for its path, so a
name changes in one place and a reader never guesses a writer's spelling.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path

from cycletune.train.config import Config, save_config

CONFIG_FILE = "config.yaml"  # in the run folder and in every checkpoint folder
EXPORT_FOLDER = "export"  # also the default export folder inside a checkpoint (train.cli.export)
_CHECKPOINT = re.compile(r"^checkpoint-(\d+)$")
_STAGING = re.compile(r"^\.tmp-checkpoint-(\d+)$")


def trainable_weights_file(model: str) -> str:
    """A checkpoint's trainable weights of `model` ("*" gives the glob of all of them)."""
    return f"{model}_trainable.safetensors"


def checkpoint_step(name: str) -> int | None:
    """N of a `checkpoint-N` folder name; None for any other name."""
    match = _CHECKPOINT.match(name)
    return None if match is None else int(match.group(1))


def staging_step(name: str) -> int | None:
    """N of a `.tmp-checkpoint-N` folder name (a save in progress, or one a kill cut short); else None."""
    match = _STAGING.match(name)
    return None if match is None else int(match.group(1))


def write_config(config: Config, folder: Path) -> None:
    """The one way a resolved config is written, into the run folder or a checkpoint folder."""
    save_config(config, folder / CONFIG_FILE)


@dataclass(frozen=True)
class RunDir:
    """Paths inside one run folder; nothing is created or read until a caller does so."""

    root: Path

    @property
    def config_file(self) -> Path:
        return self.root / CONFIG_FILE

    def checkpoint(self, step: int) -> Path:
        return self.root / f"checkpoint-{step}"

    def staging(self, step: int) -> Path:
        """Where checkpoint(step) is written before it is renamed into place."""
        return self.root / f".tmp-checkpoint-{step}"

    def checkpoints(self) -> list[tuple[int, Path]]:
        """(N, checkpoint-N folder) pairs, oldest first; none are verified here."""
        if not self.root.is_dir():
            return []
        found = [(checkpoint_step(child.name), child) for child in self.root.iterdir()]
        return sorted((step, child) for step, child in found if step is not None and child.is_dir())

    @property
    def export_dir(self) -> Path:
        return self.root / EXPORT_FOLDER

    @property
    def samples_log(self) -> Path:
        return self.root / "samples.jsonl"

    @property
    def metrics_log(self) -> Path:
        return self.root / "metrics.jsonl"

    @property
    def logging_dir(self) -> Path:
        return self.root / "logs"

    @property
    def wandb_dir(self) -> Path:
        """W&B's own folder: W&B is given the run folder and makes this inside it."""
        return self.root / "wandb"

    @property
    def validation_metrics(self) -> Path:
        return self.root / "validation_metrics.json"

    @property
    def demo_record(self) -> Path:
        return self.root / "demo_run.json"

    @property
    def test_scores(self) -> Path:
        return self.root / "test_results.safetensors"
