"""Batches for training: an infinite, resumable, rank-sharded stream over a list of Records or over shards.

The order is a pure function of (seed, global position): epoch e is torch.randperm(n) seeded from
(seed, e), the epochs are concatenated into one global stream, and every next() consumes
batch_size * world_size consecutive positions, rank r taking slice [r * batch_size, (r + 1) * batch_size).
Flip augmentation, and the replacement of an undecodable record, are also derived from (seed, global
position). So a stream resumed from state_dict(), or one split over a different number of ranks, sees
exactly the same samples with the same pixels. A sharded source (data/shards.py) replaces the epoch
permutation by a walk over its shards and keeps the rest. Nothing here draws from torch's global RNG (the
loader has its own generator), so creating or restarting a stream never shifts the model's random numbers.
"""

from __future__ import annotations

import logging
import os
import zlib
from collections.abc import Hashable, Iterator, Sequence
from dataclasses import dataclass, field, replace
from typing import Any, NamedTuple

import numpy as np
import torch
from PIL import UnidentifiedImageError
from torch.utils.data import DataLoader, Dataset

from cycletune.data.images import BadImage, ImageInput, load_rgb, to_tensor
from cycletune.data.shards import Cursor, ShardedSource, ShardWalker
from cycletune.data.sources import Record

logger = logging.getLogger(__name__)

# Distinct words in the seed sequences, so epoch orders, flips, replacements of undecodable records and
# the loader's worker seeds never share random streams.
_ORDER_PURPOSE = 0
_FLIP_PURPOSE = 1
_REPLACEMENT_PURPOSE = 2
_LOADER_PURPOSE = 3
# This many undecodable records drawn in a row for one position means the storage is broken, not a few
# bad files (with a fraction f of bad records the chance of reaching it is f ** 1000).
_MAX_ATTEMPTS = 1000


class SampleKey(NamedTuple):
    """What the batch plan asks the dataset for: a record, whether to mirror it, and its global position."""

    index: int
    flip: bool
    position: int


class _Samples(Dataset):
    """Decodes, converts and resizes the Records a subclass draws; replaces an undecodable record.

    Replacement attempt a for global position p takes a record drawn uniformly from a generator seeded
    from (seed, p, a): deterministic, the same on resume and for any rank split, and spread out rather than
    oversampling a neighbour. Each sample lists the failures met while building it ("bad_records": [record
    id, reason, where] each) so the trainer can count distinct bad records. A record found bad is not
    decoded again by this process, and its warning is logged once per process.
    """

    def __init__(
        self, *, resolution: int, seed: int, center_crop: bool, has_images: bool, has_captions: bool
    ) -> None:
        if not has_images and not has_captions:
            raise ValueError("records hold neither images nor captions")
        self.resolution = resolution
        self.seed = seed
        self.center_crop = center_crop
        self.has_images = has_images
        self.has_captions = has_captions
        self._bad: dict[Hashable, tuple[str, str, str]] = {}  # what _draw identifies -> (id, reason, where)

    def __getitem__(self, key: SampleKey) -> dict[str, Any]:
        bad_records: list[list[str]] = []
        sample = self._decoded(key, bad_records)
        sample["bad_records"] = self._found_while_reading() + bad_records
        return sample

    def _decoded(self, key: SampleKey, bad_records: list[list[str]]) -> dict[str, Any]:
        """The sample for `key`; each undecodable record drawn on the way is added to `bad_records`."""
        for attempt in range(_MAX_ATTEMPTS):
            identity, record, extra = self._draw(key, attempt)
            sample: dict[str, Any] = {"id": record.id, **extra}
            if self.has_captions:
                sample["caption"] = record.caption
            if not self.has_images:
                return sample
            if identity not in self._bad:
                source = record.image() if callable(record.image) else record.image
                try:
                    sample["pixels"] = self._pixels(source, key.flip)
                    return sample
                except BadImage as error:
                    self._bad[identity] = self._failure(record, source, error)
            bad_records.append(list(self._bad[identity]))
        named = ", ".join(f"{record_id} ({reason})" for record_id, reason, _ in bad_records[:5])
        raise RuntimeError(
            f"stream position {key.position}: {_MAX_ATTEMPTS} records drawn in a row could not be decoded "
            f"({len({entry[0] for entry in bad_records})} distinct, e.g. {named}); "
            "check that the image storage is readable"
        )

    def _draw(self, key: SampleKey, attempt: int) -> tuple[Hashable, Record, dict[str, Any]]:
        """The record tried at `attempt` for `key`, what identifies it as bad, and extra sample fields."""
        raise NotImplementedError

    def _found_while_reading(self) -> list[list[str]]:
        """Bad records met other than by decoding (the rows a sharded source dropped)."""
        return []

    def _pixels(self, source: ImageInput, flip: bool) -> torch.Tensor:
        image = load_rgb(source, min_side=self.resolution)
        return to_tensor(image, self.resolution, center_crop=self.center_crop, flip=flip)

    @staticmethod
    def _failure(record: Record, source: ImageInput, error: BadImage) -> tuple[str, str, str]:
        """(id, reason, where) of a record that failed to decode; logs the decoder's message."""
        where = os.fspath(source) if isinstance(source, str | os.PathLike) else record.where or record.id
        reason = _decode_reason(error, source)
        logger.warning(
            "skipping record %s (%s), replaced by a randomly drawn record: %s", record.id, reason, error
        )
        return record.id, reason, where


class RecordDataset(_Samples):
    """Samples of a list of Records in memory; SampleKey.index picks the record, a replacement is drawn
    from the whole list."""

    def __init__(
        self, records: Sequence[Record], *, resolution: int, seed: int, center_crop: bool = True
    ) -> None:
        if not records:
            raise ValueError("RecordDataset needs at least one record")
        super().__init__(
            resolution=resolution,
            seed=seed,
            center_crop=center_crop,
            has_images=_all_or_none(records, "image"),
            has_captions=_all_or_none(records, "caption"),
        )
        self.records = records

    def __len__(self) -> int:
        return len(self.records)

    def _draw(self, key: SampleKey, attempt: int) -> tuple[Hashable, Record, dict[str, Any]]:
        index = key.index if attempt == 0 else _uniform(len(self.records), self.seed, key.position, attempt)
        return index, self.records[index], {}


class ShardedDataset(_Samples):
    """Samples of a sharded source: the record at each position is found by walking the shards
    (data/shards.py); a replacement is drawn from the same shard.

    Every loader worker walks from the base cursor on its own. Each sample carries the cursor of its
    shard, and the rows the walker dropped from the shards read since its last sample ("bad_records").
    """

    def __init__(
        self, source: ShardedSource, *, resolution: int, seed: int, center_crop: bool = True
    ) -> None:
        super().__init__(
            resolution=resolution,
            seed=seed,
            center_crop=center_crop,
            has_images=source.images,
            has_captions=source.captions,
        )
        self.source = source
        self.walker = ShardWalker(source, seed)

    def _draw(self, key: SampleKey, attempt: int) -> tuple[Hashable, Record, dict[str, Any]]:
        found = self.walker.locate(key.position)
        size = len(found.records)
        offset = found.offset if attempt == 0 else _uniform(size, self.seed, key.position, attempt)
        record = found.records[offset]
        return (found.shard, record.id), record, {"cursor": found.cursor.state_dict()}

    def _found_while_reading(self) -> list[list[str]]:
        return self.walker.take_skips()


def _uniform(size: int, seed: int, position: int, attempt: int) -> int:
    """The replacement tried at `attempt` (>= 1) for `position`: uniform, keyed only by (seed, position, attempt)."""
    return int(np.random.default_rng([seed, _REPLACEMENT_PURPOSE, position, attempt]).integers(size))


def _decode_reason(error: BadImage, source: ImageInput) -> str:
    """A short stable word for why a record did not decode, as specific as the decoder's error allows."""
    cause = error.__cause__
    if isinstance(cause, FileNotFoundError):
        return "missing_file"  # removed after the source was read
    if _is_empty(source):
        return "empty_file"
    if isinstance(cause, UnidentifiedImageError):
        return "not_an_image"
    # Pillow reports a file that ends early as an OSError whose message says "truncated".
    if isinstance(cause, OSError) and "truncated" in str(cause).lower():
        return "truncated_image"
    return "undecodable_image"


def _is_empty(source: ImageInput) -> bool:
    """Whether an image source holds no bytes at all (a 0-byte file or an empty blob)."""
    if isinstance(source, bytes):
        return not source
    if isinstance(source, str | os.PathLike):
        try:
            return os.path.getsize(source) == 0
        except OSError:
            return False
    return False


def collate_samples(samples: list[dict[str, Any]]) -> dict[str, Any]:
    """Stack pixels; keep ids and captions as lists; gather the failures met while building the batch."""
    batch: dict[str, Any] = {
        "ids": [sample["id"] for sample in samples],
        "bad_records": [entry for sample in samples for entry in sample["bad_records"]],
    }
    if "pixels" in samples[0]:
        batch["pixels"] = torch.stack([sample["pixels"] for sample in samples])
    if "caption" in samples[0]:
        batch["captions"] = [sample["caption"] for sample in samples]
    if "cursor" in samples[0]:  # a sharded source: the shard boundary before the batch, for resuming
        batch["cursor"] = samples[0]["cursor"]
    return batch


class Stream:
    """An infinite, resumable, rank-sharded iterator of batches (see the module docstring for the order).

    Batches: {"ids": list[str], "pixels": Tensor[B, 3, R, R] in [0, 1] (absent for text-only records),
    "captions": list[str] (absent for image-only records), "bad_records": list[[record_id, reason, where]]
    (the undecodable records met while building this batch, repeats included; SkipLedger.add dedups)}.
    random_flip mirrors images left-right: leave it off when captions mention left and right (shapes world).

    `records` is a list in memory, or a ShardedSource read shard by shard (data/shards.py) whose global
    order extends the same rule; its state also holds the cursor of the last batch consumed, so a resumed
    stream starts reading at that shard.
    """

    def __init__(
        self,
        records: Sequence[Record] | ShardedSource,
        *,
        batch_size: int,
        seed: int,
        rank: int = 0,
        world_size: int = 1,
        resolution: int,
        center_crop: bool = True,
        random_flip: bool = False,
        num_workers: int = 0,
        name: str = "paired",
    ) -> None:
        if batch_size <= 0:
            raise ValueError(f"stream {name}: batch_size must be positive, got {batch_size}")
        if not 0 <= rank < world_size:
            raise ValueError(f"stream {name}: rank must be in [0, world_size={world_size}), got {rank}")
        if seed < 0:
            raise ValueError(f"stream {name}: seed must be non-negative, got {seed}")
        options = {"resolution": resolution, "seed": seed, "center_crop": center_crop}
        self.dataset: RecordDataset | ShardedDataset
        if isinstance(records, ShardedSource):
            self.dataset, num_records = ShardedDataset(records, **options), None
        else:
            self.dataset = RecordDataset(records, **options)
            num_records = len(self.dataset)
        # The order from position 0; each loader starts a copy of it at the stream's position.
        self._plan = _BatchPlan(num_records, seed, batch_size, rank, world_size, random_flip)
        self.num_workers = num_workers
        self.name = name
        self.position = 0
        self.cursor = Cursor()  # sharded sources: the shard boundary before the last batch consumed
        self._batches: Iterator[dict[str, Any]] | None = None

    def next(self) -> dict[str, Any]:
        """This rank's next batch; advances the global position by batch_size * world_size."""
        if self._batches is None:
            self._batches = iter(self._loader())
        batch = next(self._batches)
        if "cursor" in batch:
            self.cursor = Cursor.from_state(batch.pop("cursor"))
        self.position += self._plan.batch_size * self._plan.world_size
        return batch

    __next__ = next

    def __iter__(self) -> Stream:
        return self

    def state_dict(self) -> dict[str, Any]:
        """The global position (in samples), plus what is needed to notice a changed dataset on resume;
        for a sharded source, the shard list's digest and the cursor where reading restarts."""
        state: dict[str, Any] = {"position": self.position, "seed": self._plan.seed, "name": self.name}
        if isinstance(self.dataset, ShardedDataset):
            return {**state, "shards": self.dataset.source.digest(), "cursor": self.cursor.state_dict()}
        return {**state, "num_records": len(self.dataset)}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Continue from a saved position; the next batch equals the one an uninterrupted stream would give.

        A sharded stream needs the state of the same shards (any number of ranks and workers will do)."""
        if "position" not in state:
            raise KeyError(f"stream {self.name}: state has no 'position' (keys: {sorted(state)})")
        if isinstance(self.dataset, ShardedDataset):
            self._load_cursor(state)
        for key, current in (("seed", self._plan.seed), ("num_records", self._plan.num_records)):
            if key in state and state[key] != current:
                logger.warning(
                    "stream %s: resuming with %s=%s but the state was saved with %s; the order will differ",
                    self.name,
                    key,
                    current,
                    state[key],
                )
        self.close()
        self.position = int(state["position"])

    def _load_cursor(self, state: dict[str, Any]) -> None:
        digest = self.dataset.source.digest()
        if "cursor" not in state or state.get("shards") != digest:
            saved = state.get("shards", "an in-memory source" if "cursor" not in state else None)
            raise ValueError(
                f"stream {self.name}: the checkpoint was saved over {saved} and this run reads shards {digest} "
                "(count:checksum of their names); resume with the same shards, or start a new run"
            )
        cursor = Cursor.from_state(state["cursor"])
        if cursor.start > state["position"]:
            raise ValueError(f"stream {self.name}: cursor {cursor} lies after position {state['position']}")
        self.cursor = cursor

    def close(self) -> None:
        """Stop loader workers; the next call to next() starts them again at the current position."""
        self._batches = None

    def _loader(self) -> DataLoader:
        plan = replace(self._plan, start=self.position)
        if isinstance(self.dataset, ShardedDataset):  # workers start walking at the last batch's shard
            self.dataset.walker.move_base(self.cursor)
        # Every new iterator draws the workers' base seed from `generator`; left None, that draw would come
        # from torch's global RNG and shift everything seeded after it (LoRA dropout masks) on resume.
        generator = torch.Generator().manual_seed(
            _seed_word(self._plan.seed, _LOADER_PURPOSE, zlib.crc32(self.name.encode("utf-8")))
        )
        return DataLoader(
            self.dataset,
            batch_sampler=plan,
            num_workers=self.num_workers,
            collate_fn=collate_samples,
            generator=generator,
        )


@dataclass
class _BatchPlan:
    """Yields this rank's SampleKeys batch by batch, starting at global position `start`."""

    num_records: int | None  # None: a sharded source, which finds each position's record itself
    seed: int
    batch_size: int
    rank: int
    world_size: int
    random_flip: bool
    start: int = 0
    _orders: dict[int, list[int]] = field(default_factory=dict, init=False, repr=False)

    def __iter__(self) -> Iterator[list[SampleKey]]:
        position = self.start
        while True:
            first = position + self.rank * self.batch_size
            yield [self._key(global_position) for global_position in range(first, first + self.batch_size)]
            position += self.batch_size * self.world_size

    def _key(self, position: int) -> SampleKey:
        flip = self.random_flip and bool(_seed_word(self.seed, _FLIP_PURPOSE, position) & 1)
        if self.num_records is None:
            return SampleKey(position, flip, position)
        epoch, offset = divmod(position, self.num_records)
        return SampleKey(self._order(epoch)[offset], flip, position)

    def _order(self, epoch: int) -> list[int]:
        if epoch not in self._orders:
            self._orders = {key: value for key, value in self._orders.items() if key >= epoch - 1}
            generator = torch.Generator().manual_seed(_seed_word(self.seed, _ORDER_PURPOSE, epoch))
            self._orders[epoch] = torch.randperm(self.num_records, generator=generator).tolist()
        return self._orders[epoch]


def _seed_word(seed: int, purpose: int, counter: int) -> int:
    """A well-mixed 64-bit integer from (seed, purpose, counter)."""
    return int(np.random.SeedSequence([seed, purpose, counter]).generate_state(1, dtype=np.uint64)[0])


def _all_or_none(records: Sequence[Record], field: str) -> bool:
    """Whether every record has `field`; a mix is refused because a batch must be all of one kind."""
    present = sum(getattr(record, field) is not None for record in records)
    if 0 < present < len(records):
        raise ValueError(
            f"{present} of {len(records)} records have a {field} and the rest do not; "
            "build separate streams for paired, image-only and text-only records"
        )
    return present == len(records)
