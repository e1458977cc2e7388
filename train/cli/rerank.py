"""Reconstruction reranking from the command line, and the rank-vs-quality report.

    # best caption per image: N candidates, each reconstructed and compared with the image
    python -m train.cli.rerank captions --checkpoint runs/x/checkpoint-2000 --images photos/ --out runs/x/rerank
    # best image per prompt: N generations, each re-captioned and compared with the prompt
    python -m train.cli.rerank images --checkpoint runs/x/export --prompts prompts.txt --out runs/x/rerank-images
    # mean quality of the candidates at each rank, with bootstrap confidence intervals
    python -m train.cli.rerank report --rankings runs/x/rerank/rankings.jsonl --metric cider_d

Without --images / --prompts the inputs are the config's validation data (data.validation, else
data.paired), references included, which the report needs. Each run writes OUT/rankings.jsonl (one row per
candidate: caption, image file, scores and ranks under both rankings), OUT/images/*.png and OUT/index.html,
a contact sheet to open in a browser. Each query's rows are written as soon as it is ranked, so an
interrupted run keeps its work; --resume (with the same flags) ranks only the queries still missing, and
the folder ends as an uninterrupted run leaves it (every draw is seeded per query id). See
evaluation/ranking.py and evaluation/rank_report.py for the method.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import TypeVar

from cycletune.data.batching import batched
from cycletune.data.images import load_pixels
from cycletune.evaluation.availability import MetricUnavailable
from cycletune.evaluation.candidates import CaptionSampling, generate_images
from cycletune.evaluation.metric_settings import EvaluationSettings, image_options, text_options
from cycletune.evaluation.rank_report import CAPTION_QUALITY, IMAGE_QUALITY, rank_report
from cycletune.evaluation.ranking import Ranking, RerankSettings, rank_images, rerank_captions
from cycletune.evaluation.rankings_file import RANKINGS_FILE, RankingWriter
from cycletune.evaluation.similarity import (
    IMAGE_SIMILARITIES,
    TEXT_SIMILARITIES,
    image_similarity,
    text_similarity_measure,
)
from cycletune.models.sampling_settings import SamplingSettings
from cycletune.train.cli.help_format import HelpFormatter
from cycletune.train.cli.jsonl_rows import add_resume_arguments, progress_bar, written_ids
from cycletune.train.cli.sampling_arguments import (
    add_caption_sampling_arguments,
    add_image_sampling_arguments,
    add_output_argument,
    add_prompt_drawing_arguments,
    add_seed_argument,
    image_drawing,
)
from cycletune.train.config import Config, ConfigError
from cycletune.train.inference import ModelSources, add_model_arguments, load_options, model_sources
from cycletune.train.queries import (
    ImageQuery,
    TextQuery,
    config_records,
    folder_records,
    image_queries,
    prompt_records,
    text_queries,
)

Query = TypeVar("Query", ImageQuery, TextQuery)

# Weight paths of the similarities, named as in the config's evaluation section; each is also a flag.
_WEIGHT_OPTIONS = {
    "lpips_backbone_weights": "torchvision ImageNet state dict for LPIPS' backbone",
    "clip_image_encoder": "local CLIP folder for clip_image_similarity",
    "dino_image_encoder": "local DINO folder for dino_similarity",
    "sbert_model": "local sentence-transformers folder (default: the packaged all-MiniLM-L6-v2)",
    "clip_text_encoder": "local CLIP folder for clip_text_similarity",
}


def _add_weight_arguments(parser: argparse.ArgumentParser) -> None:
    group = parser.add_argument_group("metric weights (default: the config's evaluation section)")
    for option, help_text in _WEIGHT_OPTIONS.items():
        group.add_argument(f"--{option.replace('_', '-')}", dest=option, help=help_text)
    group.add_argument("--lpips-net", choices=("alex", "vgg", "squeeze"))


def _evaluation_settings(args: argparse.Namespace, config: Config | None) -> EvaluationSettings:
    """The config's evaluation section (or the defaults), with the weight flags given on the command line."""
    settings = config.evaluation if config is not None else EvaluationSettings()
    given = {option: getattr(args, option) for option in (*_WEIGHT_OPTIONS, "lpips_net")}
    return settings.model_copy(update={option: value for option, value in given.items() if value is not None})


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=HelpFormatter)
    modes = parser.add_subparsers(dest="mode", required=True)

    captions = modes.add_parser(
        "captions", formatter_class=HelpFormatter, help="rank candidate captions of each image"
    )
    captions.add_argument(
        "--images", type=Path, help="image folder (with metadata.jsonl: captions as references)"
    )
    captions.add_argument(
        "--num-beams", type=int, default=4, help="beam-search candidates (top beams of one search)"
    )
    captions.add_argument("--num-samples", type=int, default=4, help="nucleus-sampled candidates")
    add_caption_sampling_arguments(captions)
    captions.add_argument(
        "--similarity", choices=IMAGE_SIMILARITIES, default="mse", help="reconstruction vs image"
    )
    captions.add_argument(
        "--score-timesteps", type=int, default=4, help="noise draws of the denoising-loss ranking"
    )

    images = modes.add_parser(
        "images", formatter_class=HelpFormatter, help="rank generated images of each prompt"
    )
    images.add_argument("--prompts", type=Path, help=".txt (one per line) or .jsonl prompts")
    images.add_argument("--num-images", type=int, default=4, help="generated candidates per prompt")
    images.add_argument(
        "--text-similarity",
        choices=("auto", *TEXT_SIMILARITIES),
        default="auto",
        help="re-caption vs prompt; auto: SBERT if available, else token_f1; cider_d: idf over one batch",
    )
    images.add_argument("--recaption-beams", type=int, default=SamplingSettings.num_beams)
    add_prompt_drawing_arguments(images)

    for subparser in (captions, images):
        add_output_argument(subparser, required=True, help="output folder")
        subparser.add_argument("--limit", type=int, help="rank only the first N queries")
        subparser.add_argument("--batch-size", type=int, default=4, help="queries per batch")
        add_image_sampling_arguments(subparser)
        add_seed_argument(subparser)
        add_model_arguments(subparser)
        _add_weight_arguments(subparser)
        add_resume_arguments(
            subparser, "keep the queries a previous (interrupted) run ranked in OUT; rank the rest"
        )

    report = modes.add_parser(
        "report",
        formatter_class=HelpFormatter,
        help="mean quality per rank, with bootstrap confidence intervals",
    )
    report.add_argument("--rankings", type=Path, required=True, help="a rankings.jsonl written by this tool")
    report.add_argument(
        "--metric",
        required=True,
        choices=sorted({*CAPTION_QUALITY, *IMAGE_QUALITY}),
        help=f"captions runs: {', '.join(CAPTION_QUALITY)}; images runs: {', '.join(IMAGE_QUALITY)}",
    )
    add_output_argument(
        report, required=False, help="report folder (default: report_<metric>/ beside the rankings)"
    )
    report.add_argument("--bootstrap-samples", type=int, default=1000)
    report.add_argument("--confidence", type=float, default=0.95)
    report.add_argument("--seed", type=int, default=0)
    report.add_argument("--device", default="cpu")
    _add_weight_arguments(report)
    return parser.parse_args(argv)


def rank_caption_candidates(args: argparse.Namespace, models: ModelSources) -> None:
    records = folder_records(args.images) if args.images else config_records(_config(models))
    queries = image_queries(records, args.limit)
    settings = _evaluation_settings(args, models.config)
    similarity = image_similarity(args.similarity, image_options(settings, args.device))
    captioner, generator = models.load(**load_options(args))
    sampling = CaptionSampling(
        num_beams=args.num_beams,
        num_samples=args.num_samples,
        top_p=args.top_p,
        temperature=args.temperature,
        max_new_tokens=args.max_new_tokens,
    )

    def rank(batch: list[ImageQuery]) -> list[Ranking]:
        pixels = load_pixels([query.image for query in batch], generator.resolution).to(args.device)
        rankings = rerank_captions(
            captioner,
            generator,
            pixels,
            [query.id for query in batch],
            candidate_sampling=sampling,
            similarity=similarity,
            settings=_rerank_settings(args, score_timesteps=args.score_timesteps),
        )
        for query, ranking in zip(batch, rankings, strict=True):
            ranking.references = list(query.references)
        return rankings

    _rank_queries(
        args,
        queries,
        rank,
        candidates=len(sampling.kinds),
        title=f"Best caption per image ({len(queries)} images)",
        summary=lambda query, ranking: f"{query.id}: {ranking.captions[ranking.best]}",
    )


def rank_image_candidates(args: argparse.Namespace, models: ModelSources) -> None:
    records = prompt_records(args.prompts) if args.prompts else config_records(_config(models))
    queries = text_queries(records, args.limit)
    similarity = text_similarity_measure(
        args.text_similarity, text_options(_evaluation_settings(args, models.config), args.device)
    )
    captioner, generator = models.load(**load_options(args))

    def rank(batch: list[TextQuery]) -> list[Ranking]:
        texts, ids = [query.text for query in batch], [query.id for query in batch]
        images = generate_images(generator, texts, ids, **image_drawing(args))
        rankings = rank_images(
            captioner,
            texts,
            ids,
            images,
            similarity=similarity,
            settings=_rerank_settings(args, num_beams=args.recaption_beams),
        )
        for query, ranking in zip(batch, rankings, strict=True):
            if query.image is not None:
                ranking.reference_image = load_pixels([query.image], generator.resolution)[0]
        return rankings

    _rank_queries(
        args,
        queries,
        rank,
        candidates=args.num_images,
        title=f"Best image per text ({len(queries)} texts)",
        summary=lambda query, ranking: f"{query.id}: best image {ranking.best} ({query.text})",
    )


def _rank_queries(
    args: argparse.Namespace,
    queries: Sequence[Query],
    rank: Callable[[list[Query]], list[Ranking]],
    *,
    candidates: int,
    title: str,
    summary: Callable[[Query, Ranking], str],
) -> None:
    """Rank the queries batch by batch into args.out, each stored as soon as it is ranked, under a progress
    bar over queries. With --resume, a query whose `candidates` rows rankings.jsonl already holds is kept
    (one cut short by the interruption is ranked again); every query is numbered by its position among all
    of them, so the rows and files are named as an uninterrupted run names them."""
    args.out.mkdir(parents=True, exist_ok=True)
    done = written_ids(
        args.out / RANKINGS_FILE,
        args.resume,
        id_field="query_id",
        complete=lambda rows: sorted(row["candidate"] for row in rows) == list(range(candidates)),
    )
    todo = [(position, query) for position, query in enumerate(queries) if query.id not in done]
    with (
        RankingWriter(args.out, title, append=True) as writer,
        progress_bar(len(todo), args.quiet, "query") as bar,
    ):
        for batch in batched(todo, args.batch_size):
            rankings = rank([query for _, query in batch])
            for (position, query), ranking in zip(batch, rankings, strict=True):
                writer.write(ranking, position)
                bar.update()
                bar.write(summary(query, ranking))
    print(f"ranked {len(todo)} queries ({len(queries) - len(todo)} kept from before)")
    print(f"rankings: {writer.jsonl_path}\ncontact sheet: {writer.html_path}")


def report(args: argparse.Namespace) -> None:
    _, files = rank_report(
        args.rankings,
        args.metric,
        args.out,
        bootstrap_samples=args.bootstrap_samples,
        confidence=args.confidence,
        seed=args.seed,
        options=image_options(_evaluation_settings(args, None), args.device),
    )
    print(files.markdown.read_text(encoding="utf-8"))
    print(f"table: {files.csv}\nplot: {files.plot}")


def _rerank_settings(
    args: argparse.Namespace,
    *,
    num_beams: int = SamplingSettings.num_beams,
    score_timesteps: int = RerankSettings.score_timesteps,
) -> RerankSettings:
    """Both modes' sampling flags, with the one knob of the mode: re-caption beams or score timesteps."""
    sampling = SamplingSettings(
        seed=args.seed,
        num_beams=num_beams,
        num_inference_steps=args.inference_steps,
        guidance_scale=args.guidance_scale,
    )
    return RerankSettings(sampling, score_timesteps)


def _config(models: ModelSources) -> Config:
    if models.config is None:
        raise ConfigError(
            "no inputs: pass --images / --prompts, or a --config (or checkpoint) whose data to rank"
        )
    return models.config


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    try:
        if args.mode == "report":
            report(args)
        elif args.mode == "captions":
            rank_caption_candidates(args, model_sources(args))
        else:
            rank_image_candidates(args, model_sources(args))
    except (ValueError, FileNotFoundError, MetricUnavailable) as error:  # bad input, named in the message
        print(f"error: {error}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
