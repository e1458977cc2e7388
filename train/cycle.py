"""CycleTune training recipe: alternate captioner and generator updates, each teaching through the other.

    accelerate launch train/cycle.py --config configs/tiny.yaml train.max_train_steps=20 output_dir=runs/x

Read top to bottom: build -> (resume) -> loop over optimizer updates -> checkpoint -> export. Every
component (models, losses, data, checkpoints, tracking) lives in its own package; this file is the algorithm.
"""

from __future__ import annotations

import argparse
import logging
import sys
import time
from collections import defaultdict
from collections.abc import Iterator
from contextlib import contextmanager, nullcontext
from functools import partial
from pathlib import Path
from typing import Any

import torch
import yaml
from accelerate import Accelerator
from accelerate.utils import ProjectConfiguration, extract_model_from_parallel, gather_object, set_seed
from tqdm.auto import tqdm

from data.mixer import BatchMixer
from losses.phases import PHASE_LOSSES
from losses.randomness import DrawKey
from models.lora import frozen
from models.transfer import to_device
from train.builders import (
    build_bridge,
    build_captioner,
    build_encoder_cache,
    build_generator,
    build_lr_scheduler,
    build_optimizer,
    build_streams,
    build_validation_batch,
    phase_update_counts,
)
from train.checkpoint import (
    CONFIG_NAME,
    PreemptionSignal,
    TrainableWeights,
    prune_checkpoints,
    resolve_resume,
    save_checkpoint,
)
from train.config import (
    Config,
    ConfigError,
    fingerprint_differences,
    load_config,
    model_fingerprint,
    save_config,
)
from train.export import export_run
from train.state import TrainerState
from train.tracking import StepLog, log_validation_table, start_tracking, trackers_for, wandb_run_dir
from train.update import optimizer_update
from train.validation import check_validation_metrics, validate

logger = logging.getLogger("cycletune")


def parse_args(argv: list[str] | None = None) -> tuple[Config, list[str]]:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--config", required=True, help="YAML file (see configs/)")
    parser.add_argument("overrides", nargs="*", help="dotted overrides, e.g. train.max_train_steps=20")
    args = parser.parse_args(argv)
    return load_config(args.config, args.overrides), [args.config, *args.overrides]


def batch_to_device(batch: dict[str, Any], device: torch.device) -> dict[str, Any]:
    return {
        key: to_device(value, device) if torch.is_tensor(value) else value for key, value in batch.items()
    }


@contextmanager
def sync_gradients_if(
    accelerator: Accelerator, model: torch.nn.Module, last_micro_batch: bool
) -> Iterator[None]:
    """All-reduce only on the last micro-batch of an update (per model, not Accelerate's global counter)."""
    with nullcontext() if last_micro_batch else accelerator.no_sync(model):
        yield


def main(argv: list[str] | None = None) -> int:
    try:
        config, command = parse_args(argv)
        check_validation_metrics(config)
    except ConfigError as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    output_dir = Path(config.output_dir)
    accelerator = Accelerator(
        mixed_precision=config.mixed_precision,
        log_with=trackers_for(config.report_to),
        project_config=ProjectConfiguration(
            project_dir=str(output_dir), logging_dir=str(output_dir / "logs")
        ),
    )
    logging.basicConfig(level=logging.INFO if accelerator.is_main_process else logging.WARNING)
    set_seed(config.seed)

    # --- resume target, refused if it holds weights of a different shape -----------------------------
    resume_dir = resolve_resume(output_dir, config.train.resume_from_checkpoint)
    if resume_dir is not None:
        saved = load_config(resume_dir / CONFIG_NAME)
        differences = fingerprint_differences(model_fingerprint(saved), model_fingerprint(config))
        if differences:
            print(f"error: cannot resume from {resume_dir}:\n  " + "\n  ".join(differences), file=sys.stderr)
            return 2
    if accelerator.is_main_process:
        output_dir.mkdir(parents=True, exist_ok=True)
        save_config(config, output_dir / CONFIG_NAME)

    # --- models, optimizers, schedulers, data -------------------------------------------------------
    captioner, captioner_names = build_captioner(config.captioner, config.mixed_precision)
    generator, generator_names = build_generator(config.generator, config.mixed_precision)
    generator.encoder_cache = build_encoder_cache(config, generator)  # frozen encoders' outputs, reused
    updates_per_phase = phase_update_counts(config.train.schedule, config.train.max_train_steps)
    optimizers, schedulers = {}, {}
    for phase, module, names in (
        ("captioner", captioner, captioner_names),
        ("generator", generator, generator_names),
    ):
        settings = config.phase_settings(phase).optimizer
        optimizers[phase] = build_optimizer(module, names, settings)
        schedulers[phase] = build_lr_scheduler(optimizers[phase], settings, updates_per_phase[phase])
    streams = build_streams(config, accelerator.process_index, accelerator.num_processes)
    mixer = BatchMixer(
        streams, image_only_ratio=config.data.image_only_ratio, text_only_ratio=config.data.text_only_ratio
    )
    bridge = build_bridge(config, captioner, generator, accelerator.device)
    TrainableWeights(
        accelerator, {"captioner": (captioner, captioner_names), "generator": (generator, generator_names)}
    )
    captioner, generator, optimizers["captioner"], optimizers["generator"] = accelerator.prepare(
        captioner, generator, optimizers["captioner"], optimizers["generator"]
    )
    models = {"captioner": captioner, "generator": generator}
    state = TrainerState(streams=streams)
    accelerator.register_for_checkpointing(state, schedulers["captioner"], schedulers["generator"])
    if resume_dir is not None:
        accelerator.load_state(str(resume_dir))
        logger.info("resumed from %s at update %d", resume_dir, state.step)
    state.tracker_run_id = start_tracking(accelerator, config, state.tracker_run_id)
    sample_log, metrics_log = (
        (StepLog(output_dir / "samples.jsonl", state.step), StepLog(output_dir / "metrics.jsonl", state.step))
        if accelerator.is_main_process
        else (None, None)
    )
    validates = accelerator.is_main_process and config.train.validation_steps is not None
    validation_batch = build_validation_batch(config) if validates else None
    preemption = PreemptionSignal()

    # --- the loop: one optimizer update of one model per step --------------------------------------------
    progress = tqdm(
        total=config.train.max_train_steps,
        initial=state.step,
        desc="updates",
        disable=not accelerator.is_local_main_process,
    )
    accumulation = config.train.gradient_accumulation_steps
    while state.step < config.train.max_train_steps:
        started = time.perf_counter()
        phase = config.train.schedule[state.step % len(config.train.schedule)]
        partner_phase = "generator" if phase == "captioner" else "captioner"
        trained, partner = models[phase], extract_model_from_parallel(models[partner_phase])

        logged: dict[str, list[float]] = defaultdict(list)
        nonfinite, ids = 0, []
        for micro in range(accumulation):
            key = DrawKey(config.seed, state.step, micro)
            batch = batch_to_device(mixer.next(phase, key.uniform("batch_kind")), accelerator.device)
            state.skipped_records += batch.get("skipped", 0)
            ids.extend(batch["ids"])
            with sync_gradients_if(accelerator, trained, micro == accumulation - 1), frozen(partner):
                # The whole phase computation runs as the trained model's forward, so DDP all-reduces it.
                phase_loss = partial(
                    PHASE_LOSSES[phase], partner=partner, batch=batch, config=config, key=key, bridge=bridge
                )
                output = trained(phase_loss)
                loss = sum(output.terms.values())
                accelerator.backward(loss / accumulation)
            nonfinite += int(not torch.isfinite(loss.detach()).item())
            for name, value in {**output.terms, **output.metrics}.items():
                logged[name].append(float(value))

        # Ranks agree on skipping (any non-finite loss) and on stopping (any rank got SIGTERM).
        flags = accelerator.reduce(
            torch.tensor([nonfinite, int(preemption.received)], device=accelerator.device), "sum"
        )
        result = optimizer_update(
            accelerator,
            optimizers[phase],
            schedulers[phase],
            config.phase_settings(phase).optimizer.max_grad_norm,
            nonfinite_loss=flags[0].item() > 0,
        )
        if result.skipped:
            state.skipped_nonfinite += 1
            logger.warning("update %d (%s): non-finite loss or gradient, step skipped", state.step, phase)
        state.step += 1
        state.updates[phase] += 1

        all_ids = gather_object(ids)
        if sample_log is not None:
            sample_log.append(state.step, phase=phase, ids=all_ids)
        # Per model: a global counter would never land on one phase's updates (2 phases, even interval).
        if state.updates[phase] % config.train.logging_steps == 0:
            logs = {f"{phase}/{name}": sum(values) / len(values) for name, values in logged.items()}
            logs |= {
                f"{phase}/lr": schedulers[phase].get_last_lr()[0],
                f"{phase}/grad_norm": result.grad_norm,
                "samples_per_second": len(all_ids) / (time.perf_counter() - started),
                "skipped_nonfinite_updates": state.skipped_nonfinite,
                "skipped_records": state.skipped_records,
            }
            accelerator.log(logs, step=state.step)
            if metrics_log is not None:
                metrics_log.append(state.step, **logs)
            progress.set_postfix(
                {key.split("/")[-1]: f"{value:.4g}" for key, value in logs.items() if "/" in key}
            )
        progress.update(1)

        if config.train.validation_steps and state.step % config.train.validation_steps == 0:
            if accelerator.is_main_process:
                with accelerator.autocast():
                    metrics, rows = validate(
                        extract_model_from_parallel(captioner),
                        extract_model_from_parallel(generator),
                        batch_to_device(validation_batch, accelerator.device),
                        config,
                    )
                accelerator.log(metrics, step=state.step)
                metrics_log.append(state.step, **metrics)
                log_validation_table(accelerator, rows, state.step)
            accelerator.wait_for_everyone()
        stopping = flags[1].item() > 0
        if state.step % config.train.checkpointing_steps == 0 or stopping:
            save_checkpoint(
                accelerator,
                output_dir,
                state.step,
                yaml.safe_dump(config.model_dump(mode="json")),
                state.summary_json(),
            )
            if accelerator.is_main_process:
                prune_checkpoints(output_dir, config.train.checkpoints_total_limit)
        if stopping:
            logger.warning(
                "stopped by signal at update %d; resume with train.resume_from_checkpoint=latest", state.step
            )
            accelerator.end_training()
            return 0
    progress.close()

    # --- export adapters in the formats other tools load -------------------------------------------------
    accelerator.wait_for_everyone()
    if accelerator.is_main_process:
        export_dir = export_run(
            extract_model_from_parallel(captioner),
            extract_model_from_parallel(generator),
            config,
            output_dir / "export",
            step=state.step,
            command=command,
        )
        run_dir = wandb_run_dir(accelerator)
        print(f"{'run folder:':<19}{output_dir.resolve()}")
        print(f"{'exported adapters:':<19}{export_dir.resolve()}")
        if run_dir is not None:
            print(f"{'W&B run:':<19}{run_dir.resolve()}")
        if state.skipped_records or state.skipped_nonfinite:
            print(
                f"skipped: {state.skipped_records} unreadable records, "
                f"{state.skipped_nonfinite} non-finite updates"
            )
    accelerator.end_training()
    return 0


if __name__ == "__main__":
    sys.exit(main())
