"""check_model_sources: both models' sources checked from the config, and through the real entry point."""

from __future__ import annotations

from pathlib import Path

import pytest
from cycle_runs import REPO, run_cycle, tiny_config, tiny_overrides

from cycletune.train.config import ConfigError, check_model_sources, load_config


def test_sources_of_the_tiny_models_pass(tiny_models) -> None:
    check_model_sources(tiny_config(tiny_models))


def test_a_missing_generator_folder_is_a_config_error_naming_key_and_path(
    tiny_models, tmp_path: Path
) -> None:
    missing = tmp_path / "generator"
    config = tiny_config(tiny_models, f"generator.pretrained_model_name_or_path={missing}")
    with pytest.raises(
        ConfigError, match=f"^generator.pretrained_model_name_or_path: model folder {missing} "
    ):
        check_model_sources(config)


def test_configs_tiny_defaults_say_make_tiny(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.chdir(tmp_path)  # where runs/tiny-models does not exist
    config = load_config(REPO / "configs" / "tiny.yaml")
    with pytest.raises(ConfigError, match=r"^captioner.pretrained_model_name_or_path: .*`make tiny`"):
        check_model_sources(config)


@pytest.mark.slow
def test_the_trainer_stops_with_one_line_naming_key_and_path(tiny_models, tmp_path: Path) -> None:
    missing = tmp_path / "no-such" / "captioner"
    overrides = [
        *tiny_overrides(tiny_models, tmp_path / "out"),
        f"captioner.pretrained_model_name_or_path={missing}",
    ]
    result = run_cycle(overrides, check=False)
    assert result.returncode == 2, result.stderr[-3000:]
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert lines == [f"error: captioner.pretrained_model_name_or_path: model folder {missing} does not exist"]
