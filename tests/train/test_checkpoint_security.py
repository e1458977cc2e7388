"""A planted pickle never runs: the trainer and every CLI that takes --checkpoint refuse it, naming the file.

Each case plants a payload that would create a marker file if it were unpickled, under a name the tool
reads. The manifest is rewritten to match, as an attacker with write access to the run folder could, so the
refusal must come from the loaders never unpickling, not only from the checksums.
"""

from __future__ import annotations

import json
import pickle
import shutil
from collections.abc import Callable
from pathlib import Path

import pytest
import torch
from cycle_runs import run_cycle, run_recipe_in_process, tiny_overrides

from cycletune.data.shapes import all_scenes, render
from cycletune.train.cli import evaluate, export, generate, rerank
from cycletune.train.manifest import MANIFEST_NAME, write_manifest

pytestmark = pytest.mark.slow

# What the trainer reads back on resume, and files of the formats other trainers pickle (never read).
TRAINER_READS = [
    "manifest.json",
    "config.yaml",
    "trainer_state.json",
    "captioner_trainable.safetensors",
    "generator_trainable.safetensors",
    "optimizer_captioner.safetensors",
    "optimizer_generator.safetensors",
    "lr_scheduler_captioner.json",
    "lr_scheduler_generator.json",
    "rng_state_0.safetensors",
]
NEVER_READ = ["custom_checkpoint_0.pkl", "random_states_0.pkl", "optimizer.bin", "scheduler.bin"]
# What the CLIs read from a checkpoint-N folder and from an export folder (and the run's config beside it).
CHECKPOINT_READS = ["manifest.json", "config.yaml", "captioner_trainable.safetensors"]
EXPORT_READS = [
    "captioner/adapter_config.json",
    "captioner/adapter_model.safetensors",
    "generator/pytorch_lora_weights.safetensors",
    "config.yaml",
]


class Payload:
    """Unpickling this creates `marker`: the stand-in for arbitrary code."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self) -> tuple[Callable, tuple[str, str]]:
        return (open, (str(self.marker), "w"))


@pytest.fixture(scope="module")
def trained_run(tiny_models, tmp_path_factory: pytest.TempPathFactory) -> Path:
    output_dir = tmp_path_factory.mktemp("planted") / "run"
    run_cycle(
        [*tiny_overrides(tiny_models, output_dir), "train.max_train_steps=2", "train.checkpointing_steps=2"]
    )
    return output_dir


def _plant(run: Path, tmp_path: Path, name: str, *, torch_format: bool = False) -> tuple[Path, Path]:
    """A copy of the run with a payload under `name` (relative to the checkpoint or export folder's parent)."""
    copy = tmp_path / "run"
    shutil.copytree(run, copy)
    marker = tmp_path / "code-ran"
    target = copy / name
    target.parent.mkdir(parents=True, exist_ok=True)
    if torch_format:
        torch.save(Payload(marker), target)
    else:
        target.write_bytes(pickle.dumps(Payload(marker)))
    checkpoint = copy / "checkpoint-2"
    if target.parent == checkpoint and target.name != MANIFEST_NAME:
        required = json.loads((checkpoint / MANIFEST_NAME).read_text())["required"]
        write_manifest(checkpoint, required)  # the attacker re-signs the folder
    return copy, marker


def _resume(argv: list[str]) -> int:
    """Resume the recipe from the planted folder, as `python train/cycle.py` does."""
    return run_recipe_in_process([*argv, "train.max_train_steps=4", "train.resume_from_checkpoint=latest"])


@pytest.mark.parametrize("name", TRAINER_READS)
def test_resume_refuses_a_planted_pickle_naming_the_file(
    trained_run: Path, tmp_path: Path, tiny_models, name: str, capsys: pytest.CaptureFixture[str]
) -> None:
    run, marker = _plant(trained_run, tmp_path, f"checkpoint-2/{name}")
    argv = ["--config", str(run / "config.yaml"), *tiny_overrides(tiny_models, run)]
    code = _resume(argv)
    error = capsys.readouterr().err
    assert not marker.exists(), "the payload ran"
    if name == "manifest.json":  # no valid manifest: `latest` passes the folder over and starts afresh
        assert code == 0
        return
    assert code == 2 and name in error, error


def test_resume_never_reads_pickles_of_other_formats(trained_run: Path, tmp_path: Path, tiny_models) -> None:
    run, marker = _plant(trained_run, tmp_path, f"checkpoint-2/{NEVER_READ[0]}")
    for name in NEVER_READ[1:]:
        torch.save(Payload(marker), run / "checkpoint-2" / name)
    write_manifest(
        run / "checkpoint-2", json.loads((run / "checkpoint-2" / MANIFEST_NAME).read_text())["required"]
    )
    argv = ["--config", str(run / "config.yaml"), *tiny_overrides(tiny_models, run)]
    assert _resume(argv) == 0
    assert not marker.exists(), "the payload ran"
    assert (run / "checkpoint-4").is_dir()


def _cli_calls(folder: Path, tmp_path: Path, part: str = "generator") -> dict[str, Callable[[], int]]:
    """generate, rerank and evaluate on `folder`, in the direction that loads `part` (evaluate loads both)."""
    out = tmp_path / "out"
    if part == "captioner":
        images = tmp_path / "images"
        images.mkdir(exist_ok=True)
        render(all_scenes()[0], 32).save(images / "shape.png")
        mode, inputs = "captions", ["--images", str(images)]
    else:
        prompts = tmp_path / "prompts.txt"
        prompts.write_text("a red circle\n")
        mode, inputs = "images", ["--prompts", str(prompts), "--inference-steps", "1"]
    common = ["--checkpoint", str(folder), *inputs]
    return {
        "generate": lambda: generate.main([mode, *common, "--out", str(out / "generated")]),
        "rerank": lambda: rerank.main([mode, *common, "--out", str(out / "ranked")]),
        "evaluate": lambda: evaluate.main(
            ["--checkpoint", str(folder), "--limit", "1", "--out", str(out / "m.json")]
        ),
    }


@pytest.mark.parametrize("name", CHECKPOINT_READS)
def test_every_cli_refuses_a_planted_pickle_in_a_checkpoint_folder(
    trained_run: Path, tmp_path: Path, name: str, capsys: pytest.CaptureFixture[str]
) -> None:
    run, marker = _plant(trained_run, tmp_path, f"checkpoint-2/{name}")
    folder = run / "checkpoint-2"
    calls = {
        "export": lambda: export.main(["--checkpoint", str(folder), "--out", str(tmp_path / "out")]),
        **_cli_calls(folder, tmp_path),
    }
    for tool, call in calls.items():
        assert call() == 2, tool
        assert name in capsys.readouterr().err, tool
        assert not marker.exists(), f"the payload ran in {tool}"


@pytest.mark.parametrize("name", [*EXPORT_READS, "captioner/adapter_model.bin"])
def test_every_cli_refuses_a_planted_pickle_in_an_export_folder(
    trained_run: Path, tmp_path: Path, name: str, capsys: pytest.CaptureFixture[str]
) -> None:
    """adapter_model.bin: without the .safetensors file peft falls back to it, with weights_only=True."""
    bin_fallback = name.endswith(".bin")
    run, marker = _plant(
        trained_run, tmp_path, f"export/{name}" if name != "config.yaml" else name, torch_format=bin_fallback
    )
    if bin_fallback:
        (run / "export" / "captioner" / "adapter_model.safetensors").unlink()
    part = "captioner" if name.startswith("captioner/") else "generator"
    for tool, call in _cli_calls(run / "export", tmp_path, part).items():
        assert call() == 2, tool
        assert Path(name).name in capsys.readouterr().err, tool
        assert not marker.exists(), f"the payload ran in {tool}"
