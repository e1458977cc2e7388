"""A ledger of distinct bad records: what was dropped, why and where, each counted once however often met.

Sources add what they drop while reading a manifest (a row that is not JSON, a missing file, a blank
caption); streams report a record that fails to decode every time they meet it (every epoch, every
replacement attempt, on every rank and worker). Keyed by record id, the ledger turns all of that into
counts of distinct records, and its state holds only JSON types so a checkpoint can carry it.
"""

from __future__ import annotations

from collections import Counter
from typing import Any


class SkipLedger:
    """Distinct bad records by id, in the order first met: (reason, where, detail) for each.

    `reason` is a short stable snake_case word (bad_json, missing_file, truncated_image, ...), `where` names
    the file or manifest row, `detail` optionally says more (the decoder's or parser's message).
    """

    def __init__(self) -> None:
        self._entries: dict[str, tuple[str, str, str]] = {}

    def add(self, record_id: str, reason: str, where: str, detail: str = "") -> bool:
        """Record one bad record; False (and nothing changes) when its id is already in the ledger."""
        if record_id in self._entries:
            return False
        self._entries[record_id] = (reason, where, detail)
        return True

    def merge(self, other: SkipLedger) -> None:
        """Add every entry of `other` (ids already here keep their first entry)."""
        for record_id, (reason, where, detail) in other._entries.items():
            self.add(record_id, reason, where, detail)

    def entries(self) -> list[list[str]]:
        """[record_id, reason, where] per bad record in the order first met: the shape of a batch's "bad_records"."""
        return [[record_id, reason, where] for record_id, (reason, where, _) in self._entries.items()]

    @property
    def total(self) -> int:
        return len(self._entries)

    def counts(self) -> dict[str, int]:
        """Distinct bad records per reason, reasons sorted."""
        return dict(sorted(Counter(reason for reason, _, _ in self._entries.values()).items()))

    def examples(self, limit: int = 5) -> list[str]:
        """'<where>: <reason> (<detail>)' for the first `limit` bad records met."""
        return [
            f"{where}: {reason}" + (f" ({detail})" if detail else "")
            for reason, where, detail in list(self._entries.values())[:limit]
        ]

    def summary(self) -> str:
        """One line: the total, the count per reason, then the first few files or rows."""
        if not self._entries:
            return "skipped 0"
        counts = ", ".join(f"{reason}={count}" for reason, count in self.counts().items())
        return f"skipped {self.total} ({counts}); e.g. " + "; ".join(self.examples())

    def state_dict(self) -> dict[str, Any]:
        """{"entries": [[record_id, reason, where, detail], ...]} in the order first met (JSON types only)."""
        return {"entries": [[record_id, *entry] for record_id, entry in self._entries.items()]}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Replace the contents with a state from state_dict()."""
        entries = state.get("entries") if isinstance(state, dict) else None
        if not isinstance(entries, list):
            raise ValueError(f"skip ledger state needs an 'entries' list, got {_shape(state)}")
        loaded: dict[str, tuple[str, str, str]] = {}
        for number, entry in enumerate(entries):
            if not (isinstance(entry, list) and len(entry) == 4 and all(isinstance(x, str) for x in entry)):
                raise ValueError(
                    f"skip ledger state: entries[{number}] must be [record_id, reason, where, detail] strings, "
                    f"got {entry!r}"
                )
            loaded.setdefault(entry[0], (entry[1], entry[2], entry[3]))
        self._entries = loaded


def _shape(value: Any) -> str:
    return f"keys {sorted(value)}" if isinstance(value, dict) else type(value).__name__
