"""Builders: precision of trainable weights, gradient checkpointing, LoRA targets of the shipped configs, every
source type read through load_records."""

from __future__ import annotations

import inspect
import json
import tarfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import torch
from cycle_runs import tiny_config
from datasets import Dataset
from lora_weights import perturb_lora
from PIL import Image
from torch import nn

from cycletune.data.images import load_rgb
from cycletune.data.source_types import SOURCE_TYPES
from cycletune.losses.supervised import caption_terms, denoise_terms
from cycletune.models.modes import frozen
from cycletune.models.randomness import DrawKey
from cycletune.train.builders import build_captioner, build_generator, load_records, phase_update_counts
from cycletune.train.config import Config, load_config

CONFIGS = Path(__file__).resolve().parents[2] / "configs"


def _config(tiny_models, *overrides: str) -> Config:
    return tiny_config(tiny_models, "generator.caption_dropout=0.0", *overrides)


def _checkpointed_models(
    tiny_models, checkpointing: bool, *overrides: str
) -> tuple[Config, Any, list[str], Any, list[str]]:
    """The config, and both models built with both gradient_checkpointing keys set to `checkpointing`, each
    with its trainables."""
    config = _config(
        tiny_models,
        *overrides,
        f"captioner.gradient_checkpointing={checkpointing}",
        f"generator.gradient_checkpointing={checkpointing}",
    )
    return (config, *build_captioner(config.captioner), *build_generator(config.generator))


def _batch(size: int = 2) -> dict:
    torch.manual_seed(1)
    return {
        "ids": [f"sample-{index}" for index in range(size)],
        "pixels": torch.rand(size, 3, 32, 32),
        "captions": ["a small red circle in the top left", "a large blue square in the center"][:size],
    }


def _grads(module: torch.nn.Module, names: list[str]) -> dict[str, torch.Tensor]:
    return {name: param.grad.clone() for name, param in module.named_parameters() if name in names}


def test_trainable_weights_stay_fp32_under_bf16(tiny_models) -> None:
    config = _config(tiny_models, "mixed_precision=bf16")
    captioner, captioner_names = build_captioner(config.captioner, "bf16")
    generator, generator_names = build_generator(config.generator, "bf16")
    batch = _batch()
    for module, names in ((captioner, captioner_names), (generator, generator_names)):
        params = dict(module.named_parameters())
        assert names and all(
            params[name].dtype == torch.float32 and params[name].requires_grad for name in names
        )
        frozen = [param for name, param in params.items() if name not in names]
        assert frozen and all(param.dtype == torch.bfloat16 and not param.requires_grad for param in frozen)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        loss = caption_terms(captioner, batch, config.captioner)["caption_ce"]
        loss = loss + denoise_terms(generator, batch, config.generator, DrawKey(0, 0))["denoise"]
    loss.backward()
    for module, names in ((captioner, captioner_names), (generator, generator_names)):
        grads = _grads(module, names)
        assert all(grad.dtype == torch.float32 for grad in grads.values())
        assert any(grad.abs().sum() > 0 for grad in grads.values())


@pytest.mark.parametrize("train_mode", ["lora", "full"])
def test_gradient_checkpointing_gives_the_same_gradients(tiny_models, train_mode: str) -> None:
    batch = _batch()
    results = {}
    for checkpointing in (False, True):
        config, captioner, captioner_names, generator, generator_names = _checkpointed_models(
            tiny_models,
            checkpointing,
            f"captioner.train_mode={train_mode}",
            f"generator.train_mode={train_mode}",
        )
        if train_mode == "lora":
            perturb_lora(captioner, captioner_names, seed=2, scale=0.1, replace=True)
            perturb_lora(generator, generator_names, seed=2, scale=0.1, replace=True)
        assert captioner.model.is_gradient_checkpointing == checkpointing
        assert generator.unet.is_gradient_checkpointing == checkpointing
        captioner.train()
        generator.train()
        caption_terms(captioner, batch, config.captioner)["caption_ce"].backward()
        denoise_terms(generator, batch, config.generator, DrawKey(0, 0))["denoise"].backward()
        results[checkpointing] = {**_grads(captioner, captioner_names), **_grads(generator, generator_names)}
    assert results[False].keys() == results[True].keys()
    assert any(grad.abs().sum() > 0 for grad in results[False].values())
    for name, grad in results[False].items():
        torch.testing.assert_close(results[True][name], grad, rtol=1e-5, atol=1e-7, msg=name)


class _SavedBytes:
    """Bytes autograd saves for the backward pass while active."""

    def __init__(self) -> None:
        self.total = 0

    def __enter__(self) -> None:
        self._hooks = torch.autograd.graph.saved_tensors_hooks(self._pack, lambda tensor: tensor)
        self._hooks.__enter__()

    def __exit__(self, *exc: object) -> None:
        self._hooks.__exit__(*exc)

    def _pack(self, tensor: torch.Tensor) -> torch.Tensor:
        self.total += tensor.numel() * tensor.element_size()
        return tensor


def _t2i2t_path(captioner, generator, latents: torch.Tensor) -> tuple[int, int, torch.Tensor]:
    """T2I2T's path (decode, then the frozen captioner reads the image): the bytes autograd saved for the
    decoder's and the captioner's backward pass, and the gradient that reaches the latents. Backward runs
    inside `frozen`, as the trainer's step runs it, so any recomputation sees the partner's modes."""
    latents = latents.clone().requires_grad_(True)
    tokens = captioner.tokenize(_batch()["captions"])
    decoder, reader = _SavedBytes(), _SavedBytes()
    with frozen(captioner):
        assert not any(module.training for module in captioner.modules() if isinstance(module, nn.Dropout))
        with decoder:
            pixels = generator.decode_latents(latents)
        with reader:
            loss = captioner.caption_loss(pixels, **tokens).sum()
        loss.backward()
    return decoder.total, reader.total, latents.grad


def test_checkpointing_reaches_the_frozen_partner_and_the_vae_decoder_on_cycle_paths(tiny_models) -> None:
    """The T2I2T paths backpropagate through the VAE decoder and the frozen captioner: with the checkpointing
    keys on, both save less for the backward pass, and the partner stays in eval mode (dropout off), so the
    gradient is the same."""
    latents = torch.randn(2, 4, 16, 16, generator=torch.Generator().manual_seed(0))
    measured = {}
    for checkpointing in (False, True):
        _, captioner, _, generator, _ = _checkpointed_models(tiny_models, checkpointing)
        assert generator.vae.is_gradient_checkpointing == checkpointing
        measured[checkpointing] = _t2i2t_path(captioner, generator, latents)
    (plain_decoder, plain_reader, plain_grad) = measured[False]
    (checkpointed_decoder, checkpointed_reader, checkpointed_grad) = measured[True]
    assert plain_grad.abs().sum() > 0
    torch.testing.assert_close(checkpointed_grad, plain_grad, rtol=1e-5, atol=1e-7)
    assert checkpointed_decoder < 0.6 * plain_decoder
    assert checkpointed_reader < 0.6 * plain_reader


def test_paper_config_targets_only_cross_attention_queries(tiny_models) -> None:
    paper = load_config(CONFIGS / "paper_blip_sd14_coco.yaml")
    config = _config(
        tiny_models,
        f"captioner.lora.target_modules={paper.captioner.lora.target_modules}",
        f"generator.lora.target_modules={paper.generator.lora.target_modules}",
    )
    _, captioner_names = build_captioner(config.captioner)
    _, generator_names = build_generator(config.generator)
    assert captioner_names and all(".crossattention.self.query." in name for name in captioner_names)
    assert generator_names and all(".attn2.to_q." in name for name in generator_names)


def test_update_counts_follow_the_schedule() -> None:
    assert phase_update_counts(["captioner", "generator"], 5) == {"captioner": 3, "generator": 2}
    assert phase_update_counts(["generator", "generator", "captioner"], 6) == {"captioner": 2, "generator": 4}


def _image(path: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", (8, 8), (200, 10, 10)).save(path)
    return path


def _hf(root: Path) -> dict[str, Any]:
    Dataset.from_dict({"image": [str(_image(root / "a.png"))], "text": ["a red square"]}).save_to_disk(
        root / "saved"
    )
    return {"path": str(root / "saved")}


def _imagefolder(root: Path) -> dict[str, Any]:
    _image(root / "a.png")
    (root / "metadata.jsonl").write_text(json.dumps({"file_name": "a.png", "text": "a red square"}))
    return {"path": str(root)}


def _coco(root: Path) -> dict[str, Any]:
    _image(root / "images" / "a.png")
    captions = {
        "images": [{"id": 1, "file_name": "a.png"}],
        "annotations": [{"id": 7, "image_id": 1, "caption": "a red square"}],
    }
    (root / "captions.json").write_text(json.dumps(captions))
    return {"annotations": str(root / "captions.json"), "images_dir": str(root / "images")}


def _images(root: Path) -> dict[str, Any]:
    _image(root / "a.png")
    return {"path": str(root)}


def _texts(root: Path) -> dict[str, Any]:
    (root / "captions.txt").write_text("a red square\n")
    return {"path": str(root / "captions.txt")}


def _shapes(root: Path) -> dict[str, Any]:
    return {"num_samples": 2}


def _webdataset(root: Path) -> dict[str, Any]:
    with tarfile.open(root / "00000.tar", "w") as tar:
        tar.add(_image(root / "a.png"), arcname="a.png")
        (root / "a.txt").write_text("a red square")
        tar.add(root / "a.txt", arcname="a.txt")
    return {"path": str(root / "*.tar")}


# A tiny source on disk for every registered type: writes it under the folder, returns its settings.
SOURCE_FIXTURES: dict[str, Callable[[Path], dict[str, Any]]] = {
    "hf": _hf,
    "imagefolder": _imagefolder,
    "coco": _coco,
    "images": _images,
    "texts": _texts,
    "shapes": _shapes,
    "webdataset": _webdataset,
}


@pytest.mark.parametrize("name", SOURCE_TYPES)
def test_every_source_type_loads_through_load_records_for_each_role_it_feeds(
    name: str, tmp_path: Path
) -> None:
    assert set(SOURCE_FIXTURES) == set(SOURCE_TYPES), "give every source type a fixture"
    source = SOURCE_TYPES[name]
    assert ("resolution" in inspect.signature(source.reader).parameters) == source.needs_resolution
    settings = source.settings.model_validate({"type": name, **SOURCE_FIXTURES[name](tmp_path)})
    for role in source.roles:
        records, skips = load_records([settings], role, resolution=16)
        assert records and not skips.total, role
        assert all((record.image is None) == (role == "text_only") for record in records), role
        assert all((record.caption is None) == (role == "image_only") for record in records), role
        if source.needs_resolution and role != "text_only":
            # The source renders at the run's data.resolution, which load_records hands it.
            assert load_rgb(records[0].image()).size == (16, 16)
