"""An export made in one folder works from any other: absolute base paths in the run's config, the adapter
config and the model cards; cards that follow the Hub's conventions and whose snippets run as written."""

from __future__ import annotations

import argparse
import re
from pathlib import Path

import pytest
import yaml
from cycle_runs import REPO, run_recipe_in_process
from huggingface_hub import ModelCard
from peft import AutoPeftModel

from cycletune.train.inference import add_model_arguments, model_sources
from cycletune.train.run_dir import CONFIG_FILE

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def export_from_elsewhere(tiny_models, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A two-update run started in its own folder, with the base models given as relative paths there."""
    workdir = tmp_path_factory.mktemp("workdir")
    (workdir / "models").mkdir()
    for part in ("captioner", "generator"):
        (workdir / "models" / part).symlink_to(getattr(tiny_models, part))
    with pytest.MonkeyPatch.context() as patch:
        patch.chdir(workdir)
        overrides = [
            *("--output_dir", "run"),  # a config key as a flag, as diffusers' scripts take it
            "captioner.pretrained_model_name_or_path=models/captioner",
            "generator.pretrained_model_name_or_path=models/generator",
            "train.max_train_steps=2",
            "train.checkpointing_steps=2",
            "train.validation_steps=null",
        ]
        assert run_recipe_in_process(["--config", str(REPO / "configs" / "tiny.yaml"), *overrides]) == 0
    return workdir / "run"


def test_local_base_paths_are_written_absolute(export_from_elsewhere: Path) -> None:
    config = yaml.safe_load((export_from_elsewhere / CONFIG_FILE).read_text())
    for part in ("captioner", "generator"):
        assert Path(config[part]["pretrained_model_name_or_path"]).is_absolute()
    adapter = (export_from_elsewhere / "export" / "captioner" / "adapter_config.json").read_text()
    assert str(export_from_elsewhere.parent / "models" / "captioner") in adapter


@pytest.mark.parametrize(
    ("part", "library", "pipeline_tag"),
    [("captioner", "peft", "image-to-text"), ("generator", "diffusers", "text-to-image")],
)
def test_model_cards_carry_hub_metadata_and_snippets_that_run_from_another_folder(
    export_from_elsewhere: Path,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    part: str,
    library: str,
    pipeline_tag: str,
) -> None:
    card = ModelCard.load(export_from_elsewhere / "export" / part / "README.md")
    assert card.data.library_name == library and card.data.pipeline_tag == pipeline_tag
    assert {"lora", "cycletune"} <= set(card.data.tags) and card.data.license
    assert Path(card.data.base_model).is_absolute()
    command = re.search(r"```bash\n(.+?)\n```", card.text, re.DOTALL).group(1)
    assert command.startswith("accelerate launch train/cycle.py --config ")
    snippet = re.search(r"```python\n(.+?)\n```", card.text, re.DOTALL).group(1)
    monkeypatch.chdir(tmp_path)
    namespace: dict = {}
    exec(snippet, namespace)  # the card's own imports and paths, from an unrelated folder
    assert ("model" if part == "captioner" else "pipe") in namespace


def test_the_export_loads_from_another_folder_through_peft_and_checkpoint(
    export_from_elsewhere: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.chdir(tmp_path)
    export = export_from_elsewhere / "export"
    assert AutoPeftModel.from_pretrained(str(export / "captioner")) is not None
    parser = argparse.ArgumentParser()
    add_model_arguments(parser)
    captioner, generator = model_sources(parser.parse_args(["--checkpoint", str(export)])).load()
    assert captioner.has_adapters and generator is not None
