"""What a cycle mode reads, returns and declares; every mode is declared once, in its direction's table.

A mode's table entry (I2T2I_MODES in losses/i2t2i.py, T2I2T_MODES in losses/t2i2t.py) names its loss, the
batch kinds it can train on and whether it reads the vocabulary bridge. The settings' mode check, the
config's check that unpaired data has a mode that uses it, build_bridge and the phase losses all ask the
table. Each table lives beside its losses because that direction's settings check their mode against it.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any, Generic, Literal, Protocol, TypeVar

import torch

from cycletune.models.generator_bridge import GeneratorBridge
from cycletune.models.randomness import DrawKey

Direction = Literal["i2t2i", "t2i2t"]
# The kinds of batch data/mixer.py hands out: image_only batches lack captions, text_only ones images.
BatchKind = Literal["paired", "image_only", "text_only"]
# The mode that turns a direction's cycle term off; it has no table entry, as there is no loss to run.
OFF = "none"

Trained = TypeVar("Trained")
Partner = TypeVar("Partner")


class CaptionScorer(Protocol):
    """Scores each candidate caption against the reference caption at its index (higher is better): the T2I2T
    reward's cider_d judge. The trainer builds it (train/builders.py) from the evaluation package, which the
    losses may not import."""

    def __call__(self, candidates: Sequence[str], references: Sequence[str]) -> list[float]: ...


@dataclass(frozen=True)
class CycleStep(Generic[Trained, Partner]):
    """What a cycle mode reads besides its settings, the same for every mode of both directions, so the phase
    losses call any mode alike."""

    trained: Trained
    # Frozen by the trainer but not detached: most modes backpropagate through it into the trained model.
    partner: Partner
    batch: dict[str, Any]
    # Every random draw comes from it, per sample id and purpose (models/randomness.py).
    key: DrawKey
    bridge: GeneratorBridge | None = None
    caption_scorer: CaptionScorer | None = None


@dataclass
class CycleOutput:
    """What a cycle mode returns: its unweighted loss and the metrics worth logging beside it."""

    loss: torch.Tensor
    # Detached 0-dim tensors (or floats): they stay on the device until the trainer logs them after the
    # backward pass, so computing a metric never makes the host wait for the GPU mid-step.
    metrics: dict[str, torch.Tensor | float] = field(default_factory=dict)


class ModeSettings(Protocol):
    """A direction's settings (cycle.i2t2i, cycle.t2i2t): the chosen mode, and the knobs its loss reads."""

    @property
    def mode(self) -> str: ...


# (step, the direction's settings) -> the mode's term.
CycleLoss = Callable[[CycleStep[Any, Any], Any], CycleOutput]


@dataclass(frozen=True)
class CycleMode:
    loss: CycleLoss
    # The batch kinds it can train on: the config requires such a mode for unpaired data, run refuses others.
    batches: tuple[BatchKind, ...]
    # It carries the captioner's soft tokens into the generator's text encoder (models/bridge.py).
    needs_bridge: bool = False


@dataclass(frozen=True)
class CycleModes:
    """One direction's modes by name: cycle.<direction>.mode picks one of them, or OFF."""

    direction: Direction
    modes: dict[str, CycleMode]

    @property
    def names(self) -> tuple[str, ...]:
        return (OFF, *self.modes)

    def check_name(self, name: str) -> str:
        """`name` if cycle.<direction>.mode accepts it; else an error listing what it accepts, worded as
        pydantic words the config's other choices."""
        if name not in self.names:
            *others, last = (repr(known) for known in self.names)
            raise ValueError(f"Input should be {', '.join(others)} or {last}")
        return name

    def needs_bridge(self, name: str) -> bool:
        return name != OFF and self.modes[name].needs_bridge

    def consuming(self, kind: BatchKind) -> list[str]:
        """The modes that can train on `kind` batches, sorted."""
        return sorted(name for name, mode in self.modes.items() if kind in mode.batches)

    def run(self, settings: ModeSettings, step: CycleStep[Any, Any]) -> CycleOutput:
        """settings.mode's loss on the step, refusing a batch kind the mode cannot train on or a missing bridge."""
        mode, kind = self.modes[settings.mode], step.batch["kind"]
        setting = f"cycle.{self.direction}.mode={settings.mode!r}"
        if kind not in mode.batches:
            raise ValueError(
                f"{setting} cannot train on {kind} batches (only on {list(mode.batches)}); "
                f"{kind} data needs cycle.{self.direction}.mode in {self.consuming(kind)}"
            )
        if mode.needs_bridge and step.bridge is None:
            raise ValueError(f"{setting} needs a vocabulary bridge (models/bridge.py); got None")
        return mode.loss(step, settings)
