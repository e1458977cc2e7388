"""The paper's ranking finding on the shapes world, with bootstrap intervals: `make rerank-study`.

    python -m train.cli.rerank_study      # rankings in runs/rerank-study, numbers and plots in docs/results

A better caption reconstructs its image better, and a better image is re-captioned closer to its prompt; so
among N candidates, ranking by reconstruction should pick better ones than chance. With the committed base
models (pretrained/shapes-base) and both parts of the test split (evaluation/shapes_split.py: seen and
unseen colour-shape combinations), this runs the rerank tool (train/cli/rerank.py) in both directions:
- captions: per test image 4 beams + 4 nucleus samples, ranked by reconstruction (pixel MSE between the
  image and the generator's drawing from each caption, one shared noise) and by the denoising loss;
- images: per test caption 8 drawings, ranked by re-captioning (the re-caption's similarity to the caption:
  SBERT when installed, else token F1) and by the captioner's loss of the caption.
Every candidate is judged exactly (evaluation/rank_report.py: a caption parsed against its image's scene, an
image read by the oracle against its caption's scene): all four attributes right (shapes_exact) and the
share right (shapes_accuracy). Reported with bootstrap intervals over inputs: the quality at each rank, the top-1
pick against a random pick, and Spearman's rho of each score with quality. Writes rerank_study.json (every
number, settings, seeds, wall time, versions) and rerank_captions.png / rerank_images.png to --results, and
prints the README table. The candidates' sampler was chosen on the validation split, never the test split:
5 DDIM steps at guidance 2 drew images as accurate as the demo's 10 steps (oracle exact accuracy 0.22 vs
0.23 seen, 0.28 vs 0.28 unseen, 64 captions each), at half the cost. A finished direction is reused when the
same command made it from the same base models; an interrupted one resumes.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import shutil
import sys
import time
from collections.abc import Sequence
from dataclasses import asdict, fields
from importlib.metadata import version
from pathlib import Path
from typing import Any

import numpy as np
import torch

from cycletune.data.shapes import Scene
from cycletune.evaluation.rank_report import (
    SHAPES_QUALITY,
    Bootstrap,
    Estimate,
    RankPanel,
    RankPoint,
    attribute_hits,
    plot_rank_quality,
    rank_quality,
    score_correlation,
    top_pick,
)
from cycletune.evaluation.ranking import RerankSettings
from cycletune.evaluation.rankings_file import RANKINGS_FILE, read_rankings
from cycletune.evaluation.rankings_sheet import StoredRanking
from cycletune.evaluation.shapes_split import TEST_SEEDS
from cycletune.models.sampling_settings import SamplingSettings
from cycletune.train.cli import rerank
from cycletune.train.cli.demo import base_identity
from cycletune.train.cli.help_format import HelpFormatter
from cycletune.train.cli.shapes_base import DEFAULT_BASE, DEFAULT_CONFIG, base_model_overrides
from cycletune.train.config import load_config, save_config

DIRECTIONS = ("captions", "images")
PARTS = ("all", *TEST_SEEDS)
# Each candidate's quality: all four attributes right, and the share right.
QUALITIES = ("shapes_exact", "shapes_accuracy")
RECORD_FILE = "study_command.json"
# The rerank tool's defaults, written out so the stored commands say them.
SCORE_TIMESTEPS = RerankSettings.score_timesteps
RECAPTION_BEAMS = SamplingSettings.num_beams
PACKAGES = ("torch", "transformers", "diffusers", "numpy", "scipy")
SETTINGS = (
    "num_beams",
    "num_samples",
    "num_images",
    "inference_steps",
    "guidance_scale",
    "seed",
    "bootstrap_samples",
    "confidence",
)


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=HelpFormatter)
    parser.add_argument("--config", type=Path, default=DEFAULT_CONFIG, help="the shapes world's config")
    parser.add_argument("--base", type=Path, default=DEFAULT_BASE, help="folder with captioner/, generator/")
    parser.add_argument(
        "--out", type=Path, default=Path("runs/rerank-study"), help="rankings, contact sheets"
    )
    parser.add_argument("--results", type=Path, default=Path("docs/results"), help="JSON and plots")
    parser.add_argument(
        "--inputs-per-part", type=int, default=100, help="test images (and captions) per part"
    )
    parser.add_argument("--num-beams", type=int, default=4, help="beam candidates per image")
    parser.add_argument("--num-samples", type=int, default=4, help="nucleus-sampled candidates per image")
    parser.add_argument("--num-images", type=int, default=8, help="drawn candidates per caption")
    parser.add_argument("--inference-steps", type=int, default=5, help="DDIM steps of every drawing")
    parser.add_argument("--guidance-scale", type=float, default=2.0)
    parser.add_argument("--seed", type=int, default=0, help="seeds every draw, per input id")
    parser.add_argument("--batch-size", type=int, default=16, help="inputs per batch")
    parser.add_argument("--bootstrap-samples", type=int, default=2000)
    parser.add_argument("--confidence", type=float, default=0.95)
    parser.add_argument("--threads", type=int, default=1, help="torch threads")
    parser.add_argument("--device", default="cpu")
    return parser.parse_args(argv)


def study_config(args: argparse.Namespace) -> Path:
    """The config the rerank tool reads: the base models, and the test split as the data it ranks."""
    parts = ", ".join(
        f"{{type: shapes, num_samples: {args.inputs_per_part}, seed: {seed}, combinations: {part}}}"
        for part, seed in TEST_SEEDS.items()
    )
    config = load_config(
        args.config,
        [
            *base_model_overrides(args.base),
            f"data.validation=[{parts}]",
        ],
    )
    args.out.mkdir(parents=True, exist_ok=True)
    path = args.out / "config.yaml"
    save_config(config, path)
    return path


def rerank_arguments(args: argparse.Namespace, direction: str, config: Path) -> list[str]:
    """The rerank tool's command line for one direction."""
    shared = [
        "--config", str(config),
        "--out", str(args.out / direction),
        "--inference-steps", str(args.inference_steps),
        "--guidance-scale", str(args.guidance_scale),
        "--seed", str(args.seed),
        "--batch-size", str(args.batch_size),
        "--device", args.device,
        "--quiet",
    ]  # fmt: skip
    if direction == "captions":
        return [
            "captions", *shared,
            "--num-beams", str(args.num_beams),
            "--num-samples", str(args.num_samples),
            "--similarity", "mse",
            "--score-timesteps", str(SCORE_TIMESTEPS),
        ]  # fmt: skip
    return [
        "images", *shared,
        "--num-images", str(args.num_images),
        "--text-similarity", "auto",
        "--recaption-beams", str(RECAPTION_BEAMS),
    ]  # fmt: skip


def _clock() -> dict[str, float]:
    """Wall and CPU seconds (this process's: the rerank tool runs in it), to subtract."""
    return {"wall_s": time.perf_counter(), "cpu_s": time.process_time()}


def _since(start: dict[str, float]) -> dict[str, float]:
    return {key: now - start[key] for key, now in _clock().items()}


def rank_direction(arguments: list[str], folder: Path, base: str) -> dict[str, float]:
    """Run the rerank tool, or reuse what the same command made from the same base models: a finished run
    is kept as it is, an interrupted one resumed (--resume). Returns the run's wall and CPU time in s, an
    interrupted run's earlier parts included."""
    record_file = folder / RECORD_FILE
    made_by = {"arguments": arguments, "base": base}
    record = json.loads(record_file.read_text()) if record_file.is_file() else {}
    if {key: record.get(key) for key in made_by} == made_by:
        if record["finished"]:
            print(f"reusing the finished rankings in {folder}", flush=True)
            return record["time"]
        arguments = [*arguments, "--resume"]
    else:
        shutil.rmtree(folder, ignore_errors=True)
        record = {**made_by, "time": {"wall_s": 0.0, "cpu_s": 0.0}}
    folder.mkdir(parents=True, exist_ok=True)
    print("$ python -m train.cli.rerank " + " ".join(arguments), flush=True)
    started = _clock()
    record_file.write_text(json.dumps({**record, "finished": False}))
    status = rerank.main(arguments)
    record["time"] = {key: record["time"][key] + spent for key, spent in _since(started).items()}
    record_file.write_text(json.dumps({**record, "finished": status == 0}))
    if status != 0:
        raise SystemExit(f"the rerank tool failed (exit status {status}); its message is above")
    return record["time"]


def _part_of(ranking: StoredRanking) -> str:
    """seen / unseen, from the test source in the query's id (data/sources.py names it shapes:SEED:INDEX)."""
    seed = int(ranking.query_id.split(":")[1])
    return next(part for part, part_seed in TEST_SEEDS.items() if part_seed == seed)


def direction_results(rankings: Sequence[StoredRanking], args: argparse.Namespace) -> dict[str, Any]:
    """Per part (all, seen, unseen) and quality: the random pick, and per measure the quality by rank,
    the top-1 pick against random, and the score's correlation with quality."""
    bootstrap = Bootstrap(args.bootstrap_samples, args.confidence, args.seed)
    hits = attribute_hits(rankings)
    parts = np.array([_part_of(ranking) for ranking in rankings])
    measures = list(rankings[0].ranks)
    ranks = {measure: np.array([ranking.ranks[measure] for ranking in rankings]) for measure in measures}
    scores = {measure: np.array([ranking.scores[measure] for ranking in rankings]) for measure in measures}
    results: dict[str, Any] = {}
    for part in PARTS:
        chosen = np.ones(len(rankings), bool) if part == "all" else parts == part
        results[part] = {
            "inputs": int(chosen.sum()),
            "per_attribute": _per_attribute(hits[chosen], ranks, chosen),
        }
        for name in QUALITIES:
            quality = SHAPES_QUALITY[name](hits[chosen])
            by_measure = {
                measure: _measure_results(
                    quality,
                    ranks[measure][chosen],
                    scores[measure][chosen],
                    measure,
                    rankings[0].higher_is_better[measure],
                    bootstrap,
                )
                for measure in measures
            }
            # A random pick does not depend on the ranking: the same under every measure.
            random = by_measure[measures[0]]["top_pick"]["random"]
            results[part][name] = {"random_pick": random, "measures": by_measure}
    return results


def _per_attribute(hits: np.ndarray, ranks: dict[str, np.ndarray], chosen: np.ndarray) -> dict[str, Any]:
    """Which attributes a pick gets right (no intervals): a random pick's share per attribute, and the
    top-1's under each measure; says where a ranking's gain comes from."""
    names = [field.name for field in fields(Scene)]
    top1 = {
        measure: hits[np.arange(len(hits)), order[chosen].argmin(axis=1)].mean(axis=0)
        for measure, order in ranks.items()
    }
    return {
        "random_pick": dict(zip(names, hits.mean(axis=(0, 1)).tolist(), strict=True)),
        "top1": {measure: dict(zip(names, shares.tolist(), strict=True)) for measure, shares in top1.items()},
    }


def _measure_results(
    quality: np.ndarray,
    ranks: np.ndarray,
    scores: np.ndarray,
    measure: str,
    higher_is_better: bool,
    bootstrap: Bootstrap,
) -> dict[str, Any]:
    """One measure's quality by rank, top-1 pick against random, and score-quality correlation."""
    correlation = score_correlation(
        scores, quality, measure, higher_is_better=higher_is_better, bootstrap=bootstrap
    )
    return {
        "by_rank": [asdict(point) for point in rank_quality(quality, ranks, measure, bootstrap)],
        "top_pick": asdict(top_pick(quality, ranks, measure, bootstrap)),
        "correlation": asdict(correlation),
    }


def readme_table(summary: dict[str, Any]) -> str:
    """The README's table: every input under each measure and quality, then each part apart under the
    measure that closes the cycle, exact quality. tests/test_results_tables.py checks it against the JSON."""
    lines = [
        "| direction | inputs | ranked by | quality | top-1 | random pick | top-1 - random "
        "| Spearman ρ, within input | Spearman ρ, pooled |",
        "|---|---|---|---|---:|---:|---:|---:|---:|",
    ]
    for direction, study in summary["directions"].items():
        rows = [("all", measure, quality) for measure in study["measures"] for quality in QUALITIES]
        rows += [(part, study["primary"], "shapes_exact") for part in TEST_SEEDS]
        for part, measure, quality in rows:
            result = study["results"][part][quality]["measures"][measure]
            pick, correlation = result["top_pick"], result["correlation"]
            lines.append(
                f"| {direction} | {part} | `{measure}` | {quality} | {Estimate(**pick['top1']).text()} "
                f"| {Estimate(**pick['random']).text()} | {Estimate(**pick['gain']).text(signed=True)} "
                f"| {Estimate(**correlation['within_query']).text(signed=True)} "
                f"| {Estimate(**correlation['pooled']).text(signed=True)} |"
            )
    return "\n".join(lines)


def plot_direction(direction: str, study: dict[str, Any], path: Path) -> None:
    """Quality by rank under each measure, exact and attributes side by side, with the random pick."""
    results = study["results"]["all"]
    panels = [
        RankPanel(
            metric=f"{quality} ({'all four attributes right' if quality == 'shapes_exact' else 'share right'})",
            points=[
                RankPoint(**row)
                for measure in study["measures"]
                for row in results[quality]["measures"][measure]["by_rank"]
            ],
            random=Estimate(**results[quality]["random_pick"]),
        )
        for quality in QUALITIES
    ]
    inputs = study["results"]["all"]["inputs"]
    noun = "caption per image" if direction == "captions" else "image per caption"
    title = f"Best {noun}: {study['candidates']} candidates, {inputs} test inputs, base models"
    plot_rank_quality(panels, path, title=title)


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    argv = list(sys.argv[1:] if argv is None else argv)
    torch.set_num_threads(args.threads)
    config = study_config(args)
    base = base_identity(args.base)
    directions: dict[str, Any] = {}
    spent: dict[str, dict[str, float]] = {}
    load_average = os.getloadavg()[0]
    for direction in DIRECTIONS:
        folder = args.out / direction
        spent[f"{direction}_ranking"] = rank_direction(
            rerank_arguments(args, direction, config), folder, base
        )
        started = _clock()
        rankings = read_rankings(folder / RANKINGS_FILE)
        directions[direction] = {
            "candidates": len(rankings[0].captions),
            "measures": {m: {"higher_is_better": rankings[0].higher_is_better[m]} for m in rankings[0].ranks},
            "primary": rankings[0].primary,
            "results": direction_results(rankings, args),
        }
        spent[f"{direction}_judging"] = _since(started)
    spent["total"] = {key: sum(part[key] for part in spent.values()) for key in ("wall_s", "cpu_s")}
    summary = {
        "command": " ".join(["python -m train.cli.rerank_study", *argv]),
        "rerank_commands": {
            direction: "python -m train.cli.rerank " + " ".join(rerank_arguments(args, direction, config))
            for direction in DIRECTIONS
        },
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "machine": f"{platform.machine()}, {torch.get_num_threads()} torch threads, device {args.device}",
        "versions": {"python": platform.python_version(), **{name: version(name) for name in PACKAGES}},
        "base": {"folder": str(args.base), "identity": base},
        "test_split": {"seeds": TEST_SEEDS, "inputs_per_part": args.inputs_per_part},
        "settings": {key: getattr(args, key) for key in SETTINGS},
        "directions": directions,
        # Ranking (a reused direction: the run that made it, resumed parts added) and judging, wall and CPU
        # seconds; the machine's 1-minute load average when this run started says how shared it was.
        "time": {
            part: {key: round(value, 1) for key, value in times.items()} for part, times in spent.items()
        },
        "load_average_at_start": round(load_average, 2),
    }
    args.results.mkdir(parents=True, exist_ok=True)
    (args.results / "rerank_study.json").write_text(json.dumps(summary, indent=2) + "\n", encoding="utf-8")
    for direction, study in directions.items():
        plot_direction(direction, study, args.results / f"rerank_{direction}.png")
    print(readme_table(summary))
    total = summary["time"]["total"]
    print(f"{total['wall_s']:.0f} s wall, {total['cpu_s']:.0f} s CPU; results in {args.results}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
