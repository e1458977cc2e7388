"""Sources in published caption-dataset formats: Hugging Face datasets, COCO captions and Karpathy's splits.

Each is its settings class beside its reader, as in data/sources.py (which also describes the ids and how
malformed rows are skipped); data/source_types.py collects them.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

from cycletune.data.images import ImageInput, ImageSource
from cycletune.data.shards import Shard, read_shards
from cycletune.data.skips import SkipLedger
from cycletune.data.sources import (
    SourceResult,
    SourceSettings,
    existing_path,
    finish_source,
    numbered_records,
    skip,
    typed_field,
    valid_captions,
)

if TYPE_CHECKING:
    import datasets

# Karpathy's split assigns 30k COCO val2014 images to "restval"; the standard practice (and his own
# training code) trains on train + restval, so asking for "train" returns both.
_KARPATHY_SPLIT_ALIASES = {"train": frozenset({"train", "restval"})}
# Rows of a streamed shard read per batch from `datasets`.
_ROWS_PER_READ = 256


# `data_files` as load_dataset takes it: a pattern, a list of them, or {split: pattern(s)}.
DataFiles = str | list[str] | dict[str, str | list[str]]


class HFDatasetSource(SourceSettings):
    type: Literal["hf"]
    path: str
    name: str | None = None
    split: str = "train"
    revision: str | None = None
    image_column: str = "image"
    caption_column: str = "text"
    data_files: DataFiles | None = None
    data_dir: str | None = None
    # Read the data files shard by shard while training (data/shards.py) instead of loading them first.
    streaming: bool = False

    def streamed(self) -> bool:
        return self.streaming


def hf_dataset(
    path: str,
    split: str = "train",
    image_column: str = "image",
    caption_column: str = "text",
    name: str | None = None,
    revision: str | None = None,
    data_files: DataFiles | None = None,
    data_dir: str | None = None,
    streaming: bool = False,
) -> SourceResult:
    """Paired records from a Hugging Face dataset: a hub id, a local data folder, or a save_to_disk folder.

    The image column may be a datasets Image feature (embedded bytes or file paths) or a string column of
    file paths (relative paths are looked up in the dataset folder first, then the working directory).
    The caption column may hold a string or a list of strings per row. A folder written by save_to_disk
    holding a single Dataset is used whatever `split` says (the split only appears in the ids).
    streaming=True reads every shard of hf_stream_shards into memory (validation sets, small sets).
    """
    options = {"name": name, "revision": revision, "data_files": data_files, "data_dir": data_dir}
    if streaming:
        return read_shards(hf_stream_shards(path, split, image_column, caption_column, **options))
    dataset = _load_hf(path, split, **options)
    _check_columns(dataset, path, split, image_column, caption_column)
    base_dir = Path(path) if Path(path).is_dir() else None
    image_rows = _hf_image_rows(dataset, image_column, base_dir)
    captions = dataset.with_format("arrow")[caption_column].to_pylist()
    skips = SkipLedger()
    entries: list[tuple[str, ImageSource, str]] = []
    source_name = path if name is None else f"{path}/{name}"
    for row, (image, caption_value) in enumerate(zip(image_rows, captions, strict=True)):
        where = f"{source_name}:{split}:{row}"
        if isinstance(image, str):
            skip(skips, image, where)
            continue
        for caption in valid_captions(caption_value, caption_column, skips, where):
            entries.append((where, image, caption))
    return finish_source(entries, skips, "hf_dataset", source_name)


@dataclass(frozen=True, eq=False)
class _EmbeddedImage:
    """Reads the encoded bytes of one row of an HF dataset on demand, so records stay small."""

    dataset: datasets.Dataset  # only the image column, with decoding turned off
    column: str
    row: int

    def __call__(self) -> ImageInput:
        return self.dataset[self.row][self.column]["bytes"]


def _load_hf(
    path: str, split: str, *, streaming: bool = False, **options: Any
) -> datasets.Dataset | datasets.IterableDataset:
    """load_dataset's result, or a save_to_disk folder's split; streamed, the folder's by its arrow files."""
    import datasets

    folder = Path(path)
    if (folder / datasets.config.DATASETDICT_JSON_FILENAME).is_file():
        splits = datasets.load_from_disk(str(folder))
        if split not in splits:
            raise ValueError(f"{path}: unknown split {split!r}; the saved dataset has {sorted(splits)}")
        dataset = splits[split]
    elif (folder / datasets.config.DATASET_STATE_JSON_FILENAME).is_file():
        dataset = datasets.load_from_disk(str(folder))
    else:
        return datasets.load_dataset(path, split=split, streaming=streaming, **options)
    return dataset.to_iterable_dataset(num_shards=max(1, len(dataset.cache_files))) if streaming else dataset


def _check_columns(
    dataset: datasets.Dataset | datasets.IterableDataset,
    path: str,
    split: str,
    image_column: str,
    caption_column: str,
) -> None:
    """Refuse, before any row is read, a dataset without the two columns or with an unusable image column."""
    from datasets import Image as ImageFeature
    from datasets import Value

    columns = list(dataset.features or {})
    for column in (image_column, caption_column):
        if column not in columns:
            raise ValueError(f"{path} (split {split!r}) has no column {column!r}; columns: {columns}")
    feature = dataset.features[image_column]
    is_path_column = isinstance(feature, Value) and feature.dtype in ("string", "large_string")
    if not isinstance(feature, ImageFeature) and not is_path_column:
        raise ValueError(
            f"{path}: image column {image_column!r} is {feature}; "
            "expected a datasets Image feature or a column of file path strings"
        )


def hf_stream_shards(
    path: str, split: str = "train", image_column: str = "image", caption_column: str = "text", **options: Any
) -> list[Shard]:
    """The dataset as shards for streaming: one per shard of load_dataset(..., streaming=True) (for data
    files, one per file), images left encoded. A save_to_disk folder streams by its arrow files. `options`
    are hf_dataset's load_dataset arguments (name, revision, data_files, data_dir).

    Ids are "<path>:<split>:<shard>:<row in shard>". Each shard is read whole into memory while walked, so
    keep data files to a few hundred MB; webdataset shards are the format for large image sets, since a
    worker walking past a tar reads only its headers, where a data file's rows are read whole.
    """
    import datasets

    stream = _load_hf(path, split, streaming=True, **options)
    _check_columns(stream, path, split, image_column, caption_column)
    if isinstance(stream.features[image_column], datasets.Image):
        stream = stream.cast_column(image_column, datasets.Image(decode=False))
    name, data_dir = options.get("name"), options.get("data_dir")
    label = f"{path if name is None else f'{path}/{name}'}:{split}"
    base_dir = next((Path(folder) for folder in (data_dir, path) if folder and Path(folder).is_dir()), None)
    columns = (image_column, caption_column)
    return [
        Shard(f"{label}:{index}", _HFStreamShard(stream, index, f"{label}:{index}", *columns, base_dir))
        for index in range(stream.num_shards)
    ]


@dataclass(frozen=True)
class _HFStreamShard:
    """Reads one shard of a streamed dataset: its rows as records, images still encoded (bytes or files)."""

    dataset: datasets.IterableDataset
    index: int
    label: str  # "<path>:<split>:<shard>", the prefix of its rows' ids
    image_column: str
    caption_column: str
    base_dir: Path | None

    def __call__(self) -> SourceResult:
        skips = SkipLedger()
        entries: list[tuple[str, ImageSource, str]] = []
        shard = self.dataset.shard(num_shards=self.dataset.num_shards, index=self.index)
        # iter(batch_size) reads the whole shard even in a loader worker, where iterating the dataset itself
        # would read only the worker's share of its shards.
        columns = (self.image_column, self.caption_column)
        batches = shard.iter(batch_size=_ROWS_PER_READ)
        rows = (row for batch in batches for row in zip(*(batch[column] for column in columns), strict=True))
        for row_number, (image_value, caption_value) in enumerate(rows):
            where = f"{self.label}:{row_number}"
            image = _row_image(image_value, self.base_dir)
            if isinstance(image, str):
                skip(skips, image, where)
                continue
            for caption in valid_captions(caption_value, self.caption_column, skips, where):
                entries.append((where, image, caption))
        return SourceResult(numbered_records(entries), skips)


@dataclass(frozen=True)
class EncodedImage:
    """An image's encoded bytes held by a record (a streamed row's), returned for load_rgb."""

    data: bytes

    def __call__(self) -> ImageInput:
        return self.data


def _row_image(value: Any, base_dir: Path | None) -> ImageSource | str:
    """A streamed row's image: its bytes, its file, or the skip reason (a str)."""
    if isinstance(value, dict) and value.get("bytes") is not None:
        return EncodedImage(value["bytes"])
    file = value.get("path") if isinstance(value, dict) else value
    if not file:
        return "missing_image"
    resolved = _resolve_relative(Path(file), base_dir)
    return resolved if resolved.is_file() else "missing_file"


def _hf_image_rows(dataset: datasets.Dataset, column: str, base_dir: Path | None) -> list[ImageSource | str]:
    """Per row: the image file, a loader of its embedded bytes, or the skip reason (a str)."""
    import pyarrow.compute as pc
    from datasets import Image as ImageFeature

    values = dataset.with_format("arrow")[column]
    if isinstance(dataset.features[column], ImageFeature):
        has_bytes = pc.struct_field(values, "bytes").is_valid().to_pylist()
        paths = pc.struct_field(values, "path").to_pylist()
        encoded = dataset.select_columns([column]).cast_column(column, ImageFeature(decode=False))
    else:
        has_bytes, paths, encoded = [False] * len(values), values.to_pylist(), None
    rows: list[ImageSource | str] = []
    for row, (embedded, path) in enumerate(zip(has_bytes, paths, strict=True)):
        if embedded:
            rows.append(_EmbeddedImage(encoded, column, row))
        elif path is None:
            rows.append("missing_image")
        else:
            file = _resolve_relative(Path(path), base_dir)
            rows.append(file if file.is_file() else "missing_file")
    return rows


def _resolve_relative(file: Path, base_dir: Path | None) -> Path:
    if file.is_absolute() or base_dir is None or not (base_dir / file).is_file():
        return file
    return base_dir / file


class CocoSource(SourceSettings):
    type: Literal["coco"]
    annotations: str
    images_dir: str
    split: str | None = None


def coco_captions(
    annotations: str | os.PathLike, images_dir: str | os.PathLike, split: str | None = None
) -> SourceResult:
    """Paired records from a COCO captions JSON (captions_<split>.json) or Karpathy's dataset_coco.json.

    COCO files hold one split each, so `split` must be None for them. For Karpathy files `split` filters
    images ("train", "val", "test", "restval"); "train" also returns "restval" (the usual 113k-image
    training set). Karpathy image paths are images_dir/<filepath>/<filename>.
    """
    annotations_file = existing_path(annotations, directory=False)
    images_root = existing_path(images_dir, directory=True)
    try:
        data = json.loads(annotations_file.read_text(encoding="utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as error:
        raise ValueError(f"{annotations_file}: not a JSON file ({error})") from error
    if not isinstance(data, dict) or not isinstance(data.get("images"), list):
        raise ValueError(
            f"{annotations_file}: expected a JSON object with an 'images' list (COCO or Karpathy format)"
        )
    skips = SkipLedger()
    if "annotations" in data:
        if split is not None:
            raise ValueError(
                f"{annotations_file} is a COCO captions file, which holds a single split; pass split=None "
                f"(got {split!r}) and choose the split by choosing the file"
            )
        entries = _coco_entries(data, str(annotations_file), images_root, skips)
    else:
        entries = _karpathy_entries(data, str(annotations_file), images_root, split, skips)
    return finish_source(entries, skips, "coco_captions", str(annotations_file))


def _coco_entries(
    data: dict[str, Any], label: str, images_root: Path, skips: SkipLedger
) -> list[tuple[str, ImageSource | None, str]]:
    image_files: dict[int, Path] = {}
    for index, image in enumerate(data["images"]):
        where = f"{label}:images[{index}]"
        image_id = typed_field(image, "id", int, skips, where)
        file_name = None if image_id is None else typed_field(image, "file_name", str, skips, where)
        if file_name is not None:
            image_files[image_id] = images_root / file_name
    annotations = data["annotations"] if isinstance(data["annotations"], list) else []
    file_exists: dict[Path, bool] = {}
    entries: list[tuple[str, ImageSource | None, str]] = []
    for index, annotation in enumerate(annotations):
        where = f"{label}:annotations[{index}]"
        image_id = typed_field(annotation, "image_id", int, skips, where)
        annotation_id = None if image_id is None else typed_field(annotation, "id", int, skips, where)
        caption = None if annotation_id is None else typed_field(annotation, "caption", str, skips, where)
        captions = [] if caption is None else valid_captions(caption, "caption", skips, where)
        if not captions:
            continue
        if image_id not in image_files:
            skip(skips, "unknown_image", where, f"image_id {image_id} is not in 'images'")
            continue
        file = image_files[image_id]
        if not file_exists.setdefault(file, file.is_file()):
            skip(skips, "missing_file", where, str(file))
            continue
        entries.append((f"coco:{image_id}:{annotation_id}", file, captions[0]))
    return entries


def _karpathy_entries(
    data: dict[str, Any], label: str, images_root: Path, split: str | None, skips: SkipLedger
) -> list[tuple[str, ImageSource | None, str]]:
    images = data["images"]
    wanted = None if split is None else _KARPATHY_SPLIT_ALIASES.get(split, frozenset({split}))
    if wanted is not None:
        available = sorted({str(image.get("split")) for image in images if isinstance(image, dict)})
        if not wanted & set(available):
            raise ValueError(f"{label}: unknown split {split!r}; the file has {available}")
    entries: list[tuple[str, ImageSource | None, str]] = []
    for index, image in enumerate(images):
        where = f"{label}:images[{index}]"
        if wanted is not None and isinstance(image, dict) and image.get("split") not in wanted:
            continue
        file = _karpathy_image_file(image, images_root, skips, where)
        sentences = None if file is None else typed_field(image, "sentences", list, skips, where)
        if sentences is None:
            continue
        image_id = image.get("cocoid", image.get("imgid"))
        for position, sentence in enumerate(sentences):
            sentence_where = f"{where}.sentences[{position}]"
            raw = typed_field(sentence, "raw", str, skips, sentence_where)
            captions = [] if raw is None else valid_captions(raw, "raw", skips, sentence_where)
            sentence_id = sentence.get("sentid", position) if isinstance(sentence, dict) else position
            entries.extend((f"karpathy:{image_id}:{sentence_id}", file, caption) for caption in captions)
    return entries


def _karpathy_image_file(image: Any, images_root: Path, skips: SkipLedger, where: str) -> Path | None:
    """images_root/<filepath>/<filename> of a Karpathy image entry, or None (counted) when unusable."""
    file_name = typed_field(image, "filename", str, skips, where)
    folder = None if file_name is None else typed_field(image, "filepath", str, skips, where, optional=True)
    if file_name is None or folder is None:
        return None
    if not isinstance(image.get("cocoid", image.get("imgid")), int):
        skip(skips, "missing_key", where, "needs an integer 'cocoid' or 'imgid'")
        return None
    file = images_root / folder / file_name
    if not file.is_file():
        skip(skips, "missing_file", where, str(file))
        return None
    return file
