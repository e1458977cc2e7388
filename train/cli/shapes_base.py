"""What the shapes-world studies (make demo, experiment, reward-learning, scaling) share: the committed base
models they start from, the config they train with, and the arguments that name them."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from cycletune.train.config import load_config
from cycletune.train.inference import ModelSources
from cycletune.train.run_dir import RunDir

DEFAULT_CONFIG = Path("configs/shapes.yaml")
DEFAULT_BASE = Path("pretrained/shapes-base")


def add_base_arguments(parser: argparse.ArgumentParser, *, config_help: str, out: Path) -> None:
    """--config, --base and --out (the study's runs and scores)."""
    parser.add_argument("--config", type=Path, default=DEFAULT_CONFIG, help=config_help)
    parser.add_argument("--base", type=Path, default=DEFAULT_BASE, help="folder with captioner/, generator/")
    parser.add_argument("--out", type=Path, default=out, help="runs and scores")


def base_is_missing(base: Path) -> bool:
    """True, after saying what is missing, when `base` lacks the captioner/ or generator/ a study trains
    from: nothing should start training then."""
    missing = [part for part in ("captioner", "generator") if not (base / part).is_dir()]
    if missing:
        print(f"error: {base} has no {', '.join(missing)}/: run `make base` first", file=sys.stderr)
    return bool(missing)


def base_model_overrides(base: Path) -> list[str]:
    """Config overrides that start both models from the base folder's captioner/ and generator/."""
    return [f"{role}.pretrained_model_name_or_path={base / role}" for role in ("captioner", "generator")]


def trained_arm(run_dir: Path) -> ModelSources:
    """A finished arm's models: its exported adapters on the base models its saved config names."""
    run = RunDir(run_dir)
    return ModelSources(checkpoint=run.export_dir, config=load_config(run.config_file))
