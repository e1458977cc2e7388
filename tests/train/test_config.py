"""The config schema: shipped configs validate, typos fail by name, overrides are typed."""

from __future__ import annotations

from pathlib import Path

import pytest

from cycletune.data.source_types import ROLES, SOURCE_TYPES
from cycletune.train.config import (
    ConfigError,
    apply_override,
    fingerprint_differences,
    flags_as_overrides,
    load_config,
    model_fingerprint,
    save_config,
)

CONFIGS = Path(__file__).resolve().parents[2] / "configs"


@pytest.mark.parametrize("name", sorted(path.name for path in CONFIGS.glob("*.yaml")))
def test_shipped_configs_validate_and_survive_the_checkpoint_round_trip(name: str, tmp_path: Path) -> None:
    """A checkpoint stores the resolved config and resume reads it back: nothing may be lost or retyped."""
    config = load_config(CONFIGS / name)
    save_config(config, tmp_path / "config.yaml")
    assert load_config(tmp_path / "config.yaml") == config


def test_cross_field_rules_name_the_keys_involved() -> None:
    with pytest.raises(ConfigError, match=r"data\.image_only has sources but data\.image_only_ratio is 0"):
        load_config(
            CONFIGS / "tiny.yaml",
            ["data.image_only=[{type: images, path: x}]", "cycle.i2t2i.mode=gumbel"],
        )
    with pytest.raises(ConfigError, match=r"train\.schedule must name at least one phase"):
        load_config(CONFIGS / "tiny.yaml", ["train.schedule=[]"])
    with pytest.raises(ConfigError, match=r"data\.paired: at least one paired"):
        load_config(CONFIGS / "tiny.yaml", ["data.paired=[]"])


def test_paper_config_trains_only_cross_attention_queries() -> None:
    config = load_config(CONFIGS / "paper_blip_sd14_coco.yaml")
    assert config.captioner.pretrained_model_name_or_path == "Salesforce/blip-image-captioning-base"
    assert config.generator.pretrained_model_name_or_path == "CompVis/stable-diffusion-v1-4"
    assert config.train.gradient_accumulation_steps == 8 and config.data.train_batch_size == 1
    assert config.captioner.optimizer.learning_rate == config.generator.optimizer.learning_rate == 1e-4
    assert "crossattention" in config.captioner.lora.target_modules
    assert "attn2" in config.generator.lora.target_modules
    assert (config.cycle.i2t2i.mode, config.cycle.i2t2i.weight) == ("soft", 1.0)
    assert (config.cycle.t2i2t.mode, config.cycle.t2i2t.weight) == ("one_step", 1.0)


def test_unpaired_sources_need_a_mode_that_uses_them() -> None:
    texts = ["data.text_only=[{type: texts, path: captions.txt}]", "data.text_only_ratio=0.5"]
    with pytest.raises(
        ConfigError,
        match=r"data.text_only batches need cycle.t2i2t.mode in \['one_step', 'reward', 'sample'\]",
    ):
        load_config(CONFIGS / "tiny.yaml", texts)
    for mode in ("one_step", "reward", "sample"):
        config = load_config(CONFIGS / "tiny.yaml", [*texts, f"cycle.t2i2t.mode={mode}"])
        assert config.data.text_only_ratio == 0.5
    with pytest.raises(
        ConfigError, match=r"data\.image_only_ratio is 0\.5 but data\.image_only has no sources"
    ):
        load_config(CONFIGS / "tiny.yaml", ["data.image_only_ratio=0.5", "cycle.i2t2i.mode=gumbel"])
    with pytest.raises(ConfigError, match="grad_steps cannot exceed"):
        load_config(CONFIGS / "tiny.yaml", ["cycle.t2i2t.grad_steps=5", "cycle.t2i2t.num_inference_steps=3"])
    with pytest.raises(ConfigError, match="share_denoise_pass applies to mode 'one_step'; mode 'sample'"):
        load_config(CONFIGS / "tiny.yaml", ["cycle.t2i2t.mode=sample", "cycle.t2i2t.share_denoise_pass=true"])


def test_overrides_are_parsed_as_yaml_values() -> None:
    config = load_config(
        CONFIGS / "tiny.yaml",
        ["train.max_train_steps=20", "output_dir=/x", "train.schedule=[generator]", "generator.snr_gamma=5"],
    )
    assert config.train.max_train_steps == 20
    assert config.output_dir == "/x"
    assert config.train.schedule == ["generator"]
    assert config.generator.snr_gamma == 5.0


def test_misspelled_key_names_the_key_and_the_closest_valid_one() -> None:
    with pytest.raises(ConfigError) as error:
        load_config(CONFIGS / "tiny.yaml", ["train.max_train_step=20"])
    message = str(error.value)
    assert "unknown key 'train.max_train_step'" in message
    assert "did you mean 'train.max_train_steps'" in message


def test_misspelled_key_inside_a_data_source_is_reported_with_its_position(tmp_path: Path) -> None:
    with pytest.raises(ConfigError) as error:
        load_config(CONFIGS / "tiny.yaml", ["data.paired.0.num_sample=3"])
    assert "unknown key 'data.paired[0].num_sample'" in str(error.value)
    assert "did you mean 'data.paired[0].num_samples'" in str(error.value)


def test_wrong_type_and_bad_choice_are_named() -> None:
    with pytest.raises(ConfigError, match=r"'train.max_train_steps'.*'many'"):
        load_config(CONFIGS / "tiny.yaml", ["train.max_train_steps=many"])
    with pytest.raises(ConfigError, match=r"'mixed_precision'"):
        load_config(CONFIGS / "tiny.yaml", ["mixed_precision=fp8"])
    with pytest.raises(ConfigError, match=r"'train.schedule\[1\]'.*'dreamer'"):
        load_config(CONFIGS / "tiny.yaml", ["train.schedule=[captioner, dreamer]"])


# A valid entry of every source type (only the role it is put in may be wrong).
SOURCE_ENTRIES = {
    "hf": "{type: hf, path: x}",
    "imagefolder": "{type: imagefolder, path: x}",
    "coco": "{type: coco, annotations: x.json, images_dir: x}",
    "images": "{type: images, path: x}",
    "texts": "{type: texts, path: captions.txt}",
    "shapes": "{type: shapes, num_samples: 2}",
    "webdataset": "{type: webdataset, path: x.tar}",
}


@pytest.mark.parametrize(
    ("name", "role"),
    [(name, role) for name, source in SOURCE_TYPES.items() for role in ROLES if role not in source.roles],
)
def test_a_source_type_cannot_feed_a_role_it_does_not_declare(name: str, role: str) -> None:
    assert set(SOURCE_ENTRIES) == set(SOURCE_TYPES), "give every source type an entry"
    with pytest.raises(
        ConfigError, match=rf"data.{role}\[0\]: source type '{name}' cannot feed {role} batches"
    ):
        load_config(CONFIGS / "tiny.yaml", [f"data.{role}=[{SOURCE_ENTRIES[name]}]"])


def test_unpaired_source_cannot_feed_paired_batches() -> None:
    with pytest.raises(
        ConfigError,
        match=r"data.paired\[0\]: source type 'texts' cannot feed paired batches \(allowed: "
        r"\['coco', 'hf', 'imagefolder', 'shapes', 'webdataset'\]\)",
    ):
        load_config(CONFIGS / "tiny.yaml", ["data.paired=[{type: texts, path: captions.txt}]"])
    for name, entry in SOURCE_ENTRIES.items():
        if "paired" in SOURCE_TYPES[name].roles:
            assert (
                load_config(CONFIGS / "tiny.yaml", [f"data.validation=[{entry}]"]).data.validation[0].type
                == name
            )


def test_missing_file_and_malformed_override() -> None:
    with pytest.raises(ConfigError, match="config file not found"):
        load_config("no/such/config.yaml")
    with pytest.raises(ConfigError, match="not of the form"):
        apply_override({}, "train.max_train_steps")


def test_fingerprint_reports_what_changes_the_weights() -> None:
    base = load_config(CONFIGS / "tiny.yaml")
    same_shape = load_config(
        CONFIGS / "tiny.yaml", ["train.max_train_steps=99", "captioner.lora.dropout=0.1"]
    )
    other_rank = load_config(CONFIGS / "tiny.yaml", ["generator.lora.rank=8"])
    assert fingerprint_differences(model_fingerprint(base), model_fingerprint(same_shape)) == []
    assert fingerprint_differences(model_fingerprint(base), model_fingerprint(other_rank)) == [
        "generator.lora.rank: checkpoint has 4, config has 8"
    ]


def test_config_keys_as_flags_become_dotted_overrides() -> None:
    argv = ["--config", "c.yaml", "--output_dir", "runs/x", "--train.max_train_steps=3", "seed=2", "--help"]
    assert flags_as_overrides(argv, keep=("--config",)) == [
        "--config",
        "c.yaml",
        "output_dir=runs/x",
        "train.max_train_steps=3",
        "seed=2",
        "--help",
    ]
    with pytest.raises(ConfigError, match="flag --seed needs a value"):
        flags_as_overrides(["--seed", "--output_dir", "x"])


def test_a_bare_yaml_no_is_the_mixed_precision_no() -> None:
    assert load_config(CONFIGS / "tiny.yaml", ["mixed_precision=no"]).mixed_precision == "no"
    assert load_config(CONFIGS / "tiny.yaml").mixed_precision is None  # unset: the launcher's
