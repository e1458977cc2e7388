"""Stable Diffusion XL: a UNet cross-attending to two CLIP text encoders' penultimate hidden states side by side,
with the second encoder's projected pooled output and the image's size and crop ("time ids") added to its
timestep embedding; the DDPM objective (epsilon, or v-prediction for the 2.x-style finetunes)."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from diffusers import DiffusionPipeline, StableDiffusionXLPipeline
from transformers.modeling_outputs import BaseModelOutput

from cycletune.models.generators.generator_spec import (
    GeneratorParts,
    TextEncoderSlot,
    split_pooled,
    with_pooled,
)
from cycletune.models.generators.stable_diffusion import StableDiffusionSpec


class StableDiffusionXLSpec(StableDiffusionSpec):
    """SD's UNet family (its LoRA targets, key names and kohya files) with SDXL's encoders and added inputs."""

    name = "sdxl"
    pipeline_class = StableDiffusionXLPipeline
    text_encoders = (
        TextEncoderSlot("text_encoder", "tokenizer"),
        TextEncoderSlot("text_encoder_2", "tokenizer_2"),
    )

    def conditioning(self, generator: GeneratorParts, outputs: Sequence[BaseModelOutput]) -> torch.Tensor:
        """As StableDiffusionXLPipeline.encode_prompt (clip_skip unset): each encoder's penultimate hidden
        state, concatenated on the feature axis, and the pooled vector of the last (projected) encoder."""
        states = torch.cat([output.hidden_states[-2] for output in outputs], dim=-1)
        return with_pooled(states, outputs[-1].text_embeds)

    def predict(
        self,
        generator: GeneratorParts,
        noisy: torch.Tensor,
        timesteps: torch.Tensor,
        conditioning: torch.Tensor,
    ) -> torch.Tensor:
        """The time ids are (original size, crop top-left, target size) of a square, uncropped image at the
        model's resolution: what diffusers' SDXL trainer passes for center-cropped training images."""
        states, pooled = split_pooled(conditioning, generator.text_encoder_2.config.projection_dim)
        side = generator.resolution
        time_ids = torch.tensor([side, side, 0, 0, side, side], dtype=states.dtype, device=states.device)
        added = {"text_embeds": pooled, "time_ids": time_ids.expand(len(states), -1)}
        return generator.unet(noisy, timesteps, states, added_cond_kwargs=added).sample

    def pipeline_settings(self, model_index: dict[str, Any]) -> dict[str, Any]:
        """force_zeros_for_empty_prompt (diffusers' default: True, as SDXL base saves it): with no negative
        prompt, classifier-free guidance steers away from zero embeddings, not from the encoded empty caption."""
        return {"force_zeros_for_empty_prompt": bool(model_index.get("force_zeros_for_empty_prompt", True))}

    def pipeline(self, components: dict[str, Any]) -> DiffusionPipeline:
        """No invisible watermark (an optional package) and no IP-adapter image encoder."""
        return StableDiffusionXLPipeline(
            **components, image_encoder=None, feature_extractor=None, add_watermarker=False
        )
