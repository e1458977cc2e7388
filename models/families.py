"""The model families CycleTune trains, each declared once: its wrapper, how its folders are recognised, its
tiny random-init stand-in.

A family is recognised from the file at a model's root that names its architecture (transformers'
config.json `model_type`, diffusers' model_index.json `_class_name`), read before any weights load, so an
unsupported model fails with one message naming the folder, what it holds and the families supported. A new
captioner family is one more spec in models/captioners/ (the Captioner wrapper drives them all); a new
generator family one more spec in models/generators/ (the Generator wrapper drives them all).
"""

from __future__ import annotations

import json
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Generic, TypeVar

from huggingface_hub import hf_hub_download

from cycletune.models.captioner import Captioner
from cycletune.models.captioners import SPECS
from cycletune.models.forward_routing import RunsInForward
from cycletune.models.generator import Generator
from cycletune.models.generators import SPECS as GENERATOR_SPECS
from cycletune.models.locate import hub_offline
from cycletune.models.tiny import TINY_GENERATORS

Wrapper = TypeVar("Wrapper", bound=RunsInForward)


class UnsupportedFamilyError(ValueError):
    """A model whose root config names no registered family; the message says what it names instead."""


@dataclass(frozen=True)
class RootField:
    """The field of the config file at a model's root whose value names the model's architecture."""

    file: str
    key: str


MODEL_TYPE = RootField("config.json", "model_type")  # transformers models
PIPELINE_CLASS = RootField("model_index.json", "_class_name")  # diffusers pipelines


@dataclass(frozen=True)
class Family(Generic[Wrapper]):
    """One architecture: its name, the wrapper whose from_pretrained loads it, the root-config field and
    values that identify it, and the function that saves a tiny random-init one (tests, the bench)."""

    name: str
    wrapper: type[Wrapper]
    field: RootField
    values: tuple[str, ...]
    save_tiny: Callable[..., Path]

    def describe(self) -> str:
        values = " or ".join(repr(value) for value in self.values)
        return f"{self.name} ({self.field.file} {self.field.key} {values})"


CAPTIONERS: tuple[Family[Captioner], ...] = tuple(
    Family(spec.name, Captioner, MODEL_TYPE, spec.model_types, spec.save_tiny) for spec in SPECS
)
GENERATORS: tuple[Family[Generator], ...] = tuple(
    Family(spec.name, Generator, PIPELINE_CLASS, spec.pipeline_class_names, TINY_GENERATORS[spec.name])
    for spec in GENERATOR_SPECS
)


def captioner_family(name_or_path: str, *, revision: str | None = None) -> Family[Captioner]:
    """The captioner family of a hub id or local folder; UnsupportedFamilyError when none matches."""
    return _recognise(name_or_path, "captioner", CAPTIONERS, revision)


def generator_family(name_or_path: str, *, revision: str | None = None) -> Family[Generator]:
    """The generator family of a hub id or local folder; UnsupportedFamilyError when none matches."""
    return _recognise(name_or_path, "generator", GENERATORS, revision)


def _recognise(
    name_or_path: str, role: str, families: Sequence[Family[Wrapper]], revision: str | None
) -> Family[Wrapper]:
    configs: dict[str, dict] = {}
    for family in families:
        if family.field.file not in configs:
            configs[family.field.file] = _root_config(name_or_path, family.field.file, revision)
        if configs[family.field.file].get(family.field.key) in family.values:
            return family
    fields = dict.fromkeys(family.field for family in families)
    found = ", ".join(f"{field.file} {field.key} {configs[field.file].get(field.key)!r}" for field in fields)
    supported = "; ".join(family.describe() for family in families)
    raise UnsupportedFamilyError(
        f"{role} {name_or_path} has {found}, which is not a supported {role} family; supported: {supported}"
    )


def _root_config(name_or_path: str, filename: str, revision: str | None) -> dict:
    """A model's root config file as a dict, from the folder or the Hugging Face Hub (or its local cache)."""
    folder = Path(name_or_path).expanduser()
    if folder.is_dir():
        path = folder / filename
    else:
        path = Path(
            hf_hub_download(name_or_path, filename, revision=revision, local_files_only=hub_offline())
        )
    return json.loads(path.read_text(encoding="utf-8"))
