"""Checkpoint folders: safetensors/JSON round trips, manifests, `latest` past damage, pruning, SIGTERM flag."""

from __future__ import annotations

import json
import logging
import os
import random
import signal
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from accelerate import Accelerator
from cycle_runs import tiny_config
from safetensors.torch import load_file

from cycletune.train import checkpoint as checkpoint_module
from cycletune.train.checkpoint import (
    CheckpointError,
    PreemptionSignal,
    TrainingParts,
    load_checkpoint,
    prune_checkpoints,
    resolve_resume,
    save_checkpoint,
)
from cycletune.train.config import Config
from cycletune.train.optimizer_state import load_optimizer_state, optimizer_state_file
from cycletune.train.run_dir import RunDir


class TwoLayers(torch.nn.Module):
    """A frozen base layer and a trainable head, like a base model with an adapter."""

    def __init__(self) -> None:
        super().__init__()
        self.base = torch.nn.Linear(4, 4).requires_grad_(False)
        self.head = torch.nn.Linear(4, 2)

    def forward(self, inputs: torch.Tensor) -> torch.Tensor:
        return self.head(self.base(inputs))


class Counter:
    """A stand-in trainer state: anything with state_dict / load_state_dict of JSON types."""

    def __init__(self) -> None:
        self.value = 0

    def state_dict(self) -> dict[str, Any]:
        return {"value": self.value}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.value = state["value"]


def _parts(seed: int = 0) -> TrainingParts:
    torch.manual_seed(seed)
    model = TwoLayers()
    optimizer = torch.optim.AdamW(model.head.parameters(), lr=0.1, betas=(0.8, 0.95))
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: 1 / (1 + step))
    return TrainingParts(
        {"captioner": (model, ["head.bias", "head.weight"])},
        {"captioner": optimizer},
        {"captioner": scheduler},
        Counter(),
    )


def _train(parts: TrainingParts, updates: int) -> None:
    (model, _), optimizer = parts.models["captioner"], parts.optimizers["captioner"]
    for _ in range(updates):
        model(torch.randn(3, 4)).sum().backward()
        optimizer.step()
        optimizer.zero_grad()
        parts.schedulers["captioner"].step()
        parts.trainer_state.value += 1


@pytest.fixture(scope="module")
def config(tiny_models) -> Config:
    return tiny_config(tiny_models)


def _save(parts: TrainingParts, output_dir: Path, step: int, config: Config) -> Path:
    return save_checkpoint(Accelerator(cpu=True), output_dir, step, parts, config)


def test_a_checkpoint_restores_weights_optimizer_schedule_state_and_every_rng(tmp_path: Path, config) -> None:
    saved = _parts()
    _train(saved, 3)
    folder = _save(saved, tmp_path, 3, config)
    assert folder == tmp_path / "checkpoint-3"
    names = sorted(path.name for path in folder.iterdir())
    assert all(name.endswith((".safetensors", ".json", ".yaml")) for name in names), names
    expected_next = (torch.rand(4), np.random.rand(), random.random())
    _train(saved, 2)  # the uninterrupted run goes on

    resumed = _parts()  # the same frozen base (rebuilt from the pretrained model in a real run) ...
    with torch.no_grad():
        resumed.models["captioner"][0].head.weight.add_(1.0)  # ... but other trained weights
    torch.manual_seed(99)  # and another RNG position
    load_checkpoint(Accelerator(cpu=True), folder, resumed)
    assert (torch.rand(4).tolist(), np.random.rand(), random.random()) == (
        expected_next[0].tolist(),
        *expected_next[1:],
    )
    _train(resumed, 2)  # repeats the uninterrupted run's last two updates, dropout-like draws included
    (saved_model, _), (resumed_model, _) = saved.models["captioner"], resumed.models["captioner"]
    assert torch.equal(saved_model.head.weight, resumed_model.head.weight)
    assert set(load_file(folder / "captioner_trainable.safetensors")) == {"head.bias", "head.weight"}
    assert resumed.trainer_state.value == 5
    assert resumed.schedulers["captioner"].get_last_lr() == saved.schedulers["captioner"].get_last_lr()
    assert resumed.optimizers["captioner"].param_groups[0]["betas"] == (0.8, 0.95)


def test_latest_passes_over_damaged_checkpoints_and_names_the_bad_file(
    tmp_path: Path, config, caplog: pytest.LogCaptureFixture
) -> None:
    parts = _parts()
    for step in (2, 4, 6):
        _train(parts, 2)
        _save(parts, tmp_path, step, config)
    weights = tmp_path / "checkpoint-6" / "captioner_trainable.safetensors"
    weights.write_bytes(weights.read_bytes()[:-10])  # truncated
    flipped = tmp_path / "checkpoint-4" / "optimizer_captioner.safetensors"
    data = bytearray(flipped.read_bytes())
    data[-1] ^= 1  # same size, one bit changed
    flipped.write_bytes(bytes(data))
    with caplog.at_level(logging.WARNING):
        assert resolve_resume(tmp_path, "latest") == tmp_path / "checkpoint-2"
    assert str(weights) in caplog.text and "truncated" in caplog.text
    assert str(flipped) in caplog.text and "SHA-256" in caplog.text

    with pytest.raises(CheckpointError) as error:
        resolve_resume(tmp_path, str(tmp_path / "checkpoint-6"))
    assert str(weights) in str(error.value) and str(tmp_path / "checkpoint-2") in str(error.value)


def test_a_crash_during_save_leaves_nothing_that_latest_would_pick(
    tmp_path: Path, config, monkeypatch: pytest.MonkeyPatch
) -> None:
    parts = _parts()
    _save(parts, tmp_path, 2, config)

    def lose_power(*args: Any) -> None:
        raise RuntimeError("node lost power")

    monkeypatch.setattr(checkpoint_module, "write_manifest", lose_power)
    with pytest.raises(RuntimeError, match="node lost power"):
        _save(parts, tmp_path, 4, config)
    assert (tmp_path / ".tmp-checkpoint-4" / "captioner_trainable.safetensors").exists()
    assert [step for step, _ in RunDir(tmp_path).checkpoints()] == [2]
    assert resolve_resume(tmp_path, "latest") == tmp_path / "checkpoint-2"


def test_a_folder_without_a_manifest_is_refused_and_pickles_are_never_loaded(tmp_path: Path, config) -> None:
    """An accelerate-style folder (pickled RNG and custom state) is named as such, never unpickled."""
    folder = tmp_path / "checkpoint-8"
    folder.mkdir()
    (folder / "custom_checkpoint_0.pkl").write_bytes(b"not read")
    (folder / "trainer_state.json").write_text("{}")
    assert resolve_resume(tmp_path, "latest") is None
    with pytest.raises(CheckpointError, match=r"no manifest.json.*custom_checkpoint_0.pkl.*never loaded"):
        resolve_resume(tmp_path, str(folder))


def test_pruning_keeps_the_newest(tmp_path: Path) -> None:
    for step in (100, 20, 300, 40):
        (tmp_path / f"checkpoint-{step}").mkdir()
    removed = prune_checkpoints(tmp_path, 2)
    assert sorted(path.name for path in removed) == ["checkpoint-20", "checkpoint-40"]
    assert [step for step, _ in RunDir(tmp_path).checkpoints()] == [100, 300]
    assert prune_checkpoints(tmp_path, None) == []


def test_sigterm_sets_the_flag() -> None:
    previous = signal.getsignal(signal.SIGTERM)
    try:
        preemption = PreemptionSignal()
        assert not preemption.received
        os.kill(os.getpid(), signal.SIGTERM)
        assert preemption.received
    finally:
        signal.signal(signal.SIGTERM, previous)


def test_manifest_lists_every_file_with_size_and_checksum(tmp_path: Path, config) -> None:
    folder = _save(_parts(), tmp_path, 1, config)
    manifest = json.loads((folder / "manifest.json").read_text())
    on_disk = {path.name for path in folder.iterdir()} - {"manifest.json"}
    assert set(manifest["files"]) == on_disk
    assert all(entry["bytes"] == (folder / name).stat().st_size for name, entry in manifest["files"].items())


def test_the_runs_config_chooses_the_optimizer_kernel_over_the_checkpoints(tmp_path: Path) -> None:
    """A checkpoint written with fused=False resumes fused when the config now says so (and its state)."""
    weight = torch.nn.Parameter(torch.ones(3))
    saved_with = torch.optim.AdamW([weight], lr=0.1, fused=False)
    weight.grad = torch.ones(3)
    saved_with.step()
    optimizer_state_file(saved_with).save(tmp_path / "optimizer.safetensors")
    resumed = torch.optim.AdamW([weight], lr=0.1, fused=True)
    load_optimizer_state(resumed, tmp_path / "optimizer.safetensors")
    assert resumed.param_groups[0]["fused"] is True
    assert torch.equal(resumed.state[weight]["exp_avg"], saved_with.state[weight]["exp_avg"])
