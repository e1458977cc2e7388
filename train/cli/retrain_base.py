"""make base: train the shapes demo's base captioner and generator from scratch, and publish them.

    python -m train.cli.retrain_base [--config configs/shapes_base.yaml] [--out pretrained/shapes-base] [overrides]

Writes random-init architectures (models/tiny.py, preset shapes-base), trains both in full mode with the
supervised losses on the paired split through the project's own trainer (accelerate launch
train/cycle.py), scores the result on the validation split (python -m train.cli.evaluate), and copies the
exported models into --out with base.json beside them: the commands, seed, wall time, library versions and
validation metrics. `make demo` starts from that folder, which is committed (a few MB).
"""

from __future__ import annotations

import argparse
import json
import platform
import shutil
import sys
from collections.abc import Sequence
from datetime import UTC, datetime
from pathlib import Path

import diffusers
import torch
import transformers

from cycletune.train.cli.help_format import HelpFormatter
from cycletune.train.cli.launch import launch_command, run_timed
from cycletune.train.config import load_config
from cycletune.train.run_dir import RunDir

VALIDATION_METRICS = "shapes_caption_accuracy,shapes_image_accuracy"


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=HelpFormatter)
    parser.add_argument("--config", type=Path, default=Path("configs/shapes_base.yaml"))
    parser.add_argument("--out", type=Path, default=Path("pretrained/shapes-base"))
    parser.add_argument("overrides", nargs="*", help="dotted config overrides, e.g. train.max_train_steps=50")
    return parser.parse_args(argv)


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    config = load_config(args.config, args.overrides)
    run_dir = RunDir(Path(config.output_dir))
    # Random-init models are written beside the generator's starting point; the captioner starts there too,
    # or from published models (the designed split's base keeps make base's captioner).
    init_dir = Path(config.generator.pretrained_model_name_or_path).parent
    captioner_start = Path(config.captioner.pretrained_model_name_or_path)
    if captioner_start.parent != init_dir and not captioner_start.is_dir():
        print(f"error: captioner.pretrained_model_name_or_path: no folder {captioner_start}", file=sys.stderr)
        return 2
    if run_dir.root.exists():
        shutil.rmtree(run_dir.root)  # a fresh run: the published models must come from this command alone
    init = [sys.executable, "-m", "models.tiny", "--out", str(init_dir), "--preset", "shapes-base"]
    init += ["--seed", str(config.seed)]
    train = launch_command(args.config, args.overrides)
    evaluate = [sys.executable, "-m", "train.cli.evaluate", "--checkpoint", str(run_dir.export_dir)]
    evaluate += ["--config", str(run_dir.config_file), "--metrics", VALIDATION_METRICS, "--num-beams", "1"]
    evaluate += ["--out", str(run_dir.validation_metrics)]
    wall_times = {name: run_timed(command) for name, command in (("init", init), ("train", train))}
    wall_times["evaluate"] = run_timed(evaluate)
    made_by = " ".join(["python -m train.cli.retrain_base", *(argv or sys.argv[1:])])
    publish(run_dir, args.out, made_by=made_by, commands=[init, train, evaluate], wall_times=wall_times)
    print(f"base models: {args.out.resolve()} (train {wall_times['train'] / 60:.1f} min)")
    return 0


def publish(
    run_dir: RunDir, out: Path, *, made_by: str, commands: list[list[str]], wall_times: dict[str, float]
) -> None:
    """Copy a finished base run's exported models into `out` with base.json (how they were made)."""
    config = load_config(run_dir.config_file)
    out.mkdir(parents=True, exist_ok=True)
    for part in ("captioner", "generator"):
        shutil.rmtree(out / part, ignore_errors=True)
        shutil.copytree(run_dir.export_dir / part, out / part)
        point_card_at(out / part, run_dir.export_dir / part)
    shutil.copy(run_dir.config_file, out / "train_config.yaml")
    record = {
        "made_by": made_by,
        "commands": [" ".join(command) for command in commands],
        "seed": config.seed,
        "wall_time_s": wall_times,
        "date": datetime.now(UTC).isoformat(timespec="seconds"),
        "machine": f"{platform.machine()}, {torch.get_num_threads()} torch threads",
        "versions": {
            "python": platform.python_version(),
            "torch": torch.__version__,
            "transformers": transformers.__version__,
            "diffusers": diffusers.__version__,
        },
        "validation": json.loads(run_dir.validation_metrics.read_text()),
    }
    (out / "base.json").write_text(json.dumps(record, indent=2) + "\n", encoding="utf-8")


def point_card_at(published: Path, exported: Path) -> None:
    """The export's model card loads it from the export folder's absolute path; the published copy's card
    loads it from where it was published, as given (pretrained/shapes-base/...: from the repository root)."""
    card = published / "README.md"
    text = card.read_text(encoding="utf-8")
    card.write_text(
        text.replace(json.dumps(str(exported.resolve())), json.dumps(str(published))), encoding="utf-8"
    )


if __name__ == "__main__":
    sys.exit(main())
