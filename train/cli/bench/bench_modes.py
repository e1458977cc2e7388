"""The benchmarked steps (modes) and the trainer config each one runs with."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

from cycletune.train.cli.bench.architectures import Architecture
from cycletune.train.config import Config, load_config


@dataclass(frozen=True)
class Mode:
    """A benchmarked step: which phase updates, with which cycle term and cache setting."""

    phase: str
    overrides: tuple[str, ...] = ()
    cache: bool = False


MODES: dict[str, Mode] = {
    "captioner": Mode("captioner"),
    "generator": Mode("generator"),
    "generator_cached": Mode("generator", cache=True),
    "i2t2i_soft": Mode("captioner", ("cycle.i2t2i.mode=soft",)),
    "i2t2i_gumbel": Mode("captioner", ("cycle.i2t2i.mode=gumbel",)),
    "i2t2i_reward": Mode("captioner", ("cycle.i2t2i.mode=reward",)),
    "t2i2t_one_step": Mode("generator", ("cycle.t2i2t.mode=one_step",)),
    "t2i2t_one_step_shared": Mode(
        "generator", ("cycle.t2i2t.mode=one_step", "cycle.t2i2t.share_denoise_pass=true")
    ),
    "t2i2t_sample": Mode("generator", ("cycle.t2i2t.mode=sample",)),
    "t2i2t_reward": Mode("generator", ("cycle.t2i2t.mode=reward",)),
    "t2i2t_reward_cider_d": Mode("generator", ("cycle.t2i2t.mode=reward", "cycle.t2i2t.reward=cider_d")),
}
BASELINE = "baseline"
CYCLE_MODES = (
    "i2t2i_soft",
    "i2t2i_gumbel",
    "i2t2i_reward",
    "t2i2t_one_step",
    "t2i2t_one_step_shared",
    "t2i2t_sample",
    "t2i2t_reward",
    "t2i2t_reward_cider_d",
)
# Cycle modes whose cost must stay within checks.CYCLE_COST_LIMIT x their supervised step, or be explained.
FLAGGED_MODES = ("i2t2i_soft", "t2i2t_one_step", "t2i2t_one_step_shared")
PROFILED_MODES = ("captioner", "generator", *FLAGGED_MODES)
# What the other generator families' rows run unless --modes says otherwise: each family's supervised step and
# the two cycle modes that run its denoiser with gradient (T2I2T trains it, I2T2I backpropagates through it to
# the captioner); the SD rows time every mode and the machinery the families share.
FAMILY_MODES = ("generator", "t2i2t_one_step", "i2t2i_soft")
# The speed levers a lever row turns on: each the config keys that users set (models/speed_levers.py, and
# train.builders.build_optimizer for fused AdamW).
LEVERS: dict[str, tuple[str, ...]] = {
    "fused": ("captioner.optimizer.fused=true", "generator.optimizer.fused=true"),
    "tf32": ("train.allow_tf32=true",),
    "flash": ("generator.attention=flash",),
    "channels_last": ("generator.channels_last=true",),
    "compile": ("generator.compile=true",),
}


def lever_rows(mode: str, levers: Sequence[str]) -> list[str]:
    """The rows of a mode with levers stacked in the order given: each row keeps the levers of the rows
    before it and adds one (generator+fused, generator+fused+tf32, ...), so the last row has them all and
    the step from one row to the next is one lever's gain."""
    return ["+".join((mode, *levers[: count + 1])) for count in range(len(levers))]


def mode_named(name: str) -> Mode:
    """A mode by its row name: a MODES name, or a lever row's (MODE+LEVER+...)."""
    base, *levers = name.split("+")
    mode = MODES[base]
    return replace(mode, overrides=(*mode.overrides, *(key for lever in levers for key in LEVERS[lever])))


def bench_config(
    arch: Architecture, captioner: Path, generator: Path, mode: Mode, output_dir: Path
) -> Config:
    """The trainer config for one mode: LoRA rank 4 (alpha 4) on both models, AdamW 1e-4, clipping at 1.0."""
    base = {
        "output_dir": str(output_dir),
        "seed": 0,
        "report_to": "none",
        "mixed_precision": arch.precision,
        "captioner": {"pretrained_model_name_or_path": str(captioner), "max_length": 24},
        "generator": {"pretrained_model_name_or_path": str(generator), "cache_frozen_encoders": mode.cache},
        "data": {
            "resolution": arch.resolution,
            "train_batch_size": arch.batch_size,
            "paired": [{"type": "shapes", "num_samples": arch.batch_size, "seed": 0}],
        },
        "train": {"max_train_steps": 1_000_000},
    }
    for model in ("captioner", "generator"):
        base[model] |= {
            "lora": {"rank": 4, "alpha": 4.0},
            "optimizer": {"learning_rate": 1e-4, "max_grad_norm": 1.0},
        }
    return load_config(None, mode.overrides, base=base)


def measured(modes: dict[str, Any]) -> dict[str, Any]:
    """The modes that ran to the end (a failed one holds only its error, one left out for time its reason)."""
    return {mode: figures for mode, figures in modes.items() if not {"error", "skipped"} & figures.keys()}
