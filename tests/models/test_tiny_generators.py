"""The tiny SDXL, SD3 and Flux folders load through the pipeline classes users call on hub ids, keep each
family's dimension rules, and generate; their T5 tokenizers are real SentencePiece unigram models."""

from __future__ import annotations

import shutil
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
import sentencepiece
import torch
from accelerate import init_empty_weights
from diffusers import (
    AutoencoderKL,
    DDPMScheduler,
    DiffusionPipeline,
    EulerDiscreteScheduler,
    FlowMatchEulerDiscreteScheduler,
    FluxPipeline,
    FluxTransformer2DModel,
    SD3Transformer2DModel,
    StableDiffusion3Pipeline,
    StableDiffusionXLPipeline,
    UNet2DConditionModel,
)
from transformers import (
    CLIPTextModel,
    CLIPTextModelWithProjection,
    CLIPTokenizer,
    T5EncoderModel,
    T5TokenizerFast,
)

from cycletune.models.tiny import PRESETS, TINY_GENERATORS
from cycletune.models.tiny_generators import save_tiny_flux, save_tiny_sd3, save_tiny_sdxl
from cycletune.models.tiny_vocabulary import default_vocabulary, sentencepiece_unigram, write_clip_bpe

CAPTION = "a small red circle at the top left"


@dataclass(frozen=True)
class Family:
    save: Callable[..., Path]
    pipeline_class: type[DiffusionPipeline]
    parts: dict[str, type]
    call_options: dict[str, Any] = field(default_factory=dict)


FAMILIES = {
    "sdxl": Family(
        save_tiny_sdxl,
        StableDiffusionXLPipeline,
        {
            "unet": UNet2DConditionModel,
            "vae": AutoencoderKL,
            "text_encoder": CLIPTextModel,
            "text_encoder_2": CLIPTextModelWithProjection,
            "tokenizer": CLIPTokenizer,
            "tokenizer_2": CLIPTokenizer,
            "scheduler": EulerDiscreteScheduler,
        },
    ),
    "sd3": Family(
        save_tiny_sd3,
        StableDiffusion3Pipeline,
        {
            "transformer": SD3Transformer2DModel,
            "vae": AutoencoderKL,
            "text_encoder": CLIPTextModelWithProjection,
            "text_encoder_2": CLIPTextModelWithProjection,
            "text_encoder_3": T5EncoderModel,
            "tokenizer": CLIPTokenizer,
            "tokenizer_2": CLIPTokenizer,
            "tokenizer_3": T5TokenizerFast,
            "scheduler": FlowMatchEulerDiscreteScheduler,
        },
        {"max_sequence_length": 32},
    ),
    "flux": Family(
        save_tiny_flux,
        FluxPipeline,
        {
            "transformer": FluxTransformer2DModel,
            "vae": AutoencoderKL,
            "text_encoder": CLIPTextModel,
            "text_encoder_2": T5EncoderModel,
            "tokenizer": CLIPTokenizer,
            "tokenizer_2": T5TokenizerFast,
            "scheduler": FlowMatchEulerDiscreteScheduler,
        },
        {"max_sequence_length": 32},
    ),
}


@pytest.fixture(scope="module")
def saved(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("tiny_generators")
    return {name: family.save(root / name) for name, family in FAMILIES.items()}


@pytest.fixture(scope="module")
def pipelines(saved: dict[str, Path]) -> dict[str, DiffusionPipeline]:
    return {name: FAMILIES[name].pipeline_class.from_pretrained(folder) for name, folder in saved.items()}


@pytest.mark.parametrize("name", FAMILIES)
def test_folder_loads_with_the_pipeline_class_and_each_part_alone(name, saved, pipelines) -> None:
    family, pipe = FAMILIES[name], pipelines[name]
    assert type(pipe) is family.pipeline_class
    for subfolder, part_class in family.parts.items():
        assert type(getattr(pipe, subfolder)) is part_class, subfolder
        alone = part_class.from_pretrained(saved[name], subfolder=subfolder)
        assert type(alone) is part_class, subfolder
    for part in family.parts:
        if part.startswith("text_encoder"):
            tokenizer = getattr(pipe, part.replace("text_encoder", "tokenizer"))
            assert getattr(pipe, part).config.vocab_size == len(tokenizer), part


@pytest.mark.parametrize("name", FAMILIES)
def test_generates_a_finite_32px_image_in_two_steps(name, pipelines) -> None:
    image = pipelines[name](
        CAPTION,
        num_inference_steps=2,
        height=32,
        width=32,
        output_type="pt",
        generator=torch.Generator().manual_seed(0),
        **FAMILIES[name].call_options,
    ).images
    assert image.shape == (1, 3, 32, 32)
    assert torch.isfinite(image).all()


@pytest.mark.parametrize("name", FAMILIES)
def test_same_seed_saves_identical_weights_and_another_seed_does_not(name, saved, tmp_path) -> None:
    save = FAMILIES[name].save
    again, reseeded = save(tmp_path / "again"), save(tmp_path / "reseeded", seed=1)
    weight_files = sorted(path.relative_to(saved[name]) for path in saved[name].rglob("*.safetensors"))
    models = [part for part in FAMILIES[name].parts if not part.startswith(("tokenizer", "scheduler"))]
    assert sorted(path.parent.name for path in weight_files) == sorted(models)
    for relative in weight_files:
        assert (saved[name] / relative).read_bytes() == (again / relative).read_bytes(), relative
        assert (saved[name] / relative).read_bytes() != (reseeded / relative).read_bytes(), relative


def test_every_clip_tokenizer_is_the_sd_tiny_vocabulary(pipelines, tmp_path) -> None:
    vocab, _ = write_clip_bpe(list(default_vocabulary()), tmp_path)
    for name, family in FAMILIES.items():
        for part, part_class in family.parts.items():
            if part_class is CLIPTokenizer:
                tokenizer = getattr(pipelines[name], part)
                assert tokenizer.get_vocab() == vocab and tokenizer.model_max_length == 77, (name, part)


def test_sdxl_dimensions_and_ddpm_compatible_scheduler(saved, pipelines) -> None:
    pipe = pipelines["sdxl"]
    unet, clip_l, clip_g = pipe.unet.config, pipe.text_encoder.config, pipe.text_encoder_2.config
    assert clip_l.hidden_size != clip_g.hidden_size  # a mix-up of the two towers fails on a shape
    assert unet.addition_embed_type == "text_time"
    assert unet.cross_attention_dim == clip_l.hidden_size + clip_g.hidden_size
    assert (
        unet.projection_class_embeddings_input_dim == clip_g.projection_dim + 6 * unet.addition_time_embed_dim
    )
    assert unet.sample_size * pipe.vae_scale_factor == 32
    assert (pipe.vae.config.latent_channels, pipe.vae.config.scaling_factor) == (4, 0.13025)
    assert pipe.tokenizer_2.pad_token == "!" and pipe.tokenizer.pad_token == "<|endoftext|>"
    ddpm = DDPMScheduler.from_pretrained(saved["sdxl"], subfolder="scheduler")
    assert not ddpm.config.clip_sample
    assert (ddpm.config.prediction_type, ddpm.config.num_train_timesteps) == ("epsilon", 1000)
    assert torch.allclose(ddpm.alphas_cumprod, pipe.scheduler.alphas_cumprod)


def test_sd3_dimensions(pipelines) -> None:
    pipe = pipelines["sd3"]
    transformer, t5 = pipe.transformer.config, pipe.text_encoder_3.config
    clips = [pipe.text_encoder.config, pipe.text_encoder_2.config]
    assert transformer.joint_attention_dim == t5.d_model >= sum(clip.hidden_size for clip in clips)
    assert transformer.pooled_projection_dim == sum(clip.projection_dim for clip in clips)
    assert transformer.pooled_projection_dim <= transformer.joint_attention_dim
    assert (
        transformer.caption_projection_dim == transformer.num_attention_heads * transformer.attention_head_dim
    )
    assert transformer.in_channels == pipe.vae.config.latent_channels == 16
    vae = pipe.vae.config
    assert (vae.scaling_factor, vae.shift_factor) == (1.5305, 0.0609)
    assert pipe.scheduler.config.shift == 3.0 and not pipe.scheduler.config.use_dynamic_shifting
    assert pipe.tokenizer_2.pad_token == "!" and pipe.tokenizer_3.model_max_length == 32


def test_flux_dimensions(pipelines) -> None:
    pipe = pipelines["flux"]
    transformer, clip, t5 = pipe.transformer.config, pipe.text_encoder.config, pipe.text_encoder_2.config
    assert (
        transformer.pooled_projection_dim == clip.hidden_size <= transformer.joint_attention_dim == t5.d_model
    )
    assert transformer.in_channels == 4 * pipe.vae.config.latent_channels == 64
    assert transformer.patch_size == 1 and transformer.guidance_embeds
    assert sum(transformer.axes_dims_rope) == transformer.attention_head_dim
    vae = pipe.vae.config
    assert (vae.latent_channels, vae.scaling_factor, vae.shift_factor) == (16, 0.3611, 0.1159)
    scheduler = pipe.scheduler.config
    assert scheduler.use_dynamic_shifting and scheduler.shift == 3.0
    shifts = (
        scheduler.base_image_seq_len,
        scheduler.max_image_seq_len,
        scheduler.base_shift,
        scheduler.max_shift,
    )
    assert shifts == (256, 4096, 0.5, 1.15)
    assert pipe.tokenizer_2.model_max_length == 32


@pytest.mark.parametrize(("name", "subfolder"), [("sd3", "tokenizer_3"), ("flux", "tokenizer_2")])
def test_t5_tokenizer_is_backed_by_its_sentencepiece_model(name, subfolder, saved, tmp_path) -> None:
    tokenizer = T5TokenizerFast.from_pretrained(saved[name], subfolder=subfolder)
    ids = tokenizer(CAPTION)["input_ids"]
    assert tokenizer.convert_ids_to_tokens(ids) == [f"▁{word}" for word in CAPTION.split()] + ["</s>"]
    assert (tokenizer.pad_token_id, tokenizer.eos_token_id, tokenizer.unk_token_id) == (0, 1, 2)
    assert tokenizer.unk_token_id not in ids
    assert tokenizer.decode(ids, skip_special_tokens=True) == CAPTION
    # Converted from spiece.model alone, the tokenizer reads text exactly as the saved tokenizer.json does.
    shutil.copy(saved[name] / subfolder / "spiece.model", tmp_path)
    assert (
        T5TokenizerFast.from_pretrained(tmp_path)(f"{CAPTION}, zq 42")["input_ids"]
        == tokenizer(f"{CAPTION}, zq 42")["input_ids"]
    )


def test_sentencepiece_unigram_has_t5s_layout_whole_words_and_no_unknown_ascii(tmp_path) -> None:
    words = list(default_vocabulary())
    path = sentencepiece_unigram(words, tmp_path / "first")
    assert path.read_bytes() == sentencepiece_unigram(words, tmp_path / "second").read_bytes()
    model = sentencepiece.SentencePieceProcessor(model_file=str(path))
    specials = (model.pad_id(), model.eos_id(), model.unk_id(), model.bos_id())
    assert specials == (0, 1, 2, -1) and model.id_to_piece(1) == "</s>"
    assert all(model.encode(word, out_type=str) == [f"▁{word}"] for word in words)
    pieces = model.encode("Zebra-42 {qx}!", out_type=str)
    assert model.unk_id() not in model.piece_to_id(pieces) and "".join(pieces) == "▁Zebra-42▁{qx}!"


def test_vocab_words_reach_every_tokenizer(tmp_path) -> None:
    folder = save_tiny_flux(tmp_path, vocab_words=["Quokka", "zorbing"])
    clip = CLIPTokenizer.from_pretrained(folder, subfolder="tokenizer")
    t5 = T5TokenizerFast.from_pretrained(folder, subfolder="tokenizer_2")
    assert clip.tokenize("quokka zorbing") == ["quokka</w>", "zorbing</w>"]
    assert t5.convert_ids_to_tokens(t5("quokka zorbing")["input_ids"]) == ["▁quokka", "▁zorbing", "</s>"]


def test_resolution_must_halve_twice(tmp_path) -> None:
    with pytest.raises(ValueError, match="multiple of 4"):
        save_tiny_flux(tmp_path, resolution=30)
    assert not any(tmp_path.iterdir())


# ------------------------------------------------------------------------------------------------ sizes

# Text towers wider than the toy defaults, each family's denoiser and VAE resized, and what must follow in the
# denoiser: the text and pooled widths it reads, its latent size (a 3-level VAE quarters 32 px).
SIZES = {
    "sdxl": {
        "text_encoder": {"hidden_size": 40},
        "text_encoder_2": {"hidden_size": 56, "projection_dim": 24},
        "unet": {"layers_per_block": 2, "addition_time_embed_dim": 4},
        "vae": {"block_out_channels": (32, 32, 64)},
    },
    "sd3": {
        "text_encoder": {"hidden_size": 40},
        "text_encoder_2": {"hidden_size": 56},
        "text_encoder_3": {"d_model": 128},
        "transformer": {"num_layers": 3, "attention_head_dim": 8},
        "vae": {"block_out_channels": (32, 32, 64)},
    },
    "flux": {
        "text_encoder": {"hidden_size": 40},
        "text_encoder_2": {"d_model": 64, "vocab_size": 500},
        "transformer": {"num_single_layers": 2, "attention_head_dim": 8, "axes_dims_rope": (2, 2, 4)},
    },
}
FOLLOWING = {
    "sdxl": (
        "unet",
        {"cross_attention_dim": 96, "projection_class_embeddings_input_dim": 24 + 6 * 4, "sample_size": 8},
    ),
    "sd3": (
        "transformer",
        {
            "joint_attention_dim": 128,
            "pooled_projection_dim": 96,
            "caption_projection_dim": 2 * 8,
            "sample_size": 8,
            "pos_embed_max_size": 12,
        },
    ),
    "flux": ("transformer", {"joint_attention_dim": 64, "pooled_projection_dim": 40}),
}


def _config_values(config: Any, keys: Iterable[str]) -> dict[str, Any]:
    """A saved config's values of `keys`, its lists as the tuples they were given as."""
    values = {key: getattr(config, key) for key in keys}
    return {key: tuple(value) if isinstance(value, list) else value for key, value in values.items()}


@pytest.mark.parametrize("name", FAMILIES)
def test_size_resizes_the_parts_and_what_follows_from_them_follows(name, tmp_path) -> None:
    family = FAMILIES[name]
    pipe = family.pipeline_class.from_pretrained(family.save(tmp_path, resolution=32, size=SIZES[name]))
    for part, arguments in SIZES[name].items():
        assert _config_values(getattr(pipe, part).config, arguments) == arguments, part
    denoiser, following = FOLLOWING[name]
    assert _config_values(getattr(pipe, denoiser).config, following) == following
    options = {"height": 32, "width": 32, "output_type": "pt", **family.call_options}
    image = pipe(CAPTION, num_inference_steps=1, **options).images
    assert image.shape == (1, 3, 32, 32) and torch.isfinite(image).all()


def test_size_refuses_what_it_cannot_set_before_writing(tmp_path) -> None:
    with pytest.raises(ValueError, match=r"StableDiffusion3Pipeline lacks; its parts: \['transformer'"):
        save_tiny_sd3(tmp_path, size={"unet": {"layers_per_block": 2}})
    with pytest.raises(ValueError, match="multiple of 8"):
        save_tiny_flux(tmp_path, resolution=20, size={"vae": {"block_out_channels": (32, 32, 64)}})
    assert not any(tmp_path.iterdir())
    # What follows from the other parts, and too small an embedding, show once the parts are built.
    with pytest.raises(ValueError, match=r"size of unet cannot set \['cross_attention_dim'\]"):
        save_tiny_sdxl(tmp_path / "sdxl", size={"unet": {"cross_attention_dim": 64}})
    with pytest.raises(ValueError, match="vocab_size=10 is below the tokenizer's"):
        save_tiny_flux(tmp_path / "flux", size={"text_encoder_2": {"vocab_size": 10}})


# The parameter counts models/tiny.py's PRESETS and the bench's architectures quote for the other families'
# denoisers, and SDXL base's own (UNet, VAE, CLIP-L, bigG with its projection) with the config values a
# 1024 px SDXL checkpoint has.
PRESET_SIZES = {
    ("bench-tiny", "sdxl"): ({"unet": 1_038_948}, {}),
    ("bench-tiny", "sd3"): ({"transformer": 895_168}, {}),
    ("bench-tiny", "flux"): ({"transformer": 1_069_120}, {}),
    ("bench-small", "sdxl"): ({"unet": 16_881_796}, {}),
    ("bench-small", "sd3"): ({"transformer": 18_624_064}, {}),
    ("bench-small", "flux"): ({"transformer": 17_982_016}, {}),
    ("bench-sdxl-blip-base", "sdxl"): (
        {
            "unet": 2_567_463_684,
            "vae": 83_653_863,
            "text_encoder": 123_060_480,
            "text_encoder_2": 694_659_840,
        },
        {"sample_size": 128, "cross_attention_dim": 2048, "projection_class_embeddings_input_dim": 2816},
    ),
}


@pytest.mark.parametrize(("preset", "name"), PRESET_SIZES)
def test_family_presets_have_the_sizes_they_quote(preset, name, tmp_path, monkeypatch) -> None:
    parameters, unet_config = PRESET_SIZES[preset, name]
    built: dict[str, Any] = {}
    monkeypatch.setattr(
        FAMILIES[name].pipeline_class, "save_pretrained", lambda pipe, folder: built.update(pipe.components)
    )
    with init_empty_weights():  # shapes only: SDXL base's 3.5B weights would take minutes and 14 GB
        TINY_GENERATORS[name](tmp_path, **PRESETS[preset][1][name])
    assert {part: built[part].num_parameters() for part in parameters} == parameters
    if unet_config:
        assert _config_values(built["unet"].config, unet_config) == unet_config
