"""A training run's parts, built once: models, optimizers, schedules, data, bridge and trainer state.

The recipe (train/cycle.py) builds a Run, resumes it from a checkpoint and loops over it; tools and tests
that need a run as the trainer builds it (the multi-process mode probe) build it here, never through the
recipe.
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from accelerate import Accelerator
from accelerate.utils import extract_model_from_parallel

from cycletune.data.mixer import BatchMixer
from cycletune.losses.cycle_modes import CaptionScorer
from cycletune.models.generator_bridge import GeneratorBridge
from cycletune.models.speed_levers import set_tf32
from cycletune.train.builders import (
    build_bridge,
    build_caption_scorer,
    build_captioner,
    build_encoder_cache,
    build_generator,
    build_lr_scheduler,
    build_optimizer,
    build_streams,
    check_family_runs_the_modes,
    phase_update_counts,
)
from cycletune.train.checkpoint import CheckpointError, TrainingParts, read_config, resolve_resume
from cycletune.train.config import PHASES, Config, ConfigError, fingerprint_differences, model_fingerprint
from cycletune.train.engines import prepare_model, shards_weights, use_deepspeed_per_model
from cycletune.train.state import TrainerState
from cycletune.train.step import batch_to_device
from cycletune.train.tracking import StepLog, log_validation_table
from cycletune.train.validation import validate

logger = logging.getLogger(__name__)


@dataclass
class Run:
    """Everything the loop touches, built once (and restored from a checkpoint on resume)."""

    config: Config
    accelerator: Accelerator
    models: dict[str, torch.nn.Module]  # prepared (DDP-wrapped where distributed)
    parts: TrainingParts  # unwrapped models, optimizers, schedulers, trainer state: what checkpoints hold
    mixer: BatchMixer
    bridge: GeneratorBridge | None
    state: TrainerState
    logs: tuple[StepLog, StepLog] | None  # RunDir.samples_log, RunDir.metrics_log (main process only)
    caption_scorer: CaptionScorer | None = None  # the T2I2T cider_d reward's judge


def resume_target(config: Config) -> Path | None:
    """The checkpoint to resume from, refused if it is damaged or holds weights of a different shape."""
    resume_dir = resolve_resume(Path(config.output_dir), config.train.resume_from_checkpoint)
    if resume_dir is not None:
        differences = fingerprint_differences(
            model_fingerprint(read_config(resume_dir)), model_fingerprint(config)
        )
        if differences:
            raise CheckpointError(f"cannot resume from {resume_dir}:\n  " + "\n  ".join(differences))
    return resume_dir


def with_launcher_precision(config: Config, accelerator: Accelerator) -> Config:
    """The config with the mixed precision the accelerator runs in (the config's own, else the launcher's),
    said once in the log, so the saved config, the exports and a resume all know it."""
    precision = accelerator.mixed_precision
    if precision not in ("no", "fp16", "bf16"):
        raise ConfigError(
            f"mixed precision {precision!r} from the launcher is not supported; use no, fp16 or bf16"
        )
    launcher = os.environ.get("ACCELERATE_MIXED_PRECISION", "no")
    if config.mixed_precision is None:
        logger.info("mixed precision: %s (the launcher's: accelerate launch / accelerate config)", precision)
    elif launcher != precision:
        logger.info(
            "mixed precision: %s (the config's mixed_precision, over the launcher's %s)", precision, launcher
        )
    else:
        logger.info("mixed precision: %s (the config's mixed_precision)", precision)
    return config.model_copy(update={"mixed_precision": precision})


def build_run(config: Config, accelerator: Accelerator) -> Run:
    """Models (trained one in train mode), optimizers, per-model LR schedules, data streams, bridge."""
    set_tf32(config.train.allow_tf32)
    max_grad_norms = {phase: config.phase_settings(phase).optimizer.max_grad_norm for phase in PHASES}
    use_deepspeed_per_model(accelerator, max_grad_norms, config.data.train_batch_size)
    caption_scorer = build_caption_scorer(config)  # first: refuses a missing [eval] extra before loading
    captioner, captioner_names = build_captioner(config.captioner, accelerator.mixed_precision)
    generator, generator_names = build_generator(config.generator, accelerator.mixed_precision)
    check_family_runs_the_modes(config, generator)
    # Frozen encoders' outputs, reused.
    generator.encoder_cache = build_encoder_cache(config, generator, sharded=shards_weights(accelerator))
    modules = {"captioner": (captioner, captioner_names), "generator": (generator, generator_names)}
    updates_per_phase = phase_update_counts(config.train.schedule, config.train.max_train_steps)
    optimizers, schedulers = {}, {}
    for phase, (module, names) in modules.items():
        settings = config.phase_settings(phase).optimizer
        optimizers[phase] = build_optimizer(module, names, settings)
        schedulers[phase] = build_lr_scheduler(optimizers[phase], settings, updates_per_phase[phase])
    streams, skipped_records = build_streams(config, accelerator.process_index, accelerator.num_processes)
    mixer = BatchMixer(
        streams, image_only_ratio=config.data.image_only_ratio, text_only_ratio=config.data.text_only_ratio
    )
    bridge = build_bridge(config, captioner, generator, accelerator.device)
    prepared = {
        phase: prepare_model(accelerator, modules[phase][0], optimizers[phase], name=phase)
        for phase in PHASES
    }
    models = {phase: model for phase, (model, _) in prepared.items()}
    optimizers = {phase: optimizer for phase, (_, optimizer) in prepared.items()}
    state = TrainerState(streams=streams, skipped_records=skipped_records)
    parts = TrainingParts(modules, optimizers, schedulers, state)
    return Run(
        config, accelerator, models, parts, mixer, bridge, state, logs=None, caption_scorer=caption_scorer
    )


def validates_here(accelerator: Accelerator) -> bool:
    """Whether this rank runs validation: the main process, and under FSDP (and ZeRO-3) every rank, since each
    forward gathers the weights' shards from all ranks (the main process alone would wait for the others
    forever)."""
    return accelerator.is_main_process or shards_weights(accelerator)


def validate_run(run: Run, validation_batch: dict[str, Any] | None) -> None:
    """Validate where validates_here (those ranks hold the batch; the others wait); the main process logs.

    Both models run as their own forward (as in a training step), which under FSDP gathers their shards.
    Every submodule's train/eval mode is restored afterwards (validate() runs under eval_mode).
    """
    if validation_batch is not None:
        captioner, generator = (extract_model_from_parallel(run.models[phase]) for phase in PHASES)
        device_batch = batch_to_device(validation_batch, run.accelerator.device)
        with run.accelerator.autocast():
            metrics, rows = captioner(
                lambda captioner: generator(
                    lambda generator: validate(captioner, generator, device_batch, run.config)
                )
            )
        if run.accelerator.is_main_process:
            run.accelerator.log(metrics, step=run.state.step)
            run.logs[1].append(run.state.step, **metrics)
            log_validation_table(run.accelerator, rows, run.state.step)
    run.accelerator.wait_for_everyone()
