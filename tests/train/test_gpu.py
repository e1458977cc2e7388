"""CUDA paths: bf16 mixed-precision training with both cycle terms, resumed, on a GPU (skipped without one)."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch
from cycle_runs import run_cycle, tiny_overrides

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
