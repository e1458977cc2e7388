"""Checkpoints that survive preemption: atomic folders, `latest`, pruning, trainable-only weights, SIGTERM.

Layout: {output_dir}/checkpoint-{N}/ holds what `accelerator.save_state` writes (optimizers, schedulers,
RNG states per rank, custom objects such as the trainer state) plus `{model}_trainable.safetensors` with
only the trainable weights (LoRA adapters, or the full model in full mode) and the resolved config.
A folder is written as `.tmp-checkpoint-{N}` and renamed when complete, so a crash mid-write never leaves a
folder that `latest` would pick.
"""

from __future__ import annotations

import logging
import re
import shutil
import signal
from pathlib import Path
from types import FrameType

import torch
from accelerate import Accelerator
from accelerate.utils import extract_model_from_parallel
from safetensors.torch import load_file, save_file

from models.lora import load_trainable_state_dict, trainable_state_dict

logger = logging.getLogger(__name__)

CHECKPOINT_PATTERN = re.compile(r"^checkpoint-(\d+)$")
COMPLETE_MARKER = "trainer_state.json"
CONFIG_NAME = "config.yaml"


def list_checkpoints(output_dir: Path) -> list[tuple[int, Path]]:
    """Complete checkpoints, oldest first. Temporary or half-written folders are ignored."""
    if not output_dir.is_dir():
        return []
    found = []
    for child in output_dir.iterdir():
        match = CHECKPOINT_PATTERN.match(child.name)
        if match and (child / COMPLETE_MARKER).is_file():
            found.append((int(match.group(1)), child))
    return sorted(found)


def resolve_resume(output_dir: Path, resume_from_checkpoint: str | None) -> Path | None:
    """'latest' -> newest complete checkpoint (None if there is none yet); a path must be a complete one."""
    if resume_from_checkpoint is None:
        return None
    if resume_from_checkpoint == "latest":
        checkpoints = list_checkpoints(output_dir)
        if not checkpoints:
            logger.info(
                "train.resume_from_checkpoint=latest: no checkpoint in %s yet, starting fresh", output_dir
            )
            return None
        return checkpoints[-1][1]
    path = Path(resume_from_checkpoint)
    if not (path / COMPLETE_MARKER).is_file():
        raise FileNotFoundError(
            f"train.resume_from_checkpoint: {path} is not a complete checkpoint folder (no {COMPLETE_MARKER})"
        )
    return path


class TrainableWeights:
    """Accelerate save/load hooks that store only the trainable weights of each prepared model.

    Without them `save_state` would write every frozen base weight (gigabytes for Stable Diffusion) into
    every checkpoint.
    """

    def __init__(
        self, accelerator: Accelerator, modules: dict[str, tuple[torch.nn.Module, list[str]]]
    ) -> None:
        self.accelerator = accelerator
        self.modules = modules
        accelerator.register_save_state_pre_hook(self._save)
        accelerator.register_load_state_pre_hook(self._load)

    def _name_of(self, model: torch.nn.Module) -> str:
        unwrapped = extract_model_from_parallel(model)
        for name, (module, _) in self.modules.items():
            if module is unwrapped:
                return name
        raise KeyError(f"model {type(unwrapped).__name__} was not registered for checkpointing")

    def _save(self, models: list[torch.nn.Module], weights: list[dict], output_dir: str) -> None:
        for model in models:
            name = self._name_of(model)
            module, names = self.modules[name]
            if self.accelerator.is_main_process:
                state = {
                    key: value.contiguous() for key, value in trainable_state_dict(module, names).items()
                }
                save_file(state, str(Path(output_dir) / f"{name}_trainable.safetensors"))
        weights.clear()

    def _load(self, models: list[torch.nn.Module], input_dir: str) -> None:
        for model in models:
            name = self._name_of(model)
            module, names = self.modules[name]
            load_trainable_state_dict(
                module, load_file(str(Path(input_dir) / f"{name}_trainable.safetensors")), names
            )
        models.clear()


def save_checkpoint(
    accelerator: Accelerator, output_dir: Path, step: int, config_text: str, state_json: str
) -> Path:
    """Every rank calls this (DeepSpeed and multi-node saves hang otherwise); the rename makes it atomic."""
    final = output_dir / f"checkpoint-{step}"
    staging = output_dir / f".tmp-checkpoint-{step}"
    if accelerator.is_main_process:
        shutil.rmtree(staging, ignore_errors=True)
        staging.mkdir(parents=True)
    accelerator.wait_for_everyone()
    accelerator.save_state(str(staging))
    accelerator.wait_for_everyone()
    if accelerator.is_main_process:
        (staging / CONFIG_NAME).write_text(config_text)
        (staging / COMPLETE_MARKER).write_text(state_json)
        if final.exists():
            shutil.rmtree(final)
        staging.rename(final)
        logger.info("saved %s", final)
    accelerator.wait_for_everyone()
    return final


def prune_checkpoints(output_dir: Path, total_limit: int | None) -> list[Path]:
    """Keep the newest `total_limit` complete checkpoints; call on the main process after a save."""
    if total_limit is None:
        return []
    checkpoints = list_checkpoints(output_dir)
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
