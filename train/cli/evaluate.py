"""Evaluate a checkpoint (or an export, or the base models) on the config's validation data.

    python -m train.cli.evaluate --config configs/blip_sd15_coco.yaml --checkpoint runs/coco/checkpoint-2000 \\
        evaluation.fid_feature_weights=/weights/pt_inception-2015-12-05-6726825d.pth

Captions every validation image (beam search) and scores them against all its references (BLEU-1..4,
METEOR, ROUGE-L, CIDEr-D, SPICE); draws an image from each image's first reference and compares it with the
image (FID, KID, CLIP-I, DINO, LPIPS, PSNR, SSIM); re-captions the drawn image and compares that with the
reference (SBERT, CLIP text, CIDEr-D); on the shapes world, also reads captions (parse) and drawn images (the
oracle) back into attributes. A metric whose weights are not configured is skipped with a message naming
the option to set (pass it as an override, as above). Prints a table and writes the metrics as JSON.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Iterator, Sequence
from pathlib import Path

from tqdm.auto import tqdm

from cycletune.data.batching import batched
from cycletune.data.images import load_pixels
from cycletune.evaluation.availability import MetricResult, check_metric_names
from cycletune.evaluation.sample_metrics import (
    SHAPES_METRICS,
    VALIDATION_METRICS,
    MetricNeeds,
    SampleBatch,
    compute_metrics,
    sample_batch,
)
from cycletune.models.captioner import Captioner
from cycletune.models.generator import Generator
from cycletune.models.sampling_settings import SamplingSettings
from cycletune.train.cli.help_format import HelpFormatter
from cycletune.train.cli.sampling_arguments import add_output_argument, add_steps_and_guidance_arguments
from cycletune.train.config import Config, ConfigError
from cycletune.train.inference import add_model_arguments, load_options, model_sources
from cycletune.train.queries import ImageQuery, config_records, image_queries


def default_metrics(config: Config) -> list[str]:
    """Every metric; the shapes ones only when the evaluated data is the shapes world."""
    role = config.data.validation or config.data.paired
    shapes_world = all(source.type == "shapes" for source in role)
    return [name for name in VALIDATION_METRICS if shapes_world or name not in SHAPES_METRICS]


def evaluation_batches(
    captioner: Captioner,
    generator: Generator,
    queries: Sequence[ImageQuery],
    needs: MetricNeeds,
    settings: SamplingSettings,
    *,
    resolution: int,
    batch_size: int,
) -> Iterator[SampleBatch]:
    for batch in batched(queries, batch_size):
        pixels = load_pixels([query.image for query in batch], resolution).to(captioner.device)
        references = [list(query.references) for query in batch]
        yield sample_batch(
            captioner, generator, [query.id for query in batch], pixels, references, needs, settings
        )


def format_table(results: dict[str, MetricResult]) -> str:
    """One line per metric, then why each skipped one was skipped (with the option to set)."""
    width = max(len(name) for name in results) + 2
    lines = [f"{'metric':<{width}}value"]
    lines += [
        f"{name:<{width}}{'skipped' if result.skipped else f'{result.value:.4f}'}"
        for name, result in results.items()
    ]
    reasons = [result.skipped_reason for result in results.values() if result.skipped]
    if reasons:
        lines += ["", "skipped:", *(f"  {reason}" for reason in reasons)]
    return "\n".join(lines)


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=HelpFormatter)
    add_model_arguments(parser)
    parser.add_argument("overrides", nargs="*", help="dotted config overrides, e.g. evaluation.lpips_net=vgg")
    parser.add_argument(
        "--metrics", help=f"comma-separated subset (default: all); known: {','.join(VALIDATION_METRICS)}"
    )
    parser.add_argument("--limit", type=int, help="evaluate only the first N validation images")
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--num-beams", type=int, default=SamplingSettings.num_beams)
    add_steps_and_guidance_arguments(
        parser,
        steps_default=None,
        guidance_default=None,
        steps_help="default: the config's train.validation_inference_steps",
        guidance_help="default: the config's train.validation_guidance_scale",
    )
    parser.add_argument("--seed", type=int, help="default: the config's seed")
    parser.add_argument(
        "--quiet",
        action="store_true",
        help="no progress bar, no line per metric group (the bar is off when not a TTY)",
    )
    add_output_argument(
        parser, required=False, help="metrics JSON (default: <checkpoint or output_dir>/metrics.json)"
    )
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    try:
        models = model_sources(args, args.overrides)
        config = models.config
        if config is None:
            raise ConfigError(
                "pass --config: it names the validation data (and the base models of an export)"
            )
        requested = args.metrics.split(",") if args.metrics else default_metrics(config)
        names = check_metric_names(requested, VALIDATION_METRICS)
        queries = image_queries(config_records(config), args.limit)
        captioner, generator = models.load(**load_options(args))
        train = config.train
        steps = train.validation_inference_steps if args.inference_steps is None else args.inference_steps
        guidance = train.validation_guidance_scale if args.guidance_scale is None else args.guidance_scale
        settings = SamplingSettings(
            seed=config.seed if args.seed is None else args.seed,
            num_beams=args.num_beams,
            num_inference_steps=steps,
            guidance_scale=guidance,
        )
        batches = evaluation_batches(
            captioner,
            generator,
            queries,
            MetricNeeds.of(names),
            settings,
            resolution=config.data.resolution,
            batch_size=args.batch_size,
        )
        total = -(-len(queries) // args.batch_size)
        progress = tqdm(
            batches, desc="batches", unit="batch", total=total, disable=True if args.quiet else None
        )
        say = None if args.quiet else (lambda message: print(message, file=sys.stderr, flush=True))
        results = compute_metrics(names, progress, config.evaluation, args.device, announce=say)
    except (ValueError, FileNotFoundError) as error:  # bad input, named in the message
        print(f"error: {error}", file=sys.stderr)
        return 2
    print(format_table(results))
    out = args.out or (args.checkpoint or Path(config.output_dir)) / "metrics.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    summary = {
        "checkpoint": None if args.checkpoint is None else str(args.checkpoint),
        "images": len(queries),
        "metrics": {name: result.value for name, result in results.items() if not result.skipped},
        "skipped": {name: result.skipped_reason for name, result in results.items() if result.skipped},
    }
    out.write_text(json.dumps(summary, indent=2) + "\n", encoding="utf-8")
    print(f"metrics: {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
