"""CycleTune training recipe: alternate captioner and generator updates, each teaching through the other.

    accelerate launch train/cycle.py --config configs/tiny.yaml train.max_train_steps=20 output_dir=runs/x

Read top to bottom: build -> (resume) -> loop over steps (one optimizer update of one model each) ->
checkpoint -> export. Every
component (models, losses, data, checkpoints, tracking) lives in its own package; this file is the algorithm.
"""

from __future__ import annotations

import argparse
import copy
import logging
import sys
import time
from pathlib import Path
from typing import Any

from accelerate import Accelerator
from accelerate.utils import ProjectConfiguration, extract_model_from_parallel, gather_object, set_seed
from tqdm.auto import tqdm

from cycletune.models.randomness import DrawKey
from cycletune.train.adapter_export import export_run, rebuilt_models
from cycletune.train.builders import build_validation_batch, check_caption_scorer
from cycletune.train.checkpoint import (
    CheckpointError,
    PreemptionSignal,
    load_checkpoint,
    prune_checkpoints,
    save_checkpoint,
)
from cycletune.train.cli.help_format import HelpFormatter
from cycletune.train.config import (
    PHASES,
    Config,
    ConfigError,
    check_model_sources,
    flags_as_overrides,
    load_config,
)
from cycletune.train.engines import (
    check_levers_fit_engine,
    full_trainable_state,
    honour_fsdp_on_cpu,
    reads_state_collectively,
)
from cycletune.train.run import (
    Run,
    build_run,
    resume_target,
    validate_run,
    validates_here,
    with_launcher_precision,
)
from cycletune.train.run_dir import RunDir, write_config
from cycletune.train.step import PhaseStepResult, phase_step
from cycletune.train.tracking import (
    LoggingWindow,
    StepLog,
    log_export_artifact,
    start_tracking,
    trackers_for,
    wandb_run_dir,
)
from cycletune.train.validation import check_validation_metrics

logger = logging.getLogger("cycletune")


def parse_args(argv: list[str] | None = None) -> tuple[Config, list[str]]:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=HelpFormatter)
    parser.add_argument("--config", required=True, help="YAML file (see configs/)")
    parser.add_argument(
        "overrides",
        nargs="*",
        help="dotted overrides, e.g. train.max_train_steps=20; --output_dir X (any key as a flag) means output_dir=X",
    )
    args = parser.parse_args(flags_as_overrides(sys.argv[1:] if argv is None else argv, keep=("--config",)))
    command = ["accelerate", "launch", "train/cycle.py", "--config", args.config, *args.overrides]
    return load_config(args.config, args.overrides), command


def record_step(
    run: Run, phase: str, result: PhaseStepResult, started: float, window: LoggingWindow
) -> LoggingWindow:
    """Count the step and its bad records (the same on every rank), log samples and, every
    train.logging_steps steps, each model's mean loss terms since the last log. Returns the open window."""
    state, config = run.state, run.config
    if result.skipped:
        state.skipped_nonfinite += 1
        logger.warning("step %d (%s): non-finite loss or gradient, update skipped", state.step, phase)
    state.step += 1
    state.updates[phase] += 1
    per_rank = gather_object([{"ids": result.ids, "bad_records": result.bad_records}])
    for entry in (bad for rank in per_rank for bad in rank["bad_records"]):
        state.skipped_records.add(*entry)
    ids = [sample_id for rank in per_rank for sample_id in rank["ids"]]
    if run.logs is not None:
        run.logs[0].append(state.step, phase=phase, ids=ids)
    lr = run.parts.schedulers[phase].get_last_lr()[0]
    seconds = time.perf_counter() - started
    window.add(phase, result.terms, len(ids), seconds, lr=lr, grad_norm=result.grad_norm)
    if state.step % config.train.logging_steps:
        return window
    logs: dict[str, Any] = window.summary() | {
        "skipped_nonfinite_updates": state.skipped_nonfinite,
        "skipped_records": state.skipped_records.total,
        **{f"skipped_records/{reason}": n for reason, n in state.skipped_records.counts().items()},
    }
    run.accelerator.log(logs, step=state.step)
    if run.logs is not None:
        run.logs[1].append(state.step, **logs)
    return LoggingWindow()


def train(run: Run) -> bool:
    """The loop: a step is one optimizer update of the model the schedule names; every `train.*_steps`
    key counts these steps. Returns True if a signal stopped it."""
    config, accelerator, state = run.config, run.accelerator, run.state
    validates = validates_here(accelerator) and config.train.validation_steps is not None
    validation_batch = build_validation_batch(config) if validates else None
    preemption = PreemptionSignal()
    progress = tqdm(
        total=config.train.max_train_steps,
        initial=state.step,
        desc="steps",
        disable=not accelerator.is_local_main_process,
    )
    window = LoggingWindow()
    while state.step < config.train.max_train_steps:
        started = time.perf_counter()
        phase = config.train.schedule[state.step % len(config.train.schedule)]

        def next_batch(key: DrawKey, phase: str = phase) -> dict[str, Any]:
            return run.mixer.next(phase, key.uniform("batch_kind"))

        result = phase_step(
            accelerator,
            phase,
            models=run.models,
            optimizer=run.parts.optimizers[phase],
            scheduler=run.parts.schedulers[phase],
            next_batch=next_batch,
            config=config,
            step=state.step,
            bridge=run.bridge,
            caption_scorer=run.caption_scorer,
            stop_requested=preemption.received,
        )
        window = record_step(run, phase, result, started, window)
        progress.update(1)
        if config.train.validation_steps and state.step % config.train.validation_steps == 0:
            validate_run(run, validation_batch)
        if state.step % config.train.checkpointing_steps == 0 or result.stop:
            save_checkpoint(accelerator, Path(config.output_dir), state.step, run.parts, config)
            if accelerator.is_main_process:
                prune_checkpoints(Path(config.output_dir), config.train.checkpoints_total_limit)
        if result.stop:
            logger.warning(
                "stopped by signal at step %d; resume with train.resume_from_checkpoint=latest", state.step
            )
            return True
    progress.close()
    return False


def finish(run: Run, command: list[str]) -> None:
    """Export adapters in the formats other tools load and say where everything is."""
    accelerator, state, run_dir = run.accelerator, run.state, RunDir(Path(run.config.output_dir))
    accelerator.wait_for_everyone()
    captioner, generator = (extract_model_from_parallel(run.models[phase]) for phase in PHASES)
    if reads_state_collectively(accelerator):  # shards (FSDP, ZeRO): every rank reads, the main one exports
        weights = {
            phase: full_trainable_state(accelerator, *module) for phase, module in run.parts.models.items()
        }
        if accelerator.is_main_process:
            captioner, generator = rebuilt_models(run.config, lambda phase, names: weights[phase])
    if not accelerator.is_main_process:
        return
    export_dir = export_run(
        captioner,
        generator,
        run.config,
        run_dir.export_dir,
        step=state.step,
        command=command,
        kohya=run.config.export.kohya,
        merge=run.config.export.merge,
    )
    log_export_artifact(accelerator, export_dir, step=state.step)
    wandb_run = wandb_run_dir(accelerator)
    print(f"{'run folder:':<19}{run_dir.root.resolve()}")
    print(f"{'exported adapters:':<19}{export_dir.resolve()}")
    if wandb_run is not None:
        print(f"{'W&B run:':<19}{wandb_run.resolve()}")
    if state.skipped_records.total:
        print(f"skipped records: {state.skipped_records.summary()}")
    if state.skipped_nonfinite:
        print(f"skipped updates: {state.skipped_nonfinite} with a non-finite loss or gradient")


def main(argv: list[str] | None = None) -> int:
    try:
        config, command = parse_args(argv)
        check_validation_metrics(config)
        check_caption_scorer(config)
        check_model_sources(
            config
        )  # a missing folder or an uncached hub id offline: one line, nothing loaded
    except ConfigError as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    run_dir = RunDir(Path(config.output_dir))
    accelerator = Accelerator(
        mixed_precision=config.mixed_precision,
        log_with=trackers_for(config.report_to),
        project_config=ProjectConfiguration(
            project_dir=str(run_dir.root), logging_dir=str(run_dir.logging_dir)
        ),
    )
    logging.basicConfig(level=logging.INFO if accelerator.is_main_process else logging.WARNING)
    honour_fsdp_on_cpu(accelerator)
    try:
        config = with_launcher_precision(config, accelerator)
        check_levers_fit_engine(config.generator, accelerator)
    except ConfigError as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    set_seed(config.seed)
    try:
        resume_dir = resume_target(config)
    except CheckpointError as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    if accelerator.is_main_process:
        run_dir.root.mkdir(parents=True, exist_ok=True)
        write_config(config, run_dir.root)

    run = build_run(config, accelerator)
    if resume_dir is not None:
        found_while_building = copy.deepcopy(run.state.skipped_records)
        try:
            load_checkpoint(accelerator, resume_dir, run.parts)
        except CheckpointError as error:
            print(f"error: {error}", file=sys.stderr)
            return 2
        run.state.skipped_records.merge(found_while_building)
        logger.info("resumed from %s at step %d", resume_dir, run.state.step)
    if accelerator.is_main_process:
        run.logs = (
            StepLog(run_dir.samples_log, run.state.step),
            StepLog(run_dir.metrics_log, run.state.step),
        )
    run.state.tracker_run_id = start_tracking(accelerator, config, run.state.tracker_run_id)
    stopped = train(run)
    if not stopped:
        finish(run, command)
    # The other ranks wait for the main one's export, so that every rank tears its process group down
    # together: a rank that leaves while its peer still exports can abort in gloo's teardown.
    accelerator.wait_for_everyone()
    accelerator.end_training()
    return 0


if __name__ == "__main__":
    sys.exit(main())
