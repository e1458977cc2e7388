"""Does the cheap caption reward rank candidates as the expensive one does? `make reward-agreement`.

    python -m train.cli.reward_agreement      # numbers and plot in docs/results

I2T2I's reward scores a caption by the frozen generator's denoising loss on the image (models/scoring.py: a
few noise draws, no sampling). The expensive judge it stands in for draws an image from the caption and
compares it with the real one. On the shapes world's validation split (seed 103; tuning happens there), each
image gets its own caption and captions of other scenes as candidates; both judges rank them, and the
agreement is Spearman's rho within an image, averaged over images, with a bootstrap interval over images.
The cheap score is measured over a grid: the number of timesteps, the part of the schedule they are spread
over, and whether all candidates of an image share their noise and timesteps (common random numbers) or
each draws its own. Each setting's cost is its median wall time against sampling's, measured in the same
run; the frontier is the settings no other beats on both. The expensive judge is itself noisy: its agreement
with itself under another initial noise is the ceiling any cheap score could reach.
"""

from __future__ import annotations

import argparse
import datetime
import json
import platform
import sys
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch

from cycletune.data.sources import shapes as shapes_source
from cycletune.data.streams import Stream
from cycletune.evaluation.rank_report import Bootstrap, Estimate, score_correlation
from cycletune.models.generator import Generator
from cycletune.models.randomness import DrawKey
from cycletune.models.scoring import caption_scores
from cycletune.train.cli.bench.measure import timed
from cycletune.train.cli.bench.stats_ratios import median
from cycletune.train.cli.help_format import HelpFormatter
from cycletune.train.cli.shapes_base import DEFAULT_BASE

VALIDATION_SEED = 103
RANGES = {"all": (0.0, 1.0), "low": (0.0, 0.5), "mid": (0.25, 0.75), "high": (0.5, 1.0)}
NOISE = ("shared", "independent")
# What I2T2I reward and the rerank tool use today (cycle.i2t2i.reward_timesteps, rerank --score_timesteps).
DEFAULT_SETTING = (4, "all", "shared")


@dataclass(frozen=True)
class Candidates:
    """Images [I, 3, H, W] in [0, 1], their ids, and K candidate captions each (its own caption first)."""

    pixels: torch.Tensor
    ids: list[str]
    groups: list[list[str]]


def shapes_candidates(images: int, candidates: int, *, seed: int, resolution: int) -> Candidates:
    """`images` shapes scenes of split `seed`, each with its own caption and candidates - 1 captions of the
    scenes that follow them in the split."""
    records, _ = shapes_source(num_samples=images * candidates, seed=seed, resolution=resolution)
    batch = Stream(records, batch_size=len(records), seed=seed, resolution=resolution).next()
    others = batch["captions"][images:]
    groups = [
        [batch["captions"][i], *others[i * (candidates - 1) : (i + 1) * (candidates - 1)]]
        for i in range(images)
    ]
    return Candidates(batch["pixels"][:images], list(batch["ids"][:images]), groups)


def sampled_similarity(
    generator: Generator, found: Candidates, *, seed: int, steps: int, guidance_scale: float
) -> torch.Tensor:
    """The expensive judge [I, K]: draw an image from each candidate (one initial noise per real image,
    shared by its candidates) and score its similarity to the real image (negative pixel MSE)."""
    images, candidates = len(found.groups), len(found.groups[0])
    initial = torch.randn(
        images, *generator.latent_shape(1)[1:], generator=torch.Generator().manual_seed(seed)
    )
    made = generator.sample(
        [caption for group in found.groups for caption in group],
        num_inference_steps=steps,
        guidance_scale=guidance_scale,
        latents=initial.repeat_interleave(candidates, dim=0),
    )
    references = found.pixels.repeat_interleave(candidates, dim=0)
    return -((made - references) ** 2).mean(dim=(1, 2, 3)).view(images, candidates)


def likelihood(
    generator: Generator, found: Candidates, *, num_timesteps: int, timestep_range: str, noise: str, seed: int
) -> torch.Tensor:
    """The cheap judge [I, K], higher is better: minus the denoising loss of each image under each caption.
    `noise` independent: every candidate is scored as an image of its own, with its own draws."""
    candidates = len(found.groups[0])
    pixels, groups, ids = found.pixels, found.groups, found.ids
    if noise == "independent":
        pixels = pixels.repeat_interleave(candidates, dim=0)
        groups = [[caption] for group in groups for caption in group]
        ids = [f"{image}#{k}" for image in ids for k in range(candidates)]
    scores = caption_scores(
        generator, pixels, groups, key=DrawKey(seed, 0), ids=ids, num_timesteps=num_timesteps,
        timestep_range=RANGES[timestep_range],
    )  # fmt: skip
    return -scores.view(len(found.groups), candidates)


def agreement(cheap: torch.Tensor, expensive: torch.Tensor, bootstrap: Bootstrap) -> Estimate:
    """Spearman's rho of the two rankings within each image, averaged over images, with its interval."""
    correlation = score_correlation(
        cheap.numpy(), expensive.numpy(), "likelihood", higher_is_better=True, bootstrap=bootstrap
    )
    return correlation.within_query


def frontier(points: Sequence[dict[str, Any]]) -> list[int]:
    """Indices of the points no other point beats on both speed-up and agreement (ties kept), fastest first."""
    kept = [
        index
        for index, point in enumerate(points)
        if not any(
            other["speedup"] >= point["speedup"]
            and other["rho"]["value"] >= point["rho"]["value"]
            and (other["speedup"], other["rho"]["value"]) != (point["speedup"], point["rho"]["value"])
            for other in points
        )
    ]
    return sorted(kept, key=lambda index: -points[index]["speedup"])


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=HelpFormatter)
    parser.add_argument("--generator", type=Path, default=DEFAULT_BASE / "generator", help="the judge")
    parser.add_argument("--results", type=Path, default=Path("docs/results"))
    parser.add_argument("--images", type=int, default=32)
    parser.add_argument("--candidates", type=int, default=8)
    parser.add_argument("--timesteps", type=int, nargs="+", default=[1, 2, 4, 8, 16])
    parser.add_argument("--ranges", nargs="+", choices=list(RANGES), default=list(RANGES))
    parser.add_argument("--sampling-steps", type=int, default=20, help="DDIM steps of the expensive judge")
    parser.add_argument("--guidance-scale", type=float, default=2.0)
    parser.add_argument("--repeats", type=int, default=3, help="timed calls per setting (the median is kept)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=1, help="torch threads (timings are per thread count)")
    return parser.parse_args(argv)


def measure(scorer: Any, repeats: int) -> tuple[torch.Tensor, float]:
    """A scorer's scores and the median wall milliseconds of `repeats` more calls."""
    scores = scorer()
    return scores, 1000 * median([timed(scorer, "cpu") for _ in range(repeats)])


def readme_table(summary: dict[str, Any]) -> str:
    """The README's table: the frontier, then the default setting and the ceiling. tests/test_results_tables.py
    checks it against the JSON."""
    lines = [
        "| setting | timesteps | range | noise | ms | cheaper than sampling | Spearman ρ, within image |",
        "|---|---:|---|---|---:|---:|---:|",
    ]
    points = summary["settings"]
    rows = [("frontier", index) for index in summary["frontier"]]
    if summary["default"] is not None:
        rows.append(("default", summary["default"]))
    for label, index in rows:
        point = points[index]
        lines.append(
            f"| {label} | {point['num_timesteps']} | {point['timestep_range']} | {point['noise']} "
            f"| {point['ms']:.0f} | {point['speedup']:.1f}x | {Estimate(**point['rho']).text(signed=True)} |"
        )
    ceiling = summary["sampling"]
    lines.append(
        f"| sampling vs itself | | | | {ceiling['ms']:.0f} | 1.0x | {Estimate(**ceiling['self_rho']).text(signed=True)} |"
    )
    return "\n".join(lines)


def plot(summary: dict[str, Any], path: Path) -> None:
    """Agreement against speed-up for every setting, the frontier joined, the ceiling and the goal marked."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, axes = plt.subplots(figsize=(8.5, 4.5))
    markers = dict(zip(RANGES, "osD^", strict=True))
    for noise, colour in zip(NOISE, ("tab:blue", "tab:orange"), strict=True):
        for name, marker in markers.items():
            chosen = [p for p in summary["settings"] if p["noise"] == noise and p["timestep_range"] == name]
            if chosen:
                axes.scatter(
                    [p["speedup"] for p in chosen],
                    [p["rho"]["value"] for p in chosen],
                    marker=marker,
                    color=colour,
                    label=f"{noise}, {name}",
                )
    front = [summary["settings"][index] for index in summary["frontier"]]
    axes.plot([p["speedup"] for p in front], [p["rho"]["value"] for p in front], color="gray", lw=1)
    axes.axhline(summary["sampling"]["self_rho"]["value"], color="green", ls="--", label="sampling vs itself")
    axes.axhline(0.7, color="gray", ls=":")
    axes.axvline(20, color="gray", ls=":")
    axes.set_xscale("log")
    axes.set_xlabel("times cheaper than sampling + similarity")
    axes.set_ylabel("Spearman ρ with sampling, within image")
    axes.set_title(f"Cheap caption reward vs sampling: {summary['images']} images x {summary['candidates']}")
    axes.legend(fontsize=7, loc="center left", bbox_to_anchor=(1.02, 0.5))
    figure.tight_layout()
    figure.savefig(path, dpi=120)
    plt.close(figure)


@torch.no_grad()
def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    argv = list(sys.argv[1:] if argv is None else argv)
    torch.set_num_threads(args.threads)
    generator = Generator.from_pretrained(str(args.generator))
    generator.requires_grad_(False)
    found = shapes_candidates(
        args.images, args.candidates, seed=VALIDATION_SEED, resolution=generator.resolution
    )
    bootstrap = Bootstrap(seed=args.seed)

    def expensive(seed: int) -> torch.Tensor:
        return sampled_similarity(
            generator, found, seed=seed, steps=args.sampling_steps, guidance_scale=args.guidance_scale
        )

    reference, sampling_ms = measure(lambda: expensive(args.seed), args.repeats)
    other_noise = expensive(args.seed + 1)
    settings = []
    for num_timesteps in args.timesteps:
        for span in args.ranges:
            for noise in NOISE:
                setting = {"num_timesteps": num_timesteps, "timestep_range": span, "noise": noise}
                scores, ms = measure(
                    lambda s=setting: likelihood(generator, found, **s, seed=args.seed), args.repeats
                )
                rho = agreement(scores, reference, bootstrap)
                settings.append(setting | {"ms": ms, "speedup": sampling_ms / ms, "rho": asdict(rho)})
                print(f"{num_timesteps:>3} {span:>5} {noise:>11}: {ms:7.0f} ms, rho {rho.text(signed=True)}")
    wanted = dict(zip(("num_timesteps", "timestep_range", "noise"), DEFAULT_SETTING, strict=True))
    default = next((i for i, s in enumerate(settings) if all(s[k] == v for k, v in wanted.items())), None)
    summary = {
        "command": " ".join(["python -m train.cli.reward_agreement", *argv]),
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "machine": f"{platform.machine()}, {torch.get_num_threads()} torch threads",
        "generator": str(args.generator),
        "split": {"shapes_seed": VALIDATION_SEED, "name": "validation"},
        "images": args.images,
        "candidates": args.candidates,
        "ranges": {name: RANGES[name] for name in args.ranges},
        "sampling": {
            "steps": args.sampling_steps,
            "guidance_scale": args.guidance_scale,
            "ms": sampling_ms,
            "self_rho": asdict(agreement(other_noise, reference, bootstrap)),
        },
        "settings": settings,
        "frontier": frontier(settings),
        "default": default,
        "bootstrap": asdict(bootstrap),
    }
    args.results.mkdir(parents=True, exist_ok=True)
    (args.results / "reward_agreement.json").write_text(
        json.dumps(summary, indent=2) + "\n", encoding="utf-8"
    )
    plot(summary, args.results / "reward_agreement.png")
    print(readme_table(summary))
    return 0


if __name__ == "__main__":
    sys.exit(main())
