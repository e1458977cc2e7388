"""What a resumed run needs besides weights and optimizers: step, data positions, counters, run id.

Registered with `accelerator.register_for_checkpointing`, so it travels inside every checkpoint.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from typing import Any, Protocol


class Resumable(Protocol):
    def state_dict(self) -> dict[str, Any]: ...

    def load_state_dict(self, state: dict[str, Any]) -> None: ...


@dataclass
class TrainerState:
    streams: dict[str, Resumable]
    step: int = 0
    updates: dict[str, int] = field(default_factory=lambda: {"captioner": 0, "generator": 0})
    skipped_nonfinite: int = 0
    skipped_records: int = 0
    tracker_run_id: str | None = None

    def state_dict(self) -> dict[str, Any]:
        return {
            "step": self.step,
            "updates": dict(self.updates),
            "skipped_nonfinite": self.skipped_nonfinite,
            "skipped_records": self.skipped_records,
            "tracker_run_id": self.tracker_run_id,
            "streams": {name: stream.state_dict() for name, stream in self.streams.items()},
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.step = state["step"]
        self.updates = dict(state["updates"])
        self.skipped_nonfinite = state["skipped_nonfinite"]
        self.skipped_records = state["skipped_records"]
        self.tracker_run_id = state["tracker_run_id"]
        for name, stream_state in state["streams"].items():
            if name in self.streams:
                self.streams[name].load_state_dict(stream_state)

    def summary_json(self) -> str:
        """Human-readable copy written beside the checkpoint (its presence marks the folder complete)."""
        summary = {key: value for key, value in self.state_dict().items() if key != "streams"}
        return json.dumps(summary, indent=2)
