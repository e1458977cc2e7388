"""Inference with trained models: caption a folder of images, or generate images for a file of prompts.

    python -m train.cli.generate captions --images photos/ --checkpoint runs/x/export --out captions.jsonl
    python -m train.cli.generate images --prompts prompts.txt --checkpoint runs/x/checkpoint-2000 --out images/

Models come from a checkpoint-N folder (rebuilt from its config.yaml), an export folder (its captioner/
PEFT adapter and generator/ diffusers LoRA, loaded as PEFT and diffusers load them, onto the base models
named by --config, the run's config.yaml beside the export folder, or --captioner / --generator), or base
models with --captioner-adapter / --generator-lora. Every random draw is seeded per input id, so an
image or prompt gets the same output in any batch. This module also holds the model and input loading that
train.cli.rerank and train.cli.evaluate share.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import TypeVar

import torch
from peft import PeftModel

from data import sources
from data.images import ImageInput, load_rgb, to_tensor
from evaluation.rerank import generate_images, nucleus_captions, save_png
from models.captioner import Captioner
from models.generator import Generator, stable_diffusion_pipeline
from models.lora import DIFFUSERS_LORA_FILE
from train.adapter_export import load_checkpoint_models
from train.builders import load_records
from train.checkpoint import CONFIG_NAME, is_checkpoint_folder
from train.config import Config, ConfigError, load_config

Item = TypeVar("Item")
ImageSource = Path | Callable[[], ImageInput]


class ModelLoadError(ValueError):
    """The model flags do not name a loadable pair of models; the message says which flag to set."""


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
        self, *, captioner: bool = True, generator: bool = True, device: str | torch.device = "cpu"
    ) -> tuple[Captioner | None, Generator | None]:
        """The requested models in eval mode on `device`, frozen."""
        self._check()
        if self.is_checkpoint_folder:
            loaded_captioner, loaded_generator, _ = load_checkpoint_models(self.checkpoint)
            models = (loaded_captioner if captioner else None, loaded_generator if generator else None)
        else:
            models = (self._captioner() if captioner else None, self._generator() if generator else None)
        return tuple(
            None if model is None else model.requires_grad_(False).eval().to(device) for model in models
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
                    f"{self.checkpoint} is a checkpoint folder, rebuilt from its own {CONFIG_NAME}; "
                    f"drop {', '.join(given)} (they apply to export folders and base models)"
                )
        elif not any((self.checkpoint / part).is_dir() for part in ("captioner", "generator")):
            raise ModelLoadError(
                f"--checkpoint {self.checkpoint} is neither a checkpoint folder ({CONFIG_NAME} and "
                "*_trainable.safetensors) nor an export folder (captioner/, generator/)"
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
            f"(an export folder finds the run's {CONFIG_NAME} beside it)"
        )

    def _captioner(self) -> Captioner:
        adapter = self._adapter("captioner", self.captioner_adapter)
        settings = None if self.config is None else self.config.captioner
        max_length = {} if settings is None else {"max_length": settings.max_length}
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
            else {"resolution": settings.resolution, "prediction_type": settings.prediction_type}
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

    Through StableDiffusionPipeline.load_lora_weights on a pipeline sharing the generator's parts: the
    loader users call, so whatever it accepts (diffusers and kohya files) loads here the same way.
    """
    folder, weight_name = (lora.parent, lora.name) if lora.is_file() else (lora, DIFFUSERS_LORA_FILE)
    if not (folder / weight_name).is_file():
        raise ModelLoadError(f"{lora}: no LoRA file {weight_name} there (nor a model_index.json)")
    pipeline = stable_diffusion_pipeline(
        vae=generator.vae,
        text_encoder=generator.text_encoder,
        tokenizer=generator.tokenizer,
        unet=generator.unet,
        scheduler=generator.noise_scheduler,
    )
    with _loading(folder / weight_name):
        pipeline.load_lora_weights(str(folder), weight_name=weight_name)


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
        help=f"the run's YAML config: base models and data (default: the checkpoint's {CONFIG_NAME}, or the "
        "one beside an export folder)",
    )
    group.add_argument("--captioner", help="base captioner, a hub id or folder (default: the config's)")
    group.add_argument("--generator", help="base generator, a hub id or folder (default: the config's)")
    group.add_argument("--captioner-adapter", type=Path, help="a PEFT adapter folder for the base captioner")
    group.add_argument(
        "--generator-lora", type=Path, help="a diffusers LoRA .safetensors file, or the folder holding it"
    )
    group.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")


def model_sources(args: argparse.Namespace, overrides: Sequence[str] = ()) -> ModelSources:
    """ModelSources from add_model_arguments' flags; `overrides` (dotted, as for training) edit the config."""
    config_file = args.config
    if config_file is None and args.checkpoint is not None:
        config_file = next(
            (
                path
                for path in (args.checkpoint / CONFIG_NAME, args.checkpoint.parent / CONFIG_NAME)
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


# ----------------------------------------------------------------------------------------------------- inputs


@dataclass(frozen=True)
class ImageQuery:
    """One image to caption, with the captions the input gives for it (references; empty if none)."""

    id: str
    image: ImageSource
    references: tuple[str, ...] = ()


@dataclass(frozen=True)
class TextQuery:
    """One prompt, with the image the input pairs it with (None for a plain prompts file)."""

    id: str
    text: str
    image: ImageSource | None = None


def folder_records(folder: Path) -> list[sources.Record]:
    """A folder of images; with a metadata.jsonl (the imagefolder convention) its captions come along."""
    if not folder.is_dir():
        raise FileNotFoundError(f"{folder}: no such image folder")
    if any(folder.rglob("metadata.jsonl")):
        return sources.image_folder(folder).records
    return sources.image_only_folder(folder).records


def prompt_records(file: Path) -> list[sources.Record]:
    """Prompts from a .txt file (one per line) or a .jsonl file ({"text": ...} per row)."""
    return sources.text_only_file(file).records


def config_records(config: Config) -> list[sources.Record]:
    """The config's data.validation records (data.paired when it has none), as validation uses them."""
    role = "validation" if config.data.validation else "paired"
    return load_records(getattr(config.data, role), role, config.data.resolution)[0]  # sources log skips


def image_queries(records: Sequence[sources.Record], limit: int | None = None) -> list[ImageQuery]:
    """One query per distinct image, its captions as references (COCO has five per image)."""
    grouped: dict[ImageSource, tuple[str, list[str]]] = {}
    for record in records:
        if record.image is None:
            raise ValueError(f"record {record.id} has no image; image inputs need images")
        _, references = grouped.setdefault(record.image, (record.id, []))
        if record.caption is not None:
            references.append(record.caption)
    queries = [ImageQuery(query_id, image, tuple(refs)) for image, (query_id, refs) in grouped.items()]
    return queries[:limit]


def text_queries(records: Sequence[sources.Record], limit: int | None = None) -> list[TextQuery]:
    """One query per caption, with its paired image when the records have one."""
    queries = []
    for record in records:
        if record.caption is None:
            raise ValueError(f"record {record.id} has no caption; prompt inputs need texts")
        queries.append(TextQuery(record.id, record.caption, record.image))
    return queries[:limit]


def load_pixels(images: Sequence[ImageSource], resolution: int) -> torch.Tensor:
    """[B, 3, resolution, resolution] pixels01, each image scaled and center-cropped to a square."""
    return torch.stack(
        [
            to_tensor(load_rgb(image() if callable(image) else image, min_side=resolution), resolution)
            for image in images
        ]
    )


def batched(items: Sequence[Item], size: int) -> Iterator[list[Item]]:
    if size < 1:
        raise ValueError(f"batch size must be at least 1, got {size}")
    for start in range(0, len(items), size):
        yield list(items[start : start + size])


# ---------------------------------------------------------------------------------------------------- the CLI


def caption_folder(
    captioner: Captioner, queries: Sequence[ImageQuery], args: argparse.Namespace
) -> list[dict]:
    """One row per image: its id and its captions (beam search, or seeded nucleus sampling with --sample)."""
    rows = []
    for batch in batched(queries, args.batch_size):
        pixels = load_pixels([query.image for query in batch], captioner.image_size).to(captioner.device)
        ids = [query.id for query in batch]
        if args.sample:
            captions = nucleus_captions(
                captioner,
                pixels,
                ids,
                count=args.num_captions,
                top_p=args.top_p,
                temperature=args.temperature,
                seed=args.seed,
                max_new_tokens=args.max_new_tokens,
                prompt=args.prompt,
            )
        else:
            captions = captioner.generate(
                pixels,
                num_beams=args.num_beams,
                num_return_sequences=args.num_captions,
                max_new_tokens=args.max_new_tokens,
                prompt=args.prompt,
            )
        rows.extend(
            {"id": query_id, "captions": texts} for query_id, texts in zip(ids, captions, strict=True)
        )
    return rows


def draw_prompts(generator: Generator, queries: Sequence[TextQuery], args: argparse.Namespace) -> list[dict]:
    """num_images PNGs per prompt under args.out; one row per prompt with its files."""
    rows = []
    for batch in batched(queries, args.batch_size):
        images = generate_images(
            generator,
            [query.text for query in batch],
            [query.id for query in batch],
            num_images=args.num_images,
            seed=args.seed,
            num_inference_steps=args.inference_steps,
            guidance_scale=args.guidance_scale,
        )
        for query, query_images in zip(batch, images, strict=True):
            files = []
            for index, image in enumerate(query_images):
                name = f"{len(rows):05d}_{index}.png"
                save_png(image, args.out / name)
                files.append(name)
            rows.append({"id": query.id, "prompt": query.text, "files": files})
    return rows


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    modes = parser.add_subparsers(dest="mode", required=True)
    captions = modes.add_parser("captions", help="caption every image of a folder")
    captions.add_argument(
        "--images", type=Path, required=True, help="folder of images (searched recursively)"
    )
    captions.add_argument("--out", type=Path, required=True, help="JSONL file: one row per image")
    captions.add_argument("--num-beams", type=int, default=3)
    captions.add_argument("--num-captions", type=int, default=1, help="captions per image")
    captions.add_argument(
        "--sample", action="store_true", help="nucleus sampling (seeded) instead of beam search"
    )
    captions.add_argument("--top-p", type=float, default=0.9)
    captions.add_argument("--temperature", type=float, default=1.0)
    captions.add_argument("--max-new-tokens", type=int)
    captions.add_argument("--prompt", help="text every caption continues (stripped from the output)")
    captions.add_argument("--batch-size", type=int, default=8)
    images = modes.add_parser("images", help="generate images for a prompts file")
    images.add_argument(
        "--prompts", type=Path, required=True, help=".txt (one per line) or .jsonl ({'text': ...})"
    )
    images.add_argument("--out", type=Path, required=True, help="folder for the PNGs and images.jsonl")
    images.add_argument("--num-images", type=int, default=1, help="images per prompt")
    images.add_argument("--inference-steps", type=int, default=20)
    images.add_argument("--guidance-scale", type=float, default=3.0)
    images.add_argument("--batch-size", type=int, default=4, help="prompts per sampling batch")
    for subparser in (captions, images):
        subparser.add_argument("--seed", type=int, default=0)
        add_model_arguments(subparser)
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    try:
        models_from = model_sources(args)
        if args.mode == "captions":
            queries = image_queries(folder_records(args.images))
            captioner, _ = models_from.load(generator=False, device=args.device)
            rows = caption_folder(captioner, queries, args)
            args.out.parent.mkdir(parents=True, exist_ok=True)
            args.out.write_text("".join(json.dumps(row) + "\n" for row in rows), encoding="utf-8")
            for row in rows:
                print(f"{row['id']}: {' | '.join(row['captions'])}")
            print(f"wrote {len(rows)} images' captions to {args.out}")
        else:
            queries = text_queries(prompt_records(args.prompts))
            _, generator = models_from.load(captioner=False, device=args.device)
            args.out.mkdir(parents=True, exist_ok=True)
            rows = draw_prompts(generator, queries, args)
            (args.out / "images.jsonl").write_text(
                "".join(json.dumps(row) + "\n" for row in rows), encoding="utf-8"
            )
            print(
                f"wrote {sum(len(row['files']) for row in rows)} images for {len(rows)} prompts to {args.out}"
            )
    except (ValueError, FileNotFoundError) as error:  # bad input (ModelLoadError, ConfigError, sources)
        print(f"error: {error}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
