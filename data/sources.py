"""Sources: turn a dataset on disk (or on the hub) into a validated list of Records with stable ids.

Structural problems (a manifest row that is not JSON, a missing key, a caption that is blank, an image
file that is not there) are found here, once, before training starts: each is skipped and entered in a
SkipLedger under the file and row that hold it, and a one-line warning is logged, so a long run never dies
on row 91,234 of a manifest. Problems only visible when decoding (a truncated JPEG) are handled later by
streams.RecordDataset.

Stable ids (used for logging, evaluation tables and resuming):
  HF datasets      "<path>:<split>:<row>"
  image folders    "<file name relative to the folder>"
  COCO captions    "coco:<image_id>:<annotation_id>"
  Karpathy splits  "karpathy:<cocoid>:<sentid>"
  text files       "<file>:<line>"          (1-based line number)
  shapes world     "shapes:<seed>:<index>"
When one base id carries several captions (a caption list, or the same image on several manifest rows)
each caption is its own record and the ids get a ":<k>" suffix in manifest order.
"""

from __future__ import annotations

import json
import logging
import os
from collections import Counter
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, NamedTuple

import numpy as np

from data import shapes as shapes_world
from data.images import ImageInput
from data.skips import SkipLedger

if TYPE_CHECKING:
    import datasets

logger = logging.getLogger(__name__)

IMAGE_SUFFIXES = frozenset({".png", ".jpg", ".jpeg", ".webp", ".bmp", ".gif", ".tif", ".tiff"})
# Karpathy's split assigns 30k COCO val2014 images to "restval"; the standard practice (and his own
# training code) trains on train + restval, so asking for "train" returns both.
_KARPATHY_SPLIT_ALIASES = {"train": frozenset({"train", "restval"})}

ImageLoader = Callable[[], ImageInput]


@dataclass(frozen=True)
class Record:
    """One sample: an image (a file, or a callable returning what load_rgb accepts), a caption, or both."""

    id: str
    image: Path | ImageLoader | None
    caption: str | None


class SourceResult(NamedTuple):
    records: list[Record]
    skips: SkipLedger  # what the source dropped, one entry per manifest row or caption, keyed by where


class EmptySourceError(ValueError):
    """A source in which not a single valid record was found."""


def hf_dataset(
    path: str,
    split: str = "train",
    image_column: str = "image",
    caption_column: str = "text",
    name: str | None = None,
    revision: str | None = None,
) -> SourceResult:
    """Paired records from a Hugging Face dataset: a hub id, a local data folder, or a save_to_disk folder.

    The image column may be a datasets Image feature (embedded bytes or file paths) or a string column of
    file paths (relative paths are looked up in the dataset folder first, then the working directory).
    The caption column may hold a string or a list of strings per row. A folder written by save_to_disk
    holding a single Dataset is used whatever `split` says (the split only appears in the ids).
    """
    from datasets import Image as ImageFeature
    from datasets import Value

    dataset = _load_hf(path, split, name, revision)
    for column in (image_column, caption_column):
        if column not in dataset.column_names:
            raise ValueError(
                f"{path} (split {split!r}) has no column {column!r}; columns: {dataset.column_names}"
            )
    feature = dataset.features[image_column]
    is_path_column = isinstance(feature, Value) and feature.dtype in ("string", "large_string")
    if not isinstance(feature, ImageFeature) and not is_path_column:
        raise ValueError(
            f"{path}: image column {image_column!r} is {feature}; "
            "expected a datasets Image feature or a column of file path strings"
        )
    base_dir = Path(path) if Path(path).is_dir() else None
    image_rows = _hf_image_rows(dataset, image_column, base_dir)
    captions = dataset.with_format("arrow")[caption_column].to_pylist()
    skips = SkipLedger()
    entries: list[tuple[str, Path | ImageLoader, str]] = []
    source_name = path if name is None else f"{path}/{name}"
    for row, (image, caption_value) in enumerate(zip(image_rows, captions, strict=True)):
        where = f"{source_name}:{split}:{row}"
        if isinstance(image, str):
            _skip(skips, image, where)
            continue
        for caption in _valid_captions(caption_value, caption_column, skips, where):
            entries.append((where, image, caption))
    return _finish(entries, skips, "hf_dataset", source_name)


def image_folder(path: str | os.PathLike, caption_column: str = "text") -> SourceResult:
    """Paired records from a folder with metadata.jsonl files (the datasets "imagefolder" convention).

    Every metadata.jsonl under the folder is read; each row is {"file_name": <path relative to that
    metadata file>, caption_column: <caption or list of captions>}.
    """
    root = _existing(path, directory=True)
    manifests = sorted(root.rglob("metadata.jsonl"))
    if not manifests:
        raise FileNotFoundError(
            f"{root}: no metadata.jsonl (rows {{'file_name': ..., {caption_column!r}: ...}}); "
            "use image_only_folder for a folder of images without captions"
        )
    skips = SkipLedger()
    entries: list[tuple[str, Path | ImageLoader, str]] = []
    for manifest in manifests:
        for where, row in _jsonl_rows(manifest, skips, label=str(manifest)):
            file_name = _typed_field(row, "file_name", str, skips, where)
            captions = [] if file_name is None else _caption_field(row, caption_column, skips, where)
            if not captions:
                continue
            image = manifest.parent / file_name
            if not image.is_file():
                _skip(skips, "missing_file", where, str(image))
                continue
            relative_name = Path(os.path.relpath(image, root)).as_posix()
            entries.extend((relative_name, image, caption) for caption in captions)
    return _finish(entries, skips, "image_folder", str(root))


def coco_captions(
    annotations: str | os.PathLike, images_dir: str | os.PathLike, split: str | None = None
) -> SourceResult:
    """Paired records from a COCO captions JSON (captions_<split>.json) or Karpathy's dataset_coco.json.

    COCO files hold one split each, so `split` must be None for them. For Karpathy files `split` filters
    images ("train", "val", "test", "restval"); "train" also returns "restval" (the usual 113k-image
    training set). Karpathy image paths are images_dir/<filepath>/<filename>.
    """
    annotations_file = _existing(annotations, directory=False)
    images_root = _existing(images_dir, directory=True)
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
    return _finish(entries, skips, "coco_captions", str(annotations_file))


def image_only_folder(path: str | os.PathLike) -> SourceResult:
    """Image-only records: every image file under `path` (hidden files such as macOS "._x.jpg" excluded)."""
    root = _existing(path, directory=True)
    images = sorted(
        file
        for file in root.rglob("*")
        if file.suffix.lower() in IMAGE_SUFFIXES
        and file.is_file()
        and not any(part.startswith(".") for part in file.relative_to(root).parts)
    )
    entries = [(file.relative_to(root).as_posix(), file, None) for file in images]
    return _finish(entries, SkipLedger(), "image_only_folder", str(root))


def text_only_file(path: str | os.PathLike, text_column: str = "text") -> SourceResult:
    """Text-only records from a .txt file (one caption per line) or a .jsonl file (text_column per row)."""
    file = _existing(path, directory=False)
    skips = SkipLedger()
    entries: list[tuple[str, Path | ImageLoader | None, str]] = []
    if file.suffix == ".jsonl":
        for where, row in _jsonl_rows(file, skips, label=str(path)):
            entries.extend(
                (where, None, caption) for caption in _caption_field(row, text_column, skips, where)
            )
    elif file.suffix == ".txt":
        for where, line in _text_lines(file, skips, label=str(path)):
            entries.extend((where, None, caption) for caption in _valid_captions(line, "line", skips, where))
    else:
        raise ValueError(
            f"{path}: text-only sources must be .txt (one caption per line) or .jsonl, got {file.suffix!r}"
        )
    return _finish(entries, skips, "text_only_file", str(path))


def shapes(
    num_samples: int, seed: int = 0, resolution: int = 32, combinations: shapes_world.Combinations = "all"
) -> SourceResult:
    """Paired records of the synthetic shapes world, rendered on the fly when loaded.

    Sample `index` depends only on (seed, index, combinations), so a larger num_samples extends a smaller
    one. `combinations` restricts the scenes to the colour-shape combinations seen in the demo's paired
    split, or to the held-out (unseen) ones.
    """
    if num_samples <= 0:
        raise ValueError(f"shapes: num_samples must be positive, got {num_samples}")
    entries: list[tuple[str, Path | ImageLoader | None, str]] = []
    for index in range(num_samples):
        rng = np.random.default_rng([seed, index])
        scene = shapes_world.random_scene(rng, combinations)
        caption = shapes_world.describe(scene, rng)
        render_seed = int(rng.integers(2**31))
        entries.append((f"shapes:{seed}:{index}", _ShapesImage(scene, resolution, render_seed), caption))
    return _finish(entries, SkipLedger(), "shapes", f"shapes:{seed}")


@dataclass(frozen=True)
class _ShapesImage:
    """Renders one shapes-world image on demand (a picklable callable, so DataLoader workers can use it)."""

    scene: shapes_world.Scene
    resolution: int
    seed: int

    def __call__(self) -> ImageInput:
        return shapes_world.render(self.scene, self.resolution, self.seed)


@dataclass(frozen=True, eq=False)
class _EmbeddedImage:
    """Reads the encoded bytes of one row of an HF dataset on demand, so records stay small."""

    dataset: datasets.Dataset  # only the image column, with decoding turned off
    column: str
    row: int

    def __call__(self) -> ImageInput:
        return self.dataset[self.row][self.column]["bytes"]


def _load_hf(path: str, split: str, name: str | None, revision: str | None) -> datasets.Dataset:
    import datasets

    folder = Path(path)
    if (folder / datasets.config.DATASETDICT_JSON_FILENAME).is_file():
        splits = datasets.load_from_disk(str(folder))
        if split not in splits:
            raise ValueError(f"{path}: unknown split {split!r}; the saved dataset has {sorted(splits)}")
        return splits[split]
    if (folder / datasets.config.DATASET_STATE_JSON_FILENAME).is_file():
        return datasets.load_from_disk(str(folder))
    return datasets.load_dataset(path, name=name, split=split, revision=revision)


def _hf_image_rows(
    dataset: datasets.Dataset, column: str, base_dir: Path | None
) -> list[Path | ImageLoader | str]:
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
    rows: list[Path | ImageLoader | str] = []
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


def _coco_entries(
    data: dict[str, Any], label: str, images_root: Path, skips: SkipLedger
) -> list[tuple[str, Path | ImageLoader | None, str]]:
    image_files: dict[int, Path] = {}
    for index, image in enumerate(data["images"]):
        where = f"{label}:images[{index}]"
        image_id = _typed_field(image, "id", int, skips, where)
        file_name = None if image_id is None else _typed_field(image, "file_name", str, skips, where)
        if file_name is not None:
            image_files[image_id] = images_root / file_name
    annotations = data["annotations"] if isinstance(data["annotations"], list) else []
    file_exists: dict[Path, bool] = {}
    entries: list[tuple[str, Path | ImageLoader | None, str]] = []
    for index, annotation in enumerate(annotations):
        where = f"{label}:annotations[{index}]"
        image_id = _typed_field(annotation, "image_id", int, skips, where)
        annotation_id = None if image_id is None else _typed_field(annotation, "id", int, skips, where)
        caption = None if annotation_id is None else _typed_field(annotation, "caption", str, skips, where)
        captions = [] if caption is None else _valid_captions(caption, "caption", skips, where)
        if not captions:
            continue
        if image_id not in image_files:
            _skip(skips, "unknown_image", where, f"image_id {image_id} is not in 'images'")
            continue
        file = image_files[image_id]
        if not file_exists.setdefault(file, file.is_file()):
            _skip(skips, "missing_file", where, str(file))
            continue
        entries.append((f"coco:{image_id}:{annotation_id}", file, captions[0]))
    return entries


def _karpathy_entries(
    data: dict[str, Any], label: str, images_root: Path, split: str | None, skips: SkipLedger
) -> list[tuple[str, Path | ImageLoader | None, str]]:
    images = data["images"]
    wanted = None if split is None else _KARPATHY_SPLIT_ALIASES.get(split, frozenset({split}))
    if wanted is not None:
        available = sorted({str(image.get("split")) for image in images if isinstance(image, dict)})
        if not wanted & set(available):
            raise ValueError(f"{label}: unknown split {split!r}; the file has {available}")
    entries: list[tuple[str, Path | ImageLoader | None, str]] = []
    for index, image in enumerate(images):
        where = f"{label}:images[{index}]"
        if wanted is not None and isinstance(image, dict) and image.get("split") not in wanted:
            continue
        file = _karpathy_image_file(image, images_root, skips, where)
        sentences = None if file is None else _typed_field(image, "sentences", list, skips, where)
        if sentences is None:
            continue
        image_id = image.get("cocoid", image.get("imgid"))
        for position, sentence in enumerate(sentences):
            sentence_where = f"{where}.sentences[{position}]"
            raw = _typed_field(sentence, "raw", str, skips, sentence_where)
            captions = [] if raw is None else _valid_captions(raw, "raw", skips, sentence_where)
            sentence_id = sentence.get("sentid", position) if isinstance(sentence, dict) else position
            entries.extend((f"karpathy:{image_id}:{sentence_id}", file, caption) for caption in captions)
    return entries


def _karpathy_image_file(image: Any, images_root: Path, skips: SkipLedger, where: str) -> Path | None:
    """images_root/<filepath>/<filename> of a Karpathy image entry, or None (counted) when unusable."""
    file_name = _typed_field(image, "filename", str, skips, where)
    folder = None if file_name is None else _typed_field(image, "filepath", str, skips, where, optional=True)
    if file_name is None or folder is None:
        return None
    if not isinstance(image.get("cocoid", image.get("imgid")), int):
        _skip(skips, "missing_key", where, "needs an integer 'cocoid' or 'imgid'")
        return None
    file = images_root / folder / file_name
    if not file.is_file():
        _skip(skips, "missing_file", where, str(file))
        return None
    return file


def _jsonl_rows(file: Path, skips: SkipLedger, label: str) -> Iterator[tuple[str, Any]]:
    """(where, row) for every JSON object in a .jsonl file; bad lines are counted, blank lines ignored."""
    for where, line in _text_lines(file, skips, label):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError as error:
            _skip(skips, "bad_json", where, str(error))
            continue
        if not isinstance(row, dict):
            _skip(skips, "not_an_object", where, f"got {type(row).__name__}")
            continue
        yield where, row


def _text_lines(file: Path, skips: SkipLedger, label: str) -> Iterator[tuple[str, str]]:
    """("<label>:<line number>", text) per line; lines that are not UTF-8 are counted and skipped."""
    for number, raw_line in enumerate(file.read_bytes().splitlines(), start=1):
        where = f"{label}:{number}"
        try:
            yield where, raw_line.decode("utf-8")
        except UnicodeDecodeError as error:
            _skip(skips, "bad_encoding", where, str(error))


def _typed_field(
    row: Any, key: str, expected: type, skips: SkipLedger, where: str, *, optional: bool = False
) -> Any:
    """row[key] when row is an object holding a value of the expected type; else count why and return None.

    optional=True: a missing key reads as "" (for optional path prefixes).
    """
    if not isinstance(row, dict):
        _skip(skips, "not_an_object", where, f"got {type(row).__name__}")
        return None
    if key not in row:
        if optional:
            return ""
        _skip(skips, "missing_key", where, f"no {key!r}")
        return None
    value = row[key]
    if not isinstance(value, expected) or isinstance(value, bool):
        _skip(skips, "wrong_type", where, f"{key!r} is {type(value).__name__}, expected {expected.__name__}")
        return None
    return value


def _skip(skips: SkipLedger, reason: str, where: str, detail: str = "") -> None:
    """Enter one dropped row, annotation, sentence or caption; `where` names it uniquely, so it is its id."""
    skips.add(where, reason, where, detail)


def _caption_field(row: dict[str, Any], key: str, skips: SkipLedger, where: str) -> list[str]:
    """The valid captions under row[key]; a missing key is counted like any other malformed row."""
    if key not in row:
        _skip(skips, "missing_key", where, f"no {key!r}")
        return []
    return _valid_captions(row[key], key, skips, where)


def _valid_captions(value: Any, key: str, skips: SkipLedger, where: str) -> list[str]:
    """The non-blank captions in a caption field (a string or a list of strings), stripped."""
    if value is None:
        _skip(skips, "empty_caption", where, f"{key!r} is null")
        return []
    if isinstance(value, list):  # each caption of a list is its own entry: "<where>.<key>[<k>]"
        named = [(f"{where}.{key}[{number}]", caption) for number, caption in enumerate(value)]
    else:
        named = [(where, value)]
    captions = []
    for caption_where, caption in named:
        if not isinstance(caption, str):
            _skip(skips, "wrong_type", caption_where, f"{key!r} holds {type(caption).__name__}, expected str")
        elif not caption.strip():
            _skip(skips, "empty_caption", caption_where, f"{key!r} is blank")
        else:
            captions.append(caption.strip())
    return captions


def _existing(path: str | os.PathLike, *, directory: bool) -> Path:
    resolved = Path(path)
    if not (resolved.is_dir() if directory else resolved.is_file()):
        raise FileNotFoundError(f"{path}: no such {'folder' if directory else 'file'}")
    return resolved


def _finish(
    entries: list[tuple[str, Path | ImageLoader | None, str | None]],
    skips: SkipLedger,
    kind: str,
    source: str,
) -> SourceResult:
    """Number the captions of a repeated base id (":<k>"), refuse empty sources, log what was skipped."""
    if not entries:
        details = f": {skips.summary()}" if skips.total else ""
        raise EmptySourceError(f"{kind} {source}: no valid records{details}")
    repeats = Counter(base_id for base_id, _, _ in entries)
    seen: Counter[str] = Counter()
    records = []
    for base_id, image, caption in entries:
        record_id = base_id if repeats[base_id] == 1 else f"{base_id}:{seen[base_id]}"
        seen[base_id] += 1
        records.append(Record(record_id, image, caption))
    if skips.total:
        logger.warning("%s %s: kept %d records, %s", kind, source, len(records), skips.summary())
    return SourceResult(records, skips)
