"""End-to-end runs of `train/cycle.py` on tiny models: export, tracking, resume, preemption, multi-process."""

from __future__ import annotations

import json
import math
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from cycle_runs import (
    EXPORTED,
    REPO,
    cycle_command,
    differing_tensors,
    environment,
    exported_weights,
    run_cycle,
    sample_log,
    tiny_overrides,
)
from PIL import Image
from safetensors.torch import load_file
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
from wandb_offline import history, logged_config, records

from cycletune.data.shapes import all_scenes, describe, render
from cycletune.models.captioner import Captioner
from cycletune.models.generator import Generator
from cycletune.train.run_dir import RunDir

pytestmark = pytest.mark.slow


def wait_for(path: Path, process: subprocess.Popen, timeout: float = 300) -> None:
    deadline = time.monotonic() + timeout
    while not path.exists():
        assert process.poll() is None or path.exists(), f"run ended before {path} appeared"
        assert time.monotonic() < deadline, f"{path} did not appear in {timeout} s"
        time.sleep(0.02)


@pytest.fixture(scope="module")
def finished_run(tiny_models, tmp_path_factory) -> tuple[Path, subprocess.CompletedProcess]:
    output_dir = tmp_path_factory.mktemp("finished") / "run"
    result = run_cycle(
        [
            *tiny_overrides(tiny_models, output_dir),
            "report_to=wandb",
            "train.max_train_steps=4",
            "train.checkpointing_steps=2",
            "train.checkpoints_total_limit=1",
            "train.validation_steps=4",
            "train.logging_steps=2",
            "export.kohya=true",
            "export.merge=true",
        ]
    )
    return output_dir, result


def test_run_trains_both_phases_prunes_exports_and_says_where(finished_run) -> None:
    output_dir, result = finished_run
    assert f"run folder:        {output_dir.resolve()}" in result.stdout
    assert f"exported adapters: {(output_dir / 'export').resolve()}" in result.stdout
    assert "W&B run:" in result.stdout
    assert "Warning" not in result.stderr, "a normal run (W&B, validation, exports) prints no warnings"
    assert [entry["phase"] for entry in sample_log(output_dir)] == ["captioner", "generator"] * 2
    assert [step for step, _ in RunDir(output_dir).checkpoints()] == [4], (
        "checkpoints_total_limit=1 keeps the newest"
    )
    for relative in (
        *EXPORTED,
        "captioner/adapter_config.json",
        "captioner/README.md",
        "generator/README.md",
        "generator/pytorch_lora_weights_kohya.safetensors",  # export.kohya
        "captioner_merged/config.json",  # export.merge
        "generator_merged/model_index.json",
    ):
        assert (output_dir / "export" / relative).is_file(), relative
    assert "base_model:" in (output_dir / "export" / "generator" / "README.md").read_text()
    state = json.loads((output_dir / "checkpoint-4" / "trainer_state.json").read_text())
    assert state["updates"] == {"captioner": 2, "generator": 2}


def test_metrics_jsonl_logs_both_models_every_logging_steps_steps(finished_run) -> None:
    """Steps alternate captioner, generator; logging_steps=2 counts steps like every other *_steps key, so
    steps 2 and 4 each log both models' terms (each the mean over its update in the window), and steps 1
    and 3 log nothing."""
    output_dir, _ = finished_run
    logged = [json.loads(line) for line in (output_dir / "metrics.jsonl").read_text().splitlines()]
    training = [entry for entry in logged if "samples_per_second" in entry]
    assert [entry["step"] for entry in training] == [2, 4]
    for entry in training:
        assert {"captioner/caption_ce", "generator/denoise", "captioner/lr", "generator/grad_norm"} <= set(
            entry
        )


def test_offline_wandb_run_holds_config_and_loss_series(finished_run) -> None:
    output_dir, _ = finished_run
    run_file = next(output_dir.rglob("run-*.wandb"))
    config = logged_config(run_file)
    assert config["train.max_train_steps"] == 4
    assert config["generator.lora.rank"] == 4
    # Values keep their types in W&B (TensorBoard alone gets strings): a list stays a list, None is null.
    assert config["train.schedule"] == ["captioner", "generator"]
    assert config["captioner.revision"] is None
    rows = history(run_file)
    caption_losses = [row["captioner/caption_ce"] for row in rows if "captioner/caption_ce" in row]
    denoise_losses = [row["generator/denoise"] for row in rows if "generator/denoise" in row]
    assert len(caption_losses) == 2 and len(denoise_losses) == 2  # steps 2 and 4 log both models
    assert all(math.isfinite(value) and value > 0 for value in caption_losses + denoise_losses)
    tables = [row for row in rows if row.get("validation/samples/_type") == "table-file"]
    assert tables and tables[0]["validation/samples/nrows"] == 2, "the validation table was not logged"
    assert any("validation/caption_ce" in row for row in rows)
    artifacts = [
        record.artifact
        for record in records(run_file)
        if record.WhichOneof("record_type") == "artifact" and record.artifact.type == "model"
    ]
    assert [artifact.name.endswith("-export") for artifact in artifacts] == [True]
    files = {entry.path for artifact in artifacts for entry in artifact.manifest.contents}
    assert {"captioner/adapter_model.safetensors", "generator/pytorch_lora_weights.safetensors"} <= files


def test_resume_refuses_a_config_that_changes_the_lora_shape(finished_run, tiny_models) -> None:
    output_dir, _ = finished_run
    result = run_cycle(
        [
            *tiny_overrides(tiny_models, output_dir),
            "train.resume_from_checkpoint=latest",
            "train.max_train_steps=6",
            "generator.lora.rank=8",
        ],
        check=False,
    )
    assert result.returncode == 2
    assert "generator.lora.rank: checkpoint has 4, config has 8" in result.stderr


def test_resumed_run_continues_the_same_wandb_run(finished_run, tiny_models, tmp_path: Path) -> None:
    output_dir = tmp_path / "continued"
    shutil.copytree(finished_run[0], output_dir)
    run_cycle(
        [
            *tiny_overrides(tiny_models, output_dir),
            "report_to=wandb",
            "train.max_train_steps=6",
            "train.checkpointing_steps=2",
            "train.resume_from_checkpoint=latest",
        ]
    )
    run_files = sorted(output_dir.glob("wandb/offline-run-*/run-*.wandb"))
    assert len(run_files) == 2 and run_files[0].name == run_files[1].name, "the resumed run got a new W&B id"
    steps = [row["_step"] for path in run_files for row in history(path) if "generator/denoise" in row]
    # The first run logs both models every 2nd step (2, 4); the continuation logs every step, and only
    # step 6 of its steps 5 (captioner) and 6 (generator) updated the generator.
    assert sorted(steps) == [2, 4, 6]


def test_full_mode_bf16_run_exports_whole_models_and_logs_to_tensorboard(tiny_models, tmp_path: Path) -> None:
    """bf16 comes from the launcher (accelerate launch --mixed_precision sets this variable): the config
    leaves mixed_precision unset, so the launcher's setting holds, and the run says so and records it."""
    output_dir = tmp_path / "full"
    result = run_cycle(
        [
            *tiny_overrides(tiny_models, output_dir),
            "captioner.train_mode=full",
            "generator.train_mode=full",
            "report_to=tensorboard",
            "train.max_train_steps=2",
            "train.validation_steps=2",
        ],
        ACCELERATE_MIXED_PRECISION="bf16",
    )
    assert "mixed precision: bf16 (the launcher's" in result.stderr
    assert yaml.safe_load((output_dir / "config.yaml").read_text())["mixed_precision"] == "bf16"
    trained = load_file(str(output_dir / "checkpoint-2" / "captioner_trainable.safetensors"))
    exported = Captioner.from_pretrained(str(output_dir / "export" / "captioner"))
    exported_params = dict(exported.named_parameters())
    assert trained.keys() == exported_params.keys()
    assert all(torch.equal(trained[name], exported_params[name].detach()) for name in trained)
    generator = Generator.from_pretrained(str(output_dir / "export" / "generator"))
    assert generator.vae is not None and generator.vae.dtype == torch.float32
    events = EventAccumulator(str(next((output_dir / "logs").rglob("events.out.tfevents.*")).parent))
    events.Reload()
    scalars = events.Tags()["scalars"]
    assert {"captioner/caption_ce", "generator/denoise", "validation/caption_ce"} <= set(scalars)
    assert "validation/image_vs_generated" in events.Tags()["images"]


def test_export_cli_rebuilds_a_checkpoint(finished_run, tmp_path: Path) -> None:
    output_dir, _ = finished_run
    out = tmp_path / "export"
    checkpoint = str(output_dir / "checkpoint-4")
    subprocess.run(
        [
            sys.executable,
            "-m",
            "train.cli.export",
            "--checkpoint",
            checkpoint,
            "--out",
            str(out),
            "--kohya",
            "--merge",
        ],
        cwd=REPO,
        env=environment(),
        check=True,
        capture_output=True,
    )
    for relative in EXPORTED:
        original = load_file(str(output_dir / "export" / relative))
        again = load_file(str(out / relative))
        assert original.keys() == again.keys()
        assert all(torch.equal(original[key], again[key]) for key in original)
    assert (out / "generator" / "pytorch_lora_weights_kohya.safetensors").is_file()
    assert (out / "captioner_merged" / "config.json").is_file()
    assert (out / "generator_merged" / "model_index.json").is_file()


def test_resume_after_sigkill_matches_an_uninterrupted_run(tiny_models, tmp_path: Path) -> None:
    settings = ["train.max_train_steps=6", "train.checkpointing_steps=3", "train.validation_steps=null"]
    uninterrupted = tmp_path / "uninterrupted"
    run_cycle([*tiny_overrides(tiny_models, uninterrupted), *settings])

    interrupted = tmp_path / "interrupted"
    process = subprocess.Popen(
        cycle_command([*tiny_overrides(tiny_models, interrupted), *settings]),
        cwd=REPO,
        env=environment(),
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    wait_for(interrupted / "checkpoint-3" / "trainer_state.json", process)
    process.send_signal(signal.SIGKILL)
    process.wait()
    shutil.rmtree(interrupted / "checkpoint-6", ignore_errors=True)
    shutil.rmtree(interrupted / "export", ignore_errors=True)

    run_cycle([*tiny_overrides(tiny_models, interrupted), *settings, "train.resume_from_checkpoint=latest"])
    assert sample_log(interrupted) == sample_log(uninterrupted)
    different = differing_tensors(exported_weights(uninterrupted), exported_weights(interrupted))
    assert not different, f"resumed weights differ from the uninterrupted run: {different[:5]}"


def test_sigterm_saves_a_checkpoint_and_exits_cleanly(tiny_models, tmp_path: Path) -> None:
    output_dir = tmp_path / "preempted"
    process = subprocess.Popen(
        cycle_command([*tiny_overrides(tiny_models, output_dir), "train.max_train_steps=500"]),
        cwd=REPO,
        env=environment(),
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
    )
    wait_for(output_dir / "samples.jsonl", process)
    process.send_signal(signal.SIGTERM)
    _, stderr = process.communicate(timeout=300)
    assert process.returncode == 0, stderr[-3000:]
    steps = [step for step, _ in RunDir(output_dir).checkpoints()]
    assert steps and 1 <= steps[-1] < 500
    assert (
        json.loads((output_dir / f"checkpoint-{steps[-1]}" / "trainer_state.json").read_text())["step"]
        == steps[-1]
    )
    assert "stopped by signal" in stderr


def test_nonfinite_updates_are_skipped_and_counted(tiny_models, tmp_path: Path) -> None:
    output_dir = tmp_path / "diverged"
    # An absurd learning rate blows the generator's LoRA weights up after its first update.
    diverging = ["generator.optimizer.learning_rate=1.0e+30", "generator.optimizer.max_grad_norm=null"]
    run_cycle([*tiny_overrides(tiny_models, output_dir), *diverging, "train.max_train_steps=6"])
    state = json.loads((output_dir / "checkpoint-6" / "trainer_state.json").read_text())
    assert state["step"] == 6
    assert state["skipped_nonfinite"] >= 1


# One Adam step with epsilon far above every gradient element is lr * g / (|g| + eps) ~= lr * g / eps: linear
# in the gradient, so rounding differences stay rounding-sized instead of becoming sign-sized updates (the
# default eps=1e-8 turns a 1e-8 gradient wobble into a full lr-sized step). Weight decay is off so only the
# gradient moves the weights, and clipping is off because clipping to norm 1 would hide a missing division.
LINEAR_ADAM = [
    f"{model}.optimizer.{key}={value}"
    for model in ("captioner", "generator")
    for key, value in (("adam_epsilon", 1.0), ("adam_weight_decay", 0), ("max_grad_norm", "null"))
]
# Two processes and one process compute the same gradient in a different float32 summation order: one sums 4
# samples in one reduction, two sum 2 each and all-reduce (sum, then 1/2). Reordering a float32 sum of n
# terms moves it by at most n * u times the terms' magnitude (u = 2^-24), and along a backward chain the
# per-reduction bounds add. In the tiny models a reduction has at most 1024 terms (4 samples x 16x16 latent
# positions; channel sums are shorter) and the longest backward chain fewer than 32 reductions: n <= 2^15,
# so the gradients agree within 2^15 * 2^-24 = 2^-9 ~= 2e-3 of the tensor's largest element (measured:
# 3e-6). The linear Adam step (slope lr / (1 + |g|)^2 <= lr; |g| ~ 3e-3 << eps) carries that relative bound
# to each exported LoRA-B, which is zero before its one update. A missing 1/world_size doubles every B
# (relative error 1); a dropped rank leaves one half-batch's gradient (relative error O(1)).
REORDERING_BOUND = 2.0**15 * 2.0**-24


# One update of each model (captioner, then generator), a cycle mode on each side, as every multi-process
# run below takes.
TWO_UPDATES = [
    "train.max_train_steps=2",
    "train.validation_steps=null",
    "cycle.i2t2i.mode=soft",
    "cycle.t2i2t.mode=one_step",
    *LINEAR_ADAM,
]
FSDP_CONFIG = REPO / "configs/accelerate/fsdp.yaml"


@pytest.fixture(scope="module")
def two_process_run(tiny_models, tmp_path_factory) -> Path:
    """Two DDP processes of 2 samples each, both models updated once."""
    two = tmp_path_factory.mktemp("two")
    run_cycle([*tiny_overrides(tiny_models, two), *TWO_UPDATES, "train.checkpointing_steps=2"], processes=2)
    return two


def assert_within_reordering(actual: dict[str, torch.Tensor], expected: dict[str, torch.Tensor]) -> None:
    assert expected.keys() == actual.keys()
    # Each model had one update; LoRA-A got no gradient (its B was zero), so the LoRA-B carry the claim
    # (PEFT names them lora_B, the diffusers file lora.up).
    updated = [key for key in expected if "lora_B" in key or "lora.up" in key]
    assert any("generator" in key for key in updated) and any("captioner" in key for key in updated)
    assert updated and all(expected[key].abs().max() > 0 for key in updated), "no LoRA-B was updated"
    for key in updated:
        scale = float(expected[key].abs().max())
        torch.testing.assert_close(actual[key], expected[key], rtol=0, atol=REORDERING_BOUND * scale, msg=key)


def test_two_processes_equal_one_process_on_the_union_of_their_batches(
    two_process_run, tiny_models, tmp_path: Path
) -> None:
    two = two_process_run
    one = tmp_path / "one"
    run_cycle([*tiny_overrides(tiny_models, one), *TWO_UPDATES, "data.train_batch_size=4"])

    for two_entry, one_entry in zip(sample_log(two), sample_log(one), strict=True):
        rank0, rank1 = two_entry["ids"][:2], two_entry["ids"][2:]
        assert not set(rank0) & set(rank1), "ranks must see disjoint samples"
        assert sorted(two_entry["ids"]) == sorted(one_entry["ids"])
    assert {entry["phase"] for entry in sample_log(two)} == {"captioner", "generator"}
    assert_within_reordering(exported_weights(two), exported_weights(one))

    # A checkpoint written by two processes resumes in one.
    resumed = tmp_path / "resumed"
    resumed.mkdir()
    shutil.copytree(RunDir(two).checkpoint(2), RunDir(resumed).checkpoint(2))
    run_cycle(
        [
            *tiny_overrides(tiny_models, resumed),
            "train.max_train_steps=4",
            "train.checkpointing_steps=2",
            "train.resume_from_checkpoint=latest",
            "data.train_batch_size=4",
        ]
    )
    assert [step for step, _ in RunDir(resumed).checkpoints()] == [2, 4]


def test_fsdp_trains_resumes_exactly_and_exports_what_ddp_exports(
    two_process_run, tiny_models, tmp_path: Path
) -> None:
    """FSDP2 through Accelerate's launcher on two CPU processes: its models hold shards (each rank trains a
    half of every trainable tensor), its checkpoints and export hold full tensors."""
    fsdp = tmp_path / "fsdp"
    overrides = [*tiny_overrides(tiny_models, fsdp), *TWO_UPDATES, "train.checkpointing_steps=1"]
    run = run_cycle(overrides, processes=2, engine=FSDP_CONFIG)
    assert "FSDP2 on CPU (gloo)" in run.stderr
    assert_within_reordering(exported_weights(fsdp), exported_weights(two_process_run))

    # Resumed after the captioner's update, the generator's update and the export are bit-identical.
    resumed = tmp_path / "resumed"
    resumed.mkdir()
    shutil.copytree(RunDir(fsdp).checkpoint(1), RunDir(resumed).checkpoint(1))
    overrides = [*tiny_overrides(tiny_models, resumed), *TWO_UPDATES, "train.resume_from_checkpoint=latest"]
    run_cycle(overrides, processes=2, engine=FSDP_CONFIG)
    uninterrupted, after_resume = exported_weights(fsdp), exported_weights(resumed)
    assert uninterrupted.keys() == after_resume.keys()
    for key, value in uninterrupted.items():
        assert torch.equal(after_resume[key], value), key


def test_channels_last_is_refused_under_fsdp_before_anything_is_built(tiny_models, tmp_path: Path) -> None:
    """FSDP2 shards only contiguous weights: a two-process FSDP launch with channels_last stops at once with
    the key, the engine and the way out, instead of a traceback from inside fully_shard."""
    out = tmp_path / "run"
    overrides = [*tiny_overrides(tiny_models, out), "generator.channels_last=true"]
    run = run_cycle(overrides, processes=2, engine=FSDP_CONFIG, check=False)
    assert run.returncode != 0
    assert "error: generator.channels_last=true cannot run under FSDP" in run.stderr
    assert "[rank0]: Traceback" not in run.stderr  # the ranks stop cleanly (the launcher reports their exit)
    assert not (out / "checkpoints").exists()


def _bad_and_odd_image_folder(folder: Path) -> None:
    """Readable images in every odd mode, two corrupt files and three broken manifest rows."""
    folder.mkdir()
    shapes = [render(scene, 32, seed=index) for index, scene in enumerate(all_scenes()[:4])]
    rows = []
    for index, image in enumerate(shapes):
        image.save(folder / f"rgb{index}.png")
        rows.append({"file_name": f"rgb{index}.png", "text": describe(all_scenes()[index])})
    gray = np.asarray(shapes[0].convert("L"), dtype=np.uint16) * 257
    odd = {
        "gray.png": shapes[0].convert("L"),
        "sixteen_bit.png": Image.fromarray(gray),
        "cmyk.jpg": shapes[1].convert("CMYK"),
        "rgba.png": shapes[2].convert("RGBA"),
        "palette.png": shapes[3].convert("P"),
    }
    for name, image in odd.items():
        image.save(folder / name)
        rows.append({"file_name": name, "text": "a shape"})
    (folder / "truncated.png").write_bytes((folder / "rgb1.png").read_bytes()[:60])
    (folder / "garbage.png").write_bytes(b"this is not an image at all")
    rows += [{"file_name": "truncated.png", "text": "cut"}, {"file_name": "garbage.png", "text": "junk"}]
    rows += [{"file_name": "rgb2.png", "text": "   "}, {"file_name": "missing.png", "text": "gone"}]
    lines = [json.dumps(row) for row in rows] + ['{"file_name": "rgb3.png", "text": ']
    (folder / "metadata.jsonl").write_text("\n".join(lines) + "\n")


def test_corrupt_odd_and_malformed_data_trains_with_a_skip_count(tiny_models, tmp_path: Path) -> None:
    dataset = tmp_path / "messy"
    _bad_and_odd_image_folder(dataset)
    output_dir = tmp_path / "run"
    # 11 decodable-looking records, 12 draws: every record is drawn, the two corrupt ones included.
    result = run_cycle(
        [
            *tiny_overrides(tiny_models, output_dir),
            f"data.paired=[{{type: imagefolder, path: {dataset}}}]",
            "train.max_train_steps=6",
            "train.checkpointing_steps=6",
        ]
    )
    assert "skipped 3 (bad_json=1, empty_caption=1, missing_file=1)" in result.stderr
    assert "truncated.png" in result.stderr and "garbage.png" in result.stderr
    state = json.loads((output_dir / "checkpoint-6" / "trainer_state.json").read_text())
    # Each distinct bad record once: 3 found reading the manifest, 2 found decoding (each met once here).
    reasons = sorted(entry[1] for entry in state["skipped_records"]["entries"])
    assert state["step"] == 6
    assert reasons == ["bad_json", "empty_caption", "missing_file", "not_an_image", "truncated_image"]
    summary = "skipped 5 (bad_json=1, empty_caption=1, missing_file=1, not_an_image=1, truncated_image=1)"
    assert f"skipped records: {summary}" in result.stdout
    drawn = {sample_id for entry in sample_log(output_dir) for sample_id in entry["ids"]}
    assert {"gray.png", "sixteen_bit.png", "cmyk.jpg", "rgba.png", "palette.png"} <= drawn
    assert not drawn & {"truncated.png", "garbage.png", "missing.png"}


def test_misspelled_key_fails_before_any_work(tiny_models, tmp_path: Path) -> None:
    result = run_cycle(
        [*tiny_overrides(tiny_models, tmp_path / "typo"), "train.max_train_step=3"], check=False
    )
    assert result.returncode == 2
    assert "unknown key 'train.max_train_step' (did you mean 'train.max_train_steps'?)" in result.stderr
    assert not (tmp_path / "typo").exists()


def test_train_modules_do_not_shadow_stdlib_or_project_packages() -> None:
    # `accelerate launch train/cycle.py` puts train/ first on sys.path.
    names = {path.stem for path in (REPO / "train").glob("*.py")}
    clashes = names & (set(sys.stdlib_module_names) | {"data", "models", "losses", "train", "tests"})
    assert not clashes, f"rename {sorted(clashes)}: they shadow modules when train/ is on sys.path"
