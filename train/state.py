"""What a resumed run needs besides weights and optimizers: step, data positions, counters, run id.

Saved as JSON in every checkpoint (train/checkpoint.py), so nothing read back on resume is unpickled.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Protocol

from cycletune.data.skips import SkipLedger


class Resumable(Protocol):
    def state_dict(self) -> dict[str, Any]: ...

    def load_state_dict(self, state: dict[str, Any]) -> None: ...


@dataclass
class TrainerState:
    streams: dict[str, Resumable]
    step: int = 0
    updates: dict[str, int] = field(default_factory=lambda: {"captioner": 0, "generator": 0})
    skipped_nonfinite: int = 0
    # Distinct bad records (manifest rows and undecodable files), each counted once however often it is met.
    skipped_records: SkipLedger = field(default_factory=SkipLedger)
    tracker_run_id: str | None = None

    def state_dict(self) -> dict[str, Any]:
        return {
            "step": self.step,
            "updates": dict(self.updates),
            "skipped_nonfinite": self.skipped_nonfinite,
            "skipped_records": self.skipped_records.state_dict(),
            "tracker_run_id": self.tracker_run_id,
            "streams": {name: stream.state_dict() for name, stream in self.streams.items()},
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.step = state["step"]
        self.updates = dict(state["updates"])
        self.skipped_nonfinite = state["skipped_nonfinite"]
        self.skipped_records.load_state_dict(state["skipped_records"])
        self.tracker_run_id = state["tracker_run_id"]
        for name, stream_state in state["streams"].items():
            if name in self.streams:
                self.streams[name].load_state_dict(stream_state)
