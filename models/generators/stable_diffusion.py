"""Stable Diffusion 1.x / 2.x: a UNet cross-attending to one CLIP text encoder's last hidden state, on the DDPM
objective (epsilon for 1.x and 2.x-base, v-prediction for 2.x at 768 px; the scheduler config says which)."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, ClassVar

import torch
from diffusers import DiffusionPipeline, StableDiffusionPipeline
from transformers.modeling_outputs import BaseModelOutput

from cycletune.models.generators.generator_spec import GeneratorParts, GeneratorSpec, TextEncoderSlot


class StableDiffusionSpec(GeneratorSpec):
    name = "sd"
    pipeline_class = StableDiffusionPipeline
    denoiser = "unet"
    text_encoders = (TextEncoderSlot("text_encoder", "tokenizer"),)
    lora_targets: ClassVar[list[str]] = ["to_q", "to_k", "to_v", "to_out.0"]
    kohya_export = True
    converts_lora_keys = True

    def conditioning(self, generator: GeneratorParts, outputs: Sequence[BaseModelOutput]) -> torch.Tensor:
        """The last hidden state, as StableDiffusionPipeline encodes prompts (clip_skip unset)."""
        return outputs[0].last_hidden_state

    def predict(
        self,
        generator: GeneratorParts,
        noisy: torch.Tensor,
        timesteps: torch.Tensor,
        conditioning: torch.Tensor,
    ) -> torch.Tensor:
        return generator.unet(noisy, timesteps, conditioning).sample

    def pipeline(self, components: dict[str, Any]) -> DiffusionPipeline:
        """No safety checker: the trainer's pipelines are for export and loading LoRA files."""
        return StableDiffusionPipeline(
            **components, safety_checker=None, feature_extractor=None, requires_safety_checker=False
        )
