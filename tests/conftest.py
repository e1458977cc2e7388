"""Shared fixtures: offline caches inside the session's temp folder, one torch thread, and tiny models built once
per session and loaded fresh (to train) or frozen and shared by a module (as read-only partners)."""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import pytest

if TYPE_CHECKING:
    from cycletune.models.captioner import Captioner
    from cycletune.models.generator import Generator


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


@pytest.fixture(autouse=True, scope="session")
def _one_thread() -> None:
    """Tiny models run several times faster on one thread than on two cores shared with other processes."""
    import torch

    torch.set_num_threads(1)


@dataclass(frozen=True)
class TinyModels:
    """Folders holding random-init models in the standard Hugging Face / diffusers layouts."""

    captioner: Path
    generator: Path
    pixel_generator: Path


@pytest.fixture(scope="session")
def tiny_models(tmp_path_factory: pytest.TempPathFactory) -> TinyModels:
    from cycletune.models.captioners.blip import BlipSpec
    from cycletune.models.tiny import save_tiny_generator

    root = tmp_path_factory.mktemp("tiny_models")
    return TinyModels(
        captioner=BlipSpec.save_tiny(root / "captioner"),
        generator=save_tiny_generator(root / "generator"),
        pixel_generator=save_tiny_generator(root / "pixel_generator", with_vae=False),
    )


@pytest.fixture
def captioner(tiny_models: TinyModels) -> Captioner:
    """A fresh copy per test, so tests that train or edit weights leak nothing into others."""
    from cycletune.models.captioner import Captioner

    return Captioner.from_pretrained(str(tiny_models.captioner)).eval()


@pytest.fixture
def generator(tiny_models: TinyModels) -> Generator:
    """A fresh copy per test, so tests that train or edit weights leak nothing into others."""
    from cycletune.models.generator import Generator

    return Generator.from_pretrained(str(tiny_models.generator))


@pytest.fixture(scope="module")
def frozen_captioner(tiny_models: TinyModels) -> Captioner:
    """Frozen as the trainer freezes the partner (gradients pass through, none land); a module's tests share it."""
    from cycletune.models.captioner import Captioner

    return Captioner.from_pretrained(str(tiny_models.captioner)).requires_grad_(False).eval()


@pytest.fixture(scope="module")
def frozen_generator(tiny_models: TinyModels) -> Generator:
    """Frozen as the trainer freezes the partner (gradients pass through, none land); a module's tests share it."""
    from cycletune.models.generator import Generator

    return Generator.from_pretrained(str(tiny_models.generator)).requires_grad_(False)
