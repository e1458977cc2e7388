"""Every data source type, declared once: its YAML tag, settings class, reader, and the roles it can feed.

The run config builds its source union and its role check from SOURCE_TYPES, and train/builders.py reads
every source through it, so a new source type is a settings class, a reader and one entry here.

Two ways to read a source. In memory (`read`): every record listed before training starts, the order a
permutation of the whole list; every type reads this way for validation and evaluation, and in training
unless it streams. Shard by shard (`shards`): a `webdataset` source always, an `hf` source with
streaming: true; a data role with such a source trains from a sharded stream (data/shards.py), which starts
at once whatever the size, and its in-memory sources join it as one shard each. Small sets stay in memory:
there each record is read once, where every loader worker walks every shard's index.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Literal, get_args

from cycletune.data.caption_datasets import (
    CocoSource,
    HFDatasetSource,
    coco_captions,
    hf_dataset,
    hf_stream_shards,
)
from cycletune.data.shards import Shard
from cycletune.data.sources import (
    ImageFolderSource,
    ImageOnlySource,
    ShapesSource,
    SourceResult,
    SourceSettings,
    TextOnlySource,
    image_folder,
    image_only_folder,
    shapes,
    text_only_file,
)
from cycletune.data.tar_shards import WebDatasetSource, webdataset, webdataset_shards

# The data.<role> lists of the run config; training keeps only the side an unpaired role uses.
Role = Literal["paired", "image_only", "text_only", "validation"]
ROLES: tuple[Role, ...] = get_args(Role)


@dataclass(frozen=True)
class SourceType:
    settings: type[SourceSettings]
    # Called with the settings' fields (all but `type`) as keyword arguments.
    reader: Callable[..., SourceResult]
    roles: tuple[Role, ...]
    # The reader renders its images and takes the run's data.resolution as `resolution`.
    needs_resolution: bool = False
    # Called like `reader` (less the `streaming` switch) for a source that streams: its shards.
    sharder: Callable[..., list[Shard]] | None = None

    @property
    def name(self) -> str:
        """The YAML tag, as the settings class declares it (type: Literal["<name>"])."""
        (name,) = get_args(self.settings.model_fields["type"].annotation)
        return name

    def read(self, settings: SourceSettings, resolution: int) -> SourceResult:
        options = settings.model_dump(exclude={"type"})
        if self.needs_resolution:
            options["resolution"] = resolution
        return self.reader(**options)

    def shards(self, settings: SourceSettings) -> list[Shard]:
        """The shards of a source whose settings say it streams (settings.streamed())."""
        if self.sharder is None or not settings.streamed():
            raise ValueError(f"a {self.name} source with these settings is read in memory, not streamed")
        return self.sharder(**settings.model_dump(exclude={"type", "streaming"}))


# A paired source can feed every role (an unpaired role keeps only the side it uses); an unpaired one, its own.
SOURCE_TYPES: dict[str, SourceType] = {
    source.name: source
    for source in (
        SourceType(HFDatasetSource, hf_dataset, roles=ROLES, sharder=hf_stream_shards),
        SourceType(WebDatasetSource, webdataset, roles=ROLES, sharder=webdataset_shards),
        SourceType(ImageFolderSource, image_folder, roles=ROLES),
        SourceType(CocoSource, coco_captions, roles=ROLES),
        SourceType(ImageOnlySource, image_only_folder, roles=("image_only",)),
        SourceType(TextOnlySource, text_only_file, roles=("text_only",)),
        SourceType(ShapesSource, shapes, roles=ROLES, needs_resolution=True),
    )
}


def types_feeding(role: Role) -> list[str]:
    """The source types that can feed `role`, sorted."""
    return sorted(name for name, source in SOURCE_TYPES.items() if role in source.roles)
