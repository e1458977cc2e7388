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
import sys
from collections.abc import Iterator, Sequence
from pathlib import Path

from cycletune.data.batching import batched
from cycletune.data.images import load_pixels
from cycletune.evaluation.candidates import generate_images, nucleus_captions
from cycletune.evaluation.rankings_file import save_png
from cycletune.models.captioner import Captioner
from cycletune.models.generator import Generator
from cycletune.models.sampling_settings import SamplingSettings
from cycletune.train.cli.help_format import HelpFormatter
from cycletune.train.cli.jsonl_rows import add_resume_arguments, write_rows, written_ids
from cycletune.train.cli.sampling_arguments import (
    add_caption_sampling_arguments,
    add_image_sampling_arguments,
    add_output_argument,
    add_prompt_drawing_arguments,
    add_seed_argument,
    image_drawing,
)
from cycletune.train.inference import add_model_arguments, load_options, model_sources
from cycletune.train.queries import (
    ImageQuery,
    TextQuery,
    folder_records,
    image_queries,
    prompt_records,
    text_queries,
)


def caption_folder(
    captioner: Captioner, queries: Sequence[ImageQuery], args: argparse.Namespace
) -> Iterator[dict]:
    """One row per image, batch by batch: its id and its captions (beam search, or seeded nucleus sampling
    with --sample)."""
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
        yield from (
            {"id": query_id, "captions": texts} for query_id, texts in zip(ids, captions, strict=True)
        )


def draw_prompts(
    generator: Generator, queries: Sequence[tuple[int, TextQuery]], args: argparse.Namespace
) -> Iterator[dict]:
    """num_images PNGs per prompt under args.out, named by the prompt's position in the prompts file (so a
    resumed run names them as an uninterrupted one); one row per prompt with its files."""
    for batch in batched(queries, args.batch_size):
        images = generate_images(
            generator,
            [query.text for _, query in batch],
            [query.id for _, query in batch],
            **image_drawing(args),
        )
        for (position, query), query_images in zip(batch, images, strict=True):
            files = []
            for index, image in enumerate(query_images):
                name = f"{position:05d}_{index}.png"
                save_png(image, args.out / name)
                files.append(name)
            yield {"id": query.id, "prompt": query.text, "files": files}


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
    add_prompt_drawing_arguments(images)
    for subparser in (captions, images):
        add_seed_argument(subparser)
        add_model_arguments(subparser)
        add_resume_arguments(subparser, "keep the rows a previous (interrupted) run wrote; make the rest")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    try:
        models_from = model_sources(args)
        if args.mode == "captions":
            queries = image_queries(folder_records(args.images))
            captioner, _ = models_from.load(generator=False, **load_options(args))
            args.out.parent.mkdir(parents=True, exist_ok=True)
            done = written_ids(args.out, args.resume)
            todo = [query for query in queries if query.id not in done]
            for row in write_rows(caption_folder(captioner, todo, args), args.out, len(todo), args.quiet):
                print(f"{row['id']}: {' | '.join(row['captions'])}")
            print(f"wrote {len(todo)} images' captions to {args.out} ({len(done)} kept from before)")
        else:
            queries = text_queries(prompt_records(args.prompts))
            _, generator = models_from.load(captioner=False, **load_options(args))
            args.out.mkdir(parents=True, exist_ok=True)
            done = written_ids(args.out / "images.jsonl", args.resume)
            todo = [(position, query) for position, query in enumerate(queries) if query.id not in done]
            rows = write_rows(
                draw_prompts(generator, todo, args), args.out / "images.jsonl", len(todo), args.quiet
            )
            files = sum(len(row["files"]) for row in rows)
            print(
                f"wrote {files} images for {len(todo)} prompts to {args.out} ({len(done)} kept from before)"
            )
    except (ValueError, FileNotFoundError) as error:  # bad input (ModelLoadError, ConfigError, sources)
        print(f"error: {error}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
