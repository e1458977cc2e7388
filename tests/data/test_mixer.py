"""The batch mixer: the draw picks the kind, each kind comes from its own stream."""

from __future__ import annotations

import pytest
from PIL import Image

from cycletune.data.mixer import BatchMixer
from cycletune.data.sources import Record
from cycletune.data.streams import Stream


def _stream(records: list[Record], name: str) -> Stream:
    return Stream(records, batch_size=2, seed=0, resolution=8, name=name)


def _texts(prefix: str, count: int) -> list[Record]:
    return [Record(id=f"{prefix}{index}", image=None, caption=f"caption {index}") for index in range(count)]


def test_draw_below_the_ratio_picks_the_unpaired_kind() -> None:
    paired = [
        Record(id=f"p{index}", image=lambda: Image.new("RGB", (8, 8), (255, 0, 0)), caption="a")
        for index in range(4)
    ]
    mixer = BatchMixer(
        {"paired": _stream(paired, "paired"), "text_only": _stream(_texts("t", 4), "text_only")},
        image_only_ratio=0.0,
        text_only_ratio=0.25,
    )
    assert mixer.kind("generator", 0.1) == "text_only"
    assert mixer.kind("generator", 0.3) == "paired"
    assert mixer.kind("captioner", 0.0) == "paired"
    text_batch = mixer.next("generator", 0.1)
    assert text_batch["kind"] == "text_only" and all(i.startswith("t") for i in text_batch["ids"])
    assert "pixels" not in text_batch
    paired_batch = mixer.next("captioner", 0.9)
    assert paired_batch["kind"] == "paired" and paired_batch["pixels"].shape == (2, 3, 8, 8)


def test_asking_for_a_missing_stream_is_an_error() -> None:
    with pytest.raises(ValueError, match="image_only batches were asked for"):
        BatchMixer({"paired": _stream(_texts("p", 2), "paired")}, image_only_ratio=0.5, text_only_ratio=0.0)
