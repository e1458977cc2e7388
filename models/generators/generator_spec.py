"""What the Generator wrapper (models/generator.py) needs to know of one text-to-image family, and nothing more.

A family is one subclass of GeneratorSpec in this package (stable_diffusion.py, sdxl.py, ...), listed in
__init__.py's SPECS. The wrapper does the rest for every family alike: loading the pipeline's parts, the
denoising loss on the family's noise process (models/noise_process.py), one-step estimates, sampling with
classifier-free guidance, the frozen-encoder cache, soft captions through the vocabulary bridge.

The conditioning a family's denoiser reads is carried as ONE tensor [B, T, D]: its text encoders' token states,
and, for families that also read a pooled text vector (SDXL, SD3, Flux), one more row holding that vector
zero-padded to D (`with_pooled` / `split_pooled`). One tensor keeps everything that handles conditioning --
CFG's [uncond; cond] batches, repeats per candidate, the per-caption cache, DDP -- plain tensor code for every
family.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, ClassVar, Protocol

import torch
import torch.nn.functional as F
from diffusers import DiffusionPipeline
from transformers.modeling_outputs import BaseModelOutput

from cycletune.models.ddpm_process import DDPMProcess, TimestepBias

if TYPE_CHECKING:
    from cycletune.models.noise_process import NoiseProcess


@dataclass(frozen=True)
class TextEncoderSlot:
    """One text encoder a family conditions on: its pipeline component names, and its token budget when the
    family sets one (T5's max_sequence_length); None: the encoder's positions bound it (CLIP's 77)."""

    encoder: str
    tokenizer: str
    max_length: int | None = None


@dataclass(frozen=True)
class FamilyOptions:
    """Family-specific settings of the generator config section (each ignored where it does not apply).

    The flow-matching ones carry diffusers' SD3/Flux trainer flag names and defaults.
    """

    prediction_type: str | None = None  # DDPM families: override the scheduler's (epsilon / v_prediction)
    # DDPM families: which training timesteps to draw more often
    timestep_bias: TimestepBias = field(default_factory=TimestepBias)
    weighting_scheme: str = "none"  # flow matching: timestep density and loss weighting
    logit_mean: float = 0.0
    logit_std: float = 1.0
    mode_scale: float = 1.29
    embedded_guidance_scale: float | None = None  # Flux-dev's distilled guidance input (None: family default)


def with_pooled(states: torch.Tensor, pooled: torch.Tensor) -> torch.Tensor:
    """Token states [B, T, D] and a pooled vector [B, P <= D] as one conditioning tensor [B, T + 1, D]."""
    if pooled.shape[-1] > states.shape[-1]:
        raise ValueError(
            f"pooled text vector of width {pooled.shape[-1]} is wider than the token states ({states.shape[-1]})"
        )
    row = F.pad(pooled.to(states.dtype), (0, states.shape[-1] - pooled.shape[-1]))
    return torch.cat([states, row.unsqueeze(1)], dim=1)


def split_pooled(conditioning: torch.Tensor, pooled_width: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Inverse of `with_pooled`: token states [B, T, D] and the pooled vector [B, pooled_width]."""
    return conditioning[:, :-1], conditioning[:, -1, :pooled_width]


class GeneratorParts(Protocol):
    """What a spec reads of the Generator wrapper (models/generator.py), which holds the pipeline's parts as
    attributes under their component names (unet or transformer, text_encoder_2, ...); named here so that the
    family files do not import the wrapper that loads them."""

    resolution: int
    options: FamilyOptions

    @property
    def vae_scale_factor(self) -> int: ...

    def __getattr__(self, name: str) -> Any: ...


class GeneratorSpec(ABC):
    """One generator family's specifics. Methods take the Generator wrapper, whose parts are named as in the
    family's diffusers pipeline (generator.unet or generator.transformer, text_encoder_2, ...)."""

    # The family's name on the command line (models.tiny --generator NAME).
    name: ClassVar[str]
    # The diffusers pipeline class users load this family with: its model_index.json `_class_name`, its
    # LoRA saver and loader, the folder layout an export writes.
    pipeline_class: ClassVar[type[DiffusionPipeline]]
    # The denoiser's component name: "unet" or "transformer".
    denoiser: ClassVar[str]
    text_encoders: ClassVar[tuple[TextEncoderSlot, ...]]
    # peft target_modules of the denoiser by default, as diffusers' LoRA trainers of the family target.
    lora_targets: ClassVar[list[str]]
    # Whether kohya/A1111 LoRA files (lora_unet_* keys) exist for the family: the UNet families.
    kohya_export: ClassVar[bool] = False
    # Whether the family's diffusers LoRA file names peft's lora_A / lora_B as lora.down / lora.up, as
    # diffusers' UNet LoRA trainers write it; its SD3 and Flux trainers keep peft's names, and SD3's loader
    # drops converted names of the layers it does not expect (the add_* projections).
    converts_lora_keys: ClassVar[bool] = False

    @property
    def pipeline_class_names(self) -> tuple[str, ...]:
        """The model_index.json `_class_name` values this family loads."""
        return (self.pipeline_class.__name__,)

    @property
    def components(self) -> tuple[str, ...]:
        """The pipeline components the wrapper loads (besides the VAE and the schedulers)."""
        slots = [name for slot in self.text_encoders for name in (slot.encoder, slot.tokenizer)]
        return (self.denoiser, *slots)

    def noise_process(
        self, name_or_path: str, *, revision: str | None, options: FamilyOptions, pixel_space: bool
    ) -> NoiseProcess:
        """The training objective, read from the checkpoint's scheduler folder: DDPM unless the family says
        otherwise (the UNet families train on it)."""
        return DDPMProcess.from_pretrained(
            name_or_path,
            revision=revision,
            prediction_type=options.prediction_type,
            pixel_space=pixel_space,
            timestep_bias=options.timestep_bias,
        )

    @abstractmethod
    def conditioning(self, generator: GeneratorParts, outputs: Sequence[BaseModelOutput]) -> torch.Tensor:
        """The denoiser's conditioning tensor from each text encoder's output (in text_encoders' order,
        called with output_hidden_states=True)."""

    @abstractmethod
    def predict(
        self,
        generator: GeneratorParts,
        noisy: torch.Tensor,
        timesteps: torch.Tensor,
        conditioning: torch.Tensor,
    ) -> torch.Tensor:
        """One denoiser call on latents [B, C, H, W] at timesteps [B] (or one shared): the prediction in the
        latents' layout and the denoiser's dtype."""

    def default_resolution(self, generator_parts: dict[str, Any], vae_scale_factor: int) -> int:
        """The checkpoint's native resolution: the denoiser's square sample_size in latent cells (`generator_parts`
        holds the loaded parts, the VAE included)."""
        sample_size = generator_parts[self.denoiser].config.sample_size
        if not isinstance(sample_size, int):
            raise ValueError(f"{self.denoiser} sample_size {sample_size!r} is not square; pass resolution")
        return sample_size * vae_scale_factor

    def check_resolution(self, resolution: int, vae_scale_factor: int) -> None:
        """Refuse a resolution the family cannot denoise; the default needs whole latent cells."""
        if resolution <= 0 or resolution % vae_scale_factor:
            raise ValueError(
                f"resolution {resolution} is not a positive multiple of the VAE scale {vae_scale_factor}"
            )

    def pipeline_settings(self, model_index: dict[str, Any]) -> dict[str, Any]:
        """The checkpoint's values of the pipeline's own settings that the wrapper honours, from its
        model_index.json: none by default (SDXL has one). They are passed to `pipeline` with the parts, so an
        export keeps them."""
        return {}

    def pipeline(self, components: dict[str, Any]) -> DiffusionPipeline:
        """The family's pipeline around existing parts (shared, not copied) and pipeline_settings: what exports
        save and what load_lora_weights is called on. Optional parts the wrapper does not hold are left out."""
        return self.pipeline_class(**components)

    def lora_save_arguments(
        self, layers: dict[str, torch.Tensor], metadata: dict[str, Any]
    ) -> dict[str, Any]:
        """The pipeline's save_lora_weights keywords for the denoiser's LoRA layers and their LoraConfig."""
        return {f"{self.denoiser}_lora_layers": layers, f"{self.denoiser}_lora_adapter_metadata": metadata}
