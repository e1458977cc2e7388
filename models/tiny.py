"""Tiny random-initialised captioner and generator, saved in the standard Hugging Face / diffusers layouts.

Nothing can be downloaded in this project's build and test environments, so tests and the demo build these
models from small configs, save them with save_pretrained, and load them back with the same from_pretrained
code that users run on hub ids. Every tokenizer is written from one word list, in the format the real models
ship (CLIP byte-level BPE vocab.json + merges.txt for Stable Diffusion here; each captioner family's own kind
in models/captioners/), so every code path that reads token strings or ids is exercised for real.

CLI: ``python -m models.tiny --out DIR [--captioner FAMILY]`` writes DIR/captioner (BLIP unless FAMILY names
another family of models/captioners/) and DIR/generator.
"""

from __future__ import annotations

import argparse
import json
import re
from collections import Counter
from collections.abc import Sequence
from itertools import pairwise
from pathlib import Path
from typing import Any

from models.captioners import SPECS
from models.captioners.blip import BlipSpec
from models.tiny_vocabulary import check_vocab_size, clean_words, seeded

_CLIP_BOS, _CLIP_EOS, _CLIP_WORD_END = "<|startoftext|>", "<|endoftext|>", "</w>"
_CLIP_MAX_LENGTH = 77
# CLIP's pre-tokenizer splits text into letter runs, single digits and punctuation runs before BPE.
_CLIP_PRETOKEN = re.compile(r"[^\W\d_]+|\d|[^\s\w]+")


# ---------------------------------------------------------------------------------------------- generator


def _learn_bpe_merges(words: Sequence[str]) -> list[tuple[str, str]]:
    """Merges that turn every training word into one token, learnt greedily by pair frequency like BPE.

    Learning merges (rather than listing each word's prefixes) keeps the ranks consistent, so the BPE
    tokenizer, which applies merges by rank, reproduces every training word as a single token.
    """
    symbols = [[*word[:-1], word[-1] + _CLIP_WORD_END] for word in words]
    merges: list[tuple[str, str]] = []
    while True:
        pair_counts = Counter(pair for word in symbols for pair in pairwise(word))
        if not pair_counts:
            return merges
        # Most frequent first; ties broken by the pair itself so the vocabulary is deterministic.
        best = min(pair_counts, key=lambda pair: (-pair_counts[pair], pair))
        merges.append(best)
        symbols = [_apply_merge(word, best) for word in symbols]


def _apply_merge(word: list[str], pair: tuple[str, str]) -> list[str]:
    merged: list[str] = []
    i = 0
    while i < len(word):
        if i + 1 < len(word) and (word[i], word[i + 1]) == pair:
            merged.append(word[i] + word[i + 1])
            i += 2
        else:
            merged.append(word[i])
            i += 1
    return merged


def _write_clip_bpe(words: Sequence[str], folder: Path) -> tuple[dict[str, int], list[tuple[str, str]]]:
    """vocab.json + merges.txt in CLIP's layout: 256 byte symbols, the same with </w>, merges, specials.

    The full byte alphabet means any text, including unknown words, tokenizes into byte-level pieces.
    """
    from transformers.convert_slow_tokenizer import bytes_to_unicode

    byte_symbols = list(bytes_to_unicode().values())
    byte_encoder = bytes_to_unicode()
    pretokens = {
        "".join(byte_encoder[b] for b in piece.encode("utf-8"))
        for word in words
        for piece in _CLIP_PRETOKEN.findall(word)
    }
    merges = _learn_bpe_merges(sorted(pretokens))
    tokens = [*byte_symbols, *(s + _CLIP_WORD_END for s in byte_symbols), *(a + b for a, b in merges)]
    tokens += [_CLIP_BOS, _CLIP_EOS]
    vocab = {token: index for index, token in enumerate(dict.fromkeys(tokens))}
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "vocab.json").write_text(json.dumps(vocab, ensure_ascii=False), encoding="utf-8")
    merge_lines = ["#version: 0.2", *(f"{a} {b}" for a, b in merges)]
    (folder / "merges.txt").write_text("\n".join(merge_lines) + "\n", encoding="utf-8")
    return vocab, merges


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

    from models.generator import stable_diffusion_pipeline

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
    vocab, merges = _write_clip_bpe(clean_words(vocab_words), tokenizer_dir)
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
    stable_diffusion_pipeline(
        vae=vae, text_encoder=text_encoder, tokenizer=tokenizer, unet=unet, scheduler=scheduler
    ).save_pretrained(out_dir)
    return out_dir


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


# CLIP's vocabulary size: the bench's text encoders have its embedding rows (those past the tokenizer's unused).
_CLIP_VOCAB_SIZE = 49408
# Transformer layers of CLIP ViT-L/14's text tower and of BLIP-base's vision and text towers (768 wide).
_BASE_LAYERS = {"intermediate_size": 3072, "num_hidden_layers": 12, "num_attention_heads": 12}

# Architectures by purpose: "test" is the fastest that exercises every code path (latent space, VAE);
# "shapes-base" is the one the demo's base models are trained from (make base): wide enough to learn the
# shapes world, pixel space (no VAE to train), v-prediction on a cosine schedule. The "bench-" ones are the
# model sizes `make bench` times: "bench-tiny" (a 0.99M-parameter UNet with diffusers' fast-test CLIP text
# encoder, 32 px), "bench-small" (17.8M UNet, 64 px) and "bench-sd15-blip-base" (SD 1.5's UNet, VAE and CLIP-L
# text tower at 512 px and BLIP-base at 384 px, random weights: a GPU-sized stand-in).
PRESETS: dict[str, tuple[dict[str, Any], dict[str, Any]]] = {
    "test": ({}, {}),
    "shapes-base": (
        {"hidden_size": 64},
        {
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
        },
    ),
    "bench-tiny": (
        {},
        {
            "unet_options": _unet_levels((32, 64), layers=1, attention=(False, True)),
            "text_options": {
                "intermediate_size": 37,
                "num_hidden_layers": 5,
                "num_attention_heads": 4,
                "vocab_size": _CLIP_VOCAB_SIZE,
            },
        },
    ),
    "bench-small": (
        {"image_size": 64, "hidden_size": 128},
        {
            "resolution": 64,
            "unet_options": _unet_levels((64, 128, 256), layers=2, attention=(True, True, False)),
            "text_hidden_size": 128,
            "text_options": {"intermediate_size": 512, "vocab_size": _CLIP_VOCAB_SIZE},
        },
    ),
    "bench-sd15-blip-base": (
        {
            "image_size": 384,
            "hidden_size": 768,
            "num_layers": 12,
            "vision_options": {**_BASE_LAYERS, "patch_size": 16},
            "text_options": {**_BASE_LAYERS, "vocab_size": 30524, "max_position_embeddings": 512},
        },
        {
            "resolution": 512,
            "unet_options": _unet_levels(
                (320, 640, 1280, 1280), layers=2, attention=(True, True, True, False)
            ),
            "vae_options": {"block_out_channels": (128, 256, 512, 512), "layers_per_block": 2},
            "text_hidden_size": 768,
            "text_options": {**_BASE_LAYERS, "hidden_act": "quick_gelu", "vocab_size": _CLIP_VOCAB_SIZE},
        },
    ),
}


def save_preset(
    out_dir: Path, preset: str, *, seed: int = 0, captioner: str = BlipSpec.name
) -> tuple[Path, Path]:
    """out_dir/captioner and out_dir/generator of one PRESETS architecture; returns their folders.

    The presets size BLIP; another captioner family (a SPECS name) is written at its own tiny size, with the
    "test" preset only.
    """
    if preset not in PRESETS:
        raise ValueError(f"unknown tiny-model preset {preset!r}; choose from {sorted(PRESETS)}")
    specs = {spec.name: spec for spec in SPECS}
    if captioner not in specs:
        raise ValueError(f"unknown captioner family {captioner!r}; choose from {sorted(specs)}")
    captioner_options, generator_options = PRESETS[preset]
    if captioner != BlipSpec.name and captioner_options:
        raise ValueError(f"preset {preset!r} sizes a BLIP captioner; use --preset test with {captioner}")
    out_dir = Path(out_dir)
    return (
        specs[captioner].save_tiny(out_dir / "captioner", seed=seed, **captioner_options),
        save_tiny_generator(out_dir / "generator", seed=seed, **generator_options),
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
        "--out", type=Path, required=True, help="folder that receives captioner/ and generator/"
    )
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument(
        "--preset", choices=sorted(PRESETS), default="test", help="architecture (see PRESETS)"
    )
    args = parser.parse_args(argv)
    for folder in save_preset(args.out, args.preset, seed=args.seed, captioner=args.captioner):
        print(folder)


if __name__ == "__main__":
    main()
