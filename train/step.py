"""One optimizer update of one model: micro-batches, the routed forward, backward, the update, its metrics.

The recipe (train/cycle.py), the benchmark and the GPU tests all call `phase_step`, so what is measured and
tested is what trains. The step makes one host sync of its own (the ranks' agreement on skipping and
stopping) besides the clipping in `optimizer_update`; metrics stay on the device until someone logs them.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass
from functools import partial
from typing import Any

import torch
from accelerate import Accelerator
from accelerate.utils import extract_model_from_parallel

from cycletune.losses.cycle_modes import CaptionScorer
from cycletune.losses.phases import PHASE_LOSSES
from cycletune.models.device_transfer import to_device
from cycletune.models.generator_bridge import GeneratorBridge
from cycletune.models.lora import frozen
from cycletune.models.randomness import DrawKey
from cycletune.train.config import Config
from cycletune.train.engines import is_deepspeed, zero_backward, zero_update
from cycletune.train.update import optimizer_update

PARTNER = {"captioner": "generator", "generator": "captioner"}


@dataclass
class PhaseStepResult:
    terms: dict[str, torch.Tensor | float]  # loss terms and metrics, means over micro-batches, not synced
    ids: list[str]  # this rank's sample ids, in micro-batch order
    bad_records: list[list[str]]  # [record id, reason, where] of every bad record met building the batches
    grad_norm: float
    skipped: bool  # a non-finite loss or gradient on any rank: no optimizer step
    stop: bool  # any rank asked to stop (SIGTERM)


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


def _through_partner(
    model: torch.nn.Module, *, partner: torch.nn.Module, phase_loss: Callable[..., Any]
) -> Any:
    """The phase's loss with the partner running as its own forward too: under FSDP that forward gathers the
    partner's sharded weights; under DDP the partner is unwrapped and the call is plain."""
    return partner(lambda frozen_partner: phase_loss(model, partner=frozen_partner))


def phase_step(
    accelerator: Accelerator,
    phase: str,
    *,
    models: dict[str, torch.nn.Module],
    optimizer: torch.optim.Optimizer,
    scheduler: torch.optim.lr_scheduler.LRScheduler,
    next_batch: Callable[[DrawKey], dict[str, Any]],
    config: Config,
    step: int,
    bridge: GeneratorBridge | None,
    caption_scorer: CaptionScorer | None = None,
    stop_requested: bool = False,
    on_stage: Callable[[str], None] | None = None,
) -> PhaseStepResult:
    """Train `models[phase]` for one step (one optimizer update) through its frozen partner (models are the prepared ones).

    The whole phase computation runs as the trained model's forward, so DDP all-reduces what it produced;
    the partner runs unwrapped inside `frozen`, in eval mode with no gradient of its own. `next_batch` gets
    each micro-batch's draw key (the recipe mixes streams with it; the benchmark returns a fixed batch).
    `on_stage` is told "forward", "backward", "update" and "done" as the step moves on (profiling, sync tests).
    """
    stage = on_stage or (lambda name: None)
    trained, partner = models[phase], extract_model_from_parallel(models[PARTNER[phase]])
    accumulation = config.train.gradient_accumulation_steps
    totals: dict[str, torch.Tensor | float] = {}
    ids: list[str] = []
    bad_records: list[list[str]] = []
    nonfinite = torch.zeros((), device=accelerator.device)
    for micro in range(accumulation):
        key = DrawKey(config.seed, step, micro)
        batch = batch_to_device(next_batch(key), accelerator.device)
        ids.extend(batch["ids"])
        bad_records.extend(batch.get("bad_records", []))
        stage("forward")
        with sync_gradients_if(accelerator, trained, micro == accumulation - 1), frozen(partner):
            phase_loss = partial(
                PHASE_LOSSES[phase],
                batch=batch,
                config=config,
                key=key,
                bridge=bridge,
                caption_scorer=caption_scorer,
            )
            output = trained(partial(_through_partner, partner=partner, phase_loss=phase_loss))
            loss = sum(output.terms.values())
            stage("backward")
            if is_deepspeed(accelerator):
                zero_backward(trained, loss / accumulation, last_micro_batch=micro == accumulation - 1)
            else:
                accelerator.backward(loss / accumulation)
        nonfinite = nonfinite + (~torch.isfinite(loss.detach())).float()
        for name, value in {**output.terms, **output.metrics}.items():
            value = value.detach() if torch.is_tensor(value) else value
            totals[name] = totals.get(name, 0.0) + value / accumulation
    stage("update")
    # Ranks agree on skipping (a non-finite loss anywhere) and on stopping (any rank got SIGTERM).
    flags = accelerator.reduce(
        torch.stack([nonfinite, torch.full_like(nonfinite, float(stop_requested))]), "sum"
    )
    any_nonfinite, any_stop = (value > 0 for value in flags.tolist())
    if is_deepspeed(accelerator):  # the engine clips and skips a non-finite gradient itself
        grad_norm, skipped = zero_update(trained, scheduler)
    else:
        result = optimizer_update(
            accelerator,
            optimizer,
            scheduler,
            config.phase_settings(phase).optimizer.max_grad_norm,
            nonfinite_loss=any_nonfinite,
        )
        grad_norm, skipped = result.grad_norm, result.skipped
    stage("done")
    return PhaseStepResult(totals, ids, bad_records, grad_norm, skipped, any_stop)
