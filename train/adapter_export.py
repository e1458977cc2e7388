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

import json
import shlex
from collections.abc import Callable
from pathlib import Path

import torch

from cycletune.models.captioner import Captioner
from cycletune.models.generator import Generator
from cycletune.models.lora import (
    DIFFUSERS_LORA_FILE,
    load_trainable_state_dict,
    save_captioner_adapter,
    save_generator_lora,
    save_merged_captioner,
    save_merged_generator,
    trainable_state_dict,
)
from cycletune.train.builders import build_captioner, build_generator
from cycletune.train.checkpoint import CheckpointError, read_config, read_tensors, verify_checkpoint
from cycletune.train.config import Config
from cycletune.train.run_dir import trainable_weights_file

# What each export folder is for the Hugging Face Hub's model-card metadata.
PIPELINE_TAGS = {"captioner": "image-to-text", "generator": "text-to-image"}


def model_card(
    config: Config, part: str, library: str, step: int, command: list[str], how_to_load: str
) -> str:
    """A README with the Hub's YAML metadata: what was trained on what, for how long, by which command, and a
    snippet (imports included) that loads it from any working directory.

    No export date: an identical run must export identical bytes (the file's own time says when)."""
    role = "captioner" if part.startswith("captioner") else "generator"
    settings = config.captioner if role == "captioner" else config.generator
    lora = settings.train_mode == "lora" and not part.endswith("_merged")
    weights = (
        f"LoRA rank {settings.lora.rank}, alpha {settings.lora.alpha}"
        if settings.train_mode == "lora"
        else "full finetune"
    )
    data = ", ".join(str(source.model_dump()) for source in config.data.paired)
    tags = ["cycletune", PIPELINE_TAGS[role], *(["lora"] if lora else [])]
    return f"""---
license: other
base_model: {json.dumps(settings.pretrained_model_name_or_path)}
library_name: {library}
pipeline_tag: {PIPELINE_TAGS[role]}
tags: {json.dumps(tags)}
---
# CycleTune {part}

- Base model: `{settings.pretrained_model_name_or_path}` (its license applies)
- Weights: {weights}, after {step} updates (phases alternating as {config.train.schedule})
- Paired data: {data}

## Trained with
```bash
{shlex.join(command)}
```

## Load
```python
{how_to_load}
```
"""


def _load_snippets(config: Config, out_dir: Path, *, merge: bool) -> dict[str, tuple[str, str]]:
    """Per export folder: its library and a snippet that loads it, paths absolute (hub ids as they are)."""
    folder = {name: json.dumps(str((out_dir / name).resolve())) for name in ("captioner", "generator")}
    base_captioner = json.dumps(config.captioner.pretrained_model_name_or_path)
    base_generator = json.dumps(config.generator.pretrained_model_name_or_path)
    # Imports end with a blank line, as PEP 8 and formatters lay a snippet out.
    transformers = "from transformers import AutoModelForImageTextToText, AutoProcessor\n\n"
    diffusers = "from diffusers import StableDiffusionPipeline\n\n"

    def whole_captioner(path: str) -> tuple[str, str]:
        loads = f"model = AutoModelForImageTextToText.from_pretrained({path})\n"
        return "transformers", f"{transformers}{loads}processor = AutoProcessor.from_pretrained({path})"

    def whole_generator(path: str) -> tuple[str, str]:
        return "diffusers", f"{diffusers}pipe = StableDiffusionPipeline.from_pretrained({path})"

    snippets = {
        "captioner": (
            (
                "peft",
                f"from peft import PeftModel\n{transformers}"
                f"base = AutoModelForImageTextToText.from_pretrained({base_captioner})\n"
                f"model = PeftModel.from_pretrained(base, {folder['captioner']})\n"
                f"processor = AutoProcessor.from_pretrained({base_captioner})",
            )
            if config.captioner.train_mode == "lora"
            else whole_captioner(folder["captioner"])
        ),
        "generator": (
            (
                "diffusers",
                f"{diffusers}pipe = StableDiffusionPipeline.from_pretrained({base_generator})\n"
                f'pipe.load_lora_weights({folder["generator"]}, weight_name="{DIFFUSERS_LORA_FILE}")',
            )
            if config.generator.train_mode == "lora"
            else whole_generator(folder["generator"])
        ),
    }
    if merge:
        snippets["captioner_merged"] = whole_captioner(
            json.dumps(str((out_dir / "captioner_merged").resolve()))
        )
        snippets["generator_merged"] = whole_generator(
            json.dumps(str((out_dir / "generator_merged").resolve()))
        )
    return snippets


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
    if config.captioner.train_mode == "lora":
        save_captioner_adapter(captioner, out_dir / "captioner")
    else:
        save_merged_captioner(captioner, out_dir / "captioner")
    if config.generator.train_mode == "lora":
        save_generator_lora(generator, out_dir / "generator", kohya=kohya)
    else:
        save_merged_generator(generator, out_dir / "generator")
    if merge:
        save_merged_captioner(captioner, out_dir / "captioner_merged")
        save_merged_generator(generator, out_dir / "generator_merged")
    for part, (library, how_to_load) in _load_snippets(config, out_dir, merge=merge).items():
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
    trained = {"captioner": captioner, "generator": generator}
    return rebuilt_models(config, lambda phase, names: trainable_state_dict(trained[phase], names))


def rebuilt_models(
    config: Config, trained_weights: Callable[[str, list[str]], dict[str, torch.Tensor]]
) -> tuple[Captioner, Generator]:
    """The config's base models built afresh (fp32), each loaded with trained_weights(phase, its trainable
    names): full-precision exports, and the export of an FSDP run, whose own models hold only shards."""
    copies = []
    for phase, build, settings in (
        ("captioner", build_captioner, config.captioner),
        ("generator", build_generator, config.generator),
    ):
        fresh, names = build(settings)
        load_trainable_state_dict(fresh, trained_weights(phase, names), names)
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
