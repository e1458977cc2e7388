"""Streams: deterministic order, exact resume, rank sharding, bad-image replacement, batch kinds, no global RNG."""

from __future__ import annotations

import logging
from collections import Counter
from pathlib import Path

import pytest
import torch
from PIL import Image

from cycletune.data.sources import Record, shapes
from cycletune.data.streams import RecordDataset, SampleKey, Stream

NUM_RECORDS = 12


@pytest.fixture
def paired(tmp_path: Path) -> list[Record]:
    """Left-right asymmetric images (so a flip is visible), each with its own colour."""
    records = []
    for index in range(NUM_RECORDS):
        image = Image.new("RGB", (12, 8), (index * 25, 0, 0))
        image.paste((0, 0, 255), (0, 0, 4, 8))
        image.save(tmp_path / f"{index}.png")
        records.append(Record(f"img{index}", tmp_path / f"{index}.png", f"caption {index}"))
    return records


def take(stream: Stream, steps: int) -> list[dict]:
    return [stream.next() for _ in range(steps)]


def assert_same_batches(first: list[dict], second: list[dict]) -> None:
    assert [batch["ids"] for batch in first] == [batch["ids"] for batch in second]
    for one, other in zip(first, second, strict=True):
        assert one.keys() == other.keys()
        if "pixels" in one:
            assert torch.equal(one["pixels"], other["pixels"])


def test_batches_hold_ids_pixels_captions_and_cover_each_epoch(paired: list[Record]) -> None:
    stream = Stream(paired, batch_size=6, seed=3, resolution=8)
    epochs = [take(stream, 2) for _ in range(2)]
    batch = epochs[0][0]
    assert batch.keys() == {"ids", "pixels", "captions", "bad_records"}
    assert batch["pixels"].shape == (6, 3, 8, 8) and batch["bad_records"] == []
    assert [f"caption {record_id[3:]}" for record_id in batch["ids"]] == batch["captions"]
    orders = [[record_id for batch in epoch for record_id in batch["ids"]] for epoch in epochs]
    assert all(sorted(order) == sorted(record.id for record in paired) for order in orders)
    assert orders[0] != orders[1]  # every epoch is reshuffled
    assert stream.state_dict()["position"] == 24


def test_resumed_stream_continues_exactly(paired: list[Record]) -> None:
    options = {"batch_size": 5, "seed": 11, "resolution": 8, "random_flip": True}
    uninterrupted = take(Stream(paired, **options), 7)  # 35 samples: crosses two epoch boundaries
    interrupted = Stream(paired, **options)
    take(interrupted, 3)
    resumed = Stream(paired, **options)
    resumed.load_state_dict(interrupted.state_dict())
    assert_same_batches(take(resumed, 4), uninterrupted[3:])


def test_loading_state_restarts_a_running_stream_with_workers(paired: list[Record]) -> None:
    options = {"batch_size": 4, "seed": 5, "resolution": 8, "random_flip": True}
    reference = take(Stream(paired, **options), 6)
    stream = Stream(paired, **options, num_workers=2)
    try:
        assert_same_batches(take(stream, 4), reference[:4])  # workers prefetch ahead; that must not matter
        saved = Stream(paired, **options)
        take(saved, 1)
        stream.load_state_dict(saved.state_dict())  # rewind a running stream: the iterator is recreated
        assert_same_batches(take(stream, 5), reference[1:6])
    finally:
        stream.close()


def test_ranks_split_the_global_batch(paired: list[Record]) -> None:
    options = {"seed": 2, "resolution": 8, "random_flip": True}
    single = take(Stream(paired, batch_size=4, **options), 6)  # two epochs of three global batches
    ranks = [take(Stream(paired, batch_size=2, rank=rank, world_size=2, **options), 6) for rank in (0, 1)]
    for step, whole in enumerate(single):
        assert ranks[0][step]["ids"] + ranks[1][step]["ids"] == whole["ids"]
        assert torch.equal(torch.cat([ranks[0][step]["pixels"], ranks[1][step]["pixels"]]), whole["pixels"])
    for epoch in (slice(0, 3), slice(3, 6)):
        seen = [[record_id for batch in batches[epoch] for record_id in batch["ids"]] for batches in ranks]
        assert not set(seen[0]) & set(seen[1])
        assert sorted(seen[0] + seen[1]) == sorted(record.id for record in paired)


def test_flips_follow_the_position_not_a_global_rng(paired: list[Record]) -> None:
    plain = take(Stream(paired, batch_size=10, seed=4, resolution=8), 4)
    torch.manual_seed(123)  # global RNG state must not matter
    flipped = take(Stream(paired, batch_size=10, seed=4, resolution=8, random_flip=True), 4)
    torch.manual_seed(999)
    again = take(Stream(paired, batch_size=10, seed=4, resolution=8, random_flip=True), 4)
    assert_same_batches(flipped, again)
    outcomes = []
    for plain_batch, flipped_batch in zip(plain, flipped, strict=True):
        for original, augmented in zip(plain_batch["pixels"], flipped_batch["pixels"], strict=True):
            assert torch.equal(augmented, original) or torch.equal(augmented, original.flip(-1))
            outcomes.append(torch.equal(augmented, original))
    assert 5 < sum(outcomes) < 35  # about half of 40 samples flipped


def test_undecodable_records_are_reported_and_replaced_by_a_drawn_record(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    good = []
    for index in range(3):
        Image.new("RGB", (8, 8), (index * 100, 0, 0)).save(tmp_path / f"good{index}.png")
        good.append(Record(f"good{index}", tmp_path / f"good{index}.png", f"good {index}"))
    Image.new("RGB", (64, 64)).save(tmp_path / "whole.jpg")
    (tmp_path / "truncated.jpg").write_bytes((tmp_path / "whole.jpg").read_bytes()[:300])
    (tmp_path / "garbage.png").write_bytes(b"garbage" * 20)
    records = [
        good[0],
        Record("truncated", tmp_path / "truncated.jpg", "bad"),
        Record("garbage", tmp_path / "garbage.png", "bad"),
        good[1],
        good[2],
    ]
    expected = {
        "truncated": ["truncated", "truncated_image", str(tmp_path / "truncated.jpg")],
        "garbage": ["garbage", "not_an_image", str(tmp_path / "garbage.png")],
    }
    dataset = RecordDataset(records, resolution=8, seed=0)
    with caplog.at_level(logging.WARNING, logger="cycletune.data.streams"):
        samples = [dataset[SampleKey(1, False, position)] for position in range(40)]
    for sample in samples:
        assert sample["id"] in {"good0", "good1", "good2"} and sample["caption"] == f"good {sample['id'][4:]}"
        assert sample["bad_records"][0] == expected["truncated"]
        assert all(entry == expected[entry[0]] for entry in sample["bad_records"])
    # The replacement is drawn per position, not the record after the bad one: every good record serves.
    assert {sample["id"] for sample in samples} == {"good0", "good1", "good2"}
    messages = [record.getMessage() for record in caplog.records]
    assert len(messages) == 2  # once per bad record: known-bad records are not decoded again
    assert "truncated.jpg" in " ".join(messages) and "garbage.png" in " ".join(messages)

    batch = Stream(records, batch_size=5, seed=0, resolution=8).next()
    assert set(batch["ids"]) <= {"good0", "good1", "good2"} and len(batch["ids"]) == 5
    assert {entry[0]: entry for entry in batch["bad_records"]} == expected  # each epoch meets both


def test_a_source_of_only_bad_images_fails_clearly(tmp_path: Path) -> None:
    (tmp_path / "bad.png").write_bytes(b"not a png")
    dataset = RecordDataset([Record("bad", tmp_path / "bad.png", "x")], resolution=8, seed=0)
    with pytest.raises(RuntimeError, match=r"position 3: .* could not be decoded \(1 distinct, e.g. bad"):
        dataset[SampleKey(0, False, 3)]


def test_image_only_and_text_only_batches(paired: list[Record]) -> None:
    images = [Record(record.id, record.image, None) for record in paired]
    texts = [Record(record.id, None, record.caption) for record in paired]
    image_batch = Stream(images, batch_size=4, seed=0, resolution=8, name="images").next()
    text_batch = Stream(texts, batch_size=4, seed=0, resolution=8, name="texts").next()
    assert image_batch.keys() == {"ids", "pixels", "bad_records"}
    assert text_batch.keys() == {"ids", "captions", "bad_records"}
    assert image_batch["ids"] == text_batch["ids"]
    with pytest.raises(ValueError, match="separate streams"):
        Stream([*paired[:2], texts[2]], batch_size=1, seed=0, resolution=8)


def test_shapes_records_render_on_the_fly_with_workers() -> None:
    records, _ = shapes(16, seed=1, resolution=32)
    stream = Stream(records, batch_size=8, seed=0, resolution=32, num_workers=2)
    try:
        batch = stream.next()
    finally:
        stream.close()
    assert batch["pixels"].shape == (8, 3, 32, 32)
    assert batch["ids"] == Stream(records, batch_size=8, seed=0, resolution=32).next()["ids"]
    by_id = {record.id: record for record in records}
    assert batch["captions"] == [by_id[record_id].caption for record_id in batch["ids"]]


def test_resuming_on_changed_data_warns(paired: list[Record], caplog: pytest.LogCaptureFixture) -> None:
    state = Stream(paired, batch_size=2, seed=0, resolution=8).state_dict()
    stream = Stream(paired[:-1], batch_size=2, seed=0, resolution=8)
    with caplog.at_level(logging.WARNING, logger="cycletune.data.streams"):
        stream.load_state_dict(state)
    assert "num_records" in caplog.text
    with pytest.raises(KeyError, match="position"):
        stream.load_state_dict({})


def test_bad_arguments_are_refused(paired: list[Record]) -> None:
    with pytest.raises(ValueError, match="rank"):
        Stream(paired, batch_size=2, seed=0, rank=2, world_size=2, resolution=8)
    with pytest.raises(ValueError, match="batch_size"):
        Stream(paired, batch_size=0, seed=0, resolution=8)
    with pytest.raises(ValueError, match="at least one record"):
        Stream([], batch_size=1, seed=0, resolution=8)


@pytest.mark.parametrize("num_workers", [0, 2])
def test_streams_never_draw_from_the_global_torch_rng(paired: list[Record], num_workers: int) -> None:
    torch.manual_seed(7)
    before = torch.get_rng_state()
    stream = Stream(paired, batch_size=4, seed=1, resolution=8, num_workers=num_workers)
    try:
        first = stream.next()
        stream.close()  # a fresh loader iterator (as after a resume) must not draw either
        second = stream.next()
    finally:
        stream.close()
    assert torch.equal(torch.get_rng_state(), before)
    assert first["ids"] != second["ids"]  # both batches were really read


@pytest.fixture
def one_bad(paired: list[Record], tmp_path: Path) -> list[Record]:
    """The paired records with record 4 replaced by a text file saved as .png."""
    (tmp_path / "text.png").write_text("not an image\n")
    return [*paired[:4], Record("bad", tmp_path / "text.png", "caption bad"), *paired[5:]]


def test_replacements_do_not_oversample_the_neighbour(one_bad: list[Record]) -> None:
    epochs = 60
    seen = Counter(
        record_id
        for batch in take(Stream(one_bad, batch_size=NUM_RECORDS, seed=0, resolution=8), epochs)
        for record_id in batch["ids"]
    )
    assert "bad" not in seen and sum(seen.values()) == epochs * NUM_RECORDS
    # Each good record appears once per epoch, plus the replacements of the bad one (60 draws over 11
    # records: about 5.5 each). Taking the next record instead would give img5 all 60 of them.
    extra = {record_id: count - epochs for record_id, count in seen.items()}
    assert max(extra.values()) < 20 and sum(count > 0 for count in extra.values()) >= 8


def test_replacements_are_the_same_on_resume_and_for_any_rank_split(one_bad: list[Record]) -> None:
    options = {"seed": 5, "resolution": 8}
    single = take(Stream(one_bad, batch_size=4, **options), 9)  # three epochs
    ranks = [take(Stream(one_bad, batch_size=2, rank=rank, world_size=2, **options), 9) for rank in (0, 1)]
    for step, whole in enumerate(single):
        assert ranks[0][step]["ids"] + ranks[1][step]["ids"] == whole["ids"]
        assert ranks[0][step]["bad_records"] + ranks[1][step]["bad_records"] == whole["bad_records"]
    assert sum(len(batch["bad_records"]) for batch in single) >= 3  # met at least once per epoch
    interrupted = Stream(one_bad, batch_size=4, **options)
    take(interrupted, 4)
    resumed = Stream(one_bad, batch_size=4, **options)
    resumed.load_state_dict(interrupted.state_dict())
    resumed_batches = take(resumed, 5)
    assert_same_batches(resumed_batches, single[4:])
    assert [batch["bad_records"] for batch in resumed_batches] == [
        batch["bad_records"] for batch in single[4:]
    ]
