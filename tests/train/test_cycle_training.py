"""End-to-end cycle training through `train/cycle.py`: gradient routing under DDP, unpaired-only runs."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
import torch
from cycle_runs import run_cycle, sample_log, tiny_overrides
from safetensors.torch import load_file

from cycletune.losses.i2t2i import I2T2I_MODES
from cycletune.losses.t2i2t import T2I2T_MODES
from cycletune.train.run_dir import RunDir

pytestmark = pytest.mark.slow

MODELS = ("captioner", "generator")


def trainable_weights(checkpoint: Path, model: str) -> dict[str, torch.Tensor]:
    return load_file(str(checkpoint / f"{model}_trainable.safetensors"))


def lora_b_norms(output_dir: Path) -> dict[str, float]:
    """LoRA B matrices start at zero: a model whose B are still all zero was never updated."""
    checkpoint = RunDir(output_dir).checkpoints()[-1][1]
    norms = {}
    for model in MODELS:
        weights = trainable_weights(checkpoint, model)
        assert any("lora_B" in key for key in weights), f"no LoRA B weights in the {model} checkpoint"
        norms[model] = sum(float(value.abs().sum()) for key, value in weights.items() if "lora_B" in key)
    return norms


@pytest.fixture(scope="module")
def warmed_up(tiny_models, tmp_path_factory) -> Path:
    """Both models after one paired update each, so every LoRA tensor (B included) is non-zero: a partner
    moved by any update, even by weight decay alone, no longer matches its checkpoint."""
    output_dir = tmp_path_factory.mktemp("warmed_up") / "run"
    run_cycle(
        [*tiny_overrides(tiny_models, output_dir), "train.max_train_steps=2", "train.checkpointing_steps=2"],
        processes=2,
    )
    return output_dir


# Every registered mode, trained through its frozen partner: one run per pair of an I2T2I and a T2I2T mode
# (a run updates the captioner at step 3 and the generator at step 4, each through the other, frozen).
# The shorter list repeats from its start, so every mode of both directions runs.
_CAPTIONER_MODES, _GENERATOR_MODES = list(I2T2I_MODES.modes), list(T2I2T_MODES.modes)
MODE_PAIRS = [
    (_CAPTIONER_MODES[index % len(_CAPTIONER_MODES)], _GENERATOR_MODES[index % len(_GENERATOR_MODES)])
    for index in range(max(len(_CAPTIONER_MODES), len(_GENERATOR_MODES)))
]


@pytest.mark.parametrize(("captioner_mode", "generator_mode"), MODE_PAIRS)
def test_two_process_cycle_updates_reach_only_the_trained_model(
    warmed_up: Path, tiny_models, tmp_path: Path, captioner_mode: str, generator_mode: str
) -> None:
    output_dir = tmp_path / f"{captioner_mode}-{generator_mode}"
    shutil.copytree(warmed_up, output_dir)
    run_cycle(
        [
            *tiny_overrides(tiny_models, output_dir),
            f"cycle.i2t2i.mode={captioner_mode}",
            f"cycle.t2i2t.mode={generator_mode}",
            "train.resume_from_checkpoint=latest",
            "train.schedule=[captioner, generator]",
            "train.max_train_steps=4",
            "train.checkpointing_steps=1",
            "captioner.caption_loss_weight=0",
            "generator.denoise_loss_weight=0",
            "cycle.i2t2i.num_candidates=2",
            "cycle.t2i2t.num_inference_steps=3",
        ],
        processes=2,
    )
    for step, trained, frozen in ((3, "captioner", "generator"), (4, "generator", "captioner")):
        before, after = output_dir / f"checkpoint-{step - 1}", output_dir / f"checkpoint-{step}"
        partner_before, partner_after = trainable_weights(before, frozen), trainable_weights(after, frozen)
        assert any(value.abs().max() > 0 for key, value in partner_before.items() if "lora_B" in key)
        moved = [key for key in partner_before if not torch.equal(partner_before[key], partner_after[key])]
        assert not moved, f"step {step}: the frozen {frozen} was updated: {moved[:3]}"
        trained_before, trained_after = trainable_weights(before, trained), trainable_weights(after, trained)
        assert any(not torch.equal(trained_before[key], trained_after[key]) for key in trained_before), (
            f"step {step}: the cycle term alone must update the {trained}"
        )
    entries = sample_log(output_dir)[2:]
    assert [entry["phase"] for entry in entries] == ["captioner", "generator"]
    assert all(len(entry["ids"]) == 4 and len(set(entry["ids"])) == 4 for entry in entries)


def test_unpaired_only_run_after_a_paired_warm_up(tiny_models, tmp_path: Path) -> None:
    output_dir = tmp_path / "unpaired"
    run_cycle(
        [*tiny_overrides(tiny_models, output_dir), "train.max_train_steps=2", "train.checkpointing_steps=2"]
    )
    before = lora_b_norms(output_dir)
    run_cycle(
        [
            *tiny_overrides(tiny_models, output_dir),
            "train.resume_from_checkpoint=latest",
            "train.max_train_steps=4",
            "cycle.i2t2i.mode=gumbel",
            "cycle.t2i2t.mode=sample",
            "cycle.t2i2t.num_inference_steps=3",
            "data.image_only=[{type: shapes, num_samples: 16, seed: 7}]",
            "data.text_only=[{type: shapes, num_samples: 16, seed: 8}]",
            "data.image_only_ratio=1.0",
            "data.text_only_ratio=1.0",
        ]
    )
    later = sample_log(output_dir)[2:]
    assert [entry["phase"] for entry in later] == ["captioner", "generator"]
    assert all(sample_id.startswith("shapes:7:") for sample_id in later[0]["ids"])
    assert all(sample_id.startswith("shapes:8:") for sample_id in later[1]["ids"])
    after = lora_b_norms(output_dir)
    assert all(after[model] != before[model] for model in MODELS), "unpaired updates must train both models"
    assert all(torch.isfinite(torch.tensor(value)) for value in after.values())
