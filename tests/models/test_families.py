"""The family registry: every family's tiny model is recognised back, others are refused by name, and the
builders load with the wrapper the registry names."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import pytest
from cycle_runs import tiny_config

from cycletune.models import families
from cycletune.models.captioner import Captioner
from cycletune.models.families import (
    CAPTIONERS,
    GENERATORS,
    UnsupportedFamilyError,
    captioner_family,
    generator_family,
)
from cycletune.models.generator import Generator
from cycletune.train.builders import build_captioner, build_generator


@pytest.mark.parametrize("family", CAPTIONERS, ids=lambda family: family.name)
def test_each_captioner_familys_tiny_model_is_recognised_and_loads(tmp_path: Path, family) -> None:
    folder = family.save_tiny(tmp_path / family.name)
    assert captioner_family(str(folder)) is family
    assert isinstance(family.wrapper.from_pretrained(str(folder)), family.wrapper)


@pytest.mark.parametrize("family", GENERATORS, ids=lambda family: family.name)
def test_each_generator_familys_tiny_model_is_recognised_and_loads(tmp_path: Path, family) -> None:
    folder = family.save_tiny(tmp_path / family.name)
    assert generator_family(str(folder)) is family
    assert isinstance(family.wrapper.from_pretrained(str(folder)), family.wrapper)


def test_family_names_are_unique() -> None:
    names = [family.name for family in (*CAPTIONERS, *GENERATORS)]
    assert len(names) == len(set(names))


def test_an_unknown_model_type_is_refused_naming_folder_type_and_supported_families(tmp_path: Path) -> None:
    from transformers import PaliGemmaConfig

    PaliGemmaConfig().save_pretrained(tmp_path)
    with pytest.raises(UnsupportedFamilyError) as refused:
        captioner_family(str(tmp_path))
    message = str(refused.value)
    assert str(tmp_path) in message and "model_type 'paligemma'" in message
    assert all(family.name in message for family in CAPTIONERS)


def test_an_unknown_pipeline_class_is_refused(tiny_models, tmp_path: Path) -> None:
    index = json.loads((tiny_models.generator / "model_index.json").read_text())
    (tmp_path / "model_index.json").write_text(json.dumps(index | {"_class_name": "KandinskyV22Pipeline"}))
    with pytest.raises(
        UnsupportedFamilyError,
        match=r"_class_name 'KandinskyV22Pipeline'.*sd \(model_index.json _class_name 'StableDiffusionPipeline'\)",
    ):
        generator_family(str(tmp_path))


def test_a_hub_id_is_recognised_from_its_downloaded_root_config(tiny_models, monkeypatch) -> None:
    asked = []

    def download(repo_id: str, filename: str, **options: object) -> str:
        asked.append((repo_id, filename, options["revision"]))
        return str(tiny_models.captioner / filename)

    monkeypatch.setattr(families, "hf_hub_download", download)
    assert captioner_family("org/captioner", revision="v1") is CAPTIONERS[0]
    assert asked == [("org/captioner", "config.json", "v1")]


class _RegisteredCaptioner(Captioner):
    """A wrapper that only a patched registry names, so a build that returns one asked the registry."""


class _RegisteredGenerator(Generator):
    """A wrapper that only a patched registry names, so a build that returns one asked the registry."""


def test_builders_load_with_the_wrapper_the_registry_names(tiny_models, monkeypatch) -> None:
    monkeypatch.setattr(
        families, "CAPTIONERS", (dataclasses.replace(CAPTIONERS[0], wrapper=_RegisteredCaptioner),)
    )
    monkeypatch.setattr(
        families, "GENERATORS", (dataclasses.replace(GENERATORS[0], wrapper=_RegisteredGenerator),)
    )
    config = tiny_config(tiny_models)
    assert type(build_captioner(config.captioner)[0]) is _RegisteredCaptioner
    assert type(build_generator(config.generator)[0]) is _RegisteredGenerator


def test_builders_refuse_a_model_of_no_registered_family(tiny_models, monkeypatch) -> None:
    monkeypatch.setattr(families, "CAPTIONERS", ())
    with pytest.raises(UnsupportedFamilyError, match="not a supported captioner family"):
        build_captioner(tiny_config(tiny_models).captioner)
