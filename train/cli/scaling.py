"""`make scaling`: does unpaired data help more as it grows, and how close does it come to the same data paired?

    python -m train.cli.scaling                                          # the README's numbers
    python -m train.cli.scaling --seeds 0 --sizes 0 50 --steps 6 --test-samples 8 --out runs/scaling-quick

From the committed base models (pretrained/shapes-base), per seed, LoRA arms of the shapes demo's cycle arm
(configs/shapes.yaml), every arm for the same number of updates:
- control: the supervised losses on the 1,000 paired records alone (the demo's control arm);
- unpaired-N: the cycle arm with N unpaired images (the image-only source, seed 101) and N unpaired captions
  (the text-only source, seed 102) beside the paired records; N = 0 trains the cycle losses on the paired
  records alone;
- paired-N (N > 0): the same N images with their own captions, added to the paired records, and no unpaired
  data: what the same images are worth when they come with captions.
Each arm is scored on the test split like the demo (train/cli/demo.py: evaluate_pair), and the gain over
control on unseen colour-shape combinations (caption and image attribute accuracy, all four right) is
reported per arm: the mean over seeds and each seed's.

Results: docs/results/scaling.json and scaling.png (the README's table is checked against the JSON); runs
and scores in runs/scaling.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
from collections.abc import Sequence
from pathlib import Path

from cycletune.evaluation.shapes_split import load_test_split
from cycletune.train.cli.demo import base_identity, evaluate_once, summarize_differences, train_once
from cycletune.train.cli.help_format import HelpFormatter
from cycletune.train.cli.launch import launch_command
from cycletune.train.cli.shapes_base import (
    add_base_arguments,
    base_is_missing,
    base_model_overrides,
    trained_arm,
)
from cycletune.train.config import load_config
from cycletune.train.inference import default_device
from cycletune.train.run_dir import RunDir

DEFAULT_RESULTS = Path("docs/results")
METRICS = ("unseen/caption_exact", "unseen/image_exact")
NO_UNPAIRED = ["data.image_only=[]", "data.text_only=[]", "data.image_only_ratio=0", "data.text_only_ratio=0"]
SUPERVISED_ONLY = ["cycle.i2t2i.mode=none", "cycle.t2i2t.mode=none", *NO_UNPAIRED]


def arm_overrides(arm: str, paired: list[dict], image_only: dict) -> list[str]:
    """control, unpaired-N or paired-N as config overrides of the cycle arm's config, whose data.paired
    sources are `paired` and whose (first) data.image_only source is `image_only`."""
    if arm == "control":
        return SUPERVISED_ONLY
    kind, _, count = arm.partition("-")
    size = int(count)
    if kind == "unpaired":
        if size == 0:
            return NO_UNPAIRED
        return [f"data.image_only.0.num_samples={size}", f"data.text_only.0.num_samples={size}"]
    if kind == "paired" and size > 0:
        # The image-only source's first N records, captions kept (a source draws its records in order).
        extra = {**image_only, "num_samples": size}
        return [*NO_UNPAIRED, f"data.paired={json.dumps([*paired, extra])}"]
    raise ValueError(f"unknown arm {arm!r}: control, unpaired-N or paired-N (N > 0)")


def arms_for(sizes: Sequence[int]) -> list[str]:
    return ["control", *(f"unpaired-{size}" for size in sizes), *(f"paired-{size}" for size in sizes if size)]


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="python -m train.cli.scaling", description=__doc__, formatter_class=HelpFormatter
    )
    add_base_arguments(parser, config_help="the cycle arm's config", out=Path("runs/scaling"))
    parser.add_argument("--results", type=Path, default=DEFAULT_RESULTS, help="folder for scaling.json/png")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1])
    parser.add_argument("--sizes", type=int, nargs="+", default=[0, 500, 2000, 5000], help="unpaired N")
    parser.add_argument("--steps", type=int, default=400, help="updates per arm (make demo's 400)")
    parser.add_argument("--test-samples", type=int, default=180, help="test images per part")
    parser.add_argument("--inference-steps", type=int, default=10, help="sampling steps when scoring")
    parser.add_argument("--guidance-scale", type=float, default=2.0, help="CFG scale when scoring")
    return parser.parse_args(argv)


def plot(report: dict, path: Path) -> None:
    """Gain over control against N, unpaired and paired, one panel per metric."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, axes = plt.subplots(1, len(METRICS), figsize=(5 * len(METRICS), 3.6), squeeze=False)
    for axis, metric in zip(axes[0], METRICS, strict=True):
        for kind, marker in (("unpaired", "o"), ("paired", "s")):
            # N = 0 adds nothing, paired or not: both lines start at unpaired-0.
            arms = [arm for arm in report["gain"] if arm.startswith(f"{kind}-") or arm == "unpaired-0"]
            sizes = [int(arm.partition("-")[2]) for arm in arms]
            means = [report["gain"][arm][metric]["mean"] for arm in arms]
            axis.plot(sizes, means, marker=marker, label=kind)
            for size, arm in zip(sizes, arms, strict=True):
                seeds = report["gain"][arm][metric]["differences"]
                axis.scatter([size] * len(seeds), seeds, s=10, alpha=0.5, color=axis.lines[-1].get_color())
        axis.axhline(0, color="grey", linewidth=0.8)
        axis.set(xlabel="extra images and captions (N)", ylabel="gain over control", title=metric)
        axis.legend()
    figure.tight_layout()
    figure.savefig(path, dpi=120)
    plt.close(figure)


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    if base_is_missing(args.base):
        return 2
    config = load_config(args.config)
    paired = [source.model_dump(exclude_defaults=True) for source in config.data.paired]
    image_only = config.data.image_only[0].model_dump(exclude_defaults=True)
    split = load_test_split(args.test_samples, config.data.resolution)
    base_id = base_identity(args.base)
    models = base_model_overrides(args.base)
    steps = [f"train.max_train_steps={args.steps}"]
    arms = arms_for(args.sizes)
    scores: dict[int, dict[str, dict[str, float]]] = {}
    wall: dict[str, list[float]] = {arm: [] for arm in arms}
    for seed in args.seeds:
        scores[seed] = {}
        for arm in arms:
            run_dir = args.out / f"seed-{seed}" / arm
            overrides = [
                *models,
                *steps,
                *arm_overrides(arm, paired, image_only),
                f"seed={seed}",
                f"output_dir={run_dir}",
            ]
            wall[arm].append(train_once(launch_command(args.config, overrides), run_dir, base_id))
            sources = trained_arm(run_dir)
            results = evaluate_once(sources, split, args, seed, RunDir(run_dir).test_scores, base_id)
            scores[seed][arm] = {metric: results.metrics[metric] for metric in METRICS}
            print(f"seed {seed} {arm}: {scores[seed][arm]}", flush=True)
    report = {
        "settings": {
            "seeds": args.seeds,
            "sizes": args.sizes,
            "updates": args.steps,
            "test_samples_per_part": args.test_samples,
            "inference_steps": args.inference_steps,
            "guidance_scale": args.guidance_scale,
            "arms": {arm: arm_overrides(arm, paired, image_only) for arm in arms},
        },
        "mean": {
            arm: {m: statistics.fmean(scores[s][arm][m] for s in args.seeds) for m in METRICS} for arm in arms
        },
        "gain": {
            arm: {
                m: summarize_differences([scores[s][arm][m] - scores[s]["control"][m] for s in args.seeds])
                for m in METRICS
            }
            for arm in arms
            if arm != "control"
        },
        "per_seed": scores,
        "train_wall_s": {arm: statistics.median(times) for arm, times in wall.items()},
        "device": default_device(),
    }
    args.results.mkdir(parents=True, exist_ok=True)
    (args.results / "scaling.json").write_text(json.dumps(report, indent=1) + "\n")
    plot(report, args.results / "scaling.png")
    for arm, gains in report["gain"].items():
        line = ", ".join(f"{m} {g['mean']:+.3f} ({g['differences']})" for m, g in gains.items())
        print(f"{arm}: gain over control {line}")
    print(f"results: {args.results / 'scaling.json'}, {args.results / 'scaling.png'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
