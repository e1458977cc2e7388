"""Webdataset tar shards (the img2dataset layout): KEY.jpg / KEY.png beside KEY.txt (and KEY.json) per sample.

Each uncompressed .tar file is one shard (data/shards.py). Reading a shard's index walks its member headers
with tarfile, which seeks over the image bytes, and reads only the small caption members; an image is read
(one seek, one read) when its position is drawn. So a loader worker pays for the headers of every shard it
walks past but decodes only its own images. A KEY.json member (img2dataset's metadata) and members of other
types are ignored. Record ids are the KEYs, which img2dataset makes unique across shards.
"""

from __future__ import annotations

import glob
import itertools
import re
import tarfile
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

from cycletune.data.images import ImageInput
from cycletune.data.shards import Shard, read_shards
from cycletune.data.skips import SkipLedger
from cycletune.data.sources import IMAGE_SUFFIXES, Record, SourceResult, SourceSettings, skip, valid_captions

_BRACE_RANGE = re.compile(r"^(\d+)\.\.(\d+)$")
_CAPTION_MEMBER = "txt"


class WebDatasetSource(SourceSettings):
    type: Literal["webdataset"]
    # A .tar file, a glob (shards/*.tar) or a brace pattern (shards/{00000..00127}.tar).
    path: str

    def streamed(self) -> bool:
        return True


def webdataset(path: str) -> SourceResult:
    """Every record of the shards in memory, in shard order (validation sets, evaluation, small sets)."""
    return read_shards(webdataset_shards(path))


def webdataset_shards(path: str) -> list[Shard]:
    """One shard per tar file the pattern names, sorted by path; a brace-named file that is missing fails."""
    files: set[str] = set()
    for pattern in expand_braces(path):
        if glob.has_magic(pattern):
            files.update(glob.glob(pattern))
        elif Path(pattern).is_file():
            files.add(pattern)
        else:
            raise FileNotFoundError(f"webdataset {path}: no such shard {pattern}")
    if not files:
        raise FileNotFoundError(f"webdataset {path}: no tar file matches")
    return [Shard(file, TarShard(file)) for file in sorted(files)]


def expand_braces(pattern: str) -> list[str]:
    """Bash-style brace expansion: "a{0..2}" -> a0 a1 a2 (zero padding kept), "a{x,y}" -> ax ay."""
    match = re.search(r"\{([^{}]*)\}", pattern)
    if match is None:
        return [pattern]
    head, tail = pattern[: match.start()], pattern[match.end() :]
    numbers = _BRACE_RANGE.match(match.group(1))
    if numbers:
        first, last = numbers.groups()
        width = len(first) if first.startswith("0") else 0
        step = 1 if int(last) >= int(first) else -1
        choices = [str(value).zfill(width) for value in range(int(first), int(last) + step, step)]
    else:
        choices = match.group(1).split(",")
    return list(itertools.chain.from_iterable(expand_braces(f"{head}{choice}{tail}") for choice in choices))


@dataclass(frozen=True)
class TarMember:
    """The bytes of one tar member, read on demand (picklable, so loader workers can carry it)."""

    file: str
    offset: int
    size: int

    def __call__(self) -> ImageInput:
        with open(self.file, "rb") as handle:
            handle.seek(self.offset)
            return handle.read(self.size)


@dataclass(frozen=True)
class TarShard:
    """Reads one tar shard's index: a record per KEY with an image and a non-blank caption."""

    file: str

    def __call__(self) -> SourceResult:
        skips = SkipLedger()
        members: dict[str, dict[str, tarfile.TarInfo]] = {}
        captions: dict[str, bytes] = {}
        duplicated: set[str] = set()
        with tarfile.open(self.file, mode="r:") as tar:
            for member in tar:
                split = split_member_name(member.name) if member.isfile() else None
                if split is None:
                    continue
                key, extension = split
                fields = members.setdefault(key, {})
                if extension in fields:
                    duplicated.add(key)
                    skip(skips, "duplicate_member", self._where(key), f"two {key}.{extension} members")
                fields[extension] = member
                if extension == _CAPTION_MEMBER:
                    captions[key] = tar.extractfile(member).read()
        records = []
        for key, fields in members.items():
            record = None if key in duplicated else self._record(key, fields, captions.get(key), skips)
            if record is not None:
                records.append(record)
        return SourceResult(records, skips)

    def _record(
        self, key: str, fields: dict[str, tarfile.TarInfo], caption: bytes | None, skips: SkipLedger
    ) -> Record | None:
        where = self._where(key)
        images = [extension for extension in fields if f".{extension}" in IMAGE_SUFFIXES]
        if not images:
            skip(skips, "missing_image", where, f"members: {sorted(fields)}")
            return None
        if caption is None:
            skip(skips, "missing_caption", where, f"no {key}.{_CAPTION_MEMBER}")
            return None
        try:
            text = caption.decode("utf-8")
        except UnicodeDecodeError as error:
            skip(skips, "bad_encoding", where, str(error))
            return None
        found = valid_captions(text, _CAPTION_MEMBER, skips, where)
        if not found:
            return None
        image = fields[images[0]]
        return Record(
            key, TarMember(self.file, image.offset_data, image.size), found[0], f"{self.file}:{image.name}"
        )

    def _where(self, key: str) -> str:
        return f"{self.file}:{key}"


def split_member_name(name: str) -> tuple[str, str] | None:
    """("dir/KEY", "ext") of a member "dir/KEY.ext": the key ends at the first dot of the file name, so
    KEY.seg.png has the extension "seg.png" (the webdataset convention); the extension is lower-cased.
    None for hidden files (macOS "._KEY.jpg") and names without an extension."""
    folder, _, file = name.rpartition("/")
    stem, _, extension = file.partition(".")
    if not stem or not extension:
        return None
    return f"{folder}/{stem}" if folder else stem, extension.lower()
