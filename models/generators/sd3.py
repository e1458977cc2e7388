"""Stable Diffusion 3 / 3.5: an MMDiT transformer reading two CLIP encoders' penultimate states (zero-padded to
T5's width) followed by T5's states, and both CLIPs' pooled outputs side by side; rectified flow
(models/flow_matching.py) on a 16-channel VAE with a shift."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, ClassVar

import torch
import torch.nn.functional as F
from diffusers import (
    DiffusionPipeline,
    FlowMatchEulerDiscreteScheduler,
    SD3Transformer2DModel,
    StableDiffusion3Pipeline,
)
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

# StableDiffusion3Pipeline's default max_sequence_length for T5.
T5_TOKENS = 256


def flow_matching_process(
    name_or_path: str, *, revision: str | None, options: FamilyOptions, patch_size: int
) -> FlowMatchingProcess:
    """The checkpoint's flow-matching scheduler with the density and weighting options; DDPM options refused."""
    if options.prediction_type is not None:
        raise ValueError(
            f"generator.prediction_type={options.prediction_type!r} applies to DDPM families; flow-matching "
            "models always predict noise - x0"
        )
    if options.timestep_bias.strategy != "none":
        raise ValueError(
            f"generator.timestep_bias_strategy={options.timestep_bias.strategy!r} applies to DDPM families; "
            "flow-matching models set their timestep density with generator.weighting_scheme"
        )
    scheduler = FlowMatchEulerDiscreteScheduler.from_pretrained(
        name_or_path, subfolder="scheduler", revision=revision
    )
    return FlowMatchingProcess(
        scheduler,
        patch_size=patch_size,
        weighting_scheme=options.weighting_scheme,
        logit_mean=options.logit_mean,
        logit_std=options.logit_std,
        mode_scale=options.mode_scale,
    )


class StableDiffusion3Spec(GeneratorSpec):
    name = "sd3"
    pipeline_class = StableDiffusion3Pipeline
    denoiser = "transformer"
    text_encoders = (
        TextEncoderSlot("text_encoder", "tokenizer"),
        TextEncoderSlot("text_encoder_2", "tokenizer_2"),
        TextEncoderSlot("text_encoder_3", "tokenizer_3", max_length=T5_TOKENS),
    )
    # Every attention projection of the joint blocks, image and text streams, as diffusers' SD3 LoRA trainer.
    lora_targets: ClassVar[list[str]] = [
        "attn.add_k_proj",
        "attn.add_q_proj",
        "attn.add_v_proj",
        "attn.to_add_out",
        "attn.to_k",
        "attn.to_out.0",
        "attn.to_q",
        "attn.to_v",
    ]

    def noise_process(
        self, name_or_path: str, *, revision: str | None, options: FamilyOptions, pixel_space: bool
    ) -> FlowMatchingProcess:
        config = SD3Transformer2DModel.load_config(name_or_path, subfolder=self.denoiser, revision=revision)
        return flow_matching_process(
            name_or_path, revision=revision, options=options, patch_size=config["patch_size"]
        )

    def conditioning(self, generator: GeneratorParts, outputs: Sequence[BaseModelOutput]) -> torch.Tensor:
        """As StableDiffusion3Pipeline.encode_prompt (clip_skip unset)."""
        clip_outputs, t5_states = outputs[:2], outputs[2].last_hidden_state
        clip_states = torch.cat([output.hidden_states[-2] for output in clip_outputs], dim=-1)
        clip_states = F.pad(clip_states, (0, t5_states.shape[-1] - clip_states.shape[-1]))
        pooled = torch.cat([output.text_embeds for output in clip_outputs], dim=-1)
        return with_pooled(torch.cat([clip_states, t5_states.to(clip_states.dtype)], dim=-2), pooled)

    def predict(
        self,
        generator: GeneratorParts,
        noisy: torch.Tensor,
        timesteps: torch.Tensor,
        conditioning: torch.Tensor,
    ) -> torch.Tensor:
        transformer = generator.transformer
        states, pooled = split_pooled(conditioning, transformer.config.pooled_projection_dim)
        return transformer(
            hidden_states=noisy,
            timestep=timesteps.expand(len(noisy)),
            encoder_hidden_states=states,
            pooled_projections=pooled,
            return_dict=False,
        )[0]

    def pipeline(self, components: dict[str, Any]) -> DiffusionPipeline:
        """No IP-adapter image encoder."""
        return StableDiffusion3Pipeline(**components, image_encoder=None, feature_extractor=None)
