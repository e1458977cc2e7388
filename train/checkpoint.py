"""Checkpoints that survive preemption and never run code: safetensors + JSON, a manifest, atomic folders.

Layout of {output_dir}/checkpoint-{N}/ (the folder and the first two names are train/run_dir.py's, since
other modules read them; the rest only resuming reads, so they are named here):
  config.yaml                        the resolved run config
  {model}_trainable.safetensors      only the trainable weights (LoRA adapters, or all in full mode)
  trainer_state.json                 update counters, data positions, skipped records, tracker run id
  optimizer_{model}.safetensors      AdamW moments (param groups in the file's JSON metadata)
  lr_scheduler_{model}.json          the learning-rate schedule's position
  rng_state_{rank}.safetensors       every global random generator of each process
  grad_scaler.json                   fp16 loss scale (fp16 runs only)
  manifest.json                      every file above with its size and SHA-256, written last
Nothing is pickled, so a file planted in a shared run folder cannot execute on resume. A folder is written
as `.tmp-checkpoint-{N}` and renamed once its manifest is on disk; `latest` takes the newest folder whose
manifest verifies and names every newer one it passes over.
"""

from __future__ import annotations

import json
import logging
import shutil
import signal
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from types import FrameType
from typing import Any, Protocol, TypeVar

import torch
from accelerate import Accelerator
from safetensors.torch import load_file, save_file

from cycletune.train.config import Config, ConfigError, load_config
from cycletune.train.engines import full_trainable_state, load_full_trainable_state, reads_state_collectively
from cycletune.train.manifest import MANIFEST_NAME, fsync_directory, manifest_problem, write_manifest
from cycletune.train.optimizer_state import load_optimizer_state, optimizer_state_file
from cycletune.train.rng import restore_rng_state, rng_state_tensors
from cycletune.train.run_dir import CONFIG_FILE, RunDir, trainable_weights_file, write_config

logger = logging.getLogger(__name__)

TRAINER_STATE_NAME = "trainer_state.json"
GRAD_SCALER_NAME = "grad_scaler.json"

T = TypeVar("T")


def optimizer_state_name(model: str) -> str:
    return f"optimizer_{model}.safetensors"


def lr_scheduler_name(model: str) -> str:
    return f"lr_scheduler_{model}.json"


def rng_state_name(rank: int) -> str:
    return f"rng_state_{rank}.safetensors"


class CheckpointError(ValueError):
    """A checkpoint that cannot be used, with the file at fault and (where known) the newest good one."""


class Stateful(Protocol):
    def state_dict(self) -> dict[str, Any]: ...

    def load_state_dict(self, state: dict[str, Any]) -> None: ...


@dataclass
class TrainingParts:
    """What a checkpoint saves and restores: models (unwrapped, with trainable names) and their optimizers,
    learning-rate schedulers and the trainer's own state, all keyed by model name."""

    models: dict[str, tuple[torch.nn.Module, list[str]]]
    optimizers: dict[str, torch.optim.Optimizer]
    schedulers: dict[str, Stateful]
    trainer_state: Stateful


def is_checkpoint_folder(folder: Path) -> bool:
    """A training checkpoint (intact or not), as opposed to an export folder: it has a manifest or weights."""
    return (folder / MANIFEST_NAME).is_file() or any(folder.glob(trainable_weights_file("*")))


def newest_intact_checkpoint(output_dir: Path, *, warn: bool = True) -> Path | None:
    """The newest checkpoint whose manifest verifies; each newer damaged one is named in a warning."""
    for _, folder in reversed(RunDir(output_dir).checkpoints()):
        problem = manifest_problem(folder)
        if problem is None:
            return folder
        if warn:
            logger.warning("passing over %s: %s", folder, problem)
    return None


def verify_checkpoint(folder: Path) -> None:
    """Raise CheckpointError naming the bad file and the newest intact checkpoint beside it."""
    if not folder.is_dir():
        raise CheckpointError(f"{folder} is not a folder")
    problem = manifest_problem(folder)
    if problem is not None:
        good = newest_intact_checkpoint(folder.parent, warn=False)
        hint = (
            f"the newest intact checkpoint there is {good}"
            if good
            else "there is no intact checkpoint beside it"
        )
        raise CheckpointError(f"checkpoint {folder} failed verification: {problem}; {hint}")


def resolve_resume(output_dir: Path, resume_from_checkpoint: str | None) -> Path | None:
    """'latest' -> newest intact checkpoint (None if there is none yet); a path must verify."""
    if resume_from_checkpoint is None:
        return None
    if resume_from_checkpoint == "latest":
        found = newest_intact_checkpoint(output_dir)
        if found is None:
            logger.info(
                "train.resume_from_checkpoint=latest: no intact checkpoint in %s, starting fresh", output_dir
            )
        return found
    folder = Path(resume_from_checkpoint)
    verify_checkpoint(folder)
    return folder


@contextmanager
def _reading(path: Path) -> Iterator[None]:
    """Whatever a damaged or planted file makes a parser raise becomes one error naming the file."""
    try:
        yield
    except CheckpointError:
        raise
    except Exception as error:  # parsers raise their own types (SafetensorError, JSONDecodeError, ...)
        raise CheckpointError(f"cannot read {path}: {type(error).__name__}: {error}") from None


def _read(path: Path, reader: Callable[[Path], T]) -> T:
    with _reading(path):
        return reader(path)


def read_json(path: Path) -> Any:
    return _read(path, lambda file: json.loads(file.read_text()))


def read_tensors(path: Path) -> dict[str, torch.Tensor]:
    return _read(path, lambda file: load_file(str(file)))


def read_config(folder: Path) -> Config:
    path = folder / CONFIG_FILE
    try:
        return _read(path, load_config)
    except ConfigError as error:
        raise CheckpointError(f"cannot read {path}: {error}") from None


def _write_json(value: Any, path: Path) -> None:
    path.write_text(json.dumps(value, indent=1))


def save_checkpoint(
    accelerator: Accelerator, output_dir: Path, step: int, parts: TrainingParts, config: Config
) -> Path:
    """Every rank calls this (each writes its RNG state; DeepSpeed and multi-node saves hang otherwise).

    The main process writes the rest, then the manifest, flushes everything and renames the folder.
    """
    run_dir = RunDir(output_dir)
    final, staging = run_dir.checkpoint(step), run_dir.staging(step)
    if accelerator.is_main_process:
        shutil.rmtree(staging, ignore_errors=True)
        staging.mkdir(parents=True)
    accelerator.wait_for_everyone()
    save_file(rng_state_tensors(), str(staging / rng_state_name(accelerator.process_index)))
    # Full tensors whatever the engine (see train/engines.py); FSDP and ZeRO shards are read by every rank.
    if accelerator.is_main_process or reads_state_collectively(accelerator):
        for name, (module, names) in parts.models.items():
            weights = full_trainable_state(accelerator, module, names)
            optimizer_state = optimizer_state_file(parts.optimizers[name])
            if accelerator.is_main_process:
                save_file(
                    {key: value.contiguous() for key, value in weights.items()},
                    str(staging / trainable_weights_file(name)),
                )
                optimizer_state.save(staging / optimizer_state_name(name))
                _write_json(parts.schedulers[name].state_dict(), staging / lr_scheduler_name(name))
    if accelerator.is_main_process:
        write_config(config, staging)
        _write_json(parts.trainer_state.state_dict(), staging / TRAINER_STATE_NAME)
        if accelerator.scaler is not None:
            _write_json(accelerator.scaler.state_dict(), staging / GRAD_SCALER_NAME)
    accelerator.wait_for_everyone()
    if accelerator.is_main_process:
        write_manifest(staging, _required_files(parts, accelerator.num_processes))
        if final.exists():
            shutil.rmtree(final)
        staging.rename(final)
        fsync_directory(output_dir)
        logger.info("saved %s", final)
    accelerator.wait_for_everyone()
    return final


def _required_files(parts: TrainingParts, num_processes: int) -> list[str]:
    names = [CONFIG_FILE, TRAINER_STATE_NAME, *(rng_state_name(rank) for rank in range(num_processes))]
    for model in parts.models:
        names += [trainable_weights_file(model), optimizer_state_name(model), lr_scheduler_name(model)]
    return names


def load_checkpoint(accelerator: Accelerator, folder: Path, parts: TrainingParts) -> None:
    """Restore everything save_checkpoint wrote into `parts` (every rank calls it).

    `folder` comes from resolve_resume, which verified its manifest: hashing a full-mode checkpoint twice
    would double the resume's I/O. Each file is still parsed only as safetensors / JSON, errors naming it.
    """
    for name, (module, names) in parts.models.items():
        weights_path = folder / trainable_weights_file(name)
        weights = read_tensors(weights_path)
        with _reading(weights_path):
            load_full_trainable_state(accelerator, module, names, weights)
        optimizer_path = folder / optimizer_state_name(name)
        with _reading(optimizer_path):
            load_optimizer_state(parts.optimizers[name], optimizer_path)
        scheduler_path = folder / lr_scheduler_name(name)
        scheduler_state = read_json(scheduler_path)
        with _reading(scheduler_path):
            parts.schedulers[name].load_state_dict(scheduler_state)
    trainer_path = folder / TRAINER_STATE_NAME
    trainer_state = read_json(trainer_path)
    with _reading(trainer_path):
        parts.trainer_state.load_state_dict(trainer_state)
    if accelerator.scaler is not None and (folder / GRAD_SCALER_NAME).is_file():
        accelerator.scaler.load_state_dict(read_json(folder / GRAD_SCALER_NAME))
    rng_path = folder / rng_state_name(accelerator.process_index)
    if rng_path.is_file():
        rng_state = read_tensors(rng_path)
        with _reading(rng_path):
            restore_rng_state(rng_state)
    else:
        logger.warning(
            "%s has no %s (saved with fewer processes): random generators not restored, dropout masks will "
            "differ from an uninterrupted run",
            folder,
            rng_path.name,
        )


def prune_checkpoints(output_dir: Path, total_limit: int | None) -> list[Path]:
    """Keep the newest `total_limit` checkpoint folders; call on the main process after a save."""
    if total_limit is None:
        return []
    checkpoints = RunDir(output_dir).checkpoints()
    removed = [path for _, path in checkpoints[: max(0, len(checkpoints) - total_limit)]]
    for path in removed:
        shutil.rmtree(path)
        logger.info("pruned %s (train.checkpoints_total_limit=%d)", path, total_limit)
    return removed


class PreemptionSignal:
    """Turns SIGTERM (what torchrun and cluster schedulers send before killing a job) into a flag.

    The loop checks the flag once per update through a collective, so every rank stops at the same step.
    """

    def __init__(self, signals: tuple[signal.Signals, ...] = (signal.SIGTERM,)) -> None:
        self.received = False
        for sig in signals:
            signal.signal(sig, self._handle)

    def _handle(self, signum: int, frame: FrameType | None) -> None:
        logger.warning("received %s: will checkpoint and exit after this update", signal.Signals(signum).name)
        self.received = True
