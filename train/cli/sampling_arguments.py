"""The sampling flags the generate and rerank CLIs share, with their defaults from the settings types.

--inference-steps, --guidance-scale and --seed draw images (models/sampling_settings.py); --top-p,
--temperature and --max-new-tokens sample captions (evaluation/candidates.py). One definition keeps the
flags' names, types and defaults the same in every tool.
"""

from __future__ import annotations

import argparse

from evaluation.candidates import CaptionSampling
from models.sampling_settings import SamplingSettings


def add_seed_argument(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--seed", type=int, default=SamplingSettings.seed, help="seeds every draw, per query id"
    )


def add_image_sampling_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--inference-steps", type=int, default=SamplingSettings.num_inference_steps)
    parser.add_argument("--guidance-scale", type=float, default=SamplingSettings.guidance_scale)


def add_caption_sampling_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--top-p", type=float, default=CaptionSampling.top_p, help="nucleus sampling mass")
    parser.add_argument("--temperature", type=float, default=CaptionSampling.temperature)
    parser.add_argument("--max-new-tokens", type=int, help="default: the captioner's max_length")
