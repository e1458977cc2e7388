"""What one update of each phase computes: the named loss terms for the model being trained.

captioner phase: caption cross-entropy on paired batches + the I2T2I cycle term (losses/i2t2i.py);
generator phase: denoising loss on paired batches + the T2I2T cycle term (losses/t2i2t.py), which may
decode the denoising term's own UNet call (cycle.t2i2t.share_denoise_pass).
Unpaired batches (image-only, text-only) carry only the cycle term; a cycle mode adds only its own term,
so no supervised term is ever counted twice. Both phase functions share one signature so the recipe can
look them up by phase; each returns weighted terms (summed for backward) and metrics (logged only).
"""

from __future__ import annotations

from typing import Any, NamedTuple, Protocol

import torch
from pydantic import Field

from cycletune.losses.cycle_modes import OFF, CaptionScorer, CycleModes, CycleOutput, CycleStep
from cycletune.losses.i2t2i import I2T2I_MODES, I2T2ISettings
from cycletune.losses.settings import Strict
from cycletune.losses.supervised import CaptionLossSettings, DenoiseLossSettings, caption_terms, denoise_pass
from cycletune.losses.t2i2t import T2I2T_MODES, T2I2TSettings, one_step_on_denoise_pass
from cycletune.models.captioner import Captioner
from cycletune.models.generator import Generator
from cycletune.models.generator_bridge import GeneratorBridge
from cycletune.models.randomness import DrawKey


class CycleSettings(Strict):
    # Cycle weights ramp linearly from 0 to their value over this many steps (summed over both models).
    warmup_steps: int = Field(0, ge=0)
    i2t2i: I2T2ISettings = I2T2ISettings()
    t2i2t: T2I2TSettings = T2I2TSettings()

    def needs_bridge(self) -> bool:
        """Whether a chosen mode reads the vocabulary bridge, which is only built then."""
        return I2T2I_MODES.needs_bridge(self.i2t2i.mode) or T2I2T_MODES.needs_bridge(self.t2i2t.mode)


class PhaseSettings(Protocol):
    """The sections of the run's settings that the phase losses read (the run's Config has them)."""

    @property
    def captioner(self) -> CaptionLossSettings: ...

    @property
    def generator(self) -> DenoiseLossSettings: ...

    @property
    def cycle(self) -> CycleSettings: ...


class PhaseOutput(NamedTuple):
    terms: dict[str, torch.Tensor]
    metrics: dict[str, torch.Tensor | float]


def cycle_ramp(config: PhaseSettings, step: int) -> float:
    """Linear warm-up of every cycle weight over cycle.warmup_steps steps."""
    warmup = config.cycle.warmup_steps
    return 1.0 if warmup == 0 else min(1.0, step / warmup)


def captioner_phase(
    trained: Captioner,
    *,
    partner: Generator,
    batch: dict[str, Any],
    config: PhaseSettings,
    key: DrawKey,
    bridge: GeneratorBridge | None,
    caption_scorer: CaptionScorer | None = None,
) -> PhaseOutput:
    terms = caption_terms(trained, batch, config.captioner) if batch["kind"] == "paired" else {}
    settings = config.cycle.i2t2i
    if settings.mode == OFF:
        return PhaseOutput(terms, {})
    cycle = I2T2I_MODES.run(settings, CycleStep(trained, partner, batch, key, bridge))
    return _with_cycle_term(terms, I2T2I_MODES, settings, cycle, cycle_ramp(config, key.step))


def generator_phase(
    trained: Generator,
    *,
    partner: Captioner,
    batch: dict[str, Any],
    config: PhaseSettings,
    key: DrawKey,
    bridge: GeneratorBridge | None,
    caption_scorer: CaptionScorer | None = None,
) -> PhaseOutput:
    denoised = denoise_pass(trained, batch, config.generator, key) if batch["kind"] == "paired" else None
    terms = denoised.terms if denoised is not None else {}
    settings = config.cycle.t2i2t
    if settings.mode == OFF:
        return PhaseOutput(terms, {})
    step = CycleStep(trained, partner, batch, key, bridge, caption_scorer)
    if denoised is not None and settings.share_denoise_pass:
        cycle = one_step_on_denoise_pass(step, settings, denoised)
    else:
        cycle = T2I2T_MODES.run(settings, step)
    return _with_cycle_term(terms, T2I2T_MODES, settings, cycle, cycle_ramp(config, key.step))


def _with_cycle_term(
    terms: dict[str, torch.Tensor],
    modes: CycleModes,
    settings: I2T2ISettings | T2I2TSettings,
    cycle: CycleOutput,
    ramp: float,
) -> PhaseOutput:
    """Add the weighted cycle term to the phase's terms, named "<direction>_<mode>" as are its metrics."""
    name = f"{modes.direction}_{settings.mode}"
    terms[name] = settings.weight * ramp * cycle.loss
    return PhaseOutput(terms, {f"{name}/{metric}": value for metric, value in cycle.metrics.items()})


PHASE_LOSSES = {"captioner": captioner_phase, "generator": generator_phase}
