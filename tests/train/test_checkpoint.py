"""Checkpoint folders: atomic saves, `latest`, pruning, trainable-only weights, SIGTERM flag."""

from __future__ import annotations

import os
import signal
from pathlib import Path

import pytest
import torch
from accelerate import Accelerator

from train.checkpoint import (
    COMPLETE_MARKER,
    PreemptionSignal,
    TrainableWeights,
    list_checkpoints,
    prune_checkpoints,
    resolve_resume,
    save_checkpoint,
)


class TwoLayers(torch.nn.Module):
    """A frozen base layer and a trainable head, like a base model with an adapter."""

    def __init__(self) -> None:
        super().__init__()
        self.base = torch.nn.Linear(4, 4).requires_grad_(False)
        self.head = torch.nn.Linear(4, 2)

    def forward(self, inputs: torch.Tensor) -> torch.Tensor:
        return self.head(self.base(inputs))


def _prepared(tmp_path: Path) -> tuple[Accelerator, TwoLayers, torch.optim.Optimizer]:
    accelerator = Accelerator(cpu=True)
    torch.manual_seed(0)
    model = TwoLayers()
    TrainableWeights(accelerator, {"captioner": (model, ["head.bias", "head.weight"])})
    optimizer = torch.optim.AdamW(model.head.parameters(), lr=0.1)
    prepared_model, optimizer = accelerator.prepare(model, optimizer)
    model(torch.randn(3, 4)).sum().backward()
    optimizer.step()
    return accelerator, prepared_model, optimizer


def _fake_checkpoint(output_dir: Path, step: int, complete: bool = True) -> Path:
    folder = output_dir / f"checkpoint-{step}"
    folder.mkdir(parents=True)
    if complete:
        (folder / COMPLETE_MARKER).write_text("{}")
    return folder


def test_save_writes_only_trainable_weights_and_restores_them(tmp_path: Path) -> None:
    accelerator, model, _ = _prepared(tmp_path)
    saved_head = model.head.weight.detach().clone()
    folder = save_checkpoint(accelerator, tmp_path, 3, "config: here", '{"step": 3}')
    assert folder == tmp_path / "checkpoint-3"
    assert (folder / "captioner_trainable.safetensors").is_file()
    assert not list(folder.glob("model*.safetensors")), "frozen base weights must not be checkpointed"
    assert (folder / "config.yaml").read_text() == "config: here"
    base_before = model.base.weight.detach().clone()
    with torch.no_grad():
        model.head.weight.add_(1.0)
    accelerator.load_state(str(folder))
    assert torch.equal(model.head.weight, saved_head)
    assert torch.equal(model.base.weight, base_before)


def test_crash_during_save_leaves_nothing_that_latest_would_pick(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    accelerator, _, _ = _prepared(tmp_path)
    save_checkpoint(accelerator, tmp_path, 2, "config", "{}")

    def crash_mid_write(output_dir: str) -> None:
        (Path(output_dir) / "optimizer.bin").write_bytes(b"half")
        raise RuntimeError("node lost power")

    monkeypatch.setattr(accelerator, "save_state", crash_mid_write)
    with pytest.raises(RuntimeError, match="node lost power"):
        save_checkpoint(accelerator, tmp_path, 4, "config", "{}")
    assert (tmp_path / ".tmp-checkpoint-4" / "optimizer.bin").exists()
    assert [step for step, _ in list_checkpoints(tmp_path)] == [2]
    assert resolve_resume(tmp_path, "latest") == tmp_path / "checkpoint-2"


def test_latest_ignores_incomplete_and_foreign_folders(tmp_path: Path) -> None:
    assert resolve_resume(tmp_path, "latest") is None
    _fake_checkpoint(tmp_path, 5)
    _fake_checkpoint(tmp_path, 10)
    _fake_checkpoint(tmp_path, 20, complete=False)
    (tmp_path / "checkpoint-final").mkdir()
    assert resolve_resume(tmp_path, "latest") == tmp_path / "checkpoint-10"
    assert resolve_resume(tmp_path, str(tmp_path / "checkpoint-5")) == tmp_path / "checkpoint-5"
    assert resolve_resume(tmp_path, None) is None
    with pytest.raises(FileNotFoundError, match="checkpoint-20 is not a complete checkpoint"):
        resolve_resume(tmp_path, str(tmp_path / "checkpoint-20"))


def test_pruning_keeps_the_newest(tmp_path: Path) -> None:
    for step in (100, 20, 300, 40):
        _fake_checkpoint(tmp_path, step)
    removed = prune_checkpoints(tmp_path, 2)
    assert sorted(path.name for path in removed) == ["checkpoint-20", "checkpoint-40"]
    assert [step for step, _ in list_checkpoints(tmp_path)] == [100, 300]
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
