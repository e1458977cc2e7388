"""Shared fixtures: offline caches inside the session's temp folder and tiny models built once per session."""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

import pytest


def pytest_configure(config: pytest.Config) -> None:
    """Keep every cache and tracker inside the test session, and never reach for a hub."""
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
    os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
    os.environ.setdefault("WANDB_MODE", "offline")
    os.environ.setdefault("WANDB_SILENT", "true")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


@pytest.fixture(autouse=True, scope="session")
def _isolated_caches(tmp_path_factory: pytest.TempPathFactory) -> None:
    root = tmp_path_factory.mktemp("caches")
    for var in ("HF_HOME", "WANDB_DIR", "TORCH_HOME", "MPLCONFIGDIR"):
        os.environ[var] = str(root / var.lower())


@dataclass(frozen=True)
class TinyModels:
    """Folders holding random-init models in the standard Hugging Face / diffusers layouts."""

    captioner: Path
    generator: Path
    pixel_generator: Path


@pytest.fixture(scope="session")
def tiny_models(tmp_path_factory: pytest.TempPathFactory) -> TinyModels:
    from models.tiny import save_tiny_captioner, save_tiny_generator

    root = tmp_path_factory.mktemp("tiny_models")
    return TinyModels(
        captioner=save_tiny_captioner(root / "captioner"),
        generator=save_tiny_generator(root / "generator"),
        pixel_generator=save_tiny_generator(root / "pixel_generator", with_vae=False),
    )
