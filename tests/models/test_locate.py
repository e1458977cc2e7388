"""Model sources are checked before loading: a missing folder or an uncached hub id offline fails in one line
that names the config key and the path."""

from __future__ import annotations

from pathlib import Path

import pytest

from cycletune.models.locate import ModelSourceError, locate_model, looks_local

KEY = "captioner.pretrained_model_name_or_path"


@pytest.mark.parametrize(
    ("name", "local"),
    [
        ("Salesforce/blip-image-captioning-base", False),
        ("gpt2", False),
        ("runs/tiny-models/captioner", True),
        ("./captioner", True),
        ("~/models/captioner", True),
        ("/abs/captioner", True),
        ("C:\\models\\captioner", True),
        ("tiny-models/captioner", False),  # org/name-shaped: a hub id unless such a folder exists
    ],
)
def test_hub_ids_and_local_paths_are_told_apart(name: str, local: bool) -> None:
    assert looks_local(name) is local


def test_an_existing_folder_passes_and_an_org_name_shaped_folder_counts_as_local(
    tiny_models, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    assert locate_model(str(tiny_models.captioner), key=KEY, marker="config.json") == str(
        tiny_models.captioner
    )
    (tmp_path / "tiny-models" / "captioner").mkdir(parents=True)
    monkeypatch.chdir(tmp_path)
    assert looks_local("tiny-models/captioner")
    with pytest.raises(ModelSourceError, match=f"^{KEY}: folder tiny-models/captioner has no config.json"):
        locate_model("tiny-models/captioner", key=KEY, marker="config.json")


def test_a_missing_local_folder_names_the_key_and_the_path(tmp_path: Path) -> None:
    missing = tmp_path / "nowhere" / "captioner"
    with pytest.raises(ModelSourceError) as error:
        locate_model(str(missing), key=KEY, marker="config.json")
    assert str(error.value) == f"{KEY}: model folder {missing} does not exist"


def test_the_tiny_default_says_to_make_the_tiny_models(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.chdir(tmp_path)
    with pytest.raises(ModelSourceError, match=r"runs/tiny-models/generator does not exist; .*`make tiny`"):
        locate_model("runs/tiny-models/generator", key="generator.x", marker="model_index.json")


@pytest.mark.parametrize("flag", ["HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE"])
@pytest.mark.parametrize("name", ["tiny-models/captioner", "cycletune-test/not-cached"])
def test_an_uncached_hub_id_offline_names_the_key_the_path_and_offline(
    name: str, flag: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A typo'd relative folder shaped like org/name is looked up in the (empty, per-session) cache."""
    monkeypatch.chdir(tmp_path)
    for variable in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE"):
        monkeypatch.delenv(variable, raising=False)
    monkeypatch.setenv(flag, "1")
    with pytest.raises(ModelSourceError) as error:
        locate_model(name, key=KEY, marker="config.json")
    message = str(error.value)
    assert message.startswith(f"{KEY}: {name} is not a local folder") and "this machine is offline" in message
    assert "\n" not in message
