"""Typed run configuration: YAML file + dotted CLI overrides, validated so a typo fails fast and by name.

Field names follow diffusers' example trainers (learning_rate, lr_scheduler, gradient_accumulation_steps,
checkpointing_steps, resume_from_checkpoint, report_to, ...) so users feel at home.
"""

# Every section is a pydantic model (Strict), whose mutable defaults are copied per instance; ruff cannot see
# that through an imported base class.
# ruff: noqa: RUF012

from __future__ import annotations

import difflib
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Annotated, Any, Literal, Union

import yaml
from pydantic import BaseModel, Field, ValidationError, field_validator, model_validator

from cycletune.data.source_types import ROLES, SOURCE_TYPES, types_feeding
from cycletune.evaluation.metric_settings import EvaluationSettings
from cycletune.losses.i2t2i import I2T2I_MODES
from cycletune.losses.phases import CycleSettings
from cycletune.losses.settings import Strict
from cycletune.losses.supervised import CaptionLossSettings, DenoiseLossSettings
from cycletune.losses.t2i2t import T2I2T_MODES
from cycletune.models.ddpm_process import TimestepBias
from cycletune.models.families import MODEL_TYPE, PIPELINE_CLASS
from cycletune.models.generators.generator_spec import FamilyOptions
from cycletune.models.locate import ModelSourceError, locate_model
from cycletune.models.sampling_settings import SamplingSettings
from cycletune.models.speed_levers import DenoiserLevers

Phase = Literal["captioner", "generator"]
PHASES: tuple[Phase, ...] = ("captioner", "generator")


class ConfigError(ValueError):
    """A configuration problem, worded for the person who wrote the YAML."""


class LoraSettings(Strict):
    rank: int = Field(4, ge=1)
    alpha: float = Field(4.0, gt=0)
    dropout: float = Field(0.0, ge=0, lt=1)
    # None: the model family's default targets (models/lora.py).
    target_modules: list[str] | str | None = None


class OptimizerSettings(Strict):
    learning_rate: float = Field(1e-4, gt=0)
    adam_beta1: float = 0.9
    adam_beta2: float = 0.999
    adam_weight_decay: float = 1e-2
    adam_epsilon: float = 1e-8
    lr_scheduler: Literal[
        "constant", "constant_with_warmup", "linear", "cosine", "cosine_with_restarts", "polynomial"
    ] = "constant"
    lr_warmup_steps: int = Field(0, ge=0)
    max_grad_norm: float | None = Field(1.0, gt=0)
    # torch's fused AdamW kernel (one kernel per step instead of one per tensor group): the same update
    # to rounding, faster on CUDA where the step has many parameter tensors.
    fused: bool = False


class ModelSettings(Strict):
    pretrained_model_name_or_path: str
    revision: str | None = None
    # lora: adapters only; full: every weight of the trainable parts (pretraining small models from scratch).
    train_mode: Literal["lora", "full"] = "lora"
    lora: LoraSettings = LoraSettings()
    optimizer: OptimizerSettings = OptimizerSettings()
    gradient_checkpointing: bool = False

    @field_validator("pretrained_model_name_or_path")
    @classmethod
    def _local_folder_made_absolute(cls, name_or_path: str) -> str:
        """An existing local folder becomes its absolute path, so the run's config.yaml, the exported adapter
        configs and the model cards load from any working directory; hub ids (and folders that do not exist,
        which check_model_source names) stay as given."""
        folder = Path(name_or_path).expanduser()
        return os.path.abspath(folder) if folder.is_dir() else name_or_path  # symlinks kept as named


class CaptionerModelSettings(ModelSettings):
    # Caption tokens plus a start and an end token (a prompt comes on top).
    max_length: int = Field(40, ge=4)
    # What every caption continues, in training and generation; None: the family's default (a chat VLM's
    # captioning request, none for BLIP and GIT; models/captioners/).
    prompt: str | None = None


class CaptionerSettings(CaptionLossSettings, CaptionerModelSettings):
    """The captioner section: its model's settings, then its caption loss's (losses/supervised.py).

    The loss base comes first so that pydantic, which orders fields from the last base up, keeps the
    model keys first in saved configs.
    """


class GeneratorModelSettings(ModelSettings):
    resolution: int | None = Field(None, ge=8)
    # DDPM families (SD 1.x/2.x, SDXL): override the scheduler's objective; None keeps the checkpoint's.
    prediction_type: Literal["epsilon", "v_prediction"] | None = None
    # DDPM families: draw some training timesteps more often, under diffusers' SDXL trainer's flag names and
    # defaults (`later`: the noisiest `portion` of the schedule, where a caption alone decides the layout).
    timestep_bias_strategy: Literal["none", "earlier", "later", "range"] = "none"
    timestep_bias_multiplier: float = Field(1.0, gt=0)
    timestep_bias_begin: int = Field(0, ge=0)
    timestep_bias_end: int = Field(1000, gt=0)
    timestep_bias_portion: float = Field(0.25, gt=0, le=1)
    # Flow-matching families (SD3, Flux): the timestep density and loss weighting of diffusers' SD3/Flux
    # LoRA trainers, under their flag names and defaults.
    weighting_scheme: Literal["logit_normal", "mode", "cosmap", "sigma_sqrt", "none"] = "none"
    logit_mean: float = 0.0
    logit_std: float = Field(1.0, gt=0)
    mode_scale: float = 1.29
    # Flux-dev's guidance input (a distilled guidance strength, not CFG); None: the family's default (3.5).
    embedded_guidance_scale: float | None = Field(None, ge=0)
    # Speed levers on the denoiser (models/speed_levers.py): torch.compile it (the backend: inductor
    # generates kernels; aot_eager and eager only trace, to find graph breaks); keep it and the VAE in
    # channels_last memory; pin its scaled-dot-product attention to one kernel (sdpa: torch picks per call;
    # flash and efficient need fp16/bf16 on CUDA, cudnn CUDA).
    compile: bool = False
    compile_backend: Literal["inductor", "aot_eager", "eager"] = "inductor"
    channels_last: bool = False
    attention: Literal["sdpa", "flash", "efficient", "cudnn", "math"] = "sdpa"

    def family_options(self) -> FamilyOptions:
        """The family-specific keys as the generator wrapper takes them."""
        return FamilyOptions(
            prediction_type=self.prediction_type,
            timestep_bias=TimestepBias(
                strategy=self.timestep_bias_strategy,
                multiplier=self.timestep_bias_multiplier,
                begin=self.timestep_bias_begin,
                end=self.timestep_bias_end,
                portion=self.timestep_bias_portion,
            ),
            weighting_scheme=self.weighting_scheme,
            logit_mean=self.logit_mean,
            logit_std=self.logit_std,
            mode_scale=self.mode_scale,
            embedded_guidance_scale=self.embedded_guidance_scale,
        )

    def denoiser_levers(self) -> DenoiserLevers:
        """The speed-lever keys as models/speed_levers.py applies them."""
        return DenoiserLevers(
            compile_backend=self.compile_backend if self.compile else None,
            channels_last=self.channels_last,
            attention=self.attention,
        )


class GeneratorSettings(DenoiseLossSettings, GeneratorModelSettings):
    """The generator section: its model's settings, its denoising loss's (losses/supervised.py), and the
    encoder cache switch; bases ordered as in CaptionerSettings."""

    # Reuse the frozen text encoder's outputs and the frozen VAE's latent mean/std across epochs (latents
    # are still sampled afresh every step); skipped automatically where the encoder trains or images are
    # randomly augmented.
    cache_frozen_encoders: bool = True


# One data.<role> entry: pydantic picks the source type's settings class by its `type` tag. The union is
# built from the registry's classes, which `|` cannot spell (hence Union and the noqa).
DataSource = Annotated[
    Union[tuple(source.settings for source in SOURCE_TYPES.values())],  # noqa: UP007
    Field(discriminator="type"),
]


class DataSettings(Strict):
    resolution: int = Field(64, ge=8)
    train_batch_size: int = Field(4, ge=1)
    dataloader_num_workers: int = Field(0, ge=0)
    center_crop: bool = True
    random_flip: bool = False
    paired: list[DataSource] = []
    image_only: list[DataSource] = []
    text_only: list[DataSource] = []
    validation: list[DataSource] = []
    # Probability that a captioner-phase micro-batch is image-only (and a generator-phase one text-only).
    image_only_ratio: float = Field(0.0, ge=0, le=1)
    text_only_ratio: float = Field(0.0, ge=0, le=1)

    @model_validator(mode="after")
    def _sources_fit_their_role(self) -> DataSettings:
        for role in ROLES:
            for index, source in enumerate(getattr(self, role)):
                if role not in SOURCE_TYPES[source.type].roles:
                    raise ValueError(
                        f"data.{role}[{index}]: source type '{source.type}' cannot feed {role} batches "
                        f"(allowed: {types_feeding(role)})"
                    )
        if not self.paired:
            raise ValueError("data.paired: at least one paired (image, caption) source is needed")
        return self


class TrainSettings(Strict):
    """A step is one optimizer update of one model (the phase the schedule names). Every `*_steps` key here
    counts steps, summed over both models; `gradient_accumulation_steps` counts micro-batches per step, and
    `validation_inference_steps` the sampler's denoising steps. Each model's `optimizer.lr_warmup_steps`
    counts that model's own updates (its LR schedule advances only when it is updated)."""

    max_train_steps: int = Field(ge=1)
    gradient_accumulation_steps: int = Field(1, ge=1)
    # The repeating pattern of phases, one entry per optimizer update.
    schedule: list[Phase] = ["captioner", "generator"]
    checkpointing_steps: int = Field(500, ge=1)
    checkpoints_total_limit: int | None = Field(None, ge=1)
    # "latest" or a checkpoint folder.
    resume_from_checkpoint: str | None = None
    # Every N steps, log each model's mean loss terms over the steps since the last log.
    logging_steps: int = Field(1, ge=1)
    validation_steps: int | None = Field(None, ge=1)
    num_validation_samples: int = Field(4, ge=1)
    validation_inference_steps: int = Field(SamplingSettings.num_inference_steps, ge=1)
    validation_guidance_scale: float = Field(SamplingSettings.guidance_scale, ge=0)
    # TF32 tensor cores for float32 matmuls on CUDA (Ampere and later; torch already allows them in cuDNN
    # convolutions), as diffusers' trainers' --allow_tf32: 10 mantissa bits instead of 23 in those products.
    # Mostly for mixed_precision no: under bf16/fp16 autocast the big matmuls are not float32.
    allow_tf32: bool = False

    @model_validator(mode="after")
    def _schedule_not_empty(self) -> TrainSettings:
        if not self.schedule:
            raise ValueError("train.schedule must name at least one phase")
        return self


class ExportSettings(Strict):
    """What the run's final export writes besides the adapters (train/adapter_export.py), as the export
    command's --kohya and --merge flags do."""

    # The UNet LoRA also as a kohya / A1111 file.
    kohya: bool = False
    # Standalone models with the adapters merged (captioner_merged/, generator_merged/).
    merge: bool = False


class Config(Strict):
    output_dir: str
    seed: int = 0
    # None: the launcher's (accelerate launch --mixed_precision, else accelerate config's, else no); set here,
    # it wins over the launcher's, as Accelerator(mixed_precision=...) does. The run logs which one it used.
    mixed_precision: Literal["no", "fp16", "bf16"] | None = None
    report_to: Literal["none", "wandb", "tensorboard", "all"] = "wandb"
    tracker_project_name: str = "cycletune"
    run_name: str | None = None
    captioner: CaptionerSettings
    generator: GeneratorSettings
    data: DataSettings
    train: TrainSettings
    cycle: CycleSettings = CycleSettings()
    evaluation: EvaluationSettings = EvaluationSettings()
    export: ExportSettings = ExportSettings()

    @field_validator("mixed_precision", mode="before")
    @classmethod
    def _yaml_no_is_no(cls, value: Any) -> Any:
        """YAML reads a bare `no` (mixed_precision: no, or the override mixed_precision=no) as false."""
        return "no" if value is False else value

    @model_validator(mode="after")
    def _unpaired_data_has_a_loss(self) -> Config:
        """Unpaired batches only carry a cycle term, and only the modes declared to train on them.

        Image-only batches go to the captioner's phase (its cycle is i2t2i), text-only ones to the generator's.
        """
        checks = (
            ("image_only", self.data.image_only_ratio, I2T2I_MODES, self.cycle.i2t2i.mode),
            ("text_only", self.data.text_only_ratio, T2I2T_MODES, self.cycle.t2i2t.mode),
        )
        for role, ratio, modes, mode in checks:
            has_sources = bool(getattr(self.data, role))
            if ratio > 0 and not has_sources:
                raise ValueError(f"data.{role}_ratio is {ratio} but data.{role} has no sources")
            if has_sources and ratio == 0:
                raise ValueError(
                    f"data.{role} has sources but data.{role}_ratio is 0: set the share of such batches"
                )
            consuming = modes.consuming(role)
            if ratio > 0 and mode not in consuming:
                raise ValueError(
                    f"data.{role} batches need cycle.{modes.direction}.mode in {consuming} (it is '{mode}')"
                )
        return self

    def phase_settings(self, phase: Phase) -> CaptionerSettings | GeneratorSettings:
        return self.captioner if phase == "captioner" else self.generator


def _dotted(loc: tuple[int | str, ...]) -> str:
    """('data', 'paired', 0, 'imagefolder', 'path') -> 'data.paired[0].path' (drops union tags)."""
    parts: list[str] = []
    for index, item in enumerate(loc):
        if isinstance(item, int):
            parts[-1] += f"[{item}]"
        elif index > 0 and isinstance(loc[index - 1], int) and item in SOURCE_TYPES:
            continue
        else:
            parts.append(item)
    return ".".join(parts)


def _valid_keys(model: type[BaseModel], loc: tuple[int | str, ...]) -> list[str]:
    """The field names allowed at `loc`'s parent, for 'did you mean' suggestions."""
    current: Any = model
    for index, item in enumerate(loc[:-1]):
        if isinstance(item, int):
            continue
        if index > 0 and isinstance(loc[index - 1], int) and item in SOURCE_TYPES:
            current = SOURCE_TYPES[item].settings  # the tag pydantic adds for a discriminated union member
        elif current is not None:
            field = current.model_fields.get(item)
            annotation = field.annotation if field else None
            is_model = isinstance(annotation, type) and issubclass(annotation, BaseModel)
            current = annotation if is_model else None
    return list(current.model_fields) if current is not None else []


def _explain(error: ValidationError, origin: str) -> ConfigError:
    lines = []
    for item in error.errors():
        key = _dotted(item["loc"])
        if item["type"] == "extra_forbidden":
            close = difflib.get_close_matches(str(item["loc"][-1]), _valid_keys(Config, item["loc"]), n=1)
            parent = key.rsplit(".", 1)[0] + "." if "." in key else ""
            hint = f" (did you mean '{parent}{close[0]}'?)" if close else ""
            lines.append(f"unknown key '{key}'{hint}")
        elif item["type"] == "missing":
            lines.append(f"missing required key '{key}'")
        else:
            message = item["msg"].removeprefix("Value error, ")
            shown = f" (got {item['input']!r})" if not isinstance(item["input"], dict | list) else ""
            lines.append(f"'{key}': {message}{shown}" if key else message)
    return ConfigError(f"invalid config {origin}:\n  " + "\n  ".join(lines))


def apply_override(raw: dict[str, Any], assignment: str) -> None:
    """Apply one `a.b.c=value` override in place; the value is parsed as YAML (so 20 is an int)."""
    if "=" not in assignment:
        raise ConfigError(f"override '{assignment}' is not of the form key.path=value")
    dotted, _, text = assignment.partition("=")
    keys = dotted.strip().split(".")
    target: Any = raw
    for depth, key in enumerate(keys[:-1]):
        child = target[int(key)] if isinstance(target, list) else target.setdefault(key, {})
        if not isinstance(child, dict | list):
            raise ConfigError(f"override '{dotted}': '{'.'.join(keys[: depth + 1])}' is not a section")
        target = child
    value = yaml.safe_load(text) if text.strip() else None
    if isinstance(target, list):
        target[int(keys[-1])] = value
    else:
        target[keys[-1]] = value


# Where `--config NAME` finds the configs shipped with CycleTune: configs/ beside this package, in a checkout
# as in an installed wheel (pyproject.toml packages the folder as cycletune/configs).
PACKAGED_CONFIGS = Path(__file__).resolve().parents[1] / "configs"


def config_file(path: str | Path) -> Path:
    """A YAML path, or the bare name of a config packaged with CycleTune (`tiny` for configs/tiny.yaml), so
    that an installed CycleTune starts from `cycletune train --config tiny` in any folder. A file of that
    name in the working directory wins."""
    path = Path(path)
    if path.is_file():
        return path
    packaged = PACKAGED_CONFIGS / f"{path.name}.yaml"
    if path.suffix == "" and len(path.parts) == 1 and packaged.is_file():
        return packaged
    names = sorted(entry.stem for entry in PACKAGED_CONFIGS.glob("*.yaml"))
    raise ConfigError(f"config file not found: {path} (packaged configs, by name: {', '.join(names)})")


def load_config(
    path: str | Path | None, overrides: Sequence[str] = (), base: dict[str, Any] | None = None
) -> Config:
    """Read YAML (or start from `base`), apply overrides, validate; errors name the key and a close match."""
    raw: dict[str, Any] = dict(base or {})
    origin = "(overrides)"
    if path is not None:
        path = config_file(path)
        try:
            loaded = yaml.safe_load(path.read_text())
        except (UnicodeDecodeError, yaml.YAMLError) as error:
            raise ConfigError(f"config file {path} is not readable YAML: {error}") from None
        if not isinstance(loaded, dict):
            raise ConfigError(f"config file {path} must hold a mapping at the top level")
        raw, origin = loaded, str(path)
    for assignment in overrides:
        apply_override(raw, assignment)
    try:
        return Config.model_validate(raw)
    except ValidationError as error:
        raise _explain(error, origin) from None


# The file at the root of every loadable model of each kind, as the families registry reads it
# (transformers config / diffusers pipeline index).
MODEL_MARKERS: dict[Phase, str] = {"captioner": MODEL_TYPE.file, "generator": PIPELINE_CLASS.file}


def check_model_source(settings: ModelSettings, phase: Phase) -> None:
    """Fail before loading when {phase}.pretrained_model_name_or_path cannot be found (see models/locate.py)."""
    try:
        locate_model(
            settings.pretrained_model_name_or_path,
            key=f"{phase}.pretrained_model_name_or_path",
            marker=MODEL_MARKERS[phase],
            revision=settings.revision,
        )
    except ModelSourceError as error:
        raise ConfigError(str(error)) from None


def check_model_sources(config: Config) -> None:
    """Both models' sources, checked before anything loads; raises ConfigError with a one-line message."""
    for phase in PHASES:
        check_model_source(config.phase_settings(phase), phase)


def flags_as_overrides(argv: Sequence[str], keep: Sequence[str] = ()) -> list[str]:
    """argv with each `--key value` / `--key=value` (a config key spelt as a flag, as diffusers' scripts take
    --output_dir) turned into the dotted override `key=value`; the flags in `keep` and -h/--help stay."""
    converted: list[str] = []
    arguments = iter(argv)
    for argument in arguments:
        name, equals, value = argument.partition("=")
        if not name.startswith("--") or name in (*keep, "--help"):
            converted.append(argument)
            if name in keep and not equals:
                converted.append(next(arguments, ""))
            continue
        if not equals:
            value = next(arguments, None)
            if value is None or value.startswith("--"):
                raise ConfigError(f"flag {name} needs a value (it stands for the override {name[2:]}=VALUE)")
        converted.append(f"{name[2:]}={value}")
    return converted


def save_config(config: Config, path: Path) -> None:
    path.write_text(yaml.safe_dump(config.model_dump(mode="json"), sort_keys=False))


def model_fingerprint(config: Config) -> dict[str, Any]:
    """The settings that define which weights a checkpoint holds; resuming must not change them."""
    fingerprint: dict[str, Any] = {}
    for phase in PHASES:
        settings = config.phase_settings(phase)
        fingerprint[f"{phase}.pretrained_model_name_or_path"] = settings.pretrained_model_name_or_path
        fingerprint[f"{phase}.revision"] = settings.revision
        fingerprint[f"{phase}.train_mode"] = settings.train_mode
        if settings.train_mode == "lora":
            fingerprint[f"{phase}.lora.rank"] = settings.lora.rank
            fingerprint[f"{phase}.lora.alpha"] = settings.lora.alpha
            fingerprint[f"{phase}.lora.target_modules"] = settings.lora.target_modules
    return fingerprint


def fingerprint_differences(saved: dict[str, Any], current: dict[str, Any]) -> list[str]:
    return [
        f"{key}: checkpoint has {saved.get(key)!r}, config has {current.get(key)!r}"
        for key in sorted(set(saved) | set(current))
        if saved.get(key) != current.get(key)
    ]
