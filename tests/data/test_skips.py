"""The skip ledger: distinct bad records counted once, from manifests and decoding alike, across epochs."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from PIL import Image

from cycletune.data.skips import SkipLedger
from cycletune.train.builders import build_streams, build_validation_batch
from cycletune.train.config import Config

NUM_GOOD = 9
BAD_FILES = {"truncated.jpg": "truncated_image", "empty.jpg": "empty_file", "text.jpg": "not_an_image"}
EXPECTED_COUNTS = {
    "bad_json": 1,
    "empty_caption": 2,
    "empty_file": 1,
    "missing_file": 1,
    "missing_key": 1,
    "not_an_image": 1,
    "truncated_image": 1,
}


def test_ledger_counts_distinct_ids_and_round_trips_through_json() -> None:
    ledger = SkipLedger()
    assert ledger.summary() == "skipped 0" and ledger.total == 0
    assert ledger.add("a.jpg", "truncated_image", "/data/a.jpg")
    assert not ledger.add("a.jpg", "not_an_image", "/data/a.jpg")  # met again: neither counted nor changed
    assert ledger.add("meta.jsonl:3", "bad_json", "meta.jsonl:3", "Expecting value")
    other = SkipLedger()
    other.add("a.jpg", "truncated_image", "/data/a.jpg")
    other.add("b.jpg", "empty_file", "/data/b.jpg")
    ledger.merge(other)
    assert ledger.total == 3
    assert ledger.counts() == {"bad_json": 1, "empty_file": 1, "truncated_image": 1}
    assert ledger.examples(limit=2) == [
        "/data/a.jpg: truncated_image",
        "meta.jsonl:3: bad_json (Expecting value)",
    ]
    assert ledger.entries()[2] == ["b.jpg", "empty_file", "/data/b.jpg"]
    summary = ledger.summary()
    assert summary.startswith("skipped 3 (bad_json=1, empty_file=1, truncated_image=1); e.g. /data/a.jpg")
    assert "\n" not in summary

    restored = SkipLedger()
    restored.load_state_dict(json.loads(json.dumps(ledger.state_dict())))
    assert restored.state_dict() == ledger.state_dict() and restored.summary() == summary
    assert not restored.add("b.jpg", "empty_file", "/data/b.jpg")

    with pytest.raises(ValueError, match="'entries' list"):
        restored.load_state_dict({"total": 3})
    with pytest.raises(ValueError, match=r"entries\[1\] must be \[record_id, reason, where, detail\]"):
        restored.load_state_dict({"entries": [["x", "bad_json", "m:1", ""], ["y", "bad_json"]]})


@pytest.fixture
def bad_folder(tmp_path: Path) -> Path:
    """An imagefolder with NUM_GOOD good rows and 8 distinct bad records of 7 kinds."""
    root = tmp_path / "folder"
    root.mkdir()
    rows = []
    for index in range(NUM_GOOD):
        Image.new("RGB", (8, 8), (index * 25, 100, 0)).save(root / f"g{index}.png")
        rows.append(json.dumps({"file_name": f"g{index}.png", "text": f"good {index}"}))
    Image.effect_noise((64, 64), 50).convert("RGB").save(root / "whole.jpg", quality=90)
    (root / "truncated.jpg").write_bytes((root / "whole.jpg").read_bytes()[:-200])
    (root / "empty.jpg").write_bytes(b"")
    (root / "text.jpg").write_text("a caption saved with the wrong extension\n")
    bad_rows = [
        *(json.dumps({"file_name": name, "text": f"bad {name}"}) for name in BAD_FILES),  # decode failures
        '{"file_name": "g0.png", "text": ',  # bad_json
        json.dumps({"file_name": "g0.png"}),  # missing_key
        json.dumps({"file_name": "gone.png", "text": "no such file"}),  # missing_file
        json.dumps({"file_name": "g1.png", "text": "   "}),  # empty_caption
        json.dumps({"file_name": "g2.png", "text": ""}),  # empty_caption
    ]
    (root / "metadata.jsonl").write_text("\n".join(bad_rows + rows) + "\n", encoding="utf-8")
    return root


def config_for(folder: Path, num_workers: int = 0) -> Config:
    return Config.model_validate(
        {
            "output_dir": str(folder.parent / "out"),
            "seed": 3,
            "captioner": {"pretrained_model_name_or_path": "unused"},
            "generator": {"pretrained_model_name_or_path": "unused"},
            "data": {
                "resolution": 8,
                "train_batch_size": 4,
                "dataloader_num_workers": num_workers,
                "paired": [{"type": "imagefolder", "path": str(folder)}],
            },
            "train": {"max_train_steps": 1, "num_validation_samples": 4},
        }
    )


@pytest.mark.parametrize("num_workers", [0, 2])
def test_every_distinct_bad_record_is_counted_once_however_many_epochs(
    bad_folder: Path, num_workers: int
) -> None:
    streams, build_skips = build_streams(config_for(bad_folder, num_workers), rank=0, world_size=1)
    stream = streams["paired"]
    assert len(stream.dataset) == NUM_GOOD + len(BAD_FILES)  # 12 records: 3 batches of 4 per epoch
    assert build_skips.total == 5
    ledger = SkipLedger()
    ledger.merge(build_skips)
    met = 0
    try:
        for epoch in range(3):
            if epoch == 1:  # a resume in between: the ledger travels as JSON
                restored = SkipLedger()
                restored.load_state_dict(json.loads(json.dumps(ledger.state_dict())))
                ledger = restored
            for _ in range(3):
                batch = stream.next()
                assert len(batch["ids"]) == 4 and all(record_id.startswith("g") for record_id in batch["ids"])
                for entry in batch["bad_records"]:
                    ledger.add(*entry)
                met += len(batch["bad_records"])
            assert ledger.counts() == EXPECTED_COUNTS, f"after epoch {epoch + 1}"
            assert ledger.total == 8
    finally:
        stream.close()
    assert met >= 3 * len(BAD_FILES)  # every epoch meets every undecodable record at least once
    examples = " ".join(ledger.examples(limit=8))
    assert f"{bad_folder / 'metadata.jsonl'}:4: bad_json" in examples
    for name, reason in BAD_FILES.items():
        assert f"{bad_folder / name}: {reason}" in examples


def test_validation_batch_reports_the_rows_its_sources_dropped(bad_folder: Path) -> None:
    batch = build_validation_batch(config_for(bad_folder))
    assert len(batch["ids"]) == 4  # the first four records: the three undecodable ones and g0.png
    assert all(record_id.startswith("g") for record_id in batch["ids"])
    ledger = SkipLedger()
    for entry in batch["bad_records"]:
        ledger.add(*entry)
    assert ledger.counts() == EXPECTED_COUNTS
