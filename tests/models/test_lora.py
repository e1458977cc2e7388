"""LoRA attachment, trainable-parameter preparation, checkpoint state and export round trips (tiny models)."""

from __future__ import annotations

import json
import re
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path
from typing import TypeVar

import pytest
import safetensors.torch
import torch
from cycle_runs import environment
from diffusers import EulerDiscreteScheduler, StableDiffusionPipeline, UNet2DConditionModel
from peft import PeftModel
from peft.tuners.lora import LoraLayer
from torch import nn
from transformers import BlipForConditionalGeneration

from cycletune.models.captioner import Captioner
from cycletune.models.generator import Generator
from cycletune.models.lora import (
    DIFFUSERS_LORA_FILE,
    KOHYA_LORA_FILE,
    add_captioner_lora,
    add_generator_lora,
    frozen,
    load_trainable_state_dict,
    prepare_trainable,
    save_captioner_adapter,
    save_generator_lora,
    save_merged_captioner,
    save_merged_generator,
    trainable_state_dict,
)

# alpha != rank, so an export that drops alpha (diffusers and kohya both default it to the rank) is caught.
RANK, ALPHA = 4, 8.0
ATOL = 1e-5


def _lora_module_names(module: nn.Module, prefix: str = "") -> set[str]:
    return {
        name.removeprefix(prefix) for name, layer in module.named_modules() if isinstance(layer, LoraLayer)
    }


def _perturb(module: nn.Module, names: list[str], seed: int) -> None:
    """Stand-in for training: move every named parameter (LoRA B starts at zero, so adapters are no-ops)."""
    generator = torch.Generator().manual_seed(seed)
    params = dict(module.named_parameters())
    with torch.no_grad():
        for name in names:
            params[name].add_(0.1 * torch.randn(params[name].shape, generator=generator))


Wrapper = TypeVar("Wrapper", Captioner, Generator)


def _trained_lora(model: Wrapper, add_lora: Callable[..., None], seed: int) -> tuple[Wrapper, list[str]]:
    add_lora(model, rank=RANK, alpha=ALPHA, dropout=0.0)
    names = prepare_trainable(model, train_mode="lora")
    _perturb(model, names, seed=seed)
    return model.eval(), names


def _lora_captioner(path: Path) -> tuple[Captioner, list[str]]:
    return _trained_lora(Captioner.from_pretrained(str(path)), add_captioner_lora, seed=1)


def _lora_generator(path: Path) -> tuple[Generator, list[str]]:
    return _trained_lora(Generator.from_pretrained(str(path)), add_generator_lora, seed=2)


@torch.no_grad()
def _caption_logits(captioner: Captioner) -> torch.Tensor:
    pixels01 = torch.rand(2, 3, 32, 32, generator=torch.Generator().manual_seed(3))
    tokens = captioner.tokenize(["a red circle", "a big blue square at the top"])
    return captioner.logits(pixels01, tokens["input_ids"], tokens["attention_mask"])


@torch.no_grad()
def _unet_output(unet: UNet2DConditionModel) -> torch.Tensor:
    """A small 8x8 sample keeps this fast; the UNet only needs sides divisible by its downsampling."""
    config = unet.config
    rng = torch.Generator().manual_seed(4)
    sample = torch.randn(2, config.in_channels, 8, 8, generator=rng)
    context = torch.randn(2, 5, config.cross_attention_dim, generator=rng)
    return unet(sample, torch.tensor([10, 700]), context).sample


def _load_pipeline(path: Path, generator: Generator) -> StableDiffusionPipeline:
    """A pixel-space folder names no vae, which StableDiffusionPipeline only accepts when told vae=None."""
    return StableDiffusionPipeline.from_pretrained(path, **({"vae": None} if generator.vae is None else {}))


def test_lora_attaches_only_to_intended_modules(tiny_models) -> None:
    captioner = Captioner.from_pretrained(str(tiny_models.captioner))
    add_captioner_lora(captioner, rank=RANK, alpha=ALPHA, dropout=0.0)
    layers = captioner.model.get_base_model().config.text_config.num_hidden_layers
    expected = {
        f"text_decoder.bert.encoder.layer.{index}.{block}.{projection}"
        for index in range(layers)
        for block in ("attention", "crossattention")
        for projection in ("self.query", "self.key", "self.value", "output.dense")
    }
    assert _lora_module_names(captioner.model, prefix="base_model.model.") == expected
    assert not _lora_module_names(captioner.model.get_base_model().vision_model)

    generator = Generator.from_pretrained(str(tiny_models.generator))
    attention_projections = {
        name
        for name, _ in generator.unet.named_modules()
        if name.endswith((".to_q", ".to_k", ".to_v", ".to_out.0"))
    }
    add_generator_lora(generator, rank=RANK, alpha=ALPHA, dropout=0.0)
    assert attention_projections and _lora_module_names(generator.unet) == attention_projections
    assert not _lora_module_names(generator.text_encoder) and not _lora_module_names(generator.vae)


def test_prepare_trainable_lora_mode_keeps_adapters_fp32_over_bf16_base(tiny_models) -> None:
    captioner = Captioner.from_pretrained(str(tiny_models.captioner))
    add_captioner_lora(captioner, rank=RANK, alpha=ALPHA, dropout=0.0)
    generator = Generator.from_pretrained(str(tiny_models.generator))
    add_generator_lora(generator, rank=RANK, alpha=ALPHA, dropout=0.0)
    for module in (captioner, generator):
        names = prepare_trainable(module, train_mode="lora", base_dtype=torch.bfloat16)
        assert names == sorted(names) and names
        for name, param in module.named_parameters():
            is_lora = "lora_" in name
            assert (name in names) == is_lora == param.requires_grad, name
            assert param.dtype == (torch.float32 if is_lora else torch.bfloat16), name
    assert all(param.dtype == torch.bfloat16 for param in generator.vae.parameters())


def test_prepare_trainable_full_mode_trains_everything_but_the_vae(tiny_models) -> None:
    generator = Generator.from_pretrained(str(tiny_models.generator), torch_dtype=torch.bfloat16)
    names = prepare_trainable(generator, train_mode="full", base_dtype=torch.bfloat16)
    for part in (generator.unet, generator.text_encoder):
        assert all(param.requires_grad and param.dtype == torch.float32 for param in part.parameters())
    assert not any(param.requires_grad for param in generator.vae.parameters())
    assert all(param.dtype == torch.bfloat16 for param in generator.vae.parameters())
    assert set(names) == {name for name, _ in generator.named_parameters() if not name.startswith("vae.")}

    captioner = Captioner.from_pretrained(str(tiny_models.captioner))
    names = prepare_trainable(captioner, train_mode="full")
    assert names == sorted(name for name, _ in captioner.named_parameters())


def test_prepare_trainable_rejects_bad_requests(tiny_models) -> None:
    captioner = Captioner.from_pretrained(str(tiny_models.captioner))
    with pytest.raises(ValueError, match="unknown train_mode 'partial'"):
        prepare_trainable(captioner, train_mode="partial")
    with pytest.raises(ValueError, match="attach adapters first"):
        prepare_trainable(captioner, train_mode="lora")


def test_trainable_state_dict_round_trip_and_mismatch_errors(tiny_models) -> None:
    captioner, names = _lora_captioner(tiny_models.captioner)
    state = trainable_state_dict(captioner, names)
    assert list(state) == names
    saved = {name: tensor.clone() for name, tensor in state.items()}
    _perturb(captioner, names, seed=5)  # must not reach the snapshot
    assert all(torch.equal(state[name], saved[name]) for name in names)
    load_trainable_state_dict(captioner, state, names)
    params = dict(captioner.named_parameters())
    assert all(torch.equal(params[name], saved[name]) for name in names)

    first, second = names[0], names[1]
    with pytest.raises(ValueError, match=re.escape(f"missing keys: ['{first}']")):
        load_trainable_state_dict(captioner, {k: v for k, v in state.items() if k != first}, names)
    with pytest.raises(ValueError, match=re.escape("unexpected keys: ['stray.weight']")):
        load_trainable_state_dict(captioner, {**state, "stray.weight": torch.zeros(1)}, names)
    with pytest.raises(ValueError, match=re.escape(f"shape mismatch: ['{second}: checkpoint (1,)")):
        load_trainable_state_dict(captioner, {**state, second: torch.zeros(1)}, names)
    with pytest.raises(ValueError, match=re.escape("no parameters named ['nope']")):
        trainable_state_dict(captioner, ["nope"])


def test_frozen_restores_requires_grad_even_on_error() -> None:
    module = nn.Sequential(nn.Linear(2, 2), nn.Linear(2, 2))
    module[1].weight.requires_grad_(False)
    before = [param.requires_grad for param in module.parameters()]
    with pytest.raises(RuntimeError, match="inside"), frozen(module):
        assert not any(param.requires_grad for param in module.parameters())
        raise RuntimeError("inside")
    assert [param.requires_grad for param in module.parameters()] == before


def test_captioner_exports_reproduce_trained_logits(tiny_models, tmp_path: Path) -> None:
    captioner, _ = _lora_captioner(tiny_models.captioner)
    trained = _caption_logits(captioner)
    with captioner.model.disable_adapter():
        assert (trained - _caption_logits(captioner)).abs().max() > 1e-3

    adapter_dir = save_captioner_adapter(captioner, tmp_path / "adapter")
    config = json.loads((adapter_dir / "adapter_config.json").read_text())
    assert (config["r"], config["lora_alpha"]) == (RANK, ALPHA)
    assert config["base_model_name_or_path"] == str(tiny_models.captioner)
    assert (adapter_dir / "adapter_model.safetensors").is_file()
    reloaded = Captioner.from_pretrained(str(tiny_models.captioner))
    reloaded.model = PeftModel.from_pretrained(reloaded.model, adapter_dir)
    torch.testing.assert_close(_caption_logits(reloaded.eval()), trained, atol=ATOL, rtol=0)

    merged_dir = save_merged_captioner(captioner, tmp_path / "merged")
    reloaded.model = BlipForConditionalGeneration.from_pretrained(merged_dir).eval()
    assert not _lora_module_names(reloaded.model)
    torch.testing.assert_close(_caption_logits(reloaded), trained, atol=ATOL, rtol=0)
    assert isinstance(Captioner.from_pretrained(str(merged_dir)).processor, type(captioner.processor))
    torch.testing.assert_close(_caption_logits(captioner), trained, atol=0, rtol=0)  # training model intact


@pytest.mark.parametrize("folder", ["generator", "pixel_generator"])
def test_generator_exports_reproduce_trained_unet(tiny_models, tmp_path: Path, folder: str) -> None:
    source = getattr(tiny_models, folder)
    generator, _ = _lora_generator(source)
    trained = _unet_output(generator.unet)
    generator.unet.disable_adapters()
    assert (trained - _unet_output(generator.unet)).abs().max() > 1e-3
    generator.unet.enable_adapters()

    lora_dir = save_generator_lora(generator, tmp_path / "lora", kohya=True)
    kohya = safetensors.torch.load_file(lora_dir / KOHYA_LORA_FILE)
    alphas = [value for key, value in kohya.items() if key.endswith(".alpha")]
    assert all(key.startswith("lora_unet_") for key in kohya)
    assert len(alphas) == len(_lora_module_names(generator.unet)) and all(a.item() == ALPHA for a in alphas)
    for weight_name in (DIFFUSERS_LORA_FILE, KOHYA_LORA_FILE):
        pipeline = _load_pipeline(source, generator)
        pipeline.load_lora_weights(lora_dir, weight_name=weight_name)
        torch.testing.assert_close(
            _unet_output(pipeline.unet),
            trained,
            atol=ATOL,
            rtol=0,
            msg=lambda m, name=weight_name: f"{name}: {m}",
        )

    # A loader that drops the file's metadata (so infers alpha = rank) still gets the trained strength.
    pipeline = _load_pipeline(source, generator)
    pipeline.load_lora_weights(safetensors.torch.load_file(lora_dir / DIFFUSERS_LORA_FILE))
    torch.testing.assert_close(_unet_output(pipeline.unet), trained, atol=ATOL, rtol=0)

    merged = _load_pipeline(save_merged_generator(generator, tmp_path / "merged"), generator)
    assert not _lora_module_names(merged.unet) and (merged.vae is None) == (generator.vae is None)
    torch.testing.assert_close(_unet_output(merged.unet), trained, atol=ATOL, rtol=0)
    torch.testing.assert_close(_unet_output(generator.unet), trained, atol=0, rtol=0)  # training model intact


def test_full_mode_exports_save_the_trained_models(tiny_models, tmp_path: Path) -> None:
    generator = Generator.from_pretrained(str(tiny_models.generator)).eval()
    _perturb(generator, prepare_trainable(generator, train_mode="full"), seed=6)
    with pytest.raises(ValueError, match="no LoRA adapter"):
        save_generator_lora(generator, tmp_path / "lora")
    merged = _load_pipeline(save_merged_generator(generator, tmp_path / "generator"), generator)
    torch.testing.assert_close(_unet_output(merged.unet), _unet_output(generator.unet), atol=ATOL, rtol=0)
    input_ids = generator.tokenize(["a red circle"])
    with torch.no_grad():
        torch.testing.assert_close(
            merged.text_encoder(input_ids).last_hidden_state,
            generator.encode_text(input_ids),
            atol=ATOL,
            rtol=0,
        )

    captioner = Captioner.from_pretrained(str(tiny_models.captioner)).eval()
    _perturb(captioner, prepare_trainable(captioner, train_mode="full"), seed=7)
    with pytest.raises(ValueError, match="no LoRA adapter"):
        save_captioner_adapter(captioner, tmp_path / "adapter")
    reloaded = Captioner.from_pretrained(str(save_merged_captioner(captioner, tmp_path / "captioner"))).eval()
    torch.testing.assert_close(_caption_logits(reloaded), _caption_logits(captioner), atol=ATOL, rtol=0)


# Chosen (and checked against the unsorted exports) so that the two processes order the exported target sets
# differently; safetensors' own header map is ordered at random per process whatever the seed.
HASH_SEEDS = ("1", "2")


def test_exports_are_byte_identical_across_processes(tiny_models, tmp_path: Path) -> None:
    script = Path(__file__).with_name("export_lora_run.py")
    outs = [tmp_path / f"hash-seed-{seed}" for seed in HASH_SEEDS]
    runs = [  # concurrently: each process spends most of its time importing torch and diffusers
        subprocess.Popen(
            [sys.executable, str(script), str(tiny_models.captioner), str(tiny_models.generator), str(out)],
            env=environment(PYTHONHASHSEED=seed),
            stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
            text=True,
        )
        for seed, out in zip(HASH_SEEDS, outs, strict=True)
    ]
    for run in runs:
        _, stderr = run.communicate(timeout=300)
        assert run.returncode == 0, stderr[-4000:]
    first, second = (
        {path.relative_to(out): path.read_bytes() for path in out.rglob("*") if path.is_file()}
        for out in outs
    )
    assert first.keys() == second.keys()
    assert {"adapter_config.json", DIFFUSERS_LORA_FILE, KOHYA_LORA_FILE} <= {path.name for path in first}
    assert sorted(str(path) for path in first if first[path] != second[path]) == []


@pytest.mark.parametrize("prediction_type", [None, "v_prediction"])
def test_merged_generator_keeps_the_base_sampling_scheduler(
    tiny_models, tmp_path: Path, prediction_type: str | None
) -> None:
    """The base ships a sampler other than the DDPM process training uses; the merged model must keep it,
    with only a prediction_type override (the trained objective) applied."""
    base_dir = tmp_path / "base"
    pipeline = StableDiffusionPipeline.from_pretrained(tiny_models.generator)
    pipeline.scheduler = EulerDiscreteScheduler.from_config(pipeline.scheduler.config)
    pipeline.save_pretrained(base_dir)
    generator = Generator.from_pretrained(str(base_dir), prediction_type=prediction_type)
    add_generator_lora(generator, rank=RANK, alpha=ALPHA)
    merged_dir = save_merged_generator(generator, tmp_path / "merged")

    def scheduler_files(folder: Path) -> tuple[list[str], dict]:
        model_index = json.loads((folder / "model_index.json").read_text())
        return model_index["scheduler"], json.loads(
            (folder / "scheduler" / "scheduler_config.json").read_text()
        )

    base_class, base_config = scheduler_files(base_dir)
    assert base_class == ["diffusers", "EulerDiscreteScheduler"]
    expected = base_config | ({"prediction_type": prediction_type} if prediction_type else {})
    assert scheduler_files(merged_dir) == (base_class, expected)
