"""The sampling flags the generate and rerank CLIs share, with their defaults from the settings types.

--num_inference_steps, --guidance_scale and --seed draw images (models/sampling_settings.py), and for the
tools that draw images from prompts, --negative_prompt and --scheduler (models/image_sampling.py); --top-p,
--temperature and --max-new-tokens sample captions (evaluation/candidates.py). One definition keeps the
flags' names, types and defaults the same in every tool. Where a flag means what a diffusers script's flag
means, it has that name first (--num_inference_steps, --guidance_scale, --output_dir,
--pretrained_model_name_or_path), our earlier spelling kept as an alias.
"""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

from cycletune.evaluation.candidates import CaptionSampling
from cycletune.models.sampling_settings import SamplingSettings


def add_seed_argument(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--seed", type=int, default=SamplingSettings.seed, help="seeds every draw, per query id"
    )


def add_image_sampling_arguments(parser: argparse.ArgumentParser) -> None:
    add_steps_and_guidance_arguments(
        parser,
        steps_default=SamplingSettings.num_inference_steps,
        guidance_default=SamplingSettings.guidance_scale,
    )


def add_prompt_drawing_arguments(parser: argparse.ArgumentParser) -> None:
    """--negative_prompt and --scheduler, as diffusers' pipelines and users name them."""
    parser.add_argument(
        "--negative_prompt",
        help="text classifier-free guidance steers away from; needs --guidance_scale > 1 (Flux: true CFG, "
        "as FluxPipeline's true_cfg_scale) (default: the empty prompt; SDXL: zero embeddings where the checkpoint "
        "sets force_zeros_for_empty_prompt, as its pipeline does)",
    )
    parser.add_argument(
        "--scheduler",
        metavar="CLASS",
        help="a diffusers scheduler class compatible with the checkpoint's (EulerDiscreteScheduler, "
        "DPMSolverMultistepScheduler, UniPCMultistepScheduler, ...; FlowMatchEulerDiscreteScheduler for SD3 "
        "and Flux), built from its config; the family's diffusers pipeline then draws "
        "(default: the built-in sampler: DDIM, or flow-matching Euler)",
    )


def image_drawing(args: argparse.Namespace) -> dict[str, Any]:
    """generate_images' keywords from the flags of a tool that draws images from prompts (--num-images,
    the image sampling and prompt drawing flags, --seed), so each tool draws alike."""
    return {
        "num_images": args.num_images,
        "seed": args.seed,
        "num_inference_steps": args.inference_steps,
        "guidance_scale": args.guidance_scale,
        "negative_prompt": args.negative_prompt,
        "scheduler": args.scheduler,
    }


def add_steps_and_guidance_arguments(
    parser: argparse.ArgumentParser,
    *,
    steps_default: int | None,
    guidance_default: float | None,
    steps_help: str | None = None,
    guidance_help: str | None = None,
) -> None:
    """--num_inference_steps (alias --inference-steps) and --guidance_scale (alias --guidance-scale)."""
    parser.add_argument(
        "--num_inference_steps",
        "--inference-steps",
        dest="inference_steps",
        type=int,
        default=steps_default,
        help=steps_help,
    )
    parser.add_argument(
        "--guidance_scale",
        "--guidance-scale",
        dest="guidance_scale",
        type=float,
        default=guidance_default,
        help=guidance_help,
    )


def add_output_argument(
    parser: argparse.ArgumentParser, *, required: bool, help: str, **options: object
) -> None:
    """--output_dir (diffusers' name), alias --out."""
    parser.add_argument(
        "--output_dir", "--out", dest="out", type=Path, required=required, help=help, **options
    )


def add_caption_sampling_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--top-p", type=float, default=CaptionSampling.top_p, help="nucleus sampling mass")
    parser.add_argument("--temperature", type=float, default=CaptionSampling.temperature)
    parser.add_argument("--max-new-tokens", type=int, help="default: the captioner's max_length")
