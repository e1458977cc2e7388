"""Sources: real files in tmp_path, structural problems skipped and counted, stable ids."""

from __future__ import annotations

import json
import logging
import pickle
from pathlib import Path

import pytest
from datasets import Dataset, DatasetDict
from datasets import Image as ImageFeature
from PIL import Image

from cycletune.data import shapes as shapes_world
from cycletune.data.caption_datasets import coco_captions, hf_dataset
from cycletune.data.images import load_rgb
from cycletune.data.sources import EmptySourceError, image_folder, image_only_folder, shapes, text_only_file


def write_image(path: Path, colour: tuple[int, int, int] = (200, 10, 10)) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", (8, 8), colour).save(path)
    return path


def write_lines(path: Path, lines: list[str]) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return path


@pytest.fixture
def captioned_folder(tmp_path: Path) -> Path:
    root = tmp_path / "folder"
    for name in ("a.png", "b.jpg", "c.png"):
        write_image(root / name)
    write_lines(
        root / "metadata.jsonl",
        [
            json.dumps({"file_name": "a.png", "text": "a red square"}),  # 1
            '{"file_name": "b.jpg", "text": ',  # 2 bad JSON
            json.dumps({"file_name": "b.jpg", "text": ["first of b", "  ", "second of b"]}),  # 3: one blank
            json.dumps({"file_name": "c.png", "text": "   "}),  # 4 blank caption
            json.dumps({"file_name": "gone.png", "text": "missing file"}),  # 5
            json.dumps({"file_name": "a.png"}),  # 6 missing key
            json.dumps({"file_name": 7, "text": "wrong type"}),  # 7
            "[1, 2]",  # 8 not an object
            "",  # 9 blank line: ignored, not counted
            json.dumps({"file_name": "a.png", "text": "a second caption of a"}),  # 10
        ],
    )
    write_image(root / "nested" / "d.png")
    write_lines(
        root / "nested" / "metadata.jsonl", [json.dumps({"file_name": "d.png", "text": "nested one"})]
    )
    return root


def test_image_folder_keeps_good_rows_and_counts_bad_ones(
    captioned_folder: Path, caplog: pytest.LogCaptureFixture
) -> None:
    with caplog.at_level(logging.WARNING, logger="cycletune.data.sources"):
        records, skips = image_folder(captioned_folder)
    assert [(record.id, record.caption) for record in records] == [
        ("a.png:0", "a red square"),
        ("b.jpg:0", "first of b"),
        ("b.jpg:1", "second of b"),
        ("a.png:1", "a second caption of a"),
        ("nested/d.png", "nested one"),
    ]
    assert records[0].image == captioned_folder / "a.png"
    assert records[-1].image == captioned_folder / "nested" / "d.png"
    assert skips.counts() == {
        "bad_json": 1,
        "empty_caption": 2,
        "missing_file": 1,
        "missing_key": 1,
        "wrong_type": 1,
        "not_an_object": 1,
    }
    manifest = captioned_folder / "metadata.jsonl"
    assert skips.examples()[0].startswith(f"{manifest}:2: bad_json")
    assert skips.examples()[1:3] == [  # a blank caption in a list is named by its place in the list
        f"{manifest}:3.text[1]: empty_caption ('text' is blank)",
        f"{manifest}:4: empty_caption ('text' is blank)",
    ]
    assert len(skips.examples()) == 5
    [warning] = [record.getMessage() for record in caplog.records]
    assert "kept 5 records" in warning and "missing_file=1" in warning and "\n" not in warning


def test_image_folder_without_valid_rows_or_manifest_raises_naming_the_path(tmp_path: Path) -> None:
    write_lines(
        tmp_path / "bad" / "metadata.jsonl", ["{oops", json.dumps({"file_name": "x.png", "text": "x"})]
    )
    with pytest.raises(EmptySourceError, match=r"bad.*no valid records.*bad_json=1.*missing_file=1"):
        image_folder(tmp_path / "bad")
    (tmp_path / "plain").mkdir()
    with pytest.raises(FileNotFoundError, match=r"no metadata\.jsonl"):
        image_folder(tmp_path / "plain")
    with pytest.raises(FileNotFoundError, match="nowhere"):
        image_folder(tmp_path / "nowhere")


def test_hf_saved_dataset_with_path_column(tmp_path: Path) -> None:
    write_image(tmp_path / "images" / "0.png")
    write_image(tmp_path / "images" / "1.png")
    saved = tmp_path / "saved"
    Dataset.from_dict(
        {
            "picture": [
                "images/0.png",
                str(tmp_path / "images" / "1.png"),
                "images/none.png",
                "images/0.png",
            ],
            "caption": [["zero"], ["one", "uno"], ["lost"], ["  "]],  # a list of captions per row
        }
    ).save_to_disk(saved)
    (saved / "images").symlink_to(tmp_path / "images")  # relative paths resolve inside the dataset folder
    records, skips = hf_dataset(str(saved), image_column="picture", caption_column="caption")
    assert [(record.id, record.caption) for record in records] == [
        (f"{saved}:train:0", "zero"),
        (f"{saved}:train:1:0", "one"),
        (f"{saved}:train:1:1", "uno"),
    ]
    assert records[0].image == saved / "images" / "0.png"
    assert skips.counts() == {"missing_file": 1, "empty_caption": 1}


def test_hf_saved_dataset_with_embedded_image_bytes(tmp_path: Path) -> None:
    files = [str(write_image(tmp_path / f"{i}.png", (i * 100, 0, 0))) for i in range(3)]
    dataset = Dataset.from_dict({"image": [*files, None], "text": ["zero", "one", "two", "no image"]})
    dataset = dataset.cast_column("image", ImageFeature())
    DatasetDict({"train": dataset, "validation": dataset.select([2])}).save_to_disk(tmp_path / "saved")
    for file in files:
        Path(file).unlink()  # save_to_disk embedded the bytes: the records must not need the files
    records, skips = hf_dataset(str(tmp_path / "saved"), split="validation")
    assert [(record.id, record.caption) for record in records] == [
        (f"{tmp_path / 'saved'}:validation:0", "two")
    ]
    assert load_rgb(records[0].image()).getpixel((0, 0)) == (200, 0, 0)
    restored = pickle.loads(pickle.dumps(records))  # DataLoader workers receive pickled records
    assert restored[0].image() == records[0].image()
    assert skips.total == 0
    train, train_skips = hf_dataset(str(tmp_path / "saved"))
    assert len(train) == 3 and train_skips.counts() == {"missing_image": 1}
    with pytest.raises(ValueError, match=r"unknown split 'test'.*\['train', 'validation'\]"):
        hf_dataset(str(tmp_path / "saved"), split="test")
    with pytest.raises(ValueError, match="no column 'caption'"):
        hf_dataset(str(tmp_path / "saved"), caption_column="caption")


def test_hf_dataset_loads_a_local_imagefolder(tmp_path: Path) -> None:
    root = tmp_path / "imagefolder"
    write_image(root / "x.png", (0, 0, 250))
    write_image(root / "y.png", (0, 250, 0))
    write_lines(
        root / "metadata.jsonl",
        [
            json.dumps({"file_name": "x.png", "text": "blue"}),
            json.dumps({"file_name": "y.png", "text": "green"}),
        ],
    )
    records, _ = hf_dataset(str(root))
    assert [(record.id, record.caption) for record in records] == [
        (f"{root}:train:0", "blue"),
        (f"{root}:train:1", "green"),
    ]
    pixels = [
        load_rgb(record.image() if callable(record.image) else record.image).getpixel((0, 0))
        for record in records
    ]
    assert pixels == [(0, 0, 250), (0, 250, 0)]


def coco_file(tmp_path: Path) -> tuple[Path, Path]:
    images = tmp_path / "coco"
    write_image(images / "000001.jpg")
    write_image(images / "000002.jpg")
    data = {
        "images": [
            {"id": 1, "file_name": "000001.jpg"},
            {"id": 2, "file_name": "000002.jpg"},
            {"id": 3, "file_name": "000003.jpg"},  # not on disk
            {"id": "4", "file_name": "x.jpg"},  # wrong type
        ],
        "annotations": [
            {"image_id": 1, "id": 10, "caption": "A dog. "},
            {"image_id": 1, "id": 11, "caption": "a brown dog"},
            {"image_id": 2, "id": 12, "caption": ""},
            {"image_id": 3, "id": 13, "caption": "file missing"},
            {"image_id": 9, "id": 14, "caption": "no such image"},
            {"image_id": 2, "caption": "no id"},
            {"image_id": 2, "id": 15, "caption": "a cat"},
        ],
    }
    return write_lines(tmp_path / "captions_val2014.json", [json.dumps(data)]), images


def test_coco_captions_one_record_per_annotation(tmp_path: Path) -> None:
    annotations, images = coco_file(tmp_path)
    records, skips = coco_captions(annotations, images)
    assert [(record.id, record.caption, record.image) for record in records] == [
        ("coco:1:10", "A dog.", images / "000001.jpg"),
        ("coco:1:11", "a brown dog", images / "000001.jpg"),
        ("coco:2:15", "a cat", images / "000002.jpg"),
    ]
    assert skips.counts() == {
        "wrong_type": 1,
        "empty_caption": 1,
        "missing_file": 1,
        "unknown_image": 1,
        "missing_key": 1,
    }
    assert any(example.startswith(f"{annotations}:annotations[4]") for example in skips.examples())
    with pytest.raises(ValueError, match="single split"):
        coco_captions(annotations, images, split="train")


def karpathy_file(tmp_path: Path) -> tuple[Path, Path]:
    root = tmp_path / "coco_root"
    entries = []
    for cocoid, (folder, split) in enumerate(
        [("train2014", "train"), ("val2014", "restval"), ("val2014", "val"), ("val2014", "test")], start=100
    ):
        name = f"COCO_{cocoid}.jpg"
        write_image(root / folder / name)
        sentences = [{"raw": f"{split} caption {k}", "sentid": cocoid * 10 + k} for k in range(2)]
        entries.append(
            {"filepath": folder, "filename": name, "split": split, "cocoid": cocoid, "sentences": sentences}
        )
    entries[1]["sentences"].append({"raw": " ", "sentid": 1012})
    entries.append(
        {"filepath": "val2014", "filename": "gone.jpg", "split": "val", "cocoid": 5, "sentences": []}
    )
    return write_lines(tmp_path / "dataset_coco.json", [json.dumps({"images": entries})]), root


def test_karpathy_splits_and_train_includes_restval(tmp_path: Path) -> None:
    annotations, root = karpathy_file(tmp_path)
    train, skips = coco_captions(annotations, root, split="train")
    assert [record.id for record in train] == [
        "karpathy:100:1000",
        "karpathy:100:1001",
        "karpathy:101:1010",
        "karpathy:101:1011",
    ]
    assert train[2].caption == "restval caption 0" and train[2].image == root / "val2014" / "COCO_101.jpg"
    assert skips.counts() == {"empty_caption": 1}
    val, val_skips = coco_captions(annotations, root, split="val")
    assert [record.caption for record in val] == ["val caption 0", "val caption 1"]
    assert val_skips.counts() == {"missing_file": 1}
    everything, _ = coco_captions(annotations, root)
    assert len(everything) == 8
    with pytest.raises(ValueError, match=r"unknown split 'dev'.*'restval'"):
        coco_captions(annotations, root, split="dev")


def test_image_only_folder_lists_images_recursively(tmp_path: Path) -> None:
    write_image(tmp_path / "imgs" / "b.png")
    write_image(tmp_path / "imgs" / "sub" / "a.JPG")
    (tmp_path / "imgs" / "._b.png").write_bytes(b"AppleDouble junk")
    (tmp_path / "imgs" / "notes.txt").write_text("not an image")
    records, skips = image_only_folder(tmp_path / "imgs")
    assert [(record.id, record.caption) for record in records] == [("b.png", None), ("sub/a.JPG", None)]
    assert records[1].image == tmp_path / "imgs" / "sub" / "a.JPG" and skips.total == 0
    (tmp_path / "empty").mkdir()
    with pytest.raises(EmptySourceError, match="empty"):
        image_only_folder(tmp_path / "empty")


def test_text_only_txt_and_jsonl(tmp_path: Path) -> None:
    txt = tmp_path / "captions.txt"
    txt.write_bytes(b"a red circle\n\n  a blue square  \n\xff\xfe broken\nlast line")
    records, skips = text_only_file(txt)
    assert [(record.id, record.caption, record.image) for record in records] == [
        (f"{txt}:1", "a red circle", None),
        (f"{txt}:3", "a blue square", None),
        (f"{txt}:5", "last line", None),
    ]
    assert skips.counts() == {"empty_caption": 1, "bad_encoding": 1}
    jsonl = write_lines(
        tmp_path / "captions.jsonl",
        [
            json.dumps({"caption": "first"}),
            "not json",
            json.dumps({"text": "other key"}),
            json.dumps({"caption": 3}),
        ],
    )
    records, skips = text_only_file(jsonl, text_column="caption")
    assert [(record.id, record.caption) for record in records] == [(f"{jsonl}:1", "first")]
    assert skips.counts() == {"bad_json": 1, "missing_key": 1, "wrong_type": 1}
    with pytest.raises(ValueError, match=r"\.csv"):
        text_only_file(write_lines(tmp_path / "captions.csv", ["text", "x"]))


def test_shapes_records_are_stable_and_render_their_caption() -> None:
    records, skips = shapes(12, seed=7, resolution=32)
    assert [record.id for record in records] == [f"shapes:7:{index}" for index in range(12)]
    assert skips.total == 0
    first_five, _ = shapes(5, seed=7, resolution=32)
    assert [(record.id, record.caption) for record in first_five] == [(r.id, r.caption) for r in records[:5]]
    assert len({record.caption for record in records}) > 6  # varied scenes and templates
    for record in records:
        image = record.image()
        assert image.size == (32, 32)
        assert parse_scene(record.caption) == record.image.scene
    restored = pickle.loads(pickle.dumps(records))
    assert restored[0].image().tobytes() == records[0].image().tobytes()


def test_shapes_records_can_be_limited_to_seen_or_unseen_combinations() -> None:
    unseen, _ = shapes(30, seed=3, combinations="unseen")
    seen, _ = shapes(30, seed=3, combinations="seen")
    assert all(shapes_world.is_unseen(record.image.scene) for record in unseen)
    assert not any(shapes_world.is_unseen(record.image.scene) for record in seen)
    everything, _ = shapes(30, seed=3)
    assert {record.id for record in everything} == {record.id for record in seen}  # ids name seed and index
    assert [r.caption for r in everything] != [r.caption for r in seen]


def parse_scene(caption: str) -> shapes_world.Scene | None:
    return shapes_world.parse(caption).scene
