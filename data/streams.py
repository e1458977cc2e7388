"""Batches for training: an infinite, resumable, rank-sharded stream over a list of Records.

The order is a pure function of (seed, global position): epoch e is torch.randperm(n) seeded from
(seed, e), the epochs are concatenated into one global stream, and every next() consumes
batch_size * world_size consecutive positions, rank r taking slice [r * batch_size, (r + 1) * batch_size).
Flip augmentation, and the replacement of an undecodable record, are also derived from (seed, global
position). So a stream resumed from state_dict(), or one split over a different number of ranks, sees
exactly the same samples with the same pixels. Nothing here draws from torch's global RNG (the loader has
its own generator), so creating or restarting a stream never shifts the model's random numbers.
"""

from __future__ import annotations

import logging
import os
import zlib
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field, replace
from typing import Any, NamedTuple

import numpy as np
import torch
from PIL import UnidentifiedImageError
from torch.utils.data import DataLoader, Dataset

from cycletune.data.images import BadImage, ImageInput, load_rgb, to_tensor
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


class RecordDataset(Dataset):
    """Decodes, converts and resizes Records; replaces an undecodable record by a randomly drawn one.

    Replacement attempt a for global position p takes a record drawn uniformly from a generator seeded
    from (seed, p, a): deterministic, the same on resume and for any rank split, and spread over the whole
    dataset rather than oversampling a neighbour. Each sample lists the failures met while building it
    ("bad_records": [record id, reason, where] each) so the trainer can count distinct bad records. A record
    found bad is not decoded again by this process, and its warning is logged once per process.
    """

    def __init__(
        self, records: Sequence[Record], *, resolution: int, seed: int, center_crop: bool = True
    ) -> None:
        if not records:
            raise ValueError("RecordDataset needs at least one record")
        self.records = records
        self.resolution = resolution
        self.seed = seed
        self.center_crop = center_crop
        self.has_images = _all_or_none(records, "image")
        self.has_captions = _all_or_none(records, "caption")
        if not self.has_images and not self.has_captions:
            raise ValueError("records hold neither images nor captions")
        self._bad: dict[int, tuple[str, str, str]] = {}  # record index -> (id, reason, where)

    def __len__(self) -> int:
        return len(self.records)

    def __getitem__(self, key: SampleKey) -> dict[str, Any]:
        bad_records: list[list[str]] = []
        for attempt in range(_MAX_ATTEMPTS):
            index = key.index if attempt == 0 else self._replacement(key.position, attempt)
            record = self.records[index]
            sample: dict[str, Any] = {"id": record.id, "bad_records": bad_records}
            if self.has_captions:
                sample["caption"] = record.caption
            if not self.has_images:
                return sample
            if index not in self._bad:
                source = record.image() if callable(record.image) else record.image
                try:
                    sample["pixels"] = self._pixels(source, key.flip)
                    return sample
                except BadImage as error:
                    self._bad[index] = self._failure(record, source, error)
            bad_records.append(list(self._bad[index]))
        named = ", ".join(f"{record_id} ({reason})" for record_id, reason, _ in bad_records[:5])
        raise RuntimeError(
            f"stream position {key.position}: {_MAX_ATTEMPTS} records drawn in a row could not be decoded "
            f"({len({entry[0] for entry in bad_records})} distinct, e.g. {named}); "
            "check that the image storage is readable"
        )

    def _replacement(self, position: int, attempt: int) -> int:
        """The record tried at `attempt` (>= 1) for `position`: uniform, keyed only by (seed, position, attempt)."""
        rng = np.random.default_rng([self.seed, _REPLACEMENT_PURPOSE, position, attempt])
        return int(rng.integers(len(self.records)))

    def _pixels(self, source: ImageInput, flip: bool) -> torch.Tensor:
        image = load_rgb(source, min_side=self.resolution)
        return to_tensor(image, self.resolution, center_crop=self.center_crop, flip=flip)

    @staticmethod
    def _failure(record: Record, source: ImageInput, error: BadImage) -> tuple[str, str, str]:
        """(id, reason, where) of a record that failed to decode; logs the decoder's message."""
        where = os.fspath(source) if isinstance(source, str | os.PathLike) else record.id
        reason = _decode_reason(error, source)
        logger.warning(
            "skipping record %s (%s), replaced by a randomly drawn record: %s", record.id, reason, error
        )
        return record.id, reason, where


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
    return batch


class Stream:
    """An infinite, resumable, rank-sharded iterator of batches (see the module docstring for the order).

    Batches: {"ids": list[str], "pixels": Tensor[B, 3, R, R] in [0, 1] (absent for text-only records),
    "captions": list[str] (absent for image-only records), "bad_records": list[[record_id, reason, where]]
    (the undecodable records met while building this batch, repeats included; SkipLedger.add dedups)}.
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
        self.dataset = RecordDataset(records, resolution=resolution, seed=seed, center_crop=center_crop)
        # The order from position 0; each loader starts a copy of it at the stream's position.
        self._plan = _BatchPlan(len(self.dataset), seed, batch_size, rank, world_size, random_flip)
        self.num_workers = num_workers
        self.name = name
        self.position = 0
        self._batches: Iterator[dict[str, Any]] | None = None

    def next(self) -> dict[str, Any]:
        """This rank's next batch; advances the global position by batch_size * world_size."""
        if self._batches is None:
            self._batches = iter(self._loader())
        batch = next(self._batches)
        self.position += self._plan.batch_size * self._plan.world_size
        return batch

    __next__ = next

    def __iter__(self) -> Stream:
        return self

    def state_dict(self) -> dict[str, Any]:
        """The global position (in samples), plus what is needed to notice a changed dataset on resume."""
        return {
            "position": self.position,
            "seed": self._plan.seed,
            "num_records": len(self.dataset),
            "name": self.name,
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Continue from a saved position; the next batch equals the one an uninterrupted stream would give."""
        if "position" not in state:
            raise KeyError(f"stream {self.name}: state has no 'position' (keys: {sorted(state)})")
        for key, current in (("seed", self._plan.seed), ("num_records", len(self.dataset))):
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
        plan = replace(self._plan, start=self.position)
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

    num_records: int
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
        epoch, offset = divmod(position, self.num_records)
        flip = self.random_flip and bool(_seed_word(self.seed, _FLIP_PURPOSE, position) & 1)
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
