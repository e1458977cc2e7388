"""The config's evaluation section reaches the metrics: each weight setting fills the option of its name."""

from __future__ import annotations

from cycletune.evaluation.metric_settings import EvaluationSettings, image_options, text_options

CHANGED = EvaluationSettings(
    fid_feature_weights="inception.pth",
    fid_inception_dim=768,
    kid_subset_size=50,
    kid_subsets=7,
    clip_image_encoder="clip-image",
    dino_image_encoder="dino",
    lpips_backbone_weights="alexnet.pth",
    lpips_net="vgg",
    sbert_model="sbert",
    clip_text_encoder="clip-text",
)


def test_every_weight_setting_fills_exactly_one_metric_option() -> None:
    image, text = image_options(CHANGED, "meta"), text_options(CHANGED, "meta")
    for name, value in CHANGED:
        if name == "validation_metrics":  # read by validation, not by a metric
            continue
        assert value != EvaluationSettings.model_fields[name].default, f"set {name} to a non-default value"
        filled = [getattr(options, name) for options in (image, text) if hasattr(options, name)]
        assert filled == [value], f"evaluation.{name} reaches {filled}"
    assert image.device == text.device == "meta"
