"""Sources: turn a dataset on disk into a validated list of Records with stable ids.

Each source type is its settings class (one entry of a data.<role> list in the run config) beside the reader
that turns those settings into records; data/source_types.py collects them. This module holds the folder,
text and shapes-world sources and what every source shares (records, the settings base, the row checks);
Hugging Face datasets and COCO caption files are in data/caption_datasets.py.

Structural problems (a manifest row that is not JSON, a missing key, a caption that is blank, an image
file that is not there) are found here, once, before training starts: each is skipped and entered in a
SkipLedger under the file and row that hold it, and a one-line warning is logged, so a long run never dies
on row 91,234 of a manifest. Problems only visible when decoding (a truncated JPEG) are handled later by
streams.RecordDataset.

Stable ids (used for logging, evaluation tables and resuming):
  HF datasets      "<path>:<split>:<row>"       (streamed: "<path>:<split>:<shard>:<row in shard>")
  webdataset       "<KEY>"                      (the member name without its extension)
  image folders    "<file name relative to the folder>"
  COCO captions    "coco:<image_id>:<annotation_id>"
  Karpathy splits  "karpathy:<cocoid>:<sentid>"
  text files       "<file>:<line>"          (1-based line number)
  shapes world     "shapes:<seed>:<index>"
When one base id carries several captions (a caption list, or the same image on several manifest rows)
each caption is its own record and the ids get a ":<k>" suffix in manifest order.
"""

from __future__ import annotations

import csv
import io
import json
import logging
import os
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal, NamedTuple

import numpy as np
from pydantic import BaseModel, ConfigDict, Field

from cycletune.data import shapes as shapes_world
from cycletune.data.images import ImageInput, ImageSource
from cycletune.data.skips import SkipLedger

logger = logging.getLogger(__name__)

IMAGE_SUFFIXES = frozenset({".png", ".jpg", ".jpeg", ".webp", ".bmp", ".gif", ".tif", ".tiff"})


@dataclass(frozen=True)
class Record:
    """One sample: an image (a file, or a callable returning what load_rgb accepts), a caption, or both.

    `where` names the image in messages when it is not a file of its own (a member of a tar shard).
    """

    id: str
    image: ImageSource | None
    caption: str | None
    where: str = ""


class SourceResult(NamedTuple):
    records: list[Record]
    skips: SkipLedger  # what the source dropped, one entry per manifest row or caption, keyed by where


class EmptySourceError(ValueError):
    """A source in which not a single valid record was found."""


class SourceSettings(BaseModel):
    """Base of every source's settings: unknown keys are errors (as losses/settings.py Strict, which data
    cannot import), and `type` is the YAML tag each source narrows to its own name."""

    model_config = ConfigDict(extra="forbid", validate_assignment=True)

    type: str

    def streamed(self) -> bool:
        """Whether training reads this source shard by shard (data/shards.py) instead of in memory."""
        return False


class ImageFolderSource(SourceSettings):
    type: Literal["imagefolder"]
    path: str
    caption_column: str = "text"


def image_folder(path: str | os.PathLike, caption_column: str = "text") -> SourceResult:
    """Paired records from a folder with metadata.jsonl or metadata.csv files (the datasets "imagefolder"
    convention).

    Every metadata file under the folder is read; each row is {"file_name": <path relative to that
    metadata file>, caption_column: <caption>} (a JSON row may also hold a list of captions).
    """
    root = existing_path(path, directory=True)
    manifests = sorted(file for name in _MANIFESTS for file in root.rglob(name))
    if not manifests:
        raise FileNotFoundError(
            f"{root}: no metadata.jsonl or metadata.csv (rows {{'file_name': ..., {caption_column!r}: ...}}); "
            "use image_only_folder for a folder of images without captions"
        )
    skips = SkipLedger()
    entries: list[tuple[str, ImageSource, str]] = []
    for manifest in manifests:
        for where, row in _MANIFESTS[manifest.name](manifest, skips, str(manifest)):
            file_name = typed_field(row, "file_name", str, skips, where)
            captions = [] if file_name is None else _caption_field(row, caption_column, skips, where)
            if not captions:
                continue
            image = manifest.parent / file_name
            if not image.is_file():
                skip(skips, "missing_file", where, str(image))
                continue
            relative_name = Path(os.path.relpath(image, root)).as_posix()
            entries.extend((relative_name, image, caption) for caption in captions)
    return finish_source(entries, skips, "image_folder", str(root))


class ImageOnlySource(SourceSettings):
    type: Literal["images"]
    path: str


def image_only_folder(path: str | os.PathLike) -> SourceResult:
    """Image-only records: every image file under `path` (hidden files such as macOS "._x.jpg" excluded)."""
    root = existing_path(path, directory=True)
    images = sorted(
        file
        for file in root.rglob("*")
        if file.suffix.lower() in IMAGE_SUFFIXES
        and file.is_file()
        and not any(part.startswith(".") for part in file.relative_to(root).parts)
    )
    entries = [(file.relative_to(root).as_posix(), file, None) for file in images]
    return finish_source(entries, SkipLedger(), "image_only_folder", str(root))


class TextOnlySource(SourceSettings):
    type: Literal["texts"]
    path: str
    text_column: str = "text"


def text_only_file(path: str | os.PathLike, text_column: str = "text") -> SourceResult:
    """Text-only records from a .txt file (one caption per line) or a .jsonl file (text_column per row)."""
    file = existing_path(path, directory=False)
    skips = SkipLedger()
    entries: list[tuple[str, ImageSource | None, str]] = []
    if file.suffix == ".jsonl":
        for where, row in _jsonl_rows(file, skips, label=str(path)):
            entries.extend(
                (where, None, caption) for caption in _caption_field(row, text_column, skips, where)
            )
    elif file.suffix == ".txt":
        for where, line in _text_lines(file, skips, label=str(path)):
            entries.extend((where, None, caption) for caption in valid_captions(line, "line", skips, where))
    else:
        raise ValueError(
            f"{path}: text-only sources must be .txt (one caption per line) or .jsonl, got {file.suffix!r}"
        )
    return finish_source(entries, skips, "text_only_file", str(path))


class ShapesSource(SourceSettings):
    type: Literal["shapes"]
    num_samples: int = Field(ge=1)
    seed: int = 0
    # "seen" / "unseen": only the colour-shape combinations in / held out of the demo's paired split;
    # "generator_seen" / "captioner_only": the seen ones split as the designed split's generator saw them.
    combinations: shapes_world.Combinations = "all"


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
    entries: list[tuple[str, ImageSource | None, str]] = []
    for index in range(num_samples):
        rng = np.random.default_rng([seed, index])
        scene = shapes_world.random_scene(rng, combinations)
        caption = shapes_world.describe(scene, rng)
        render_seed = int(rng.integers(2**31))
        entries.append((f"shapes:{seed}:{index}", _ShapesImage(scene, resolution, render_seed), caption))
    return finish_source(entries, SkipLedger(), "shapes", f"shapes:{seed}")


@dataclass(frozen=True)
class _ShapesImage:
    """Renders one shapes-world image on demand (a picklable callable, so DataLoader workers can use it)."""

    scene: shapes_world.Scene
    resolution: int
    seed: int

    def __call__(self) -> ImageInput:
        return shapes_world.render(self.scene, self.resolution, self.seed)


def _jsonl_rows(file: Path, skips: SkipLedger, label: str) -> Iterator[tuple[str, Any]]:
    """(where, row) for every JSON object in a .jsonl file; bad lines are counted, blank lines ignored."""
    for where, line in _text_lines(file, skips, label):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError as error:
            skip(skips, "bad_json", where, str(error))
            continue
        if not isinstance(row, dict):
            skip(skips, "not_an_object", where, f"got {type(row).__name__}")
            continue
        yield where, row


def _csv_rows(file: Path, skips: SkipLedger, label: str) -> Iterator[tuple[str, dict[str, Any]]]:
    """(where, row) for every row of a CSV file with a header line, as `datasets` reads metadata.csv."""
    try:
        text = file.read_bytes().decode("utf-8-sig")
    except UnicodeDecodeError as error:
        skip(skips, "bad_encoding", label, str(error))
        return
    reader = csv.DictReader(io.StringIO(text, newline=""))
    try:
        for row in reader:
            yield f"{label}:{reader.line_num}", row
    except csv.Error as error:
        skip(skips, "bad_csv", f"{label}:{reader.line_num}", str(error))


# The manifests of an image folder, by file name, and how each is read.
_MANIFESTS = {"metadata.jsonl": _jsonl_rows, "metadata.csv": _csv_rows}


def _text_lines(file: Path, skips: SkipLedger, label: str) -> Iterator[tuple[str, str]]:
    """("<label>:<line number>", text) per line; lines that are not UTF-8 are counted and skipped."""
    for number, raw_line in enumerate(file.read_bytes().splitlines(), start=1):
        where = f"{label}:{number}"
        try:
            yield where, raw_line.decode("utf-8")
        except UnicodeDecodeError as error:
            skip(skips, "bad_encoding", where, str(error))


def typed_field(
    row: Any, key: str, expected: type, skips: SkipLedger, where: str, *, optional: bool = False
) -> Any:
    """row[key] when row is an object holding a value of the expected type; else count why and return None.

    optional=True: a missing key reads as "" (for optional path prefixes).
    """
    if not isinstance(row, dict):
        skip(skips, "not_an_object", where, f"got {type(row).__name__}")
        return None
    if key not in row:
        if optional:
            return ""
        skip(skips, "missing_key", where, f"no {key!r}")
        return None
    value = row[key]
    if not isinstance(value, expected) or isinstance(value, bool):
        skip(skips, "wrong_type", where, f"{key!r} is {type(value).__name__}, expected {expected.__name__}")
        return None
    return value


def skip(skips: SkipLedger, reason: str, where: str, detail: str = "") -> None:
    """Enter one dropped row, annotation, sentence or caption; `where` names it uniquely, so it is its id."""
    skips.add(where, reason, where, detail)


def _caption_field(row: dict[str, Any], key: str, skips: SkipLedger, where: str) -> list[str]:
    """The valid captions under row[key]; a missing key is counted like any other malformed row."""
    if key not in row:
        skip(skips, "missing_key", where, f"no {key!r}")
        return []
    return valid_captions(row[key], key, skips, where)


def valid_captions(value: Any, key: str, skips: SkipLedger, where: str) -> list[str]:
    """The non-blank captions in a caption field (a string or a list of strings), stripped."""
    if value is None:
        skip(skips, "empty_caption", where, f"{key!r} is null")
        return []
    if isinstance(value, list):  # each caption of a list is its own entry: "<where>.<key>[<k>]"
        named = [(f"{where}.{key}[{number}]", caption) for number, caption in enumerate(value)]
    else:
        named = [(where, value)]
    captions = []
    for caption_where, caption in named:
        if not isinstance(caption, str):
            skip(skips, "wrong_type", caption_where, f"{key!r} holds {type(caption).__name__}, expected str")
        elif not caption.strip():
            skip(skips, "empty_caption", caption_where, f"{key!r} is blank")
        else:
            captions.append(caption.strip())
    return captions


def existing_path(path: str | os.PathLike, *, directory: bool) -> Path:
    resolved = Path(path)
    if not (resolved.is_dir() if directory else resolved.is_file()):
        raise FileNotFoundError(f"{path}: no such {'folder' if directory else 'file'}")
    return resolved


def finish_source(
    entries: list[tuple[str, ImageSource | None, str | None]],
    skips: SkipLedger,
    kind: str,
    source: str,
) -> SourceResult:
    """Number the captions of a repeated base id (":<k>"), refuse empty sources, log what was skipped."""
    if not entries:
        details = f": {skips.summary()}" if skips.total else ""
        raise EmptySourceError(f"{kind} {source}: no valid records{details}")
    records = numbered_records(entries)
    if skips.total:
        logger.warning("%s %s: kept %d records, %s", kind, source, len(records), skips.summary())
    return SourceResult(records, skips)


def numbered_records(entries: list[tuple[str, ImageSource | None, str | None]]) -> list[Record]:
    """Records of (base id, image, caption) entries; the captions of a repeated base id get ":<k>"."""
    repeats = Counter(base_id for base_id, _, _ in entries)
    seen: Counter[str] = Counter()
    records = []
    for base_id, image, caption in entries:
        record_id = base_id if repeats[base_id] == 1 else f"{base_id}:{seen[base_id]}"
        seen[base_id] += 1
        records.append(Record(record_id, image, caption))
    return records
