"""The shapes demo: does cycle finetuning on unpaired data beat supervised finetuning? Numbers and pictures.

    python -m train.cli.demo                       # make demo: one seed, short arms (minutes on a laptop CPU)
    python -m train.cli.demo --seeds 0 1 2 --arms cycle t2i2t_reward --out runs/experiment  # make experiment

From the committed base models (pretrained/shapes-base, made by `make base`), for each seed it trains LoRA
arms through `accelerate launch train/cycle.py --config configs/shapes.yaml`:
- control: the supervised captioner and generator losses on the paired set only;
- cycle: the same plus the cycle losses, on paired data and the unpaired image and caption sets;
- t2i2t_reward (with --arms): the cycle arm with T2I2T `reward` (policy gradient, the frozen captioner's
  likelihood of the caption as the reward) in place of `one_step` (backpropagation through the captioner),
for the same number of updates. Then it scores base and the arms on the test split
(evaluation/shapes_split.py, seen and unseen colour-shape combinations apart; `--split designed` for the
designed split's parts) and writes a report folder (report.html, curves.png, contact_sheet.png,
results.json). With several seeds it also reports, per arm and metric, the paired differences arm - control:
their mean, their standard deviation (ddof=1), and whether the mean exceeds twice the standard deviation.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import shutil
import statistics
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open
from safetensors.torch import save_file
from tqdm.auto import tqdm

from cycletune.evaluation.demo_report import ContactSheet, format_table, write_demo_report
from cycletune.evaluation.shapes_split import (
    HELD_OUT_PARTS,
    TEST_SPLITS,
    PairResults,
    TestSplit,
    evaluate_pair,
    load_test_split,
)
from cycletune.models.sampling_settings import SamplingSettings
from cycletune.train.cli.help_format import HelpFormatter
from cycletune.train.cli.launch import launch_command, run_timed
from cycletune.train.cli.shapes_base import (
    add_base_arguments,
    base_is_missing,
    base_model_overrides,
    trained_arm,
)
from cycletune.train.config import Config, load_config
from cycletune.train.inference import ModelSources, default_device
from cycletune.train.run_dir import RunDir

# The control arm is the cycle arm's config with the cycle terms and the unpaired data taken away.
ARM_OVERRIDES: dict[str, list[str]] = {
    "control": [
        "cycle.i2t2i.mode=none",
        "cycle.t2i2t.mode=none",
        "data.image_only=[]",
        "data.text_only=[]",
        "data.image_only_ratio=0",
        "data.text_only_ratio=0",
    ],
    "cycle": [],
    "t2i2t_reward": ["cycle.t2i2t.mode=reward", "cycle.t2i2t.weight=1"],
}
ARMS = tuple(ARM_OVERRIDES)
# The acceptance comparisons: unseen combinations (and, on the designed split, the combinations only the
# captioner was trained on), caption and image attribute accuracy (all four right).
HEADLINE_METRICS = (
    "unseen/caption_exact",
    "unseen/image_exact",
    "captioner_only/caption_exact",
    "captioner_only/image_exact",
)
SHEET_EXAMPLES_PER_PART = 4


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=HelpFormatter)
    add_base_arguments(parser, config_help="the cycle arm's config", out=Path("runs/demo"))
    parser.add_argument("--seeds", type=int, nargs="+", default=[0])
    parser.add_argument(
        "--arms",
        nargs="+",
        choices=[arm for arm in ARMS if arm != "control"],
        default=["cycle"],
        help="arms trained beside the control arm",
    )
    parser.add_argument(
        "--split",
        choices=sorted(TEST_SPLITS),
        default="main",
        help="test parts: main (seen, unseen) or designed (generator_seen, captioner_only, unseen)",
    )
    parser.add_argument("--steps", type=int, help="updates per arm (default: the config's max_train_steps)")
    parser.add_argument("--test-samples", type=int, default=96, help="test images per part of the split")
    parser.add_argument("--inference-steps", type=int, default=10, help="DDIM steps when drawing test images")
    parser.add_argument("--guidance-scale", type=float, default=2.0)
    parser.add_argument("--num-processes", type=int, default=1, help="accelerate launch --num_processes")
    parser.add_argument(
        "overrides",
        nargs="*",
        help="dotted config overrides for every arm, e.g. data.train_batch_size=8 (before --seeds or --arms, "
        "which read the words after them as their values)",
    )
    args = parser.parse_args(argv)
    args.arms = ("control", *dict.fromkeys(args.arms))
    return args


def arm_command(args: argparse.Namespace, arm: str, seed: int, run_dir: Path) -> list[str]:
    """One arm's training command: the shared config, the base models, the arm's overrides, seed, folder."""
    overrides = [
        *base_model_overrides(args.base),
        f"seed={seed}",
        f"output_dir={run_dir}",
        *([f"train.max_train_steps={args.steps}"] if args.steps else []),
        *ARM_OVERRIDES[arm],
        *args.overrides,
    ]
    return launch_command(args.config, overrides, args.num_processes)


def base_identity(base: Path) -> str:
    """What distinguishes one set of base models from another: the hash of its base.json record (written
    anew by every make base), else the folder's path. Reused runs and scores must come from the same base."""
    record = base / "base.json"
    if record.is_file():
        return hashlib.sha256(record.read_bytes()).hexdigest()[:16]
    return str(base.resolve())


def train_once(command: list[str], run_dir: Path, base: str) -> float:
    """Train an arm, or reuse its finished run when the same command made it from the same base (an
    interrupted or repeated experiment picks up where it stopped); returns its training wall time in s."""
    run = RunDir(run_dir)
    made_by = {"command": command[command.index("train/cycle.py") :], "base": base}
    if run.demo_record.is_file() and run.export_dir.is_dir():
        saved = json.loads(run.demo_record.read_text())
        if {key: saved.get(key) for key in made_by} == made_by:
            print(f"reusing the finished run in {run_dir}", flush=True)
            return saved["wall_time_s"]
    if run_dir.exists():
        shutil.rmtree(run_dir)  # unfinished or made by another command: start clean
    wall_time = run_timed(command)
    run.demo_record.write_text(json.dumps({**made_by, "wall_time_s": wall_time}) + "\n")
    return wall_time


def evaluate_once(
    sources: ModelSources, split: TestSplit, args: argparse.Namespace, seed: int, cache: Path, base: str
) -> PairResults:
    """Score a pair on the test split, or load the scores it got with the same settings before."""
    settings = {
        "test_samples": args.test_samples,
        "steps": args.inference_steps,
        "guidance": args.guidance_scale,
        "seed": seed,
        "base": base,
    }
    saved = _read_scores(cache)
    if saved is not None and saved[0] == settings and set(saved[1].captions) == set(split.ids):
        return saved[1]
    captioner, generator = sources.load(device=default_device())
    sampling = SamplingSettings(
        seed=seed, num_beams=1, num_inference_steps=args.inference_steps, guidance_scale=args.guidance_scale
    )
    results = evaluate_pair(captioner, generator, split, sampling)
    cache.parent.mkdir(parents=True, exist_ok=True)
    metadata = {"settings": settings, "metrics": results.metrics, "captions": results.captions}
    save_file(
        {part: images.contiguous().cpu() for part, images in results.images.items()},
        str(cache),
        metadata={"scores": json.dumps(metadata)},
    )
    return results


def _read_scores(cache: Path) -> tuple[dict[str, Any], PairResults] | None:
    """(settings, results) of an earlier scoring, or None if there is none or it is unreadable (rescored)."""
    if not cache.is_file():
        return None
    try:
        with safe_open(str(cache), framework="pt") as handle:
            saved = json.loads(handle.metadata()["scores"])
            images = {part: handle.get_tensor(part) for part in handle.keys()}  # noqa: SIM118
    except Exception as error:  # a damaged cache costs a rescoring, nothing more
        print(f"rescoring: {cache} is unreadable ({type(error).__name__}: {error})", flush=True)
        return None
    return saved["settings"], PairResults(saved["metrics"], saved["captions"], images)


def paired_differences(results: dict[int, dict[str, PairResults]], metric: str, arm: str) -> dict[str, float]:
    """arm - control per seed: mean, standard deviation (ddof=1) and whether mean > 2 sd."""
    return summarize_differences(
        [runs[arm].metrics[metric] - runs["control"].metrics[metric] for runs in results.values()]
    )


def summarize_differences(differences: list[float]) -> dict[str, Any]:
    """Paired differences over seeds: their mean, standard deviation (ddof=1) and whether mean > 2 sd."""
    mean = statistics.fmean(differences)
    sd = statistics.stdev(differences) if len(differences) > 1 else float("nan")
    return {"mean": mean, "sd": sd, "passes": bool(mean > 2 * sd), "differences": differences}


def format_differences(comparisons: dict[str, dict[str, dict[str, Any]]]) -> str:
    """A markdown table of the paired differences arm - control, one row per arm and metric."""
    lines = [
        "| arm | metric | arm - control (mean) | sd (ddof=1) | mean > 2 sd |",
        "|---|---|---:|---:|:---:|",
    ]
    lines += [
        f"| {arm} | {name} | {c['mean']:+.3f} | {c['sd']:.3f} | {'yes' if c['passes'] else 'no'} |"
        for arm, by_metric in comparisons.items()
        for name, c in by_metric.items()
    ]
    return "\n".join(lines)


def logged_curves(seed_dir: Path, arms: Sequence[str]) -> dict[str, Path]:
    """Each arm's metrics log, for the report's curves; an arm that never logged (a run shorter than
    train.logging_steps, as `--steps 6` makes) has none, and the report goes on without its curves."""
    logs = {arm: RunDir(seed_dir / arm).metrics_log for arm in arms}
    return {arm: path for arm, path in logs.items() if path.is_file()}


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    args.argv = list(sys.argv[1:] if argv is None else argv)
    if base_is_missing(args.base):
        return 2
    config: Config = load_config(args.config, args.overrides)
    args.out.mkdir(parents=True, exist_ok=True)
    split = load_test_split(args.test_samples, config.data.resolution, TEST_SPLITS[args.split])
    wall: dict[str, list[float]] = {arm: [] for arm in args.arms}
    results: dict[int, dict[str, PairResults]] = {}
    base = ModelSources(
        captioner=str(args.base / "captioner"), generator=str(args.base / "generator"), config=config
    )
    base_id = base_identity(args.base)
    for seed in args.seeds:
        runs: dict[str, PairResults] = {}
        for arm in args.arms:
            command = arm_command(args, arm, seed, args.out / f"seed-{seed}" / arm)
            wall[arm].append(train_once(command, args.out / f"seed-{seed}" / arm, base_id))
        for arm in tqdm(("base", *args.arms), desc=f"evaluating seed {seed}"):
            folder = args.out / f"seed-{seed}" / arm
            sources = base if arm == "base" else trained_arm(folder)
            runs[arm] = evaluate_once(sources, split, args, seed, RunDir(folder).test_scores, base_id)
        results[seed] = runs
    return write_report(args, split, results, wall)


def write_report(
    args: argparse.Namespace,
    split: TestSplit,
    results: dict[int, dict[str, PairResults]],
    wall: dict[str, list[float]],
) -> int:
    """The table, curves and contact sheet into OUT/report, the numbers into OUT/results.json, a summary printed."""
    arms = ("base", *args.arms)
    metric_names = list(next(iter(results.values()))["base"].metrics)
    table = {
        arm: {
            name: statistics.fmean(runs[arm].metrics[name] for runs in results.values())
            for name in metric_names
        }
        for arm in arms
    }
    base_record = args.base / "base.json"
    base_wall = json.loads(base_record.read_text())["wall_time_s"]["train"] if base_record.is_file() else None
    for arm in arms:
        table[arm]["wall_time_s"] = statistics.fmean(wall[arm]) if arm in wall else base_wall or float("nan")
    comparisons = (
        {
            arm: {metric: paired_differences(results, metric, arm) for metric in metric_names}
            for arm in args.arms[1:]
        }
        if len(results) > 1
        else {}
    )
    first_seed = next(iter(results))
    runs = results[first_seed]
    parts = list(split.ids)
    shown = {part: min(SHEET_EXAMPLES_PER_PART, len(split.ids[part])) for part in parts}
    sheet = ContactSheet(
        images=torch.cat([split.pixels[part][: shown[part]] for part in parts]),
        captions=[caption for part in parts for caption in split.captions[part][: shown[part]]],
        unseen=[part in HELD_OUT_PARTS for part in parts for _ in range(shown[part])],
        arm_captions={
            arm: [caption for part in parts for caption in runs[arm].captions[part][: shown[part]]]
            for arm in arms
        },
        arm_images={
            arm: torch.cat([runs[arm].images[part][: shown[part]] for part in parts]) for arm in arms
        },
    )
    seeds = list(results)
    notes = [
        f"Seeds {seeds}; {args.test_samples} test images per part; metrics are means over seeds.",
        f"Command: python -m train.cli.demo {' '.join(args.argv)}",
    ]
    for arm, by_metric in comparisons.items():
        for metric in HEADLINE_METRICS:
            if metric in by_metric:
                c = by_metric[metric]
                notes.append(
                    f"{metric}: {arm} - control = {c['mean']:+.3f} (sd {c['sd']:.3f} over {len(seeds)} "
                    f"seeds): {'exceeds' if c['passes'] else 'does not exceed'} twice the standard deviation"
                )
    curves = logged_curves(args.out / f"seed-{first_seed}", args.arms)
    if len(curves) < len(args.arms):
        silent = ", ".join(arm for arm in args.arms if arm not in curves)
        notes.append(
            f"No training curves of {silent}: the run was shorter than train.logging_steps, nothing was logged."
        )
    report = write_demo_report(
        args.out / "report",
        title="CycleTune shapes demo",
        table=table,
        curves=curves,
        sheet=sheet,
        notes=notes,
    )
    summary = {
        "seeds": seeds,
        "split": args.split,
        "table": table,
        "per_seed": {seed: {arm: runs[arm].metrics for arm in arms} for seed, runs in results.items()},
        "wall_time_s": wall,
        "paired_differences": comparisons,
    }
    (args.out / "results.json").write_text(json.dumps(summary, indent=2) + "\n", encoding="utf-8")
    print(format_table(table))
    if comparisons:
        print(format_differences(comparisons))
    for note in notes[2:]:
        print(note)
    print(f"report: {report.resolve()}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
