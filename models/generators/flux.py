"""Flux.1: an MMDiT transformer reading T5's states and CLIP's pooled output, on 2x2 patches of a 16-channel
latent packed into a token sequence, with a distilled guidance strength as an input (FLUX.1-dev; schnell has
none); rectified flow (models/flow_matching.py) with a resolution-dependent shift of the sampling schedule."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, ClassVar

import torch
from diffusers import FluxPipeline
from transformers.modeling_outputs import BaseModelOutput

from cycletune.models.flow_matching import FlowMatchingProcess
from cycletune.models.generators.generator_spec import (
    FamilyOptions,
    GeneratorParts,
    GeneratorSpec,
    TextEncoderSlot,
    split_pooled,
    with_pooled,
)
from cycletune.models.generators.sd3 import flow_matching_process

# FluxPipeline's default max_sequence_length for T5, and its default guidance for FLUX.1-dev.
T5_TOKENS = 512
DEFAULT_EMBEDDED_GUIDANCE = 3.5
# Latent cells per token side: Flux packs 2x2 latent patches into one token.
PACKING = 2


class FluxSpec(GeneratorSpec):
    name = "flux"
    pipeline_class = FluxPipeline
    denoiser = "transformer"
    text_encoders = (
        TextEncoderSlot("text_encoder", "tokenizer"),
        TextEncoderSlot("text_encoder_2", "tokenizer_2", max_length=T5_TOKENS),
    )
    # The attention projections of the double-stream and single-stream blocks.
    lora_targets: ClassVar[list[str]] = ["to_k", "to_q", "to_v", "to_out.0"]

    def noise_process(
        self, name_or_path: str, *, revision: str | None, options: FamilyOptions, pixel_space: bool
    ) -> FlowMatchingProcess:
        return flow_matching_process(name_or_path, revision=revision, options=options, patch_size=PACKING)

    def default_resolution(self, generator_parts: dict[str, Any], vae_scale_factor: int) -> int:
        """The transformer carries no image size (FluxPipeline assumes 1024 px); the VAE's sample_size is the
        checkpoint's native resolution (1024 for Flux's)."""
        vae = generator_parts.get("vae")
        if vae is None:
            raise ValueError("a Flux generator needs its VAE")
        return vae.config.sample_size

    def check_resolution(self, resolution: int, vae_scale_factor: int) -> None:
        """Whole 2x2 patches of latent cells."""
        super().check_resolution(resolution, vae_scale_factor * PACKING)

    def conditioning(self, generator: GeneratorParts, outputs: Sequence[BaseModelOutput]) -> torch.Tensor:
        """As FluxPipeline.encode_prompt: T5's last hidden state and CLIP's pooled output."""
        return with_pooled(outputs[1].last_hidden_state, outputs[0].pooler_output)

    def predict(
        self,
        generator: GeneratorParts,
        noisy: torch.Tensor,
        timesteps: torch.Tensor,
        conditioning: torch.Tensor,
    ) -> torch.Tensor:
        """Pack the latents into 2x2-patch tokens with their position ids, call the transformer at
        timestep / 1000 (its convention), and unpack the prediction to the latents' layout."""
        transformer = generator.transformer
        states, pooled = split_pooled(conditioning, transformer.config.pooled_projection_dim)
        batch, channels, height, width = noisy.shape
        packed = FluxPipeline._pack_latents(noisy, batch, channels, height, width)
        image_ids = FluxPipeline._prepare_latent_image_ids(
            batch, height // PACKING, width // PACKING, noisy.device, noisy.dtype
        )
        text_ids = torch.zeros(states.shape[1], 3, device=noisy.device, dtype=noisy.dtype)
        guidance = None
        if transformer.config.guidance_embeds:
            strength = generator.options.embedded_guidance_scale
            strength = DEFAULT_EMBEDDED_GUIDANCE if strength is None else strength
            guidance = torch.full((batch,), strength, device=noisy.device, dtype=torch.float32)
        prediction = transformer(
            hidden_states=packed,
            timestep=timesteps.expand(batch).to(noisy.dtype) / 1000,
            guidance=guidance,
            pooled_projections=pooled,
            encoder_hidden_states=states,
            txt_ids=text_ids,
            img_ids=image_ids,
            return_dict=False,
        )[0]
        scale = generator.vae_scale_factor
        return FluxPipeline._unpack_latents(prediction, height * scale, width * scale, scale)
