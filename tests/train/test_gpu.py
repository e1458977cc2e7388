"""CUDA paths (skipped without a GPU): bf16 training with both cycle terms and a resume; sync-free steps."""

from __future__ import annotations

import json
import math
import warnings
from pathlib import Path

import pytest
import torch
from cycle_runs import run_cycle, tiny_overrides

from cycletune.train.cli.bench.architectures import Architecture
from cycletune.train.cli.bench.bench_modes import MODES, bench_config
from cycletune.train.cli.bench.steps import TrainerStep

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.slow,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA"),
]


def test_bf16_cycle_training_on_cuda_is_finite_and_resumes(tiny_models, tmp_path: Path) -> None:
    overrides = [
        *tiny_overrides(tiny_models, tmp_path),
        "mixed_precision=bf16",
        "cycle.i2t2i.mode=soft",
        "cycle.t2i2t.mode=one_step",
        "train.max_train_steps=4",
        "train.logging_steps=1",
    ]
    run_cycle(overrides, CUDA_VISIBLE_DEVICES="0")
    logged = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    losses = [value for entry in logged for key, value in entry.items() if "i2t2i" in key or "t2i2t" in key]
    assert losses and all(math.isfinite(value) for value in losses)
    assert (tmp_path / "export" / "generator" / "pytorch_lora_weights.safetensors").is_file()
    # Resume from the step-2 checkpoint and finish: the continued run repeats steps 3-4's sample ids.
    first = (tmp_path / "samples.jsonl").read_text().splitlines()
    run_cycle([*overrides, "train.max_train_steps=6", "train.resume_from_checkpoint=latest"])
    resumed = (tmp_path / "samples.jsonl").read_text().splitlines()
    assert resumed[:4] == first and len(resumed) == 6


# Host waits allowed in a step's forward and backward: the cache decides hits and misses on the host, from
# one small device-to-host copy of the batch's pixel fingerprints.
ALLOWED_SYNCS = {"generator": 0, "generator_cached": 1}


@pytest.mark.parametrize("mode_name", list(ALLOWED_SYNCS))
def test_supervised_generator_step_does_not_wait_for_the_gpu(
    tiny_models, tmp_path: Path, mode_name: str
) -> None:
    """Forward and backward of the trainer's generator step (train.step.phase_step, the function the recipe
    calls, here on bench's fixed batch) make no host sync beyond ALLOWED_SYNCS (the update may: it decides
    whether to skip). A sync mid-step lets the GPU drain and then idle while the host
    launches the next kernels one at a time; the bare diffusers-style loop in `make bench` has none."""
    arch = Architecture("tiny-cuda", resolution=32, batch_size=4, device="cuda", precision="bf16")
    mode = MODES[mode_name]
    step = TrainerStep(
        bench_config(arch, tiny_models.captioner, tiny_models.generator, mode, tmp_path), mode.phase, "cuda"
    )
    step.step()  # warm-up: cache misses, scheduler tables moved to the GPU, the pinned-memory pool
    watched: list[str] = []

    def sync_debug(stage: str) -> None:
        watched.append(stage)
        torch.cuda.set_sync_debug_mode("warn" if stage in ("forward", "backward") else "default")

    step.on_stage = sync_debug
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        try:
            step.step()
        finally:
            torch.cuda.set_sync_debug_mode("default")
    syncs = [f"{w.filename}:{w.lineno}" for w in caught if "synchronizing CUDA operation" in str(w.message)]
    assert watched == ["forward", "backward", "update", "done"]
    assert len(syncs) == ALLOWED_SYNCS[mode_name], syncs
