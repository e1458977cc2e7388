"""Experiment tracking through Accelerate's trackers (W&B, TensorBoard): config, scalars, validation tables.

The W&B run id is created once and stored in the trainer state, so a resumed job keeps writing to the same
W&B run instead of starting a new one. WANDB_MODE=offline writes a local run folder (no network needed).
"""

from __future__ import annotations

import json
import logging
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from accelerate import Accelerator

from cycletune.train.config import Config

logger = logging.getLogger(__name__)


def trackers_for(report_to: str) -> list[str] | None:
    """Accelerator's log_with for report_to; None (not []) for "none", which Accelerate takes without a warning."""
    return {
        "none": None,
        "wandb": ["wandb"],
        "tensorboard": ["tensorboard"],
        "all": ["wandb", "tensorboard"],
    }[report_to]


def flatten(values: dict[str, Any], prefix: str = "", *, scalars_only: bool = False) -> dict[str, Any]:
    """Nested config -> {'train.max_train_steps': 20, ...}. With scalars_only (TensorBoard's hparams take
    numbers and strings only), lists become their repr and None "None"; otherwise values keep their types."""
    flat: dict[str, Any] = {}
    for key, value in values.items():
        name = f"{prefix}{key}"
        if isinstance(value, dict):
            flat.update(flatten(value, f"{name}.", scalars_only=scalars_only))
        elif scalars_only and isinstance(value, list | tuple):
            flat[name] = str(value)
        elif scalars_only and value is None:
            flat[name] = "None"
        else:
            flat[name] = value
    return flat


def start_tracking(accelerator: Accelerator, config: Config, run_id: str | None) -> str:
    """Start the configured trackers (all ranks must call); returns the run id to keep in checkpoints."""
    run_id = run_id or uuid.uuid4().hex[:12]
    init_kwargs = {
        "wandb": {"id": run_id, "resume": "allow", "name": config.run_name, "dir": config.output_dir},
    }
    accelerator.init_trackers(config.tracker_project_name, init_kwargs=init_kwargs)
    values = config.model_dump(mode="json")
    for tracker in accelerator.trackers:  # main process only; W&B keeps lists as lists and None as null
        tracker.store_init_configuration(flatten(values, scalars_only=tracker.name != "wandb"))
    return run_id


def log_export_artifact(accelerator: Accelerator, export_dir: Path, *, step: int) -> None:
    """The export folder as a W&B model artifact of the run (when W&B tracks it), so the adapters a run
    produced are versioned beside its curves and can be pulled with `run.use_artifact`."""
    for tracker in accelerator.trackers:
        if tracker.name == "wandb":
            import wandb  # here, not at the top: every CLI imports this module, few log artifacts

            artifact = wandb.Artifact(f"{tracker.run.id}-export", type="model", metadata={"step": step})
            artifact.add_dir(str(export_dir))
            tracker.run.log_artifact(artifact, aliases=["latest", f"step-{step}"])


def wandb_run_dir(accelerator: Accelerator) -> Path | None:
    """Where the (possibly offline) W&B run lives, to tell the user; None without a W&B tracker."""
    for tracker in accelerator.trackers:
        if tracker.name == "wandb":
            return Path(tracker.run.dir).parent
    return None


@dataclass
class ValidationRow:
    sample_id: str
    image: torch.Tensor  # [3, H, W] in [0, 1]
    reference: str
    generated_caption: str
    generated_image: torch.Tensor  # [3, H, W] in [0, 1], generated from the reference caption


def _to_uint8(image: torch.Tensor) -> Any:
    return (image.detach().float().clamp(0, 1) * 255).round().to(torch.uint8).permute(1, 2, 0).cpu().numpy()


def log_validation_table(accelerator: Accelerator, rows: list[ValidationRow], step: int) -> None:
    """A table of (image, reference caption, generated caption, generated image) on every tracker."""
    for tracker in accelerator.trackers:
        if tracker.name == "wandb":
            import wandb

            table = wandb.Table(columns=["id", "image", "reference", "generated caption", "generated image"])
            for row in rows:
                table.add_data(
                    row.sample_id,
                    wandb.Image(_to_uint8(row.image)),
                    row.reference,
                    row.generated_caption,
                    wandb.Image(_to_uint8(row.generated_image), caption=row.reference),
                )
            tracker.log({"validation/samples": table}, step=step)
        elif tracker.name == "tensorboard":
            images = torch.stack([torch.cat([row.image, row.generated_image], dim=2) for row in rows])
            tracker.writer.add_images("validation/image_vs_generated", images.float().clamp(0, 1), step)
            text = "\n\n".join(
                f"**{row.sample_id}** reference: {row.reference} | generated: {row.generated_caption}"
                for row in rows
            )
            tracker.writer.add_text("validation/captions", text, step)


class StepLog:
    """A JSON-lines file in the run folder, one object per logged step (the main process writes).

    Two live in every run: `samples.jsonl` (which sample ids trained each update, so anyone can check that a
    resumed or re-sharded run saw exactly the batches of an uninterrupted one) and `metrics.jsonl` (every
    logged scalar, so curves can be drawn without a tracker). On resume, entries after the resumed step
    (written by the interrupted run) are dropped.
    """

    def __init__(self, path: Path, resume_step: int) -> None:
        self.path = path
        if path.exists():
            kept = []
            for number, line in enumerate(path.read_text().splitlines(), start=1):
                try:
                    if json.loads(line)["step"] <= resume_step:
                        kept.append(line)
                except (ValueError, KeyError, TypeError):
                    logger.warning(
                        "%s:%d: dropping an unreadable line (a run killed mid-write)", path, number
                    )
            path.write_text("".join(f"{line}\n" for line in kept))

    def append(self, step: int, **fields: Any) -> None:
        with self.path.open("a") as handle:
            handle.write(json.dumps({"step": step, **fields}) + "\n")


@dataclass
class LoggingWindow:
    """What happened since the last log: each model's loss terms summed over its updates, its last learning
    rate and gradient norm, and the samples seen and the seconds the steps took. A log every
    `train.logging_steps` steps then shows each model's mean terms over the window, whichever phase the step
    itself ran; samples_per_second counts the steps' own time, not validation or checkpoint saves between."""

    samples: int = 0
    seconds: float = 0.0
    sums: dict[str, dict[str, torch.Tensor | float]] = field(default_factory=dict)
    updates: dict[str, int] = field(default_factory=dict)
    last: dict[str, dict[str, float]] = field(default_factory=dict)

    def add(
        self, phase: str, terms: dict[str, torch.Tensor | float], samples: int, seconds: float, **last: float
    ) -> None:
        """Sums stay on the device (no host sync per update); summary() reads them once per log."""
        sums = self.sums.setdefault(phase, {})
        for name, value in terms.items():
            value = value.detach() if torch.is_tensor(value) else value
            sums[name] = sums[name] + value if name in sums else value
        self.updates[phase] = self.updates.get(phase, 0) + 1
        self.last[phase] = last
        self.samples += samples
        self.seconds += seconds

    def summary(self) -> dict[str, float]:
        """{"captioner/caption_ce": mean, "captioner/lr": last, ..., "samples_per_second": ...}."""
        logs: dict[str, float] = {}
        for phase, sums in self.sums.items():
            logs |= {f"{phase}/{name}": float(total) / self.updates[phase] for name, total in sums.items()}
            logs |= {f"{phase}/{name}": value for name, value in self.last[phase].items()}
        logs["samples_per_second"] = self.samples / self.seconds
        return logs
