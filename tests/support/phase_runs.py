"""One captioner or generator phase on the tiny models, in-process: the configs, batches and models the phase
tests share (tests/losses/test_phases.py, tests/models/test_captioner_families.py)."""

from __future__ import annotations

import torch
from cycle_runs import tiny_config

from cycletune.losses.phases import captioner_phase, generator_phase
from cycletune.models.lora import frozen
from cycletune.models.randomness import DrawKey
from cycletune.train.builders import build_bridge, build_captioner, build_generator
from cycletune.train.config import Config

CAPTIONS = ["a small red circle in the top left", "a large blue square in the center"]


def phase_config(tiny_models, *overrides: str) -> Config:
    return tiny_config(
        tiny_models, "cycle.i2t2i.num_candidates=2", "cycle.t2i2t.num_inference_steps=3", *overrides
    )


def phase_batch(kind: str = "paired") -> dict:
    generator = torch.Generator().manual_seed(3)
    batch = {
        "kind": kind,
        "ids": ["a", "b"],
        "captions": CAPTIONS,
        "pixels": torch.rand(2, 3, 32, 32, generator=generator),
    }
    if kind == "image_only":
        del batch["captions"]
    if kind == "text_only":
        del batch["pixels"]
    return batch


def build_models(config: Config):
    torch.manual_seed(0)
    captioner, captioner_names = build_captioner(config.captioner)
    generator, generator_names = build_generator(config.generator)
    return (
        captioner,
        captioner_names,
        generator,
        generator_names,
        build_bridge(config, captioner, generator, "cpu"),
    )


def run_phase(phase: str, models, config: Config, batch: dict, step: int = 0):
    captioner, _, generator, _, bridge = models
    trained, partner, function = (
        (captioner, generator, captioner_phase)
        if phase == "captioner"
        else (generator, captioner, generator_phase)
    )
    with frozen(partner):
        return trained(
            lambda model: function(
                model, partner=partner, batch=batch, config=config, key=DrawKey(0, step), bridge=bridge
            )
        )
