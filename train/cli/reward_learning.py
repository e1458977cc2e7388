"""`make reward-learning`: does the T2I2T `reward` mode teach the generator what the frozen captioner reads?

    python -m train.cli.reward_learning                    # 3 seeds, the README's numbers
    python -m train.cli.reward_learning --seeds 0 --steps 20 --test-samples 16   # a quick look

From the committed base models (pretrained/shapes-base), per seed, two generator-only LoRA arms train for the
same updates through `train/cycle.py --config configs/shapes.yaml`, on text-only batches (captions, no
images: where this mode earns its keep):
- reward: cycle.t2i2t.mode=reward at weight 1;
- control: the same run at weight 0 (the same batches and draws, no gradient from the reward).
Then each arm's generator draws G stochastic chains per test caption with the training sampler (DDIM,
eta 1), the same noise for every arm, and the frozen base captioner scores each image: the held-out reward
is the mean of its length-normalised caption log-likelihood (the training reward), per part of the test
split (seen / unseen colour-shape combinations). The oracle's reading of the same images gives their
attribute accuracy. Reported: per arm the mean over seeds, and per metric the paired differences
reward - control (mean, sd with ddof=1, mean > 2 sd).

Results: docs/results/reward_learning.json (the README's table is checked against it); runs and scores
in runs/reward-learning.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
from collections.abc import Sequence
from pathlib import Path

import torch

from cycletune.data.batching import batched
from cycletune.data.oracle import attribute_accuracy, read_scenes
from cycletune.data.shapes import parse
from cycletune.evaluation.shapes_split import (
    PARTS,
    TEST_SEEDS,
    VALIDATION_SEEDS,
    TestSplit,
    load_test_split,
)
from cycletune.losses.t2i2t_reward import likelihood_rewards, sample_chains
from cycletune.models.captioner import Captioner
from cycletune.models.generator import Generator
from cycletune.models.randomness import DrawKey
from cycletune.train.cli.demo import base_identity, summarize_differences, train_once
from cycletune.train.cli.help_format import HelpFormatter
from cycletune.train.cli.launch import launch_command
from cycletune.train.cli.shapes_base import (
    add_base_arguments,
    base_is_missing,
    base_model_overrides,
    trained_arm,
)
from cycletune.train.config import Config, load_config
from cycletune.train.inference import ModelSources, default_device

DEFAULT_RESULTS = Path("docs/results/reward_learning.json")
# Both arms: the generator alone, every batch text-only, 32 captions x G=4 chains per update.
GENERATOR_ONLY = [
    "train.schedule=[generator]",
    "cycle.i2t2i.mode=none",
    "cycle.t2i2t.mode=reward",
    "data.image_only=[]",
    "data.image_only_ratio=0",
    "data.text_only_ratio=1.0",
    "data.train_batch_size=32",
    "cycle.t2i2t.num_images=4",
    "train.validation_steps=null",
    "report_to=none",
]
ARM_OVERRIDES = {"control": ["cycle.t2i2t.weight=0"], "reward": ["cycle.t2i2t.weight=1"]}
ARMS = tuple(ARM_OVERRIDES)
# The held-out draws: one key for every arm and seed (common random numbers), G chains per caption.
EVALUATION_KEY = DrawKey(seed=20261204, step=0)
EVALUATION_IMAGES = 2


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="python -m train.cli.reward_learning", description=__doc__, formatter_class=HelpFormatter
    )
    add_base_arguments(parser, config_help="the arms' config", out=Path("runs/reward-learning"))
    parser.add_argument("--results", type=Path, default=DEFAULT_RESULTS, help="the JSON written")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--steps", type=int, default=150, help="generator updates per arm")
    parser.add_argument(
        "--arms", nargs="+", choices=ARMS, default=list(ARMS), help="arms to train (tuning: reward alone)"
    )
    parser.add_argument("--test-samples", type=int, default=128, help="test captions per part")
    parser.add_argument(
        "--split",
        choices=("test", "validation"),
        default="test",
        help="held-out captions: the test split (final numbers) or the validation split (for tuning)",
    )
    parser.add_argument(
        "overrides",
        nargs="*",
        help="dotted config overrides for both arms, e.g. generator.optimizer.learning_rate=3e-4",
    )
    return parser.parse_args(argv)


@torch.no_grad()
def held_out_scores(
    generator: Generator, captioner: Captioner, split: TestSplit, config: Config
) -> dict[str, float]:
    """Per part: the mean likelihood reward of EVALUATION_IMAGES chains per test caption, drawn with the
    training sampler under EVALUATION_KEY, and the oracle's attribute accuracy of those images."""
    settings = config.cycle.t2i2t.model_copy(update={"num_images": EVALUATION_IMAGES})
    scores: dict[str, float] = {}
    for part in PARTS:
        rewards, readings, scenes = [], [], []
        for indices in batched(range(len(split.ids[part])), 32):
            ids = [split.ids[part][index] for index in indices]
            captions = [split.captions[part][index] for index in indices]
            repeated = [caption for caption in captions for _ in range(EVALUATION_IMAGES)]
            _, _, chain = sample_chains(generator, captions, ids, settings, EVALUATION_KEY)
            rewards.append(likelihood_rewards(generator, captioner, chain.latents[-1], repeated).cpu())
            readings += read_scenes(generator.decode_latents(chain.latents[-1]))
            scenes += [parse(caption) for caption in repeated]
        accuracy = attribute_accuracy(readings, scenes)
        scores[f"{part}/reward"] = torch.cat(rewards).mean().item()
        scores[f"{part}/image_exact"] = accuracy["all"]
    for metric in ("reward", "image_exact"):  # every held-out caption: the parts are the same size
        scores[f"all/{metric}"] = sum(scores[f"{part}/{metric}"] for part in PARTS) / len(PARTS)
    return scores


def score_once(sources: ModelSources, split: TestSplit, config: Config, cache: Path, made_by: dict) -> dict:
    """An arm's held-out scores, or the ones it got before from the same base and settings."""
    if cache.is_file():
        saved = json.loads(cache.read_text())
        if saved.get("made_by") == made_by:
            return saved["scores"]
    captioner, generator = sources.load(device=default_device())
    scores = held_out_scores(generator, captioner, split, config)
    cache.parent.mkdir(parents=True, exist_ok=True)
    cache.write_text(json.dumps({"made_by": made_by, "scores": scores}, indent=1) + "\n")
    return scores


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    if base_is_missing(args.base):
        return 2
    models = base_model_overrides(args.base)
    common = [*models, *GENERATOR_ONLY, f"train.max_train_steps={args.steps}", *args.overrides]
    config = load_config(args.config, common)
    seeds = TEST_SEEDS if args.split == "test" else VALIDATION_SEEDS
    split = load_test_split(args.test_samples, config.data.resolution, seeds)
    base_id = base_identity(args.base)
    made_by = {
        "base": base_id,
        "split": args.split,
        "samples": args.test_samples,
        "images": EVALUATION_IMAGES,
    }
    base = ModelSources(captioner=str(args.base / "captioner"), generator=str(args.base / "generator"))
    base_scores = score_once(base, split, config, args.out / "base-scores.json", made_by)
    per_seed: dict[int, dict[str, dict[str, float]]] = {}
    wall: dict[str, list[float]] = {arm: [] for arm in args.arms}
    for seed in args.seeds:
        per_seed[seed] = {}
        for arm in args.arms:
            run_dir = args.out / f"seed-{seed}" / arm
            overrides = [*common, *ARM_OVERRIDES[arm], f"seed={seed}", f"output_dir={run_dir}"]
            wall[arm].append(train_once(launch_command(args.config, overrides), run_dir, base_id))
            sources = trained_arm(run_dir)
            per_seed[seed][arm] = score_once(
                sources, split, config, run_dir / "held-out-scores.json", made_by
            )
            print(f"seed {seed} {arm}: {per_seed[seed][arm]} (base: {base_scores})", flush=True)
    metrics = list(base_scores)
    compared = set(ARMS) <= set(args.arms)
    report = {
        "settings": {
            "seeds": args.seeds,
            "updates": args.steps,
            "split": args.split,
            "captions_per_part": args.test_samples,
            "chains_per_caption": EVALUATION_IMAGES,
            "overrides": common,
            "arms": ARM_OVERRIDES,
        },
        "base": base_scores,
        "mean": {
            arm: {m: statistics.fmean(per_seed[s][arm][m] for s in args.seeds) for m in metrics}
            for arm in args.arms
        },
        "reward_minus_control": {
            m: summarize_differences(
                [per_seed[s]["reward"][m] - per_seed[s]["control"][m] for s in args.seeds]
            )
            for m in metrics
        }
        if compared
        else {},
        "per_seed": per_seed,
        "train_wall_s": {arm: statistics.median(times) for arm, times in wall.items()},
    }
    args.results.parent.mkdir(parents=True, exist_ok=True)
    args.results.write_text(json.dumps(report, indent=1) + "\n")
    for metric, difference in report["reward_minus_control"].items():
        verdict = "yes" if difference["passes"] else "no"
        print(
            f"{metric}: reward - control {difference['mean']:+.4f} (sd {difference['sd']:.4f}); > 2 sd: {verdict}"
        )
    print(f"results: {args.results}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
