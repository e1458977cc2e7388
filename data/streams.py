"""Batches for training: an infinite, resumable, rank-sharded stream over a list of Records.

The order is a pure function of (seed, global position): epoch e is torch.randperm(n) seeded from
(seed, e), the epochs are concatenated into one global stream, and every next() consumes
batch_size * world_size consecutive positions, rank r taking slice [r * batch_size, (r + 1) * batch_size).
Flip augmentation is also derived from (seed, global position). So a stream resumed from state_dict(),
or one split over a different number of ranks, sees exactly the same samples with the same pixels.
"""

from __future__ import annotations

import logging
from collections.abc import Iterator, Sequence
from typing import Any

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset

from data.images import BadImage, load_rgb, to_tensor
from data.sources import Record

logger = logging.getLogger(__name__)

# Distinct words in the seed sequences, so epoch orders and flips never share random streams.
_ORDER_PURPOSE = 0
_FLIP_PURPOSE = 1
# A run of this many undecodable records in a row means the storage is broken, not a few bad files.
_MAX_CONSECUTIVE_FAILURES = 1000


class RecordDataset(Dataset):
    """Decodes, converts and resizes Records; replaces an undecodable record by the next decodable one.

    Items are keyed by a record index or (record index, flip). Replacement is deterministic (the next
    index, wrapping around), and each sample says how many records it replaced ("skipped"), so a batch
    can report them; a warning naming the file is logged once per bad record and process.
    """

    def __init__(self, records: Sequence[Record], *, resolution: int, center_crop: bool = True) -> None:
        if not records:
            raise ValueError("RecordDataset needs at least one record")
        self.records = records
        self.resolution = resolution
        self.center_crop = center_crop
        self.has_images = _all_or_none(records, "image")
        self.has_captions = _all_or_none(records, "caption")
        if not self.has_images and not self.has_captions:
            raise ValueError("records hold neither images nor captions")
        self._warned: set[str] = set()

    def __len__(self) -> int:
        return len(self.records)

    def __getitem__(self, key: int | tuple[int, bool]) -> dict[str, Any]:
        index, flip = key if isinstance(key, tuple) else (key, False)
        attempts = min(len(self.records), _MAX_CONSECUTIVE_FAILURES)
        for skipped in range(attempts):
            record = self.records[(index + skipped) % len(self.records)]
            sample: dict[str, Any] = {"id": record.id, "skipped": skipped}
            if self.has_captions:
                sample["caption"] = record.caption
            if not self.has_images:
                return sample
            try:
                sample["pixels"] = self._pixels(record, flip)
            except BadImage as error:
                self._warn_once(record, error)
                continue
            return sample
        raise RuntimeError(
            f"{attempts} records in a row from index {index} (first id {self.records[index].id}) could not be "
            "decoded; check that the image storage is readable"
        )

    def _pixels(self, record: Record, flip: bool) -> torch.Tensor:
        source = record.image() if callable(record.image) else record.image
        image = load_rgb(source, min_side=self.resolution)
        return to_tensor(image, self.resolution, center_crop=self.center_crop, flip=flip)

    def _warn_once(self, record: Record, error: BadImage) -> None:
        if record.id not in self._warned:
            self._warned.add(record.id)
            logger.warning("skipping record %s, replaced by the next record: %s", record.id, error)


def collate_samples(samples: list[dict[str, Any]]) -> dict[str, Any]:
    """Stack pixels; keep ids and captions as lists; sum the replaced-record counts."""
    batch: dict[str, Any] = {
        "ids": [sample["id"] for sample in samples],
        "skipped": sum(sample["skipped"] for sample in samples),
    }
    if "pixels" in samples[0]:
        batch["pixels"] = torch.stack([sample["pixels"] for sample in samples])
    if "caption" in samples[0]:
        batch["captions"] = [sample["caption"] for sample in samples]
    return batch


class Stream:
    """An infinite, resumable, rank-sharded iterator of batches (see the module docstring for the order).

    Batches: {"ids": list[str], "pixels": Tensor[B, 3, R, R] in [0, 1] (absent for text-only records),
    "captions": list[str] (absent for image-only records), "skipped": int}.
    random_flip mirrors images left-right: leave it off when captions mention left and right (shapes world).
    """

    def __init__(
        self,
        records: Sequence[Record],
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
        self.dataset = RecordDataset(records, resolution=resolution, center_crop=center_crop)
        self.batch_size = batch_size
        self.seed = seed
        self.rank = rank
        self.world_size = world_size
        self.random_flip = random_flip
        self.num_workers = num_workers
        self.name = name
        self.position = 0
        self._batches: Iterator[dict[str, Any]] | None = None

    def next(self) -> dict[str, Any]:
        """This rank's next batch; advances the global position by batch_size * world_size."""
        if self._batches is None:
            self._batches = iter(self._loader())
        batch = next(self._batches)
        self.position += self.batch_size * self.world_size
        return batch

    __next__ = next

    def __iter__(self) -> Stream:
        return self

    def state_dict(self) -> dict[str, Any]:
        """The global position (in samples), plus what is needed to notice a changed dataset on resume."""
        return {
            "position": self.position,
            "seed": self.seed,
            "num_records": len(self.dataset),
            "name": self.name,
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Continue from a saved position; the next batch equals the one an uninterrupted stream would give."""
        if "position" not in state:
            raise KeyError(f"stream {self.name}: state has no 'position' (keys: {sorted(state)})")
        for key, current in (("seed", self.seed), ("num_records", len(self.dataset))):
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

    def close(self) -> None:
        """Stop loader workers; the next call to next() starts them again at the current position."""
        self._batches = None

    def _loader(self) -> DataLoader:
        plan = _BatchPlan(
            num_records=len(self.dataset),
            seed=self.seed,
            start=self.position,
            batch_size=self.batch_size,
            rank=self.rank,
            world_size=self.world_size,
            random_flip=self.random_flip,
        )
        return DataLoader(
            self.dataset, batch_sampler=plan, num_workers=self.num_workers, collate_fn=collate_samples
        )


class _BatchPlan:
    """Yields this rank's (record index, flip) keys batch by batch, starting at a global position."""

    def __init__(
        self,
        *,
        num_records: int,
        seed: int,
        start: int,
        batch_size: int,
        rank: int,
        world_size: int,
        random_flip: bool,
    ) -> None:
        self.num_records = num_records
        self.seed = seed
        self.start = start
        self.batch_size = batch_size
        self.rank = rank
        self.world_size = world_size
        self.random_flip = random_flip
        self._orders: dict[int, list[int]] = {}

    def __iter__(self) -> Iterator[list[tuple[int, bool]]]:
        position = self.start
        while True:
            first = position + self.rank * self.batch_size
            yield [self._key(global_position) for global_position in range(first, first + self.batch_size)]
            position += self.batch_size * self.world_size

    def _key(self, position: int) -> tuple[int, bool]:
        epoch, offset = divmod(position, self.num_records)
        flip = self.random_flip and bool(_seed_word(self.seed, _FLIP_PURPOSE, position) & 1)
        return self._order(epoch)[offset], flip

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
