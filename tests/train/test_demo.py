"""The shapes demo: both arms train from the committed base models, are scored, and a report is written."""

from __future__ import annotations

import json
import math
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from cycle_runs import REPO, environment
from PIL import Image
from safetensors.torch import save_file

from cycletune.evaluation import shapes_split
from cycletune.evaluation.shapes_split import PARTS, PairResults
from cycletune.train.cli.demo import (
    ARM_OVERRIDES,
    ARMS,
    base_identity,
    evaluate_once,
    paired_differences,
    parse_args,
    train_once,
    write_report,
)
from cycletune.train.cli.demo import arm_command as demo_arm_command
from cycletune.train.cli.shapes_base import DEFAULT_BASE, DEFAULT_CONFIG
from cycletune.train.config import load_config
from cycletune.train.inference import ModelSources
from cycletune.train.run_dir import RunDir


class _Results:
    def __init__(self, metrics: dict[str, float]) -> None:
        self.metrics = metrics


def test_paired_differences_compare_cycle_with_control_seed_by_seed() -> None:
    results = {
        seed: {"control": _Results({"m": control}), "cycle": _Results({"m": cycle})}
        for seed, (control, cycle) in enumerate([(0.1, 0.5), (0.3, 0.6), (0.2, 0.6)])
    }
    summary = paired_differences(results, "m", "cycle")
    assert summary["differences"] == pytest.approx([0.4, 0.3, 0.4])
    assert summary["mean"] == pytest.approx(11 / 30)
    assert summary["sd"] == pytest.approx(math.sqrt(((0.4 - 11 / 30) ** 2 * 2 + (0.3 - 11 / 30) ** 2) / 2))
    assert summary["passes"]  # 0.367 > 2 * 0.058
    results[1]["cycle"] = _Results({"m": 0.0})  # one seed where cycle loses badly: spread swamps the mean
    assert not paired_differences(results, "m", "cycle")["passes"]


def test_the_control_arm_is_the_cycle_config_without_cycle_terms_or_unpaired_data(tmp_path: Path) -> None:
    cycle = load_config(REPO / DEFAULT_CONFIG)
    assert cycle.cycle.i2t2i.mode != "none" and cycle.cycle.t2i2t.mode != "none"
    assert cycle.data.image_only and cycle.data.text_only
    assert all(source.combinations == "seen" for source in cycle.data.paired)
    control = load_config(REPO / DEFAULT_CONFIG, ARM_OVERRIDES["control"])
    assert (control.cycle.i2t2i.mode, control.cycle.t2i2t.mode) == ("none", "none")
    assert not control.data.image_only and not control.data.text_only
    # Everything else is shared: same models, optimizers, paired data, schedule and length.
    for section in ("captioner", "generator", "train", "seed"):
        assert getattr(control, section) == getattr(cycle, section), section
    assert control.data.paired == cycle.data.paired
    args = parse_args(["--steps", "7", "--seeds", "3", "--out", str(tmp_path)])
    command = demo_arm_command(args, "control", 3, tmp_path / "control")
    assert command[command.index("--config") + 1] == str(DEFAULT_CONFIG)
    assert {"seed=3", "train.max_train_steps=7", f"output_dir={tmp_path / 'control'}"} <= set(command)
    assert set(ARM_OVERRIDES["control"]) <= set(command)


def test_the_t2i2t_reward_arm_is_the_cycle_arm_with_the_generator_side_by_policy_gradient() -> None:
    cycle = load_config(REPO / DEFAULT_CONFIG)
    reward = load_config(REPO / DEFAULT_CONFIG, ARM_OVERRIDES["t2i2t_reward"])
    assert (cycle.cycle.t2i2t.mode, reward.cycle.t2i2t.mode) == ("one_step", "reward")
    assert reward.model_dump(exclude={"cycle"}) == cycle.model_dump(exclude={"cycle"})
    assert reward.cycle.i2t2i == cycle.cycle.i2t2i
    # The control arm always trains, first: every other arm is compared with it.
    assert parse_args(["--arms", "t2i2t_reward", "cycle", "cycle"]).arms == (
        "control",
        "t2i2t_reward",
        "cycle",
    )
    with pytest.raises(SystemExit):
        parse_args(["--arms", "control"])


def test_the_designed_split_tests_the_colour_only_the_captioner_was_trained_on() -> None:
    split = shapes_split.load_test_split(24, 32, shapes_split.TEST_SPLITS["designed"])
    assert list(split.ids) == ["generator_seen", "captioner_only", "unseen"]
    assert all("orange" in caption for caption in split.captions["captioner_only"])
    assert not any("orange" in caption for caption in split.captions["generator_seen"])
    main = shapes_split.load_test_split(24, 32)
    assert split.captions["unseen"] == main.captions["unseen"]  # the same unseen part as the main split
    assert parse_args(["--split", "designed"]).split == "designed"


def test_a_finished_arm_is_reused_only_for_the_same_command_and_base(tmp_path: Path) -> None:
    base = tmp_path / "base"
    base.mkdir()
    (base / "base.json").write_text('{"date": "one"}')
    run = RunDir(tmp_path / "arm")
    run.export_dir.mkdir(parents=True)
    command = [sys.executable, "-c", "raise SystemExit(3)", "train/cycle.py", "--config", "x.yaml", "seed=0"]
    made_by = {"command": command[3:], "base": base_identity(base), "wall_time_s": 12.5}
    run.demo_record.write_text(json.dumps(made_by))
    assert train_once(command, run.root, base_identity(base)) == 12.5  # reused: the command would fail
    (base / "base.json").write_text('{"date": "two"}')  # make base ran again: new models, so train again
    with pytest.raises(subprocess.CalledProcessError):
        train_once(command, run.root, base_identity(base))
    assert not run.export_dir.exists()  # the stale run was cleared before training


def _scores(seed: int) -> PairResults:
    torch.manual_seed(seed)
    return PairResults(
        {"unseen/caption_exact": 0.5},
        {part: ["a red circle"] for part in PARTS},
        {part: torch.rand(1, 3, 8, 8) for part in PARTS},
    )


def test_the_report_is_written_when_an_arm_logged_no_metrics(tmp_path: Path) -> None:
    """A demo shorter than train.logging_steps (`--steps 6`) leaves no metrics.jsonl; the report still comes,
    naming the arms without curves, with the table and the contact sheet."""
    split = shapes_split.TestSplit(  # imported by name, pytest would collect it as a test class
        pixels={part: torch.rand(1, 3, 8, 8) for part in PARTS},
        captions={part: ["a red circle"] for part in PARTS},
        ids={part: [f"{part}-0"] for part in PARTS},
    )
    results = {0: {arm: _scores(index) for index, arm in enumerate(("base", *ARMS))}}
    args = parse_args(["--out", str(tmp_path), "--base", str(tmp_path / "base"), "--test-samples", "1"])
    args.argv = ["--steps", "6"]
    wall = {arm: [1.0] for arm in ARMS}
    assert write_report(args, split, results, wall) == 0
    report = tmp_path / "report"
    html = (report / "report.html").read_text()
    assert "No training curves of control, cycle" in html and "unseen/caption_exact" in html
    assert (report / "contact_sheet.png").is_file() and not (report / "curves.png").exists()
    assert (
        json.loads((tmp_path / "results.json").read_text())["table"]["cycle"]["unseen/caption_exact"] == 0.5
    )
    cycle = RunDir(tmp_path / "seed-0" / "cycle")
    cycle.root.mkdir(parents=True)
    cycle.metrics_log.write_text(json.dumps({"step": 1, "captioner/caption_ce": 2.0}) + "\n")
    assert write_report(args, split, results, wall) == 0  # one arm logged: its curves, the other named
    html = (report / "report.html").read_text()
    assert "No training curves of control:" in html and (report / "curves.png").is_file()


def test_saved_scores_are_reused_only_for_the_same_settings_and_test_parts(tmp_path: Path) -> None:
    """Scores cached by an earlier run come back without loading a model; another split's parts (the designed
    split in the same --out) are scored anew, which here fails, as the models do not exist."""
    args = parse_args(["--out", str(tmp_path), "--test-samples", "1"])
    main, designed = (
        shapes_split.TestSplit(
            pixels={part: torch.rand(1, 3, 8, 8) for part in parts},
            captions={part: ["a red circle"] for part in parts},
            ids={part: [f"{part}-0"] for part in parts},
        )
        for parts in (PARTS, shapes_split.DESIGNED_TEST_SEEDS)
    )
    missing = ModelSources(captioner=str(tmp_path / "none"), generator=str(tmp_path / "none"))
    cache = tmp_path / "scores.safetensors"
    with pytest.raises(OSError):
        evaluate_once(missing, main, args, 0, cache, "base-id")
    settings = {"test_samples": 1, "steps": 10, "guidance": 2.0, "seed": 0, "base": "base-id"}
    scores = {"settings": settings, "metrics": {"unseen/caption_exact": 0.5}, "captions": main.captions}
    save_file(main.pixels, str(cache), metadata={"scores": json.dumps(scores)})
    assert evaluate_once(missing, main, args, 0, cache, "base-id").metrics == {"unseen/caption_exact": 0.5}
    with pytest.raises(OSError):
        evaluate_once(missing, designed, args, 0, cache, "base-id")
    with pytest.raises(OSError):
        evaluate_once(missing, main, args, 1, cache, "base-id")  # another seed's draws


def _run(module: str, *arguments: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", module, *arguments],
        cwd=REPO,
        env=environment(),
        capture_output=True,
        text=True,
    )


def test_the_demo_refuses_to_start_without_base_models(tmp_path: Path) -> None:
    result = _run("train.cli.demo", "--base", str(tmp_path / "nothing"), "--out", str(tmp_path))
    assert result.returncode == 2
    assert "make base" in result.stderr and "captioner" in result.stderr


@pytest.mark.slow
def test_a_reduced_demo_runs_both_arms_from_the_committed_base_models_and_writes_the_report(
    tmp_path: Path,
) -> None:
    assert (REPO / DEFAULT_BASE / "base.json").is_file(), "the committed base models are missing"
    out = tmp_path / "demo"
    flags = ["--steps", "2", "--test-samples", "2", "--inference-steps", "2", "--out", str(out)]
    overrides = ["train.validation_steps=2", "train.num_validation_samples=2", "train.logging_steps=1"]
    result = _run("train.cli.demo", *flags, *overrides)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    summary = json.loads((out / "results.json").read_text())
    assert set(summary["table"]) == {"base", "control", "cycle"}
    for arm, metrics in summary["table"].items():
        assert "unseen/caption_exact" in metrics and "seen/image_exact" in metrics, arm
        assert all(math.isfinite(value) for name, value in metrics.items() if name != "wall_time_s"), arm
    for arm in ("control", "cycle"):
        run = out / "seed-0" / arm
        assert (run / "export" / "captioner" / "adapter_config.json").is_file()
        assert (run / "export" / "generator" / "pytorch_lora_weights.safetensors").is_file()
        logged = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
        assert {entry["step"] for entry in logged} == {1, 2}
        assert any(key.startswith("validation/") for entry in logged for key in entry)
    cycle_terms = {
        key
        for line in (out / "seed-0" / "cycle" / "metrics.jsonl").read_text().splitlines()
        for key in json.loads(line)
    }
    assert any("i2t2i" in key for key in cycle_terms) and any("t2i2t" in key for key in cycle_terms)
    report = out / "report"
    html = (report / "report.html").read_text()
    assert "unseen/caption_exact" in html and "cycle" in html
    for picture in ("curves.png", "contact_sheet.png"):
        with Image.open(report / picture) as image:
            assert image.width > 100 and image.height > 100
    assert "report:" in result.stdout and "| metric |" in result.stdout
    # Run again with the T2I2T reward arm: the finished arms and their scores are reused (an interrupted
    # experiment continues), only the new arm trains, and the table keeps the others' numbers.
    again = _run("train.cli.demo", "--arms", "cycle", "t2i2t_reward", *flags, *overrides)
    assert again.returncode == 0, again.stderr[-3000:]
    assert again.stdout.count("reusing the finished run") == 2
    table = json.loads((out / "results.json").read_text())["table"]
    assert {arm: table[arm] for arm in summary["table"]} == summary["table"]
    reward_terms = {
        key
        for line in (out / "seed-0" / "t2i2t_reward" / "metrics.jsonl").read_text().splitlines()
        for key in json.loads(line)
    }
    assert "generator/t2i2t_reward" in reward_terms and "generator/t2i2t_one_step" not in reward_terms


def test_make_base_refuses_a_captioner_start_that_is_neither_made_nor_published(tmp_path: Path) -> None:
    """make split-base keeps make base's published captioner; a wrong path fails before anything trains."""
    result = _run(
        "train.cli.retrain_base",
        "--out",
        str(tmp_path / "published"),
        f"output_dir={tmp_path / 'run'}",
        f"captioner.pretrained_model_name_or_path={tmp_path / 'nothing' / 'captioner'}",
        f"generator.pretrained_model_name_or_path={tmp_path / 'init' / 'generator'}",
    )
    assert result.returncode == 2
    assert "captioner.pretrained_model_name_or_path" in result.stderr and "nothing" in result.stderr
    assert not (tmp_path / "init").exists() and not (tmp_path / "run").exists()


@pytest.mark.slow
def test_make_base_trains_both_models_from_scratch_and_publishes_them_with_their_record(
    tmp_path: Path,
) -> None:
    out, run = tmp_path / "published", tmp_path / "run"
    overrides = [
        f"output_dir={run}",
        f"captioner.pretrained_model_name_or_path={tmp_path / 'init' / 'captioner'}",
        f"generator.pretrained_model_name_or_path={tmp_path / 'init' / 'generator'}",
        "train.max_train_steps=5",
        "train.validation_steps=null",
        "report_to=none",
        "data.validation=[{type: shapes, num_samples: 4, seed: 103}]",
        "train.validation_inference_steps=2",
    ]
    result = _run("train.cli.retrain_base", "--out", str(out), *overrides)
    assert result.returncode == 0, result.stderr[-3000:]
    record = json.loads((out / "base.json").read_text())
    assert record["seed"] == 0 and set(record["wall_time_s"]) == {"init", "train", "evaluate"}
    assert "shapes_image_accuracy" in record["validation"]["metrics"]
    assert any("train/cycle.py" in command for command in record["commands"])
    assert record["made_by"] == " ".join(["python -m train.cli.retrain_base", "--out", str(out), *overrides])
    # Full models in the standard layouts, loadable without the run: what make demo starts from.
    assert (out / "captioner" / "config.json").is_file() and (
        out / "generator" / "model_index.json"
    ).is_file()
    assert load_config(out / "train_config.yaml").train.max_train_steps == 5
    # The published cards load the published copies, not the run's export folder.
    for part in ("captioner", "generator"):
        card = (out / part / "README.md").read_text()
        assert f'from_pretrained("{out / part}")' in card and str(run / "export") not in card
    # make split-base: the published captioner kept as it is, a new generator trained on the paired set
    # without the captioner-only combinations.
    split = tmp_path / "split"
    split_overrides = [
        *(o for o in overrides if not o.startswith(("output_dir=", "captioner.", "generator."))),
        f"output_dir={tmp_path / 'split-run'}",
        f"captioner.pretrained_model_name_or_path={out / 'captioner'}",
        f"generator.pretrained_model_name_or_path={tmp_path / 'split-init' / 'generator'}",
        "train.schedule=[generator]",
        "data.paired=[{type: shapes, num_samples: 64, seed: 100, combinations: generator_seen}]",
    ]
    result = _run("train.cli.retrain_base", "--out", str(split), *split_overrides)
    assert result.returncode == 0, result.stderr[-3000:]
    published = "model.safetensors", "diffusion_pytorch_model.safetensors"
    assert (split / "captioner" / published[0]).read_bytes() == (
        out / "captioner" / published[0]
    ).read_bytes()
    assert (split / "generator" / "unet" / published[1]).read_bytes() != (
        out / "generator" / "unet" / published[1]
    ).read_bytes()
