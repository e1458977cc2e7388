"""Fixed-size batches of a sequence, for inference loops that feed models a few inputs at a time."""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from typing import TypeVar

Item = TypeVar("Item")


def batched(items: Sequence[Item], size: int) -> Iterator[list[Item]]:
    """Consecutive lists of `size` items, the last one shorter (itertools.batched needs Python 3.12)."""
    if size < 1:
        raise ValueError(f"batch size must be at least 1, got {size}")
    for start in range(0, len(items), size):
        yield list(items[start : start + size])
