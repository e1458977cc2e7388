"""Generator sampling: the sampler loop (DDIM or flow-matching Euler, by the family's noise process) with
classifier-free guidance, the sampler a checkpoint ships, and drawing with any compatible diffusers scheduler.

Sampling is what validation, evaluation and the T2I2T cycle's DRaFT-K run on top of the training wrapper in
models/generator.py, which mixes ImageSampling in. One loop serves both: `sample` is `sample_with_grad`
with no step recorded. A scheduler named by the user (EulerDiscreteScheduler, DPMSolverMultistepScheduler,
...) draws through the family's own diffusers pipeline around the same parts instead: its scheduler-specific
input scaling, initial noise sigma and step noise are the library's, not rewritten here.
"""

from __future__ import annotations

import inspect
from collections.abc import Callable, Sequence
from contextlib import nullcontext
from typing import TYPE_CHECKING, Any

import diffusers
import torch
from diffusers import SchedulerMixin
from diffusers.utils.torch_utils import randn_tensor
from torch.utils.checkpoint import checkpoint

from cycletune.models.noise_process import NoiseProcess
from cycletune.models.sampling_settings import SamplingSettings

if TYPE_CHECKING:
    from diffusers import AutoencoderKL, DiffusionPipeline

    from cycletune.models.generators.generator_spec import FamilyOptions


def checkpoint_sampler(
    name_or_path: str, model_index: dict[str, Any], *, revision: str | None, prediction_type: str | None
) -> SchedulerMixin:
    """The scheduler class model_index.json names (PNDM for SD 1.x), loaded with any prediction_type override.

    Sampling here runs the noise process's sampler (DDIM, flow-matching Euler); this one is kept for the pipelines exported from the model, so their
    default sampling stays the checkpoint's.
    """
    overrides = {} if prediction_type is None else {"prediction_type": prediction_type}
    sampler = _scheduler_class(name_or_path, model_index).from_pretrained(
        name_or_path, subfolder="scheduler", revision=revision, **overrides
    )
    if prediction_type is not None and sampler.config.get("prediction_type") != prediction_type:
        raise ValueError(
            f"{name_or_path!r}: its scheduler {type(sampler).__name__} takes no prediction_type, "
            f"so prediction_type={prediction_type!r} cannot be applied to it"
        )
    return sampler


def compatible_scheduler(class_name: str, sampler: SchedulerMixin) -> type[SchedulerMixin]:
    """The diffusers scheduler class `class_name`, if diffusers lists it among `sampler`'s compatibles (same
    noise schedule and model output, so it can be built from `sampler`'s config); otherwise a ValueError
    listing those that are. Schedulers whose optional dependency is missing (torchsde) are not listed."""
    compatible = sorted(
        found.__name__ for found in sampler.compatibles if _diffusers_scheduler(found.__name__) is not None
    )
    scheduler_class = _diffusers_scheduler(class_name)
    if scheduler_class is None or class_name not in compatible:
        kind = "is not a diffusers scheduler" if scheduler_class is None else "is not compatible with"
        raise ValueError(
            f"scheduler {class_name!r} {kind} this generator's {type(sampler).__name__}; "
            f"compatible: {', '.join(compatible)}"
        )
    return scheduler_class


def _scheduler_class(name_or_path: str, model_index: dict[str, Any]) -> type[SchedulerMixin]:
    """The diffusers scheduler class model_index.json names for the pipeline's sampling."""
    class_name = model_index["scheduler"][1]
    scheduler_class = _diffusers_scheduler(class_name)
    if scheduler_class is None:
        raise ValueError(
            f"{name_or_path!r}: model_index.json scheduler {class_name!r} is not a diffusers scheduler"
        )
    return scheduler_class


def _diffusers_scheduler(class_name: str) -> type[SchedulerMixin] | None:
    """diffusers' scheduler class of that name; None for any other name (a model, a placeholder of a
    scheduler whose optional dependency is missing): nothing outside diffusers is ever looked up."""
    found = getattr(diffusers, class_name, None)
    return found if isinstance(found, type) and issubclass(found, SchedulerMixin) else None


class ImageSampling:
    """The sampling methods of models/generator.py's Generator, which this is mixed into.

    The annotations below are what they use of the Generator.
    """

    process: NoiseProcess
    sampling_scheduler: SchedulerMixin
    vae: AutoencoderKL | None
    options: FamilyOptions
    pipeline_settings: dict[str, Any]
    resolution: int
    device: torch.device
    dtype: torch.dtype
    latent_shape: Callable[[int], tuple[int, int, int, int]]
    token_lengths: Callable[[], list[int]]
    tokenize: Callable[[list[str]], torch.Tensor]
    encode_text: Callable[[torch.Tensor], torch.Tensor]
    encode_captions: Callable[[Sequence[str]], torch.Tensor]
    decode_latents: Callable[[torch.Tensor], torch.Tensor]
    predict: Callable[[torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor]
    pipeline: Callable[..., DiffusionPipeline]

    def zeroes_unconditional(self, negative_prompt: str | None) -> bool:
        """Whether the family's pipeline guides away from zero embeddings for this negative prompt: only with
        none given, where the checkpoint sets SDXL's force_zeros_for_empty_prompt (else the empty caption)."""
        return negative_prompt is None and bool(self.pipeline_settings.get("force_zeros_for_empty_prompt"))

    def unconditional(self, conditioning: torch.Tensor, negative_prompt: str | None = None) -> torch.Tensor:
        """Classifier-free guidance's unconditional states for each row of `conditioning`, as the family's
        pipeline builds them: `negative_prompt` encoded, or with none, zeros where the pipeline zeroes them and
        the empty caption encoded elsewhere."""
        if self.zeroes_unconditional(negative_prompt):
            return torch.zeros_like(conditioning)
        return self.encode_captions([negative_prompt or ""] * len(conditioning))

    def sample_with_grad(
        self,
        encoder_hidden_states: torch.Tensor,
        latents: torch.Tensor,
        *,
        num_inference_steps: int,
        grad_steps: int,
        guidance_scale: float = 1.0,
        uncond_hidden_states: torch.Tensor | None = None,
        gradient_checkpointing: bool = True,
    ) -> torch.Tensor:
        """The process's sampler (DDIM with eta 0, flow-matching Euler) from the initial noise `latents` to
        final float32 latents; the one sampling loop.

        Only the last `grad_steps` steps are recorded for backward (DRaFT-K; 0 records none): the earlier
        steps run under no_grad, and each recorded denoiser call is checkpointed (recomputed in backward) so
        memory stays at one activation set whatever K is. Classifier-free guidance against
        `uncond_hidden_states` when guidance_scale > 1, as StableDiffusionPipeline does.
        """
        batch_size = encoder_hidden_states.shape[0]
        if tuple(latents.shape) != self.latent_shape(batch_size):
            raise ValueError(
                f"latents shape {tuple(latents.shape)} != {self.latent_shape(batch_size)} "
                f"for {batch_size} text embeddings"
            )
        if not 0 <= grad_steps <= num_inference_steps:
            raise ValueError(
                f"grad_steps={grad_steps} must lie in [0, num_inference_steps={num_inference_steps}]"
            )
        guided = guidance_scale > 1.0
        if guided and uncond_hidden_states is None:
            raise ValueError(f"guidance_scale={guidance_scale} > 1 needs uncond_hidden_states")
        if guided and uncond_hidden_states.shape != encoder_hidden_states.shape:
            raise ValueError(
                f"uncond_hidden_states shape {tuple(uncond_hidden_states.shape)} != "
                f"encoder_hidden_states shape {tuple(encoder_hidden_states.shape)}"
            )
        context = (
            torch.cat([uncond_hidden_states, encoder_hidden_states]) if guided else encoder_hidden_states
        )
        context = context.to(self.dtype)
        scheduler = self.process.sampler(num_inference_steps, latents.shape, self.device)
        latents = latents.to(self.device, torch.float32)
        first_grad_step = len(scheduler.timesteps) - grad_steps
        for index, t in enumerate(scheduler.timesteps):
            recorded = index >= first_grad_step and torch.is_grad_enabled()
            with nullcontext() if recorded else torch.no_grad():
                if recorded and gradient_checkpointing:
                    prediction = checkpoint(
                        self.guided_prediction, latents, t, context, guidance_scale, use_reentrant=False
                    )
                else:
                    prediction = self.guided_prediction(latents, t, context, guidance_scale)
                latents = scheduler.step(prediction, t, latents).prev_sample
        return latents

    def guided_prediction(
        self, latents: torch.Tensor, t: torch.Tensor, context: torch.Tensor, guidance_scale: float
    ) -> torch.Tensor:
        """One denoiser call (both CFG branches batched when guided), in float32.

        `t` is one timestep or one per sample [B] (models/denoising_chain.py recomputes transitions of
        different timesteps in one call); `context` is [uncond; cond] when guided.
        """
        guided = guidance_scale > 1.0
        model_input = torch.cat([latents, latents]) if guided else latents
        if guided and t.ndim == 1:
            t = torch.cat([t, t])
        prediction = self.predict(model_input, t, context).float()
        if not guided:
            return prediction
        unconditional, conditional = prediction.chunk(2)
        return unconditional + guidance_scale * (conditional - unconditional)

    @torch.no_grad()
    def sample(
        self,
        captions: list[str],
        *,
        num_inference_steps: int = SamplingSettings.num_inference_steps,
        guidance_scale: float = SamplingSettings.guidance_scale,
        generator: torch.Generator | None = None,
        latents: torch.Tensor | None = None,
        negative_prompt: str | None = None,
        scheduler: str | None = None,
        step_generators: Sequence[torch.Generator] | None = None,
    ) -> torch.Tensor:
        """Sampling with classifier-free guidance away from `negative_prompt` (None: the empty caption);
        returns pixels01.

        `scheduler` names a diffusers scheduler class compatible with the checkpoint's sampler: the family's
        diffusers pipeline then draws with it (built from the checkpoint's sampler config), from the same
        initial latents; `step_generators`, one per caption, seed the noise a stochastic scheduler
        (EulerAncestral, DDPM) adds at each step, so that a caption's draws are its own in any batch.
        For Flux, classifier-free guidance is FluxPipeline's true CFG (true_cfg_scale), on top of its
        distilled guidance input.
        """
        if negative_prompt and guidance_scale <= 1.0:
            raise ValueError(
                f"negative_prompt {negative_prompt!r} steers classifier-free guidance, which "
                f"guidance_scale={guidance_scale} turns off: set guidance_scale > 1"
            )
        if latents is None:
            shape = self.latent_shape(len(captions))
            latents = randn_tensor(shape, generator=generator, device=self.device, dtype=torch.float32)
        guided = guidance_scale > 1.0
        if scheduler is not None:
            zeroed = self.zeroes_unconditional(negative_prompt)
            return self._pipeline_sample(
                captions,
                latents,
                scheduler=scheduler,
                num_inference_steps=num_inference_steps,
                guidance_scale=guidance_scale,
                negative_prompts=None if zeroed or not guided else [negative_prompt or ""] * len(captions),
                step_generators=step_generators,
            )
        conditioning = self.encode_text(self.tokenize(captions))
        final = self.sample_with_grad(
            conditioning,
            latents,
            num_inference_steps=num_inference_steps,
            grad_steps=0,
            guidance_scale=guidance_scale,
            uncond_hidden_states=self.unconditional(conditioning, negative_prompt) if guided else None,
        )
        return self.decode_latents(final)

    def _pipeline_sample(
        self,
        captions: list[str],
        latents: torch.Tensor,
        *,
        scheduler: str,
        num_inference_steps: int,
        guidance_scale: float,
        negative_prompts: list[str] | None,
        step_generators: Sequence[torch.Generator] | None,
    ) -> torch.Tensor:
        """`sample` through the family pipeline with the named scheduler; pixels01 in float32.

        `negative_prompts` are given when guided, except where the pipeline zeroes the unconditional
        embeddings itself (`unconditional`): Flux's pipeline would not guide at all without them, and the
        others would encode the empty caption as the built-in sampler does.
        """
        if self.vae is None:
            raise ValueError(
                f"scheduler {scheduler!r}: the diffusers pipelines decode with a VAE; a pixel-space generator "
                "draws with its built-in sampler only"
            )
        sampler = compatible_scheduler(scheduler, self.sampling_scheduler)
        pipe = self.pipeline(scheduler=sampler.from_config(self.sampling_scheduler.config))
        pipe.set_progress_bar_config(disable=True)
        parameters = inspect.signature(pipe.__call__).parameters
        options: dict[str, Any] = {}
        if "max_sequence_length" in parameters:  # T5 families: the generator's T5 budget, not the default
            options["max_sequence_length"] = self.token_lengths()[-1]
        latents = latents.to(self.device, self.dtype)
        if "true_cfg_scale" in parameters:
            # Flux: guidance_scale is its distilled guidance input (the pipeline's default is the family's),
            # and its prepare_latents packs only the noise it draws itself.
            options["true_cfg_scale"] = guidance_scale
            if self.options.embedded_guidance_scale is not None:
                options["guidance_scale"] = self.options.embedded_guidance_scale
            latents = pipe._pack_latents(latents, *latents.shape)
        else:
            options["guidance_scale"] = guidance_scale
        images = pipe(
            list(captions),
            negative_prompt=negative_prompts,
            height=self.resolution,
            width=self.resolution,
            num_inference_steps=num_inference_steps,
            latents=latents,
            generator=None if step_generators is None else list(step_generators),
            output_type="pt",
            **options,
        ).images
        return images.float()
