"""Inference, reranking and evaluation entry points on a real tiny training run (checkpoint and export
folders), and the trainer's validation metrics."""

from __future__ import annotations

import json
import logging
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from cycle_runs import REPO, TINY_CONFIG, environment, run_cycle, tiny_overrides
from PIL import Image

from cycletune.data.shapes import all_scenes, describe, render
from cycletune.models.captioner import Captioner
from cycletune.models.generator import Generator
from cycletune.models.lora import save_merged_captioner, save_merged_generator
from cycletune.train.builders import build_captioner, build_generator, build_validation_batch
from cycletune.train.cli import evaluate, generate, rerank
from cycletune.train.config import ConfigError, load_config
from cycletune.train.inference import ModelSources
from cycletune.train.validation import check_validation_metrics, validate

# Every metric that needs weights the tests do not have, and the option its skip message must name.
WEIGHT_OPTIONS = {
    "spice": "stanford-corenlp-3.6.0.jar",
    "fid": "evaluation.fid_feature_weights",
    "kid": "evaluation.fid_feature_weights",
    "clip_image_similarity": "evaluation.clip_image_encoder",
    "dino_similarity": "evaluation.dino_image_encoder",
    "lpips": "evaluation.lpips_backbone_weights",
    "clip_text_similarity": "evaluation.clip_text_encoder",
}


@pytest.fixture(scope="module")
def trained_run(tiny_models, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A finished two-update run: run/config.yaml, run/checkpoint-2/ and run/export/."""
    output_dir = tmp_path_factory.mktemp("cli") / "run"
    run_cycle(
        [
            *tiny_overrides(tiny_models, output_dir),
            "train.max_train_steps=2",
            "train.checkpointing_steps=2",
            "train.validation_steps=null",
        ]
    )
    return output_dir


@pytest.fixture(scope="module")
def inputs(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    """A folder of two shapes images with their captions (metadata.jsonl), and a prompts file of the same."""
    root = tmp_path_factory.mktemp("inputs")
    (root / "images").mkdir()
    scenes = all_scenes()[:2]
    for index, scene in enumerate(scenes):
        render(scene, 32, seed=index).save(root / "images" / f"shape{index}.png")
    (root / "images" / "metadata.jsonl").write_text(
        "".join(
            json.dumps({"file_name": f"shape{index}.png", "text": describe(scene)}) + "\n"
            for index, scene in enumerate(scenes)
        )
    )
    (root / "prompts.txt").write_text("".join(describe(scene) + "\n" for scene in scenes))
    return root / "images", root / "prompts.txt"


def _outputs(models: ModelSources) -> tuple[torch.Tensor, torch.Tensor]:
    """Captioner logits and UNet output on fixed inputs: what the trained weights decide."""
    return _outputs_of(*models.load())


def _outputs_of(captioner: Captioner, generator: Generator) -> tuple[torch.Tensor, torch.Tensor]:
    pixels = torch.rand(1, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    tokens = captioner.tokenize(["a red circle in the center"])
    latents = torch.randn(generator.latent_shape(1), generator=torch.Generator().manual_seed(1))
    context = generator.encode_text(generator.tokenize(["a red circle"]))
    with torch.no_grad():
        logits = captioner.logits(pixels, tokens["input_ids"], tokens["attention_mask"])
        unet = generator.unet(latents, torch.tensor([500]), context).sample
    return logits, unet


@pytest.mark.slow
def test_export_folder_and_checkpoint_folder_load_the_same_trained_models(trained_run: Path) -> None:
    config = load_config(trained_run / "config.yaml")
    from_checkpoint = _outputs(ModelSources(checkpoint=trained_run / "checkpoint-2"))
    from_export = _outputs(ModelSources(checkpoint=trained_run / "export", config=config))
    explicit = _outputs(
        ModelSources(
            config=config,
            captioner_adapter=trained_run / "export" / "captioner",
            generator_lora=trained_run / "export" / "generator" / "pytorch_lora_weights.safetensors",
        )
    )
    base = _outputs(ModelSources(config=config))
    for trained, exported, adapters, untrained in zip(
        from_checkpoint, from_export, explicit, base, strict=True
    ):
        torch.testing.assert_close(exported, trained, atol=1e-5, rtol=0)
        torch.testing.assert_close(adapters, trained, atol=1e-5, rtol=0)
        assert (untrained - trained).abs().max() > 1e-5  # the adapters did change the outputs


def test_diffusers_flag_names_and_our_earlier_ones_parse_alike() -> None:
    ours = ["images", "--prompts", "p.txt", "--out", "o", "--inference-steps", "3", "--guidance-scale", "2"]
    diffusers = ["images", "--prompts", "p.txt", "--output_dir", "o", "--num_inference_steps", "3"]
    diffusers += ["--guidance_scale", "2", "--pretrained_model_name_or_path", "g"]
    assert vars(generate.parse_args(diffusers)) == vars(generate.parse_args([*ours, "--generator", "g"]))


def _argv(mode: str, **flags: object) -> list[str]:
    """Command-line arguments from keywords: num_images=2 -> --num-images 2."""
    argv = [mode]
    for name, value in flags.items():
        argv += [f"--{name.replace('_', '-')}", str(value)]
    return argv


def _png_pixels(path: Path) -> bytes:
    with Image.open(path) as image:
        return image.tobytes()


@pytest.mark.slow
def test_generate_captions_and_images_from_an_export_and_a_checkpoint(
    trained_run: Path, inputs: tuple[Path, Path], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    images, prompts = inputs
    for name in ("export", "checkpoint-2"):
        checkpoint = trained_run / name
        assert (
            generate.main(
                _argv("captions", images=images, checkpoint=checkpoint, out=tmp_path / f"{name}.jsonl")
            )
            == 0
        )
        drawn = _argv("images", prompts=prompts, checkpoint=checkpoint, out=tmp_path / name, num_images=2)
        assert generate.main([*drawn, "--inference-steps", "2", "--batch-size", "1"]) == 0
    captions = [json.loads(line) for line in (tmp_path / "export.jsonl").read_text().splitlines()]
    assert [row["id"] for row in captions] == ["shape0.png", "shape1.png"]
    assert all(len(row["captions"]) == 1 and row["captions"][0] for row in captions)
    assert (tmp_path / "checkpoint-2.jsonl").read_text() == (tmp_path / "export.jsonl").read_text()
    assert "shape0.png: " in capsys.readouterr().out

    # Rows are written as they are made, so an interrupted run keeps them; --resume makes only the rest (a
    # row cut short is made again) and ends with what an uninterrupted run writes.
    complete = (tmp_path / "export.jsonl").read_text()
    first, second = complete.splitlines(keepends=True)
    (tmp_path / "export.jsonl").write_text(first + second[:10])
    resumed = _argv(
        "captions", images=images, checkpoint=trained_run / "export", out=tmp_path / "export.jsonl"
    )
    assert generate.main([*resumed, "--resume"]) == 0
    assert (tmp_path / "export.jsonl").read_text() == complete
    assert "wrote 1 images' captions" in capsys.readouterr().out
    drawn_rows = (tmp_path / "export" / "images.jsonl").read_text()
    (tmp_path / "export" / "images.jsonl").write_text(drawn_rows.splitlines(keepends=True)[0])
    drawn = _argv(
        "images", prompts=prompts, checkpoint=trained_run / "export", out=tmp_path / "export", num_images=2
    )
    assert generate.main([*drawn, "--inference-steps", "2", "--batch-size", "1", "--resume"]) == 0
    assert (tmp_path / "export" / "images.jsonl").read_text() == drawn_rows

    rows = [json.loads(line) for line in (tmp_path / "export" / "images.jsonl").read_text().splitlines()]
    assert [row["prompt"] for row in rows] == prompts.read_text().splitlines()
    files = [name for row in rows for name in row["files"]]
    assert len(files) == 4
    for name in files:
        assert _png_pixels(tmp_path / "export" / name) == _png_pixels(tmp_path / "checkpoint-2" / name), name

    # Seeded sampling draws per image id: the same captions whatever the batch size.
    for batch_size in (1, 2):
        sampled = _argv("captions", images=images, checkpoint=trained_run / "export", num_captions=3)
        out = tmp_path / f"sampled{batch_size}.jsonl"
        assert generate.main([*sampled, "--sample", "--batch-size", str(batch_size), "--out", str(out)]) == 0
    assert (tmp_path / "sampled1.jsonl").read_text() == (tmp_path / "sampled2.jsonl").read_text()
    assert all(len(json.loads(line)["captions"]) == 3 for line in (tmp_path / "sampled1.jsonl").open())


@pytest.mark.slow
def test_lora_scale_zero_draws_the_base_models_images_and_bfloat16_weights_run(
    tiny_models, trained_run: Path, inputs: tuple[Path, Path], tmp_path: Path
) -> None:
    images, prompts = inputs
    common = [
        "--prompts",
        str(prompts),
        "--num_inference_steps",
        "2",
        "--config",
        str(trained_run / "config.yaml"),
    ]
    export = ["--checkpoint", str(trained_run / "export")]
    assert (
        generate.main(["images", *common, *export, "--lora_scale", "0", "--out", str(tmp_path / "off")]) == 0
    )
    assert (
        generate.main(
            ["images", *common, "--generator", str(tiny_models.generator), "--out", str(tmp_path / "base")]
        )
        == 0
    )
    assert generate.main(["images", *common, *export, "--out", str(tmp_path / "on")]) == 0
    drawn = sorted(path.name for path in (tmp_path / "base").glob("*.png"))
    assert drawn and all(
        _png_pixels(tmp_path / "off" / name) == _png_pixels(tmp_path / "base" / name) for name in drawn
    )
    assert any(_png_pixels(tmp_path / "on" / name) != _png_pixels(tmp_path / "base" / name) for name in drawn)
    captions = [
        "captions",
        "--images",
        str(images),
        *export,
        "--dtype",
        "bfloat16",
        "--out",
        str(tmp_path / "c.jsonl"),
    ]
    assert generate.main(captions) == 0
    assert len((tmp_path / "c.jsonl").read_text().splitlines()) == 2


@pytest.mark.slow
def test_rerank_writes_rankings_and_a_contact_sheet_and_reports_on_them(
    trained_run: Path, inputs: tuple[Path, Path], tmp_path: Path
) -> None:
    images, prompts = inputs
    common = {"checkpoint": trained_run / "checkpoint-2", "inference_steps": 2, "batch_size": 2}
    captions = _argv(
        "captions", **common, images=images, num_beams=2, num_samples=1, out=tmp_path / "captions"
    )
    assert rerank.main(captions) == 0
    images = _argv("images", **common, prompts=prompts, num_images=2, text_similarity="token_f1")
    assert rerank.main([*images, "--out", str(tmp_path / "images")]) == 0
    queries = 2
    for folder, candidates in (("captions", 3), ("images", 2)):
        rows = [json.loads(line) for line in (tmp_path / folder / "rankings.jsonl").read_text().splitlines()]
        assert len(rows) == queries * candidates
        assert all(set(row["ranks"]) == set(row["scores"]) and len(row["scores"]) == 2 for row in rows)
        if folder == "captions":  # the folder's metadata.jsonl captions are the references
            references = [row["references"] for row in rows[::candidates]]
            assert references == [[caption] for caption in prompts.read_text().splitlines()]
        page = (tmp_path / folder / "index.html").read_text()
        links = re.findall(r'src="([^"]+)"', page)
        assert all((tmp_path / folder / link).is_file() for link in links)
        assert len(links) == queries * candidates + (queries if folder == "captions" else 0)

    rankings = tmp_path / "captions" / "rankings.jsonl"
    assert (
        rerank.main(_argv("report", rankings=rankings, metric="shapes_accuracy", bootstrap_samples=100)) == 0
    )
    report = tmp_path / "captions" / "report_shapes_accuracy"
    assert {path.name for path in report.iterdir()} == {
        "rank_quality.csv",
        "rank_quality.md",
        "rank_quality.png",
    }


@pytest.mark.slow
def test_evaluate_prints_metrics_and_names_the_option_of_every_skipped_one(
    tiny_models, trained_run: Path, tmp_path: Path
) -> None:
    measured = [
        "bleu_4",
        "cider_d",
        "psnr",
        "ssim",
        "recaption_cider_d",
        "shapes_caption_accuracy",
        "shapes_image_accuracy",
    ]
    out = tmp_path / "metrics.json"
    command = [sys.executable, "-m", "train.cli.evaluate", "--config", str(TINY_CONFIG)]
    command += [
        *tiny_overrides(tiny_models, tmp_path / "unused"),
        "--checkpoint",
        str(trained_run / "export"),
    ]
    command += ["--limit", "3", "--metrics", ",".join([*measured, *WEIGHT_OPTIONS]), "--out", str(out)]
    result = subprocess.run(
        command, cwd=REPO, env=environment(HF_HUB_OFFLINE="1"), capture_output=True, text=True, timeout=300
    )
    assert result.returncode == 0, result.stderr[-3000:]
    # It says what it is computing (some metric groups take minutes).
    assert "computing bleu_4, cider_d" in result.stderr and "computing psnr, ssim" in result.stderr
    table, _, reasons = result.stdout.partition("\nskipped:\n")
    values = dict(line.split() for line in table.splitlines() if len(line.split()) == 2)
    assert all(float(values[name]) >= 0 for name in measured)
    for name, option in WEIGHT_OPTIONS.items():
        assert values[name] == "skipped"
        assert re.search(rf"^  {name} skipped: .*{re.escape(option)}", reasons, re.MULTILINE), name
    summary = json.loads(out.read_text())
    assert summary["images"] == 3 and set(summary["skipped"]) == set(WEIGHT_OPTIONS)
    assert {*measured, "shapes_image_accuracy_colour"} <= set(summary["metrics"])
    assert all(0 <= summary["metrics"][name] <= 1 for name in ("bleu_4", "shapes_caption_accuracy", "ssim"))


def test_a_full_mode_export_folder_needs_no_base_models(tiny_models, tmp_path: Path) -> None:
    """train_mode full exports whole models: captioner/ and generator/ load on their own."""
    base = ModelSources(captioner=str(tiny_models.captioner), generator=str(tiny_models.generator)).load()
    save_merged_captioner(base[0], tmp_path / "export" / "captioner")
    save_merged_generator(base[1], tmp_path / "export" / "generator")
    exported = _outputs(ModelSources(checkpoint=tmp_path / "export"))
    for loaded, original in zip(exported, _outputs_of(*base), strict=True):
        torch.testing.assert_close(loaded, original, atol=1e-6, rtol=0)


def test_model_flags_that_cannot_work_are_named(
    tiny_models, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    (tmp_path / "neither").mkdir()
    (tmp_path / "export" / "generator").mkdir(parents=True)
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("a red circle\n")
    cases = {
        "neither a checkpoint folder": {"checkpoint": tmp_path / "neither"},
        "no base generator: pass --generator": {"checkpoint": tmp_path / "export"},
        "no LoRA file pytorch_lora_weights.safetensors": {
            "generator": tiny_models.generator,
            "generator_lora": tmp_path / "export" / "generator",
        },
    }
    for message, flags in cases.items():
        assert generate.main(_argv("images", prompts=prompts, out=tmp_path / "out", **flags)) == 2
        assert message in capsys.readouterr().err


def _tiny_config(tiny_models, tmp_path: Path, *overrides: str):
    return load_config(TINY_CONFIG, [*tiny_overrides(tiny_models, tmp_path), *overrides])


def test_validation_logs_the_configured_metrics(
    tiny_models, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    config = _tiny_config(
        tiny_models,
        tmp_path,
        "evaluation.validation_metrics=[bleu_4, cider_d, psnr, lpips, recaption_cider_d, "
        "shapes_caption_accuracy, shapes_image_accuracy]",
        "train.validation_inference_steps=2",
    )
    captioner, _ = build_captioner(config.captioner)
    generator, _ = build_generator(config.generator)
    batch = build_validation_batch(config)
    with caplog.at_level(logging.WARNING, logger="cycletune.train.validation"):
        metrics, rows = validate(captioner, generator, batch, config)
    expected = {
        "bleu_4",
        "cider_d",
        "psnr",
        "recaption_cider_d",
        "shapes_caption_accuracy",
        "shapes_image_accuracy",
    }
    assert {f"validation/{name}" for name in expected} <= metrics.keys()
    assert "validation/lpips" not in metrics and all(
        torch.isfinite(torch.tensor(v)) for v in metrics.values()
    )
    assert "lpips skipped: set evaluation.lpips_backbone_weights" in caplog.text
    assert len(rows) == 2 and rows[0].generated_image.shape == (3, 32, 32)
    assert captioner.training and generator.training  # validation leaves the models as it found them


def test_unknown_or_unusable_validation_metrics_fail_at_startup(tiny_models, tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match=r"unknown metric\(s\) \['bleu4'\]; known: \['bleu_1'"):
        check_validation_metrics(_tiny_config(tiny_models, tmp_path, "evaluation.validation_metrics=[bleu4]"))
    single = _tiny_config(
        tiny_models, tmp_path, "evaluation.validation_metrics=[cider_d]", "train.num_validation_samples=1"
    )
    with pytest.raises(ConfigError, match=r"need train\.num_validation_samples >= 2"):
        check_validation_metrics(single)
    assert check_validation_metrics(
        _tiny_config(tiny_models, tmp_path, "evaluation.validation_metrics=[psnr, psnr]")
    ) == ["psnr"]


def test_evaluate_defaults_to_the_shapes_metrics_only_on_shapes_data(tiny_models, tmp_path: Path) -> None:
    config = _tiny_config(tiny_models, tmp_path)
    assert "shapes_image_accuracy" in evaluate.default_metrics(config)
    coco = config.model_copy(deep=True)
    coco.data.validation = [{"type": "coco", "annotations": "a.json", "images_dir": "images"}]
    assert "shapes_image_accuracy" not in evaluate.default_metrics(
        coco
    ) and "fid" in evaluate.default_metrics(coco)


@pytest.mark.parametrize(
    ("parse_args", "argv", "shown"),
    [
        (generate.parse_args, ["images", "--help"], ["(default: 20)", "(default: 3.0)", "(default: 4)"]),
        (generate.parse_args, ["captions", "--help"], ["(default: 0.9)", "(default: 3)"]),
        (rerank.parse_args, ["captions", "--help"], ["(default: mse)", "(default: 0.9)", "(default: 20)"]),
        (rerank.parse_args, ["report", "--help"], ["(default: 1000)", "(default: 0.95)"]),
        (evaluate.parse_args, ["--help"], ["(default: 8)", "(default: 3)"]),
    ],
)
def test_help_shows_every_default_and_no_empty_ones(
    parse_args, argv: list[str], shown: list[str], capsys: pytest.CaptureFixture[str]
) -> None:
    with pytest.raises(SystemExit):
        parse_args(argv)
    text = capsys.readouterr().out
    assert all(default in text for default in shown), text
    assert "(default: None)" not in text and "(default: False)" not in text
