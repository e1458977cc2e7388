"""The cycle-mode tables agree with the code: each mode trains on the batch kinds it declares (and run refuses
the others), reads the bridge only if it declares so, build_bridge builds one exactly for those modes, and
the settings accept exactly the declared names."""

from __future__ import annotations

from typing import Any

import pytest
import torch
from cycle_runs import tiny_config
from pydantic import ValidationError

from cycletune.losses.cycle_modes import OFF, CycleModes, CycleStep
from cycletune.losses.i2t2i import I2T2I_MODES, I2T2ISettings
from cycletune.losses.t2i2t import T2I2T_MODES, T2I2TSettings
from cycletune.models.captioner import Captioner
from cycletune.models.generator import Generator
from cycletune.models.generator_bridge import GeneratorBridge
from cycletune.models.randomness import DrawKey
from cycletune.train.builders import build_bridge

TABLES: dict[str, tuple[CycleModes, type[I2T2ISettings | T2I2TSettings]]] = {
    "i2t2i": (I2T2I_MODES, I2T2ISettings),
    "t2i2t": (T2I2T_MODES, T2I2TSettings),
}
# Small knobs so every mode runs in a moment on the tiny models.
KNOBS: dict[str, dict[str, Any]] = {
    "i2t2i": {"max_length": 6, "num_candidates": 2, "reward_timesteps": 1},
    "t2i2t": {"num_inference_steps": 2},
}
MODES = [(direction, name) for direction, (modes, _) in TABLES.items() for name in modes.modes]
# What each kind of batch from data/mixer.py lacks.
MISSING = {"paired": (), "image_only": ("captions",), "text_only": ("pixels",)}


class _WatchedBridge:
    """Passes every use on to a real bridge and remembers whether there was any."""

    def __init__(self, bridge: GeneratorBridge) -> None:
        self.bridge, self.used = bridge, False

    def __getattr__(self, name: str) -> Any:
        self.used = True
        return getattr(self.bridge, name)


@pytest.fixture(scope="module")
def any_bridge(tiny_models, frozen_captioner: Captioner, frozen_generator: Generator) -> GeneratorBridge:
    config = tiny_config(tiny_models, "cycle.i2t2i.mode=soft")
    return build_bridge(config, frozen_captioner, frozen_generator, "cpu")


def _batch(kind: str) -> dict[str, Any]:
    full = {
        "kind": kind,
        "ids": ["a", "b"],
        "captions": ["a red circle", "a blue square"],
        "pixels": torch.rand(2, 3, 32, 32, generator=torch.Generator().manual_seed(0)),
    }
    return {key: value for key, value in full.items() if key not in MISSING[kind]}


@pytest.mark.parametrize(("direction", "name"), MODES)
def test_each_mode_trains_on_the_kinds_it_declares_and_reads_a_bridge_only_if_it_declares_so(
    tiny_models,
    frozen_captioner: Captioner,
    frozen_generator: Generator,
    any_bridge: GeneratorBridge,
    direction: str,
    name: str,
) -> None:
    modes, settings_class = TABLES[direction]
    mode = modes.modes[name]
    bridge = build_bridge(
        tiny_config(tiny_models, f"cycle.{direction}.mode={name}"), frozen_captioner, frozen_generator, "cpu"
    )
    assert (bridge is not None) == mode.needs_bridge == modes.needs_bridge(name)
    settings = settings_class(mode=name, **KNOBS[direction])
    trained, partner = (
        (frozen_captioner, frozen_generator) if direction == "i2t2i" else (frozen_generator, frozen_captioner)
    )
    for kind in MISSING:
        step = CycleStep(trained, partner, _batch(kind), DrawKey(0, 0), bridge)
        if kind in mode.batches:
            # A mode that declares no bridge runs without one (build_bridge gave None).
            assert torch.isfinite(modes.run(settings, step).loss)
        else:
            with pytest.raises(ValueError, match=rf"mode='{name}' cannot train on {kind} batches"):
                modes.run(settings, step)
    watched = _WatchedBridge(any_bridge)
    modes.run(settings, CycleStep(trained, partner, _batch(mode.batches[0]), DrawKey(0, 0), watched))
    assert watched.used == mode.needs_bridge
    if mode.needs_bridge:
        unbridged = CycleStep(trained, partner, _batch(mode.batches[0]), DrawKey(0, 0))
        with pytest.raises(ValueError, match=rf"cycle.{direction}.mode='{name}' needs a vocabulary bridge"):
            modes.run(settings, unbridged)


def test_refusing_a_kind_names_the_modes_that_take_it() -> None:
    assert I2T2I_MODES.consuming("image_only") == ["gumbel", "reward"]
    soft_on_images = CycleStep(None, None, _batch("image_only"), DrawKey(0, 0))
    with pytest.raises(ValueError, match=r"image_only data needs cycle.i2t2i.mode in \['gumbel', 'reward'\]"):
        I2T2I_MODES.run(I2T2ISettings(mode="soft"), soft_on_images)


@pytest.mark.parametrize("direction", TABLES)
def test_settings_accept_exactly_the_declared_modes(direction: str) -> None:
    modes, settings_class = TABLES[direction]
    assert modes.direction == direction
    assert modes.names == (OFF, *modes.modes)
    for name in modes.names:
        assert settings_class(mode=name).mode == name
    with pytest.raises(ValidationError) as error:
        settings_class(mode="dreaming")
    assert all(repr(name) in str(error.value) for name in modes.names)
