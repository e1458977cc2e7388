"""Inference batches: every item once, in order, in batches of the asked size."""

from __future__ import annotations

import pytest

from cycletune.data.batching import batched


def test_batches_keep_order_and_only_the_last_is_short() -> None:
    assert list(batched("abcde", 2)) == [["a", "b"], ["c", "d"], ["e"]]
    assert list(batched(range(4), 4)) == [[0, 1, 2, 3]]
    assert list(batched([], 3)) == []


def test_a_batch_size_below_one_is_refused() -> None:
    with pytest.raises(ValueError, match="at least 1"):
        list(batched([1], 0))
