"""Tiny random-init SDXL, SD3 and Flux pipelines, saved by each pipeline class's own save_pretrained.

Like the SD 1.x generator of models/tiny.py, they stand in for hub checkpoints that cannot be downloaded here,
so each keeps the quirks of its family at toy size: SDXL cross-attends to two CLIP towers' penultimate states
side by side and conditions on the second tower's pooled projection plus six micro-conditioning numbers; SD3
sets both CLIP towers' states side by side, zero-pads them to the T5 width and appends T5's tokens,
concatenates their projections as the pooled vector and samples with a shifted flow-matching schedule; Flux
packs 2x2 latent patches into tokens, embeds the guidance scale and shifts its schedule by the image's token
count. The CLIP-L stand-in, the OpenCLIP bigG stand-in and T5 are of three different widths, so code that
takes one encoder's size for another's fails on a shape instead of passing.

Each saver takes `size`: config arguments by component name ("unet" or "transformer", "vae", "text_encoder",
"text_encoder_2", ...) that replace the toy defaults, so the same code writes the bench's larger stand-ins and
a real checkpoint's architecture with random weights. The dimensions one part takes from another (a denoiser's
text and pooled widths, the latent size, the family's latent channels and scaling) follow on their own.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path
from typing import Any, TypedDict, Unpack

from diffusers import (
    AutoencoderKL,
    DiffusionPipeline,
    EulerDiscreteScheduler,
    FlowMatchEulerDiscreteScheduler,
    FluxPipeline,
    FluxTransformer2DModel,
    ModelMixin,
    SchedulerMixin,
    SD3Transformer2DModel,
    StableDiffusion3Pipeline,
    StableDiffusionXLPipeline,
    UNet2DConditionModel,
)
from transformers import (
    CLIPTextConfig,
    CLIPTextModel,
    CLIPTextModelWithProjection,
    CLIPTokenizer,
    PreTrainedModel,
    PreTrainedTokenizerBase,
    T5Config,
    T5EncoderModel,
    T5TokenizerFast,
)

from cycletune.models.tiny_vocabulary import (
    check_vocab_size,
    clean_words,
    seeded,
    sentencepiece_unigram,
    write_clip_bpe,
)

# Config arguments of each part, by its pipeline component name, that replace the toy defaults.
Size = Mapping[str, Mapping[str, Any]]

# CLIP's context length, which the SD tiny's tokenizer keeps too.
_CLIP_MAX_LENGTH = 77
# The real T5 tokenizers say 512; tiny-vocabulary prompts fit in far fewer, and T5's cost grows with it.
_T5_MAX_LENGTH = 32
_CLIP_L_WIDTH = 32  # CLIP ViT-L/14's text tower: 768 wide
_CLIP_G_WIDTH = 48  # OpenCLIP bigG's: 1280 wide
_T5_WIDTH = 96  # T5-v1.1-XXL's encoder: 4096, wider than both CLIP towers together (SD3 pads them to it)
# Transformer heads of the SD3 and Flux stand-ins: 2 heads of 16 channels.
_HEADS, _HEAD_WIDTH = 2, 16


_VAE_CHANNELS = (32, 64)


def _latent_size(resolution: int, vae_size: Mapping[str, Any]) -> int:
    """Each VAE level after the first halves the image (the toy 2-level VAE once, SDXL's 4-level one three
    times); SDXL's UNet, SD3's 2x2 patches and Flux's 2x2 packing halve the latent again, so the image side
    must be a multiple of twice the VAE's downscale: 4 for the toy VAE."""
    downscale = 2 ** (len(vae_size.get("block_out_channels", _VAE_CHANNELS)) - 1)
    if resolution % (2 * downscale) != 0:
        raise ValueError(f"resolution={resolution} must be a multiple of {2 * downscale}")
    return resolution // downscale


def _following(part: str, size: Mapping[str, Any], derived: dict[str, Any]) -> dict[str, Any]:
    """The arguments of `part` that follow from the other parts, the resolution or the family: `size` setting
    one of them could only break a shape or the family, so it is refused."""
    if clash := sorted(derived.keys() & size.keys()):
        raise ValueError(
            f"size of {part} cannot set {clash}: they follow from the other parts and the family"
        )
    return derived


def _clip_tokenizer(words: Sequence[str], folder: Path, *, pad_token: str = "<|endoftext|>") -> CLIPTokenizer:
    """CLIP's BPE: OpenAI's CLIP-L pads with its end token, OpenCLIP's bigG with "!" (SDXL's, SD3's)."""
    vocab, merges = write_clip_bpe(words, folder)
    return CLIPTokenizer(vocab=vocab, merges=merges, model_max_length=_CLIP_MAX_LENGTH, pad_token=pad_token)


def _t5_tokenizer(words: Sequence[str], folder: Path) -> T5TokenizerFast:
    """Converted from the spiece.model written into folder, as from_pretrained converts the real one; the
    pipeline's save_pretrained adds tokenizer.json beside it."""
    sentencepiece_unigram(words, folder)
    return T5TokenizerFast.from_pretrained(folder, model_max_length=_T5_MAX_LENGTH)


def _clip_text_encoder(
    model_class: type[CLIPTextModel | CLIPTextModelWithProjection],
    tokenizer: CLIPTokenizer,
    size: Mapping[str, Any],
    *,
    width: int,
    hidden_act: str = "quick_gelu",
) -> CLIPTextModel | CLIPTextModelWithProjection:
    """A 2-layer CLIP text tower whose projection is as wide as its states (a `size` hidden_size included).

    A vocab_size above the tokenizer's gives the real model's embedding rows (49408), whose cost soft captions
    pay."""
    width = size.get("hidden_size", width)
    arguments = {
        "vocab_size": len(tokenizer),
        "hidden_size": width,
        "intermediate_size": 2 * width,
        "projection_dim": width,
        "num_hidden_layers": 2,
        "num_attention_heads": 2,
        "max_position_embeddings": _CLIP_MAX_LENGTH,
        "hidden_act": hidden_act,
        **size,
    }
    token_ids = ("bos_token_id", "eos_token_id", "pad_token_id")
    arguments |= _following(
        "a CLIP text encoder", size, {name: getattr(tokenizer, name) for name in token_ids}
    )
    check_vocab_size(arguments["vocab_size"], len(tokenizer), "generator")
    return model_class(CLIPTextConfig(**arguments))


def _t5_encoder(tokenizer: T5TokenizerFast, size: Mapping[str, Any]) -> T5EncoderModel:
    """T5-v1.1's gated-GELU encoder, at toy size unless `size` says otherwise (heads a quarter of d_model wide
    and a feed-forward twice as wide, a `size` d_model included)."""
    width = size.get("d_model", _T5_WIDTH)
    arguments = {
        "vocab_size": len(tokenizer),
        "d_model": width,
        "d_kv": width // 4,
        "d_ff": 2 * width,
        "num_layers": 2,
        "num_heads": 4,
        "feed_forward_proj": "gated-gelu",
        **size,
    }
    arguments |= _following(
        "the T5 encoder",
        size,
        {"pad_token_id": tokenizer.pad_token_id, "eos_token_id": tokenizer.eos_token_id},
    )
    check_vocab_size(arguments["vocab_size"], len(tokenizer), "generator")
    return T5EncoderModel(T5Config(**arguments))


@dataclass(frozen=True)
class _TextTower:
    """A tokenizer kind and the text encoder that reads its ids."""

    tokenizer: Callable[[Sequence[str], Path], PreTrainedTokenizerBase]
    encoder: Callable[[PreTrainedTokenizerBase, Mapping[str, Any]], PreTrainedModel]


# OpenAI's CLIP-L text tower: its last states (Flux pools them) or, with its projection, SD3's first tower.
_CLIP_L = _TextTower(_clip_tokenizer, partial(_clip_text_encoder, CLIPTextModel, width=_CLIP_L_WIDTH))
_CLIP_L_PROJECTED = _TextTower(
    _clip_tokenizer, partial(_clip_text_encoder, CLIPTextModelWithProjection, width=_CLIP_L_WIDTH)
)
# OpenCLIP's bigG: exact GELU where OpenAI's CLIP uses quick GELU.
_OPEN_CLIP_G = _TextTower(
    partial(_clip_tokenizer, pad_token="!"),
    partial(_clip_text_encoder, CLIPTextModelWithProjection, width=_CLIP_G_WIDTH, hidden_act="gelu"),
)
_T5 = _TextTower(_t5_tokenizer, _t5_encoder)


def _text_component_names(towers: Sequence[_TextTower]) -> list[tuple[str, str]]:
    """(tokenizer, text_encoder), (tokenizer_2, text_encoder_2), ...: diffusers' component names, the same in
    every family."""
    suffixes = ["", *(f"_{number}" for number in range(2, len(towers) + 1))]
    return [(f"tokenizer{suffix}", f"text_encoder{suffix}") for suffix in suffixes]


def _text_parts(
    out_dir: Path, vocab_words: Sequence[str] | None, towers: Sequence[_TextTower], size: Size
) -> dict[str, Any]:
    """Each tower's tokenizer, written into its subfolder from one word list, and its text encoder. Call
    within `seeded`."""
    words = clean_words(vocab_words)
    parts: dict[str, Any] = {}
    for tower, (tokenizer_name, encoder_name) in zip(towers, _text_component_names(towers), strict=True):
        tokenizer = tower.tokenizer(words, out_dir / tokenizer_name)
        parts |= {
            tokenizer_name: tokenizer,
            encoder_name: tower.encoder(tokenizer, size.get(encoder_name, {})),
        }
    return parts


def _autoencoder(
    resolution: int,
    size: Size,
    *,
    latent_channels: int,
    scaling_factor: float,
    shift_factor: float | None = None,
) -> AutoencoderKL:
    """A 2-level AutoencoderKL unless size["vae"] sets its block_out_channels; the 16-channel SD3 and Flux VAEs
    (those with a shift) have no quant convs.

    force_upcast is off unless size sets it: the real SDXL VAE overflows in fp16, a random tiny one has nothing
    to protect."""
    vae_size = size.get("vae", {})
    flow_vae = shift_factor is not None
    arguments = {
        "block_out_channels": _VAE_CHANNELS,
        "layers_per_block": 1,
        "norm_num_groups": 32,
        "force_upcast": False,
        **vae_size,
    }
    levels = len(arguments["block_out_channels"])
    return AutoencoderKL(
        **arguments,
        **_following(
            "vae",
            vae_size,
            {
                "in_channels": 3,
                "out_channels": 3,
                "down_block_types": ("DownEncoderBlock2D",) * levels,
                "up_block_types": ("UpDecoderBlock2D",) * levels,
                "latent_channels": latent_channels,
                "sample_size": resolution,
                "scaling_factor": scaling_factor,
                "shift_factor": shift_factor,
                "use_quant_conv": not flow_vae,
                "use_post_quant_conv": not flow_vae,
            },
        ),
    )


# Micro-conditioning numbers SDXL embeds beside the pooled text: original size, crop corner, target size.
_SDXL_TIME_IDS = 6


def _sdxl_models(resolution: int, text: dict[str, Any], size: Size) -> dict[str, ModelMixin]:
    """The UNet cross-attends to both towers' states side by side and embeds the second's pooled projection
    with the time ids, each id embedded addition_time_embed_dim wide."""
    unet_size = size.get("unet", {})
    arguments = {
        "layers_per_block": 1,
        "block_out_channels": (32, 64),
        # No attention at the highest resolution, as SDXL's first level.
        "down_block_types": ("DownBlock2D", "CrossAttnDownBlock2D"),
        "up_block_types": ("CrossAttnUpBlock2D", "UpBlock2D"),
        "attention_head_dim": 2,
        "use_linear_projection": True,
        "norm_num_groups": 32,
        "addition_time_embed_dim": 8,
        **unet_size,
    }
    clip_l, clip_g = text["text_encoder"].config, text["text_encoder_2"].config
    derived = {
        "sample_size": _latent_size(resolution, size.get("vae", {})),
        "in_channels": 4,
        "out_channels": 4,
        "cross_attention_dim": clip_l.hidden_size + clip_g.hidden_size,
        "addition_embed_type": "text_time",
        "projection_class_embeddings_input_dim": clip_g.projection_dim
        + _SDXL_TIME_IDS * arguments["addition_time_embed_dim"],
    }
    unet = UNet2DConditionModel(**arguments, **_following("unet", unet_size, derived))
    return {"unet": unet, "vae": _autoencoder(resolution, size, latent_channels=4, scaling_factor=0.13025)}


def _sd3_models(resolution: int, text: dict[str, Any], size: Size) -> dict[str, ModelMixin]:
    """The joint blocks read T5's width (the CLIP states are padded to it) and both CLIP projections as the
    pooled vector; the caption stream is as wide as the image stream."""
    transformer_size = size.get("transformer", {})
    arguments = {
        "patch_size": 2,
        "num_layers": 2,  # the last joint block drops its text stream, the first keeps it
        "num_attention_heads": _HEADS,
        "attention_head_dim": _HEAD_WIDTH,
        **transformer_size,
    }
    latent_size = _latent_size(resolution, size.get("vae", {}))
    clip_l, clip_g, t5 = (text[name].config for name in ("text_encoder", "text_encoder_2", "text_encoder_3"))
    derived = {
        "sample_size": latent_size,
        "in_channels": 16,
        "out_channels": 16,
        "caption_projection_dim": arguments["num_attention_heads"] * arguments["attention_head_dim"],
        "joint_attention_dim": t5.d_model,
        "pooled_projection_dim": clip_l.projection_dim + clip_g.projection_dim,
        # Position table three times the default grid, as SD3's (192 patches for a 64-patch default).
        "pos_embed_max_size": 3 * latent_size // arguments["patch_size"],
    }
    transformer = SD3Transformer2DModel(**arguments, **_following("transformer", transformer_size, derived))
    vae = _autoencoder(resolution, size, latent_channels=16, scaling_factor=1.5305, shift_factor=0.0609)
    return {"transformer": transformer, "vae": vae}


def _flux_models(resolution: int, text: dict[str, Any], size: Size) -> dict[str, ModelMixin]:
    """The transformer reads T5's states and CLIP-L's pooled output; a `size` attention_head_dim needs its
    axes_dims_rope to fill the head again."""
    transformer_size = size.get("transformer", {})
    latent_channels = 16
    arguments = {
        "num_layers": 1,
        "num_single_layers": 1,
        "num_attention_heads": _HEADS,
        "attention_head_dim": _HEAD_WIDTH,
        # Rotary channels for the (text index, row, column) position axes; they fill each head.
        "axes_dims_rope": (4, 6, 6),
        **transformer_size,
    }
    derived = {
        "patch_size": 1,
        "in_channels": 4 * latent_channels,  # one token per 2x2 latent patch
        "joint_attention_dim": text["text_encoder_2"].config.d_model,
        "pooled_projection_dim": text["text_encoder"].config.hidden_size,
        "guidance_embeds": True,
    }
    transformer = FluxTransformer2DModel(**arguments, **_following("transformer", transformer_size, derived))
    vae = _autoencoder(
        resolution, size, latent_channels=latent_channels, scaling_factor=0.3611, shift_factor=0.1159
    )
    return {"transformer": transformer, "vae": vae}


@dataclass(frozen=True)
class _Layout:
    """What a family's folder holds: the pipeline class, its text towers in component order, its denoiser's
    component name, its denoiser and VAE (built for a resolution, the text encoders and a size), its scheduler."""

    pipeline_class: type[DiffusionPipeline]
    towers: tuple[_TextTower, ...]
    denoiser: str
    build_models: Callable[[int, dict[str, Any], Size], dict[str, ModelMixin]]
    scheduler_class: type[SchedulerMixin]
    scheduler_config: dict[str, Any]
    pipeline_options: dict[str, Any] = field(default_factory=dict)


_SDXL = _Layout(
    StableDiffusionXLPipeline,
    (_CLIP_L, _OPEN_CLIP_G),
    "unet",
    _sdxl_models,
    # SDXL ships EulerDiscreteScheduler on SD's DDPM betas. from_config keeps the keys only a compatible
    # scheduler reads, as the real scheduler_config.json does: DDPMScheduler.from_pretrained then does not
    # clip its latent x0 predictions to [-1, 1] (its default).
    EulerDiscreteScheduler,
    {
        "num_train_timesteps": 1000,
        "beta_start": 0.00085,
        "beta_end": 0.012,
        "beta_schedule": "scaled_linear",
        "prediction_type": "epsilon",
        "timestep_spacing": "leading",
        "steps_offset": 1,
        "clip_sample": False,
        "set_alpha_to_one": False,
    },
    {"add_watermarker": False},
)
_SD3 = _Layout(
    StableDiffusion3Pipeline,
    (_CLIP_L_PROJECTED, _OPEN_CLIP_G, _T5),
    "transformer",
    _sd3_models,
    FlowMatchEulerDiscreteScheduler,
    {"num_train_timesteps": 1000, "shift": 3.0},
)
_FLUX = _Layout(
    FluxPipeline,
    (_CLIP_L, _T5),
    "transformer",
    _flux_models,
    # FLUX.1-dev's: the shift grows with the image's token count, base_shift at 256 tokens, max_shift at 4096.
    FlowMatchEulerDiscreteScheduler,
    {
        "num_train_timesteps": 1000,
        "shift": 3.0,
        "use_dynamic_shifting": True,
        "base_shift": 0.5,
        "max_shift": 1.15,
        "base_image_seq_len": 256,
        "max_image_seq_len": 4096,
    },
)


class SaveOptions(TypedDict, total=False):
    """The savers' keywords: the weights' seed (0), the image side the VAE and denoiser are built for (32; a
    multiple of 4 with the toy VAE), the tokenizers' extra words, and `size` (the module docstring)."""

    seed: int
    resolution: int
    vocab_words: Sequence[str] | None
    size: Size | None


def _save(
    layout: _Layout,
    out_dir: Path,
    *,
    seed: int = 0,
    resolution: int = 32,
    vocab_words: Sequence[str] | None = None,
    size: Size | None = None,
) -> Path:
    """Builds the text towers, then the denoiser and VAE, from one seed; saves them with the pipeline class's
    own save_pretrained (model_index.json and a subfolder a part); returns out_dir."""
    size = size or {}
    # Refuse a bad resolution or a size for a part the family lacks before writing anything.
    _latent_size(resolution, size.get("vae", {}))
    part_names = [layout.denoiser, "vae", *(encoder for _, encoder in _text_component_names(layout.towers))]
    if unknown := sorted(size.keys() - set(part_names)):
        raise ValueError(
            f"size names {unknown}, which {layout.pipeline_class.__name__} lacks; its parts: {part_names}"
        )
    out_dir = Path(out_dir)
    with seeded(seed):
        text = _text_parts(out_dir, vocab_words, layout.towers, size)
        parts = text | layout.build_models(resolution, text, size)
    scheduler = layout.scheduler_class.from_config(layout.scheduler_config)
    layout.pipeline_class(**parts, scheduler=scheduler, **layout.pipeline_options).save_pretrained(out_dir)
    return out_dir


def save_tiny_sdxl(out_dir: Path, **options: Unpack[SaveOptions]) -> Path:
    """Random-init SDXL parts in the StableDiffusionXLPipeline folder layout; returns out_dir."""
    return _save(_SDXL, out_dir, **options)


def save_tiny_sd3(out_dir: Path, **options: Unpack[SaveOptions]) -> Path:
    """Random-init SD3 parts in the StableDiffusion3Pipeline folder layout; returns out_dir."""
    return _save(_SD3, out_dir, **options)


def save_tiny_flux(out_dir: Path, **options: Unpack[SaveOptions]) -> Path:
    """Random-init FLUX.1-dev-like parts in the FluxPipeline folder layout; returns out_dir."""
    return _save(_FLUX, out_dir, **options)
