"""The models an inference tool runs, and the flags that name them, shared by every inference CLI.

Three kinds of source: a checkpoint-N folder (both models rebuilt from its config.yaml, as trained); an
export folder (captioner/ PEFT adapter and generator/ diffusers LoRA, loaded the way PEFT and diffusers load
them, onto base models named by --config, by the run's config.yaml beside the folder, or by --captioner /
--generator); or base models, optionally with --captioner-adapter / --generator-lora. train.cli.generate,
rerank and evaluate and the demo all load through here, so they accept the same folders and refuse the
same flag mistakes, each with one error naming the flag or file.
"""

from __future__ import annotations

import argparse
import json
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from peft import PeftModel
from peft.tuners.lora import LoraLayer

from cycletune.models.captioner import Captioner
from cycletune.models.generator import Generator
from cycletune.models.lora import DIFFUSERS_LORA_FILE
from cycletune.train.adapter_export import load_checkpoint_models
from cycletune.train.checkpoint import is_checkpoint_folder
from cycletune.train.config import Config, ConfigError, load_config
from cycletune.train.run_dir import CONFIG_FILE, RunDir, trainable_weights_file


class ModelLoadError(ValueError):
    """The model flags do not name a loadable pair of models; the message says which flag to set."""


# --dtype's choices.
DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}


@dataclass(frozen=True)
class ModelSources:
    """Where the captioner and generator come from (see the module docstring)."""

    checkpoint: Path | None = None
    config: Config | None = None
    captioner: str | None = None
    generator: str | None = None
    captioner_adapter: Path | None = None
    generator_lora: Path | None = None

    @property
    def is_checkpoint_folder(self) -> bool:
        return self.checkpoint is not None and is_checkpoint_folder(self.checkpoint)

    def load(
        self,
        *,
        captioner: bool = True,
        generator: bool = True,
        device: str | torch.device = "cpu",
        dtype: torch.dtype = torch.float32,
        lora_scale: float = 1.0,
    ) -> tuple[Captioner | None, Generator | None]:
        """The requested models in eval mode on `device` in `dtype`, frozen; the generator's LoRA applied at
        `lora_scale` times its trained strength (diffusers' lora_scale: 0 is the base model)."""
        self._check()
        if self.is_checkpoint_folder:
            loaded_captioner, loaded_generator, _ = load_checkpoint_models(self.checkpoint)
            models = (loaded_captioner if captioner else None, loaded_generator if generator else None)
        else:
            models = (self._captioner() if captioner else None, self._generator() if generator else None)
        if models[1] is not None and lora_scale != 1.0:
            for layer in models[1].denoiser.modules():
                if isinstance(layer, LoraLayer):
                    layer.scale_layer(lora_scale)
        return tuple(
            None if model is None else model.requires_grad_(False).eval().to(device=device, dtype=dtype)
            for model in models
        )

    def _check(self) -> None:
        """Refuse flag combinations that would silently ignore a flag."""
        if self.checkpoint is None:
            return
        if not self.checkpoint.is_dir():
            raise ModelLoadError(f"--checkpoint {self.checkpoint}: no such folder")
        if self.is_checkpoint_folder:
            explicit = {
                "--captioner": self.captioner,
                "--generator": self.generator,
                "--captioner-adapter": self.captioner_adapter,
                "--generator-lora": self.generator_lora,
            }
            given = [flag for flag, value in explicit.items() if value is not None]
            if given:
                raise ModelLoadError(
                    f"{self.checkpoint} is a checkpoint folder, rebuilt from its own {CONFIG_FILE}; "
                    f"drop {', '.join(given)} (they apply to export folders and base models)"
                )
        elif not any((self.checkpoint / part).is_dir() for part in ("captioner", "generator")):
            raise ModelLoadError(
                f"--checkpoint {self.checkpoint} is neither a checkpoint folder ({CONFIG_FILE} and "
                f"{trainable_weights_file('*')}) nor an export folder (captioner/, generator/)"
            )
        elif self.captioner_adapter is not None or self.generator_lora is not None:
            raise ModelLoadError(
                "an export folder brings its own adapters: drop --captioner-adapter / --generator-lora"
            )

    def _adapter(self, part: str, flag_value: Path | None) -> Path | None:
        if flag_value is not None:
            return flag_value
        if self.checkpoint is not None and (self.checkpoint / part).is_dir():
            return self.checkpoint / part
        return None

    def _base(self, part: str, flag_value: str | None) -> str:
        if flag_value is not None:
            return flag_value
        if self.config is not None:
            return self.config.phase_settings(part).pretrained_model_name_or_path
        raise ModelLoadError(
            f"no base {part}: pass --{part} (a hub id or folder), or --config with the run's config "
            f"(an export folder finds the run's {CONFIG_FILE} beside it)"
        )

    def _captioner(self) -> Captioner:
        adapter = self._adapter("captioner", self.captioner_adapter)
        settings = None if self.config is None else self.config.captioner
        # The run's caption length and prompt: captions continue the prefix they were trained after.
        max_length = (
            {} if settings is None else {"max_length": settings.max_length, "prompt": settings.prompt}
        )
        if adapter is not None and (adapter / "config.json").is_file():  # a full model (train_mode full)
            with _loading(adapter):
                return Captioner.from_pretrained(str(adapter), **max_length)
        base = self._base("captioner", self.captioner)
        revision = None if settings is None or self.captioner else settings.revision
        captioner = Captioner.from_pretrained(base, revision=revision, **max_length)
        if adapter is not None:
            if not (adapter / "adapter_config.json").is_file():
                raise ModelLoadError(
                    f"{adapter}: neither a PEFT adapter (adapter_config.json) nor a model folder"
                )
            with _loading(adapter / "adapter_config.json"):
                json.loads((adapter / "adapter_config.json").read_text())
            # peft reads the .safetensors file, or else the .bin one (with weights_only=True).
            weights = next(
                (
                    adapter / name
                    for name in ("adapter_model.safetensors", "adapter_model.bin")
                    if (adapter / name).is_file()
                ),
                adapter,
            )
            with _loading(weights):
                captioner.model = PeftModel.from_pretrained(captioner.model, str(adapter))
        return captioner

    def _generator(self) -> Generator:
        lora = self._adapter("generator", self.generator_lora)
        settings = None if self.config is None else self.config.generator
        shape = (
            {}
            if settings is None
            else {"resolution": settings.resolution, "options": settings.family_options()}
        )
        if lora is not None and (lora / "model_index.json").is_file():  # a full pipeline (train_mode full)
            with _loading(lora):
                return Generator.from_pretrained(str(lora), **shape)
        base = self._base("generator", self.generator)
        revision = None if settings is None or self.generator else settings.revision
        generator = Generator.from_pretrained(base, revision=revision, **shape)
        if lora is not None:
            load_generator_lora(generator, lora)
        return generator


@contextmanager
def _loading(path: Path) -> Iterator[None]:
    """A library's error on a damaged or foreign file (bad JSON, not safetensors, a pickle that
    weights_only=True refuses) becomes one error naming the file; nothing is ever unpickled with code."""
    try:
        yield
    except ModelLoadError:
        raise
    except Exception as error:
        raise ModelLoadError(f"{path}: cannot load ({type(error).__name__}: {error})") from None


def load_generator_lora(generator: Generator, lora: Path) -> None:
    """Load a diffusers LoRA file (or a folder holding pytorch_lora_weights.safetensors) into the UNet.

    Through the family pipeline's load_lora_weights (StableDiffusionPipeline, StableDiffusionXLPipeline, ...)
    on a pipeline sharing the generator's parts: the loader users call, so whatever it accepts (diffusers and kohya files) loads here the same way.
    """
    folder, weight_name = (lora.parent, lora.name) if lora.is_file() else (lora, DIFFUSERS_LORA_FILE)
    if not (folder / weight_name).is_file():
        raise ModelLoadError(f"{lora}: no LoRA file {weight_name} there (nor a model_index.json)")
    pipeline = generator.pipeline()
    with _loading(folder / weight_name):
        pipeline.load_lora_weights(str(folder), weight_name=weight_name)


def default_device() -> str:
    """Where models run unless told otherwise: the GPU when there is one."""
    return "cuda" if torch.cuda.is_available() else "cpu"


def add_model_arguments(parser: argparse.ArgumentParser) -> None:
    group = parser.add_argument_group("models")
    group.add_argument(
        "--checkpoint",
        type=Path,
        help="a checkpoint-N folder of a run, or an export folder (captioner/, generator/)",
    )
    group.add_argument(
        "--config",
        type=Path,
        help=f"the run's YAML config: base models and data (default: the checkpoint's {CONFIG_FILE}, or the "
        "one beside an export folder)",
    )
    group.add_argument("--captioner", help="base captioner, a hub id or folder (default: the config's)")
    group.add_argument(
        "--generator",
        "--pretrained_model_name_or_path",
        dest="generator",
        help="base generator, a hub id or folder (default: the config's)",
    )
    group.add_argument("--captioner-adapter", type=Path, help="a PEFT adapter folder for the base captioner")
    group.add_argument(
        "--generator-lora", type=Path, help="a diffusers LoRA .safetensors file, or the folder holding it"
    )
    group.add_argument("--device", default=default_device())
    group.add_argument("--dtype", choices=sorted(DTYPES), default="float32", help="the models' weights")
    group.add_argument(
        "--lora_scale", type=float, default=1.0, help="strength of the generator's LoRA (0: the base model)"
    )


def load_options(args: argparse.Namespace) -> dict[str, Any]:
    """ModelSources.load's device, dtype and lora_scale from add_model_arguments' flags."""
    return {"device": args.device, "dtype": DTYPES[args.dtype], "lora_scale": args.lora_scale}


def model_sources(args: argparse.Namespace, overrides: Sequence[str] = ()) -> ModelSources:
    """ModelSources from add_model_arguments' flags; `overrides` (dotted, as for training) edit the config."""
    config_file = args.config
    if config_file is None and args.checkpoint is not None:
        config_file = next(
            (
                path
                for path in (args.checkpoint / CONFIG_FILE, RunDir(args.checkpoint.parent).config_file)
                if path.is_file()
            ),
            None,
        )
    if config_file is None and overrides:
        raise ConfigError(f"overrides {list(overrides)} need a config: pass --config")
    return ModelSources(
        checkpoint=args.checkpoint,
        config=None if config_file is None else load_config(config_file, overrides),
        captioner=args.captioner,
        generator=args.generator,
        captioner_adapter=args.captioner_adapter,
        generator_lora=args.generator_lora,
    )
