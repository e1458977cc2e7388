"""Sharded sources: data too large to list in memory, read shard by shard in an order fixed by the seed.

A sharded source is a list of Shards (a webdataset tar file, a data file of a streamed `datasets` dataset, or
a small source read in memory). The global order extends the in-memory stream's (data/streams.py): epoch e
visits the shards in a permutation seeded by (seed, e), each shard's records in a permutation seeded by
(seed, e, shard), and global position p is the p-th record of that walk. So it stays a pure function of
(seed, position), whatever the number of ranks and loader workers.

Every loader worker walks the shards itself: it reads a shard's index (a tar's member headers and captions,
its images skipped by seeking; a data file's rows, images left encoded) to learn where each position falls,
then decodes only the images of its own positions. A Cursor (epoch, the shard's place in that epoch's
order, the global position of its first record) marks a shard boundary at or before a position; a stream
saves the cursor of the last batch it consumed, and a resumed walker starts at that shard instead of
walking from position 0. Shard sizes need not be known in advance, and records found malformed in the
index (no image, no caption, a blank caption) are left out of the walk and reported once per walker.
"""

from __future__ import annotations

import zlib
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field, replace
from typing import Any

import numpy as np

from cycletune.data.skips import SkipLedger
from cycletune.data.sources import EmptySourceError, Record, SourceResult

# Seed-sequence words of the two permutations; data/streams.py uses 0-3 for its own draws.
_SHARD_ORDER_PURPOSE = 4
_RECORD_ORDER_PURPOSE = 5


@dataclass(frozen=True)
class Shard:
    """One unit of a sharded source: a name (for messages and the resume check) and a picklable reader.

    `read` returns the shard's valid records (possibly none) and what it dropped, keyed by where.
    """

    name: str
    read: Callable[[], SourceResult]


@dataclass(frozen=True)
class InMemoryShard:
    """A source already read into memory, as one shard (a small source in a data role that streams)."""

    result: SourceResult

    def __call__(self) -> SourceResult:
        return self.result


@dataclass(frozen=True)
class ShardedSource:
    """The shards of one data role, and which sides of each record the role keeps."""

    shards: tuple[Shard, ...]
    images: bool = True
    captions: bool = True

    def __post_init__(self) -> None:
        if not self.shards:
            raise ValueError("a sharded source needs at least one shard")
        if not self.images and not self.captions:
            raise ValueError("a sharded source must keep images, captions or both")

    def digest(self) -> str:
        """Names the shard list, so a resume over different shards is refused rather than misread."""
        names = "\n".join(shard.name for shard in self.shards)
        return f"{len(self.shards)}:{zlib.crc32(names.encode('utf-8')):08x}"

    def keep(self, record: Record) -> Record:
        """The record with only the sides this role uses."""
        return replace(
            record,
            image=record.image if self.images else None,
            caption=record.caption if self.captions else None,
        )


@dataclass(frozen=True)
class Cursor:
    """A shard boundary of the global walk: epoch, the shard's place in that epoch's order, first position."""

    epoch: int = 0
    ordinal: int = 0
    start: int = 0

    def state_dict(self) -> dict[str, int]:
        return {"epoch": self.epoch, "ordinal": self.ordinal, "start": self.start}

    @classmethod
    def from_state(cls, state: Any) -> Cursor:
        if not isinstance(state, dict) or not all(
            isinstance(state.get(key), int) and state[key] >= 0 for key in ("epoch", "ordinal", "start")
        ):
            raise ValueError(
                f"a shard cursor needs non-negative integers epoch, ordinal, start; got {state!r}"
            )
        return cls(state["epoch"], state["ordinal"], state["start"])


@dataclass(frozen=True)
class Located:
    """Where a global position falls: its shard's records (in this epoch's order), the offset, the cursor."""

    records: Sequence[Record]
    offset: int
    cursor: Cursor
    shard: str


@dataclass
class ShardWalker:
    """Maps increasing global positions to records, reading one shard at a time from a base cursor.

    A position before the current shard sends the walker back to `base` (a loader restarted at an earlier
    position); one before `base` is an error, since nothing before it is known.
    """

    source: ShardedSource
    seed: int
    base: Cursor = field(default_factory=Cursor)
    _cursor: Cursor = field(init=False)
    _records: list[Record] | None = field(default=None, init=False, repr=False)
    _shard: int = field(default=0, init=False)
    _shard_order: tuple[int, np.ndarray] | None = field(default=None, init=False, repr=False)
    _empty_in_a_row: int = field(default=0, init=False)
    # The rows dropped by the shards read, handed out once (take_skips) so batches can report them.
    _pending_skips: list[list[str]] = field(default_factory=list, init=False, repr=False)

    def __post_init__(self) -> None:
        self._cursor = self.base

    def __getstate__(self) -> dict[str, Any]:
        """Loader workers get the walker at its base, without the shard read in this process."""
        return {"source": self.source, "seed": self.seed, "base": self.base}

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__init__(**state)

    def move_base(self, cursor: Cursor) -> None:
        """Make `cursor` the base; jump there unless the walker already reads that shard or a later one."""
        self.base = cursor
        if _rank(cursor) > _rank(self._cursor):
            self._go_to(cursor)

    def locate(self, position: int) -> Located:
        if position < self._cursor.start:
            self._go_to(self.base)
        if position < self._cursor.start:
            raise ValueError(
                f"position {position} lies before the walk's base (shard boundary at {self.base.start})"
            )
        while True:
            records = self._current()
            offset = position - self._cursor.start
            if offset < len(records):
                return Located(records, offset, self._cursor, self.source.shards[self._shard].name)
            self._advance(len(records))

    def take_skips(self) -> list[list[str]]:
        """[record id, reason, where] of the rows dropped from the shards read since the last call."""
        skips, self._pending_skips = self._pending_skips, []
        return skips

    def _go_to(self, cursor: Cursor) -> None:
        self._cursor, self._records, self._empty_in_a_row = cursor, None, 0

    def _current(self) -> list[Record]:
        if self._records is None:
            epoch = self._cursor.epoch
            if self._shard_order is None or self._shard_order[0] != epoch:
                self._shard_order = epoch, self._order(epoch, len(self.source.shards), _SHARD_ORDER_PURPOSE)
            self._shard = int(self._shard_order[1][self._cursor.ordinal])
            records, skips = self.source.shards[self._shard].read()
            self._pending_skips.extend(skips.entries())
            order = self._order(epoch, len(records), _RECORD_ORDER_PURPOSE, self._shard)
            self._records = [self.source.keep(records[int(i)]) for i in order]
        return self._records

    def _advance(self, size: int) -> None:
        """Step to the next shard, into the next epoch after the last; refuse a walk that finds nothing."""
        self._empty_in_a_row = 0 if size else self._empty_in_a_row + 1
        if self._empty_in_a_row >= len(self.source.shards):
            raise EmptySourceError(
                f"none of the {len(self.source.shards)} shards (e.g. {self.source.shards[0].name}) holds a "
                "valid record"
            )
        epoch, ordinal = self._cursor.epoch, self._cursor.ordinal + 1
        if ordinal == len(self.source.shards):
            epoch, ordinal = epoch + 1, 0
        self._cursor, self._records = Cursor(epoch, ordinal, self._cursor.start + size), None

    def _order(self, epoch: int, size: int, purpose: int, *words: int) -> np.ndarray:
        return np.random.default_rng([self.seed, purpose, epoch, *words]).permutation(size)


def _rank(cursor: Cursor) -> tuple[int, int, int]:
    """Cursors in walk order (several empty shards can share a start)."""
    return cursor.start, cursor.epoch, cursor.ordinal


def read_shards(shards: Sequence[Shard], limit: int | None = None) -> SourceResult:
    """The records of the shards in their listed order (the first `limit` of them), and what they dropped:
    a sharded source read in memory, for validation batches and small sets."""
    records: list[Record] = []
    skips = SkipLedger()
    for shard in shards:
        if limit is not None and len(records) >= limit:
            break
        shard_records, shard_skips = shard.read()
        records.extend(shard_records)
        skips.merge(shard_skips)
    if not records:
        details = f": {skips.summary()}" if skips.total else ""
        raise EmptySourceError(f"{len(shards)} shards (e.g. {shards[0].name}): no valid records{details}")
    return SourceResult(records[:limit], skips)
