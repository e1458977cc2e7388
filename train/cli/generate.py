"""Inference with trained models: caption a folder of images, or generate images for a file of prompts.

    python -m train.cli.generate captions --images photos/ --checkpoint runs/x/export --out captions.jsonl
    python -m train.cli.generate images --prompts prompts.txt --checkpoint runs/x/checkpoint-2000 --out images/

Models come from a checkpoint-N folder (rebuilt from its config.yaml), an export folder (its captioner/
PEFT adapter and generator/ diffusers LoRA, loaded as PEFT and diffusers load them, onto the base models
named by --config, the run's config.yaml beside the export folder, or --captioner / --generator), or base
models with --captioner-adapter / --generator-lora. Every random draw is seeded per input id, so an
image or prompt gets the same output in any batch.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Sequence
from pathlib import Path

from data.batching import batched
from data.images import load_pixels
from evaluation.candidates import generate_images, nucleus_captions
from evaluation.rankings_file import save_png
from models.captioner import Captioner
from models.generator import Generator
from models.sampling_settings import SamplingSettings
from train.cli.help_format import HelpFormatter
from train.cli.sampling_arguments import (
    add_caption_sampling_arguments,
    add_image_sampling_arguments,
    add_output_argument,
    add_seed_argument,
)
from train.inference import add_model_arguments, model_sources
from train.queries import ImageQuery, TextQuery, folder_records, image_queries, prompt_records, text_queries


def caption_folder(
    captioner: Captioner, queries: Sequence[ImageQuery], args: argparse.Namespace
) -> list[dict]:
    """One row per image: its id and its captions (beam search, or seeded nucleus sampling with --sample)."""
    rows = []
    for batch in batched(queries, args.batch_size):
        pixels = load_pixels([query.image for query in batch], captioner.image_size).to(captioner.device)
        ids = [query.id for query in batch]
        if args.sample:
            captions = nucleus_captions(
                captioner,
                pixels,
                ids,
                count=args.num_captions,
                top_p=args.top_p,
                temperature=args.temperature,
                seed=args.seed,
                max_new_tokens=args.max_new_tokens,
                prompt=args.prompt,
            )
        else:
            captions = captioner.generate(
                pixels,
                num_beams=args.num_beams,
                num_return_sequences=args.num_captions,
                max_new_tokens=args.max_new_tokens,
                prompt=args.prompt,
            )
        rows.extend(
            {"id": query_id, "captions": texts} for query_id, texts in zip(ids, captions, strict=True)
        )
    return rows


def draw_prompts(generator: Generator, queries: Sequence[TextQuery], args: argparse.Namespace) -> list[dict]:
    """num_images PNGs per prompt under args.out; one row per prompt with its files."""
    rows = []
    for batch in batched(queries, args.batch_size):
        images = generate_images(
            generator,
            [query.text for query in batch],
            [query.id for query in batch],
            num_images=args.num_images,
            seed=args.seed,
            num_inference_steps=args.inference_steps,
            guidance_scale=args.guidance_scale,
        )
        for query, query_images in zip(batch, images, strict=True):
            files = []
            for index, image in enumerate(query_images):
                name = f"{len(rows):05d}_{index}.png"
                save_png(image, args.out / name)
                files.append(name)
            rows.append({"id": query.id, "prompt": query.text, "files": files})
    return rows


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=HelpFormatter)
    modes = parser.add_subparsers(dest="mode", required=True)
    captions = modes.add_parser(
        "captions", formatter_class=HelpFormatter, help="caption every image of a folder"
    )
    captions.add_argument(
        "--images", type=Path, required=True, help="folder of images (searched recursively)"
    )
    add_output_argument(captions, required=True, help="JSONL file: one row per image")
    captions.add_argument("--num-beams", type=int, default=SamplingSettings.num_beams)
    captions.add_argument("--num-captions", type=int, default=1, help="captions per image")
    captions.add_argument(
        "--sample", action="store_true", help="nucleus sampling (seeded) instead of beam search"
    )
    add_caption_sampling_arguments(captions)
    captions.add_argument("--prompt", help="text every caption continues (stripped from the output)")
    captions.add_argument("--batch-size", type=int, default=8)
    images = modes.add_parser(
        "images", formatter_class=HelpFormatter, help="generate images for a prompts file"
    )
    images.add_argument(
        "--prompts", type=Path, required=True, help=".txt (one per line) or .jsonl ({'text': ...})"
    )
    add_output_argument(images, required=True, help="folder for the PNGs and images.jsonl")
    images.add_argument("--num-images", type=int, default=1, help="images per prompt")
    images.add_argument("--batch-size", type=int, default=4, help="prompts per sampling batch")
    add_image_sampling_arguments(images)
    for subparser in (captions, images):
        add_seed_argument(subparser)
        add_model_arguments(subparser)
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    try:
        models_from = model_sources(args)
        if args.mode == "captions":
            queries = image_queries(folder_records(args.images))
            captioner, _ = models_from.load(generator=False, device=args.device)
            rows = caption_folder(captioner, queries, args)
            args.out.parent.mkdir(parents=True, exist_ok=True)
            args.out.write_text("".join(json.dumps(row) + "\n" for row in rows), encoding="utf-8")
            for row in rows:
                print(f"{row['id']}: {' | '.join(row['captions'])}")
            print(f"wrote {len(rows)} images' captions to {args.out}")
        else:
            queries = text_queries(prompt_records(args.prompts))
            _, generator = models_from.load(captioner=False, device=args.device)
            args.out.mkdir(parents=True, exist_ok=True)
            rows = draw_prompts(generator, queries, args)
            (args.out / "images.jsonl").write_text(
                "".join(json.dumps(row) + "\n" for row in rows), encoding="utf-8"
            )
            print(
                f"wrote {sum(len(row['files']) for row in rows)} images for {len(rows)} prompts to {args.out}"
            )
    except (ValueError, FileNotFoundError) as error:  # bad input (ModelLoadError, ConfigError, sources)
        print(f"error: {error}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
