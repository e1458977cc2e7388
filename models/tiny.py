"""Tiny random-initialised captioner and generator, saved in the standard Hugging Face / diffusers layouts.

Nothing can be downloaded in this project's build and test environments, so tests and the demo build these
models from small configs, save them with save_pretrained, and load them back with the same from_pretrained
code that users run on hub ids. Every tokenizer is written from one word list, in the format the real models
ship (CLIP byte-level BPE vocab.json + merges.txt for Stable Diffusion here; each captioner family's own kind
in models/captioners/), so every code path that reads token strings or ids is exercised for real.

CLI: ``python -m models.tiny --out DIR [--captioner FAMILY] [--generator FAMILY]`` writes DIR/captioner (BLIP
unless FAMILY names another family of models/captioners/) and DIR/generator (Stable Diffusion 1.x unless FAMILY
is sdxl, sd3 or flux: models/tiny_generators.py).
"""

from __future__ import annotations

import argparse
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from cycletune.models.captioners import SPECS
from cycletune.models.captioners.blip import BlipSpec
from cycletune.models.tiny_generators import save_tiny_flux, save_tiny_sd3, save_tiny_sdxl
from cycletune.models.tiny_vocabulary import check_vocab_size, clean_words, seeded, write_clip_bpe

_CLIP_MAX_LENGTH = 77


# ---------------------------------------------------------------------------------------------- generator


def save_tiny_generator(
    out_dir: Path,
    *,
    seed: int = 0,
    resolution: int = 32,
    with_vae: bool = True,
    vocab_words: Sequence[str] | None = None,
    text_hidden_size: int = 32,
    prediction_type: str = "epsilon",
    beta_schedule: str = "scaled_linear",
    timestep_spacing: str = "leading",
    unet_options: dict[str, Any] | None = None,
    vae_options: dict[str, Any] | None = None,
    text_options: dict[str, Any] | None = None,
) -> Path:
    """Random-init Stable Diffusion parts saved in the StableDiffusionPipeline folder layout; returns out_dir.

    with_vae=False leaves the VAE out (model_index.json has vae null) and the UNet denoises RGB pixels at
    `resolution`; otherwise a 2-level AutoencoderKL gives 4-channel latents at resolution / 2. The defaults
    are SD 1.5's noise schedule and objective; the shapes demo's base model uses v-prediction on a cosine
    schedule instead, which learns usable samples from scratch in far fewer CPU steps. `unet_options`,
    `vae_options` and `text_options` override UNet2DConditionModel, AutoencoderKL and CLIPTextConfig arguments
    (levels, channels, where attention sits, layers, a vocabulary larger than the tokenizer's); the latent
    size follows the VAE's levels.
    """
    from diffusers import AutoencoderKL, DDPMScheduler, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTokenizer

    from cycletune.models.generators.stable_diffusion import StableDiffusionSpec

    if vae_options and not with_vae:
        raise ValueError("vae_options given with with_vae=False: a pixel-space generator has no VAE")
    vae_arguments = {"block_out_channels": (32, 64), "layers_per_block": 1} | (vae_options or {})
    vae_levels = len(vae_arguments["block_out_channels"])
    vae_arguments = {
        "in_channels": 3,
        "out_channels": 3,
        "down_block_types": ("DownEncoderBlock2D",) * vae_levels,
        "up_block_types": ("UpDecoderBlock2D",) * vae_levels,
        "latent_channels": 4,
        "norm_num_groups": 32,
        "sample_size": resolution,
    } | vae_arguments
    vae_downscale = 2 ** (vae_levels - 1)
    if resolution % (vae_downscale * 2) != 0:
        raise ValueError(f"resolution={resolution} must be a multiple of {vae_downscale * 2}")
    out_dir = Path(out_dir)
    tokenizer_dir = out_dir / "tokenizer"
    vocab, merges = write_clip_bpe(clean_words(vocab_words), tokenizer_dir)
    tokenizer = CLIPTokenizer(vocab=vocab, merges=merges, model_max_length=_CLIP_MAX_LENGTH)

    text_arguments = {
        "vocab_size": len(tokenizer),
        "hidden_size": text_hidden_size,
        "intermediate_size": 2 * text_hidden_size,
        "projection_dim": text_hidden_size,
        "num_hidden_layers": 2,
        "num_attention_heads": 2,
        "max_position_embeddings": _CLIP_MAX_LENGTH,
        "bos_token_id": tokenizer.bos_token_id,
        "eos_token_id": tokenizer.eos_token_id,
        "pad_token_id": tokenizer.pad_token_id,
    } | (text_options or {})
    check_vocab_size(text_arguments["vocab_size"], len(tokenizer), "generator")
    text_config = CLIPTextConfig(**text_arguments)
    image_channels = 4 if with_vae else 3
    with seeded(seed):
        text_encoder = CLIPTextModel(text_config)
        unet_arguments = {
            "layers_per_block": 1,
            "block_out_channels": (32, 64),
            "down_block_types": ("CrossAttnDownBlock2D", "DownBlock2D"),
            "up_block_types": ("UpBlock2D", "CrossAttnUpBlock2D"),
            "attention_head_dim": 2,
            "norm_num_groups": 32,
        } | (unet_options or {})
        unet = UNet2DConditionModel(
            sample_size=resolution // vae_downscale if with_vae else resolution,
            in_channels=image_channels,
            out_channels=image_channels,
            cross_attention_dim=text_config.hidden_size,
            **unet_arguments,
        )
        vae = AutoencoderKL(**vae_arguments) if with_vae else None
    scheduler = DDPMScheduler(
        num_train_timesteps=1000,
        beta_start=0.00085,
        beta_end=0.012,
        beta_schedule=beta_schedule,
        prediction_type=prediction_type,
        clip_sample=False,
        steps_offset=1,
        timestep_spacing=timestep_spacing,
    )
    parts = {"vae": vae, "text_encoder": text_encoder, "tokenizer": tokenizer, "unet": unet}
    StableDiffusionSpec().pipeline(parts | {"scheduler": scheduler}).save_pretrained(out_dir)
    return out_dir


# The tiny saver of each generator family, by its models/generators/ name.
TINY_GENERATORS: dict[str, Callable[..., Path]] = {
    "sd": save_tiny_generator,
    "sdxl": save_tiny_sdxl,
    "sd3": save_tiny_sd3,
    "flux": save_tiny_flux,
}


def _unet_levels(channels: tuple[int, ...], *, layers: int, attention: tuple[bool, ...]) -> dict[str, Any]:
    """unet_options of an SD-style UNet with 8-channel attention heads (diffusers' default); attention[i] says
    whether level i (high resolution first) cross-attends."""
    return {
        "block_out_channels": channels,
        "layers_per_block": layers,
        "attention_head_dim": 8,
        "down_block_types": tuple("CrossAttnDownBlock2D" if on else "DownBlock2D" for on in attention),
        "up_block_types": tuple("CrossAttnUpBlock2D" if on else "UpBlock2D" for on in reversed(attention)),
    }


# CLIP's and T5's vocabulary sizes: the bench's text encoders have their embedding rows (those past the
# tokenizer's unused), whose cost soft captions pay.
_CLIP_VOCAB_SIZE = 49408
_T5_VOCAB_SIZE = 32128
# diffusers' fast-test CLIP text encoder (32 wide), with CLIP's embedding rows.
_TINY_CLIP_TEXT = {
    "intermediate_size": 37,
    "num_hidden_layers": 5,
    "num_attention_heads": 4,
    "vocab_size": _CLIP_VOCAB_SIZE,
}
# Transformer layers of CLIP ViT-L/14's text tower and of BLIP-base's vision and text towers (768 wide).
_BASE_LAYERS = {"intermediate_size": 3072, "num_hidden_layers": 12, "num_attention_heads": 12}
_BLIP_BASE = {
    "image_size": 384,
    "hidden_size": 768,
    "num_layers": 12,
    "vision_options": {**_BASE_LAYERS, "patch_size": 16},
    "text_options": {**_BASE_LAYERS, "vocab_size": 30524, "max_position_embeddings": 512},
}


def _other_families(
    *,
    resolution: int,
    clip_l: dict[str, Any],
    clip_g: dict[str, Any],
    t5: dict[str, Any],
    sdxl_unet: dict[str, Any],
    sd3_transformer: dict[str, Any],
    flux_transformer: dict[str, Any],
) -> dict[str, dict[str, Any]]:
    """The SDXL, SD3 and Flux generators of one size (models/tiny_generators.py's `size`): the CLIP-L, OpenCLIP
    bigG and T5 stand-ins go to whichever component each family loads them as."""
    return {
        "sdxl": {
            "resolution": resolution,
            "size": {"text_encoder": clip_l, "text_encoder_2": clip_g, "unet": sdxl_unet},
        },
        "sd3": {
            "resolution": resolution,
            "size": {
                "text_encoder": clip_l,
                "text_encoder_2": clip_g,
                "text_encoder_3": t5,
                "transformer": sd3_transformer,
            },
        },
        "flux": {
            "resolution": resolution,
            "size": {"text_encoder": clip_l, "text_encoder_2": t5, "transformer": flux_transformer},
        },
    }


# Architectures by purpose, each (captioner options, {generator family: generator options}): "test" is the
# fastest that exercises every code path (latent space, VAE), in every family; "shapes-base" is the one the
# demo's base models are trained from (make base): wide enough to learn the shapes world, pixel space (no VAE
# to train), v-prediction on a cosine schedule. The "bench-" ones are the model sizes `make bench` times:
# "bench-tiny" (a 0.99M-parameter UNet with diffusers' fast-test CLIP text encoder, 32 px), "bench-small"
# (17.8M UNet, 64 px), each with SDXL, SD3 and Flux denoisers of about the same size, and
# "bench-sd15-blip-base" and "bench-sdxl-blip-base" (SD 1.5's UNet, VAE and CLIP-L text tower at 512 px, or
# SDXL base's UNet, VAE, CLIP-L and OpenCLIP bigG at 1024 px, with BLIP-base at 384 px, random weights:
# GPU-sized stand-ins).
PRESETS: dict[str, tuple[dict[str, Any], dict[str, dict[str, Any]]]] = {
    "test": ({}, {family: {} for family in TINY_GENERATORS}),
    "shapes-base": (
        {"hidden_size": 64},
        {
            "sd": {
                "with_vae": False,
                "text_hidden_size": 64,
                "prediction_type": "v_prediction",
                "beta_schedule": "squaredcos_cap_v2",
                # Few-step DDIM then starts from pure noise at the last training timestep.
                "timestep_spacing": "trailing",
                # Attention only at 8x8: at 32x32 it would cost most of the step on a CPU.
                "unet_options": {
                    "block_out_channels": (16, 32, 64),
                    "norm_num_groups": 8,
                    "attention_head_dim": 4,
                    "down_block_types": ("DownBlock2D", "DownBlock2D", "CrossAttnDownBlock2D"),
                    "up_block_types": ("CrossAttnUpBlock2D", "UpBlock2D", "UpBlock2D"),
                },
            }
        },
    ),
    "bench-tiny": (
        {},
        {
            "sd": {
                "unet_options": _unet_levels((32, 64), layers=1, attention=(False, True)),
                "text_options": _TINY_CLIP_TEXT,
            },
            # CLIP-L as SD's text encoder above, bigG 48 and T5 96 wide; SDXL's toy UNet (1.04M), 6 SD3 joint
            # blocks 64 wide (0.90M), 2 double- and 2 single-stream Flux blocks 96 wide (1.07M).
            **_other_families(
                resolution=32,
                clip_l=_TINY_CLIP_TEXT,
                clip_g={"vocab_size": _CLIP_VOCAB_SIZE},
                t5={"vocab_size": _T5_VOCAB_SIZE},
                sdxl_unet={},
                sd3_transformer={"num_layers": 6, "attention_head_dim": 32},
                flux_transformer={
                    "num_layers": 2,
                    "num_single_layers": 2,
                    "num_attention_heads": 3,
                    "attention_head_dim": 32,
                    "axes_dims_rope": (8, 12, 12),
                },
            ),
        },
    ),
    "bench-small": (
        {"image_size": 64, "hidden_size": 128},
        {
            "sd": {
                "resolution": 64,
                "unet_options": _unet_levels((64, 128, 256), layers=2, attention=(True, True, False)),
                "text_hidden_size": 128,
                "text_options": {"intermediate_size": 512, "vocab_size": _CLIP_VOCAB_SIZE},
            },
            # CLIP-L as SD's text encoder above, bigG 192 and T5 384 wide (wider than both CLIPs, as SD3
            # needs); an SDXL UNet (64,128,192) with 64-channel heads at its two lower levels (16.9M), 8 SD3
            # joint blocks 256 wide (18.6M), 4 double- and 8 single-stream Flux blocks 256 wide (18.0M).
            **_other_families(
                resolution=64,
                clip_l={"hidden_size": 128, "intermediate_size": 512, "vocab_size": _CLIP_VOCAB_SIZE},
                clip_g={"hidden_size": 192, "num_attention_heads": 3, "vocab_size": _CLIP_VOCAB_SIZE},
                t5={"d_model": 384, "vocab_size": _T5_VOCAB_SIZE},
                sdxl_unet=_unet_levels((64, 128, 192), layers=2, attention=(False, True, True))
                | {"attention_head_dim": (1, 2, 3)},
                sd3_transformer={"num_layers": 8, "num_attention_heads": 4, "attention_head_dim": 64},
                flux_transformer={
                    "num_layers": 4,
                    "num_single_layers": 8,
                    "num_attention_heads": 4,
                    "attention_head_dim": 64,
                    "axes_dims_rope": (16, 24, 24),
                },
            ),
        },
    ),
    "bench-sd15-blip-base": (
        _BLIP_BASE,
        {
            "sd": {
                "resolution": 512,
                "unet_options": _unet_levels(
                    (320, 640, 1280, 1280), layers=2, attention=(True, True, True, False)
                ),
                "vae_options": {"block_out_channels": (128, 256, 512, 512), "layers_per_block": 2},
                "text_hidden_size": 768,
                "text_options": {**_BASE_LAYERS, "hidden_act": "quick_gelu", "vocab_size": _CLIP_VOCAB_SIZE},
            }
        },
    ),
    "bench-sdxl-blip-base": (
        _BLIP_BASE,
        {
            "sdxl": {
                "resolution": 1024,
                "size": {
                    "text_encoder": {**_BASE_LAYERS, "hidden_size": 768, "vocab_size": _CLIP_VOCAB_SIZE},
                    "text_encoder_2": {
                        "hidden_size": 1280,
                        "intermediate_size": 5120,
                        "num_hidden_layers": 32,
                        "num_attention_heads": 20,
                        "vocab_size": _CLIP_VOCAB_SIZE,
                    },
                    # 64-channel heads (diffusers' SDXL config names their counts attention_head_dim), 1, 2
                    # and 10 transformer layers at the three levels; a time id embedded 256 wide.
                    "unet": _unet_levels((320, 640, 1280), layers=2, attention=(False, True, True))
                    | {
                        "attention_head_dim": (5, 10, 20),
                        "transformer_layers_per_block": (1, 2, 10),
                        "addition_time_embed_dim": 256,
                    },
                    # SDXL's VAE overflows in fp16: diffusers decodes it in fp32.
                    "vae": {
                        "block_out_channels": (128, 256, 512, 512),
                        "layers_per_block": 2,
                        "force_upcast": True,
                    },
                },
            }
        },
    ),
}


def save_preset(
    out_dir: Path, preset: str, *, seed: int = 0, captioner: str = BlipSpec.name, generator: str = "sd"
) -> tuple[Path, Path]:
    """out_dir/captioner and out_dir/generator of one PRESETS architecture; returns their folders.

    The presets size BLIP and whichever generator families they list; another captioner family (a SPECS name)
    is written at its own tiny size, with the "test" preset only.
    """
    if preset not in PRESETS:
        raise ValueError(f"unknown tiny-model preset {preset!r}; choose from {sorted(PRESETS)}")
    specs = {spec.name: spec for spec in SPECS}
    if captioner not in specs:
        raise ValueError(f"unknown captioner family {captioner!r}; choose from {sorted(specs)}")
    captioner_options, generators = PRESETS[preset]
    if captioner != BlipSpec.name and captioner_options:
        raise ValueError(f"preset {preset!r} sizes a BLIP captioner; use --preset test with {captioner}")
    if generator not in TINY_GENERATORS:
        raise ValueError(f"unknown generator family {generator!r}; choose from {sorted(TINY_GENERATORS)}")
    if generator not in generators:
        raise ValueError(
            f"preset {preset!r} has no {generator} generator; its families: {sorted(generators)}"
        )
    generator_options = generators[generator]
    out_dir = Path(out_dir)
    return (
        specs[captioner].save_tiny(out_dir / "captioner", seed=seed, **captioner_options),
        TINY_GENERATORS[generator](out_dir / "generator", seed=seed, **generator_options),
    )


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description="Write a tiny random-init captioner and generator.")
    parser.add_argument(
        "--captioner",
        choices=[spec.name for spec in SPECS],
        default=BlipSpec.name,
        help="captioner family, written with a tokenizer of its own kind",
    )
    parser.add_argument(
        "--generator",
        choices=sorted(TINY_GENERATORS),
        default="sd",
        help="generator family, written in its diffusers pipeline layout",
    )
    parser.add_argument(
        "--out", type=Path, required=True, help="folder that receives captioner/ and generator/"
    )
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument(
        "--preset", choices=sorted(PRESETS), default="test", help="architecture (see PRESETS)"
    )
    args = parser.parse_args(argv)
    folders = save_preset(
        args.out, args.preset, seed=args.seed, captioner=args.captioner, generator=args.generator
    )
    for folder in folders:
        print(folder)


if __name__ == "__main__":
    main()
