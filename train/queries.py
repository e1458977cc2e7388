"""What inference runs on: images to caption and prompts to draw, from a folder, a prompts file or a config.

Each input becomes a query with a stable id (its record's), which the CLIs seed every random draw with, so
an image or prompt gets the same output in any batch; references come along where the input has them.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from cycletune.data import sources
from cycletune.data.images import ImageSource
from cycletune.train.builders import load_records
from cycletune.train.config import Config


@dataclass(frozen=True)
class ImageQuery:
    """One image to caption, with the captions the input gives for it (references; empty if none)."""

    id: str
    image: ImageSource
    references: tuple[str, ...] = ()


@dataclass(frozen=True)
class TextQuery:
    """One prompt, with the image the input pairs it with (None for a plain prompts file)."""

    id: str
    text: str
    image: ImageSource | None = None


def folder_records(folder: Path) -> list[sources.Record]:
    """A folder of images; with a metadata.jsonl (the imagefolder convention) its captions come along."""
    if not folder.is_dir():
        raise FileNotFoundError(f"{folder}: no such image folder")
    if any(folder.rglob("metadata.jsonl")):
        return sources.image_folder(folder).records
    return sources.image_only_folder(folder).records


def prompt_records(file: Path) -> list[sources.Record]:
    """Prompts from a .txt file (one per line) or a .jsonl file ({"text": ...} per row)."""
    return sources.text_only_file(file).records


def config_records(config: Config) -> list[sources.Record]:
    """The config's data.validation records (data.paired when it has none), as validation uses them."""
    role = "validation" if config.data.validation else "paired"
    return load_records(getattr(config.data, role), role, config.data.resolution)[0]  # sources log skips


def image_queries(records: Sequence[sources.Record], limit: int | None = None) -> list[ImageQuery]:
    """One query per distinct image, its captions as references (COCO has five per image)."""
    grouped: dict[ImageSource, tuple[str, list[str]]] = {}
    for record in records:
        if record.image is None:
            raise ValueError(f"record {record.id} has no image; image inputs need images")
        _, references = grouped.setdefault(record.image, (record.id, []))
        if record.caption is not None:
            references.append(record.caption)
    queries = [ImageQuery(query_id, image, tuple(refs)) for image, (query_id, refs) in grouped.items()]
    return queries[:limit]


def text_queries(records: Sequence[sources.Record], limit: int | None = None) -> list[TextQuery]:
    """One query per caption, with its paired image when the records have one."""
    queries = []
    for record in records:
        if record.caption is None:
            raise ValueError(f"record {record.id} has no caption; prompt inputs need texts")
        queries.append(TextQuery(record.id, record.caption, record.image))
    return queries[:limit]
