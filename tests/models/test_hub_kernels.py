"""Every transformers model CycleTune loads keeps its own torch layers: transformers 5 would otherwise swap them
for hub kernels fetched at the first `.train()` or `.eval()` on CUDA (code nobody asked for; offline, an
error that stops the run)."""

from __future__ import annotations

import pytest
from transformers import PreTrainedModel

from cycletune.evaluation.text import load_clip_text_encoder
from cycletune.models.captioner import Captioner
from cycletune.models.generator import Generator

pytest.importorskip("kernels", reason="without the kernels package transformers cannot use hub kernels")


def transformers_models(module) -> list[PreTrainedModel]:
    return [part for part in module.modules() if isinstance(part, PreTrainedModel)]


def test_the_captioner_and_the_generators_text_encoder_load_without_hub_kernels(tiny_models) -> None:
    captioner = Captioner.from_pretrained(str(tiny_models.captioner))
    generator = Generator.from_pretrained(str(tiny_models.generator))
    loaded = transformers_models(captioner.model) + generator.text_encoders
    assert loaded
    assert [model.use_kernels for model in loaded] == [False] * len(loaded)


def test_the_evaluation_text_encoder_loads_without_hub_kernels(tiny_models, monkeypatch) -> None:
    loaded = []
    real_from_pretrained = PreTrainedModel.from_pretrained.__func__

    def recording(cls, *args, **kwargs):
        model = real_from_pretrained(cls, *args, **kwargs)
        loaded.append(model)
        return model

    monkeypatch.setattr(PreTrainedModel, "from_pretrained", classmethod(recording))
    load_clip_text_encoder(tiny_models.generator)
    assert loaded and [model.use_kernels for model in loaded] == [False] * len(loaded)
