"""Export trained weights in the formats the ecosystem loads, with a model card in every folder.

Written by the recipe at the end of a run, and by `python -m train.cli.export` from any checkpoint.

Layout of an export folder:
  captioner/          PEFT adapter (PeftModel.from_pretrained(base, dir)); a full model in full mode
  generator/          diffusers LoRA pytorch_lora_weights.safetensors (pipe.load_lora_weights),
                      plus pytorch_lora_weights_kohya.safetensors with --kohya (A1111 / ComfyUI); a full
                      pipeline folder in full mode
  captioner_merged/, generator_merged/   standalone models with the adapters merged (--merge)
"""

from __future__ import annotations

from pathlib import Path

from models.captioner import Captioner
from models.generator import Generator
from models.lora import (
    load_trainable_state_dict,
    save_captioner_adapter,
    save_generator_lora,
    save_merged_captioner,
    save_merged_generator,
    trainable_state_dict,
)
from train.builders import build_captioner, build_generator
from train.checkpoint import CheckpointError, read_config, read_tensors, verify_checkpoint
from train.config import Config
from train.run_dir import trainable_weights_file


def model_card(
    config: Config, part: str, library: str, step: int, command: list[str], how_to_load: str
) -> str:
    """A short README: what was trained on what, for how long, by which command, and how to load it.

    No export date: an identical run must export identical bytes (the file's own time says when)."""
    is_captioner = part.startswith("captioner")
    settings = config.captioner if is_captioner else config.generator
    lora = settings.lora
    weights = (
        f"LoRA rank {lora.rank}, alpha {lora.alpha}" if settings.train_mode == "lora" else "full finetune"
    )
    data = ", ".join(str(source.model_dump()) for source in config.data.paired)
    return f"""---
base_model: {settings.pretrained_model_name_or_path}
library_name: {library}
tags: [cycletune, {"image-to-text" if is_captioner else "text-to-image"}]
---
# CycleTune {part}

- Base model: `{settings.pretrained_model_name_or_path}`
- Weights: {weights}, after {step} updates (phases alternating as {config.train.schedule})
- Paired data: {data}
- Command: `{" ".join(command)}`

## Load
```python
{how_to_load}
```
"""


def export_run(
    captioner: Captioner,
    generator: Generator,
    config: Config,
    out_dir: Path,
    *,
    step: int,
    command: list[str],
    kohya: bool = False,
    merge: bool = False,
) -> Path:
    """Write adapters (or full models in full mode) and optional kohya / merged variants into out_dir."""
    whole_models = merge or "full" in (config.captioner.train_mode, config.generator.train_mode)
    if whole_models and config.mixed_precision != "no":
        captioner, generator = full_precision_copies(captioner, generator, config)
    base_captioner = config.captioner.pretrained_model_name_or_path
    base_generator = config.generator.pretrained_model_name_or_path
    cards: dict[str, tuple[str, str]] = {}  # folder name -> (library, how to load)
    folder = out_dir / "captioner"
    if config.captioner.train_mode == "lora":
        save_captioner_adapter(captioner, folder)
        base = f'BlipForConditionalGeneration.from_pretrained("{base_captioner}")'
        cards["captioner"] = ("peft", f'model = PeftModel.from_pretrained({base}, "{folder}")')
    else:
        save_merged_captioner(captioner, folder)
        cards["captioner"] = (
            "transformers",
            f'model = BlipForConditionalGeneration.from_pretrained("{folder}")',
        )
    folder = out_dir / "generator"
    if config.generator.train_mode == "lora":
        save_generator_lora(generator, folder, kohya=kohya)
        load = (
            f'pipe = StableDiffusionPipeline.from_pretrained("{base_generator}")\n'
            f'pipe.load_lora_weights("{folder}", weight_name="pytorch_lora_weights.safetensors")'
        )
        cards["generator"] = ("diffusers", load)
    else:
        save_merged_generator(generator, folder)
        cards["generator"] = ("diffusers", f'pipe = StableDiffusionPipeline.from_pretrained("{folder}")')
    if merge:
        folder = out_dir / "captioner_merged"
        save_merged_captioner(captioner, folder)
        cards[folder.name] = (
            "transformers",
            f'model = BlipForConditionalGeneration.from_pretrained("{folder}")',
        )
        folder = out_dir / "generator_merged"
        save_merged_generator(generator, folder)
        cards[folder.name] = ("diffusers", f'pipe = StableDiffusionPipeline.from_pretrained("{folder}")')
    for part, (library, how_to_load) in cards.items():
        (out_dir / part / "README.md").write_text(
            model_card(config, part, library, step, command, how_to_load)
        )
    return out_dir


def full_precision_copies(
    captioner: Captioner, generator: Generator, config: Config
) -> tuple[Captioner, Generator]:
    """Fresh fp32 base models carrying the trained weights.

    Under mixed precision the frozen base weights were cast to bf16/fp16 in place; merging adapters into
    them would bake that rounding into a standalone model, so merged and full exports start from fp32 bases.
    """
    copies = []
    for trained, build, settings in (
        (captioner, build_captioner, config.captioner),
        (generator, build_generator, config.generator),
    ):
        fresh, names = build(settings)
        load_trainable_state_dict(fresh, trainable_state_dict(trained, names), names)
        copies.append(fresh)
    return copies[0], copies[1]


def load_checkpoint_models(checkpoint: Path) -> tuple[Captioner, Generator, Config]:
    """Rebuild both models exactly as trained and load a verified checkpoint's trainable weights into them."""
    verify_checkpoint(checkpoint)
    config = read_config(checkpoint)
    captioner, captioner_names = build_captioner(config.captioner)
    generator, generator_names = build_generator(config.generator)
    for name, module, names in (
        ("captioner", captioner, captioner_names),
        ("generator", generator, generator_names),
    ):
        path = checkpoint / trainable_weights_file(name)
        weights = read_tensors(path)
        try:
            load_trainable_state_dict(module, weights, names)
        except ValueError as error:
            raise CheckpointError(f"{path}: {error}") from None
    return captioner, generator, config
