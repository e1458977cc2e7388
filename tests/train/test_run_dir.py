"""The run folder's layout has one owner: what the recipe writes is exactly what RunDir names."""

from __future__ import annotations

from pathlib import Path

import pytest
from cycle_runs import TINY_CONFIG, run_cycle, tiny_overrides

from cycletune.train.config import load_config
from cycletune.train.run_dir import (
    CONFIG_FILE,
    RunDir,
    checkpoint_step,
    staging_step,
    trainable_weights_file,
    write_config,
)


def test_checkpoints_are_the_checkpoint_folders_in_step_order(tmp_path: Path) -> None:
    run = RunDir(tmp_path)
    for step in (10, 9, 100):
        run.checkpoint(step).mkdir()
    run.staging(11).mkdir()  # a save a kill cut short is not a checkpoint
    (tmp_path / "checkpoint-12").write_text("a file, not a folder")
    (tmp_path / "checkpoint-best").mkdir()
    assert run.checkpoints() == [(9, run.checkpoint(9)), (10, run.checkpoint(10)), (100, run.checkpoint(100))]
    assert RunDir(tmp_path / "not-yet").checkpoints() == []
    assert [checkpoint_step(name) for name in ("checkpoint-7", ".tmp-checkpoint-7", "export")] == [
        7,
        None,
        None,
    ]
    assert [staging_step(name) for name in (".tmp-checkpoint-7", "checkpoint-7")] == [7, None]


@pytest.mark.parametrize("name", ["tiny.yaml", "shapes.yaml"])
def test_the_written_config_reads_back_equal(name: str, tmp_path: Path) -> None:
    config = load_config(TINY_CONFIG.parent / name, [f"output_dir={tmp_path}"])
    write_config(config, tmp_path)
    assert load_config(RunDir(tmp_path).config_file) == config


@pytest.mark.slow
def test_a_finished_run_holds_exactly_the_names_run_dir_knows(tiny_models, tmp_path: Path) -> None:
    run = RunDir(tmp_path / "run")
    overrides = [
        *tiny_overrides(tiny_models, run.root),
        "report_to=all",  # TensorBoard's logs/ and W&B's wandb/ too
        "train.max_train_steps=4",
        "train.checkpointing_steps=2",
        "train.checkpoints_total_limit=1",
        "train.validation_steps=null",
        "train.logging_steps=1",
    ]
    run_cycle(overrides)
    known = {
        run.config_file,
        run.checkpoint(4),
        run.export_dir,
        run.samples_log,
        run.metrics_log,
        run.logging_dir,
        run.wandb_dir,
    }
    assert set(run.root.iterdir()) == known
    assert run.checkpoints() == [(4, run.checkpoint(4))]
    checkpoint = run.checkpoint(4)
    for name in (CONFIG_FILE, trainable_weights_file("captioner"), trainable_weights_file("generator")):
        assert (checkpoint / name).is_file(), name
    # One writer: the run's config and its checkpoint's are the same bytes, and read back as the run's, with
    # the mixed precision it ran in filled in (tiny.yaml leaves it to the launcher: none here, so "no").
    assert (checkpoint / CONFIG_FILE).read_bytes() == run.config_file.read_bytes()
    assert load_config(run.config_file) == load_config(TINY_CONFIG, [*overrides, "mixed_precision=no"])
