"""Text-to-image wrapper around a diffusers pipeline's parts (denoiser, text encoders, optional VAE), for every
generator family of models/generators/.

It exposes the pieces the cycle losses need separately (tokenize, encode, noise, denoise, decode) so that
gradients can flow from a decoded image into a captioner, or from soft tokens into the text encoders.
What differs between families -- which text encoders and how their outputs condition the denoiser, the
denoiser's call, the noise process (DDPM or flow matching) -- comes from the family's spec and process.
`forward(fn)` runs a whole training computation under a DDP wrapper (models/forward_routing.py). Sampling
(the sampler loop, CFG, the checkpoint's own sampler) is in models/image_sampling.py, mixed into Generator.
"""

from __future__ import annotations

import importlib
import inspect
from collections.abc import Sequence
from contextlib import nullcontext
from typing import TYPE_CHECKING, Any, NamedTuple

import torch
import torch.nn.functional as F
from diffusers import AutoencoderKL, DiffusionPipeline, ModelMixin, SchedulerMixin
from transformers import PreTrainedModel

from cycletune.models.device_transfer import to_device
from cycletune.models.forward_routing import RunsInForward
from cycletune.models.generators import spec_for_pipeline
from cycletune.models.generators.generator_spec import FamilyOptions, GeneratorSpec
from cycletune.models.hub_kernels import WITHOUT_HUB_KERNELS
from cycletune.models.image_sampling import ImageSampling, checkpoint_sampler

if TYPE_CHECKING:
    from cycletune.models.cache import FrozenEncoderCache
    from cycletune.models.noise_process import NoiseProcess

# Libraries a model_index.json may name a part's class from: nothing else is imported by name.
_PART_LIBRARIES = ("diffusers", "transformers")
DEFAULT_OPTIONS = FamilyOptions()


class DenoiseOutput(NamedTuple):
    """One denoiser call: per-sample loss [B], the noised latents it saw, and its raw prediction."""

    loss: torch.Tensor
    noisy: torch.Tensor
    prediction: torch.Tensor


class Generator(ImageSampling, RunsInForward):
    """Latent (with a VAE) or pixel-space (without) text-to-image diffusion or flow model and its loss."""

    def __init__(
        self,
        *,
        spec: GeneratorSpec,
        parts: dict[str, Any],
        vae: AutoencoderKL | None,
        process: NoiseProcess,
        sampling_scheduler: SchedulerMixin,
        resolution: int,
        options: FamilyOptions = DEFAULT_OPTIONS,
        pipeline_settings: dict[str, Any] | None = None,
    ) -> None:
        """`parts` holds the denoiser, text encoders and tokenizers under their pipeline component names
        (they become attributes: generator.unet, generator.text_encoder_2, ...). `process` is the objective
        training draws from; sampling_scheduler the checkpoint's own sampler, kept for the pipelines exported
        from this model; pipeline_settings the checkpoint's (spec.pipeline_settings)."""
        super().__init__()
        missing = sorted(set(spec.components) - parts.keys())
        if missing:
            raise ValueError(f"{spec.name} generator needs parts {missing}")
        self.spec = spec
        for name in spec.components:
            setattr(self, name, parts[name])
        self.vae = vae
        self.process = process
        self.sampling_scheduler = sampling_scheduler
        self.options = options
        self.pipeline_settings = dict(pipeline_settings or {})
        spec.check_resolution(resolution, self.vae_scale_factor)
        self.resolution = resolution
        # Set by the trainer (train/builders.build_encoder_cache) where reusing frozen encoders is valid.
        self.encoder_cache: FrozenEncoderCache | None = None

    @classmethod
    def from_pretrained(
        cls,
        name_or_path: str,
        *,
        resolution: int | None = None,
        revision: str | None = None,
        torch_dtype: torch.dtype | None = None,
        options: FamilyOptions = DEFAULT_OPTIONS,
        prediction_type: str | None = None,
    ) -> Generator:
        """Load a hub id or local folder in its family's pipeline layout; no VAE means pixel space.

        `prediction_type` (DDPM families) overrides the saved scheduler's, as diffusers' trainers do, e.g.
        to finetune an epsilon model into a v-prediction one; it applies to both the training and the
        sampling scheduler. It is shorthand for options.prediction_type.
        """
        if prediction_type is not None:
            options = FamilyOptions(**{**vars(options), "prediction_type": prediction_type})
        model_index = DiffusionPipeline.load_config(name_or_path, revision=revision)
        spec = spec_for_pipeline(model_index.get("_class_name"))
        missing = [
            name for name in (*spec.components, "scheduler") if not _names_component(model_index, name)
        ]
        if missing:
            raise ValueError(f"model_index.json of {name_or_path!r} names no {', '.join(missing)}")
        has_vae = _names_component(model_index, "vae")
        if has_vae and model_index["vae"][1] != AutoencoderKL.__name__:
            raise ValueError(
                f"{name_or_path!r}: vae class {model_index['vae'][1]!r} is not supported (AutoencoderKL)"
            )
        vae = None
        if has_vae:
            vae = _load_part(name_or_path, model_index, "vae", revision=revision, torch_dtype=torch_dtype)
        parts = {
            name: _load_part(name_or_path, model_index, name, revision=revision, torch_dtype=torch_dtype)
            for name in spec.components
        }
        process = spec.noise_process(
            name_or_path, revision=revision, options=options, pixel_space=vae is None
        )
        sampling_scheduler = checkpoint_sampler(
            name_or_path, model_index, revision=revision, prediction_type=options.prediction_type
        )
        if resolution is None:
            resolution = spec.default_resolution(parts | {"vae": vae}, _vae_scale_factor(vae))
        return cls(
            spec=spec,
            parts=parts,
            vae=vae,
            process=process,
            sampling_scheduler=sampling_scheduler,
            resolution=resolution,
            options=options,
            pipeline_settings=spec.pipeline_settings(model_index),
        )

    @property
    def denoiser(self) -> ModelMixin:
        """The UNet or transformer, whatever the family calls it."""
        return getattr(self, self.spec.denoiser)

    @property
    def text_encoders(self) -> list[PreTrainedModel]:
        return [getattr(self, slot.encoder) for slot in self.spec.text_encoders]

    @property
    def tokenizers(self) -> list[Any]:
        return [getattr(self, slot.tokenizer) for slot in self.spec.text_encoders]

    @property
    def device(self) -> torch.device:
        return _first_parameter(self.denoiser).device

    @property
    def dtype(self) -> torch.dtype:
        """The denoiser's base weight dtype (the frozen weights come first; LoRA tensors are fp32)."""
        return _first_parameter(self.denoiser).dtype

    @property
    def prediction_type(self) -> str:
        return self.process.prediction_type

    @property
    def vae_scale_factor(self) -> int:
        return _vae_scale_factor(self.vae)

    def latent_shape(self, batch_size: int) -> tuple[int, int, int, int]:
        side = self.resolution // self.vae_scale_factor
        channels = self.denoiser.config.in_channels if self.vae is None else self.vae.config.latent_channels
        return (batch_size, channels, side, side)

    def preprocess(self, pixels01: torch.Tensor) -> torch.Tensor:
        """Resize (antialiased, differentiable) to the model resolution and map [0, 1] to [-1, 1]."""
        if pixels01.ndim != 4 or pixels01.shape[1] != 3:
            raise ValueError(f"expected pixels of shape [B, 3, H, W], got {tuple(pixels01.shape)}")
        if pixels01.shape[-2:] != (self.resolution, self.resolution):
            pixels01 = F.interpolate(
                pixels01, size=(self.resolution, self.resolution), mode="bilinear", antialias=True
            )
        return pixels01 * 2 - 1

    def token_lengths(self) -> list[int]:
        """Each text encoder's token budget: the family's (T5), else what the tokenizer and positions allow."""
        lengths = []
        for slot, tokenizer, encoder in zip(
            self.spec.text_encoders, self.tokenizers, self.text_encoders, strict=True
        ):
            # A tokenizer saved without model_max_length reports a huge sentinel; encoder positions bound it.
            limits = (
                tokenizer.model_max_length,
                getattr(encoder.config, "max_position_embeddings", None),
                slot.max_length,
            )
            lengths.append(min(limit for limit in limits if limit is not None))
        return lengths

    def tokenize(self, captions: list[str]) -> torch.Tensor:
        """Every text encoder's ids, padded and truncated as the family's pipeline does, side by side
        [B, sum of token_lengths()] so a caption's ids travel as one tensor; encode_text splits them."""
        if isinstance(captions, str):
            raise TypeError("tokenize expects a list of captions, got a single str")
        ids = [
            tokenizer(
                list(captions), padding="max_length", max_length=length, truncation=True, return_tensors="pt"
            ).input_ids
            for tokenizer, length in zip(self.tokenizers, self.token_lengths(), strict=True)
        ]
        return to_device(torch.cat(ids, dim=1), self.device)

    def encode_text(self, input_ids: torch.Tensor) -> torch.Tensor:
        """The denoiser's conditioning [B, T, D] (models/generators/generator_spec.py) from tokenize's ids."""
        pieces = input_ids.split(self.token_lengths(), dim=1)
        outputs = [
            encoder(ids.to(encoder.device), output_hidden_states=True)
            for encoder, ids in zip(self.text_encoders, pieces, strict=True)
        ]
        return self.spec.conditioning(self, outputs)

    def encode_token_embeddings(
        self, token_embeds: Sequence[torch.Tensor], eos_positions: Sequence[torch.Tensor | None]
    ) -> torch.Tensor:
        """encode_text on token embeddings instead of ids: one [B, T_i, D_i] per text encoder (a soft caption
        through the vocabulary bridge), differentiable with respect to them.

        Each encoder runs its own forward with its token-embedding layer's output swapped for the given
        embeddings (CLIPTextModel takes no inputs_embeds): position embeddings, masks, attention backend and
        final norms are exactly those of encode_text, which this equals bit for bit when the embeddings are
        the embedding rows of tokenize's ids. `eos_positions` [B] says where each row's eos sits for encoders
        whose pooled output is read at the eos (CLIP), None for the others.
        """
        if len(token_embeds) != len(self.text_encoders) or len(eos_positions) != len(token_embeds):
            raise ValueError(
                f"{self.spec.name} has {len(self.text_encoders)} text encoders; got {len(token_embeds)} "
                f"embeddings and {len(eos_positions)} eos positions"
            )
        outputs = [
            _run_on_embeddings(encoder, embeds, eos)
            for encoder, embeds, eos in zip(self.text_encoders, token_embeds, eos_positions, strict=True)
        ]
        return self.spec.conditioning(self, outputs)

    def encode_captions(self, captions: Sequence[str]) -> torch.Tensor:
        """encode_text(tokenize(captions)); served by the encoder cache when its text side is on."""
        if self.encoder_cache is not None and self.encoder_cache.text:
            return self.encoder_cache.text_states(self, captions)
        return self.encode_text(self.tokenize(list(captions)))

    def encode_images(self, pixels01: torch.Tensor, noise: torch.Tensor | None = None) -> torch.Tensor:
        """Float32 latents; `noise` draws from the VAE posterior reproducibly (None -> its mean).

        In pixel space the image is its own deterministic latent, so `noise` is ignored there.
        """
        if self.vae is None:
            return self.preprocess(pixels01).float()
        return self.latents_from_distribution(*self.latent_distribution(pixels01), noise)

    def latent_distribution(self, pixels01: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """The VAE posterior's mean and std (in the VAE's dtype): what the encoder cache keeps per image."""
        if self.vae is None:
            raise ValueError("a pixel-space generator (no VAE) has no latent distribution")
        posterior = self.vae.encode(
            self.preprocess(pixels01).to(_first_parameter(self.vae).dtype)
        ).latent_dist
        return posterior.mean, posterior.std

    def latents_from_distribution(
        self, mean: torch.Tensor, std: torch.Tensor, noise: torch.Tensor | None
    ) -> torch.Tensor:
        """Float32 latents (mean + std * noise - shift) * scale (None -> the mean), with the VAE's own shift
        (SD3, Flux) and scale; shared by fresh and cached posteriors."""
        latents = mean.float()
        if noise is not None:
            if noise.shape != latents.shape:
                raise ValueError(
                    f"vae_noise shape {tuple(noise.shape)} != latent shape {tuple(latents.shape)}"
                )
            latents = latents + std.float() * noise.to(latents)
        shift = self.vae.config.shift_factor or 0.0
        return (latents - shift) * self.vae.config.scaling_factor

    def data_latents(
        self, pixels01: torch.Tensor, noise: torch.Tensor | None, ids: Sequence[str] | None = None
    ) -> torch.Tensor:
        """Latents of training images, with no graph unless the pixels or the VAE need a gradient.

        With `ids` naming the images and the encoder cache's image side on, the posteriors come from the cache.
        """
        needs_grad = pixels01.requires_grad or (
            self.vae is not None and any(p.requires_grad for p in self.vae.parameters())
        )
        cache = self.encoder_cache
        if cache is not None and cache.images and ids is not None and not needs_grad:
            return cache.image_latents(self, pixels01, ids, noise)
        with nullcontext() if needs_grad else torch.no_grad():
            return self.encode_images(pixels01, noise)

    def decode_latents(self, latents: torch.Tensor) -> torch.Tensor:
        """Differentiable decode to pixels01 in at least float32 (a float64 model stays float64), clamped, so
        gradients stop outside [0, 1]."""
        if self.vae is None:
            pixels = latents
        else:
            shift = self.vae.config.shift_factor or 0.0
            scaled = latents / self.vae.config.scaling_factor + shift
            pixels = self.vae.decode(scaled.to(_first_parameter(self.vae).dtype)).sample
        pixels = pixels.to(torch.promote_types(pixels.dtype, torch.float32))
        return (pixels / 2 + 0.5).clamp(0, 1)

    def predict(
        self, noisy: torch.Tensor, timesteps: torch.Tensor, conditioning: torch.Tensor
    ) -> torch.Tensor:
        """One denoiser call (the family's spec knows its inputs), in the denoiser's dtype."""
        return self.spec.predict(self, noisy.to(self.dtype), timesteps, conditioning.to(self.dtype))

    def denoise_loss(
        self,
        pixels01: torch.Tensor,
        input_ids: torch.Tensor,
        *,
        noise: torch.Tensor,
        timesteps: torch.Tensor,
        vae_noise: torch.Tensor | None = None,
        snr_gamma: float | None = None,
    ) -> torch.Tensor:
        """Per-sample denoising loss [B] on ground-truth pairs; callers own all randomness."""
        return self.denoise(
            self.data_latents(pixels01, vae_noise),
            self.encode_text(input_ids),
            noise=noise,
            timesteps=timesteps,
            snr_gamma=snr_gamma,
        ).loss

    def denoise(
        self,
        latents: torch.Tensor,
        conditioning: torch.Tensor,
        *,
        noise: torch.Tensor,
        timesteps: torch.Tensor,
        snr_gamma: float | None = None,
    ) -> DenoiseOutput:
        """One denoiser call on given latents and conditioning: the per-sample float32 MSE over C, H, W
        against the process's target, weighted as the process weights it (Min-SNR, flow-matching schemes),
        with the call's input and output kept.

        Split from `denoise_loss` so a caller with its own conditioning (soft tokens) reuses the exact loss,
        and a cycle term can decode the same call's prediction (cycle.t2i2t.share_denoise_pass).
        """
        # At least float32 (a bf16 model still gets a float32 loss); a float64 model stays float64 (gradcheck).
        latents = latents.to(
            torch.promote_types(torch.promote_types(latents.dtype, self.dtype), torch.float32)
        )
        if noise.shape != latents.shape:
            raise ValueError(f"noise shape {tuple(noise.shape)} != latent shape {tuple(latents.shape)}")
        noise = noise.to(latents)
        timesteps = timesteps.to(latents.device)
        noisy = self.process.add_noise(latents, noise, timesteps)
        prediction = self.predict(noisy, timesteps, conditioning)
        target = self.process.target(latents, noise, timesteps)
        loss = F.mse_loss(prediction.to(latents.dtype), target, reduction="none").mean(dim=(1, 2, 3))
        weights = self.process.loss_weights(timesteps, snr_gamma)
        if weights is not None:
            loss = loss * weights
        return DenoiseOutput(loss, noisy, prediction)

    def predict_x0(
        self, noisy: torch.Tensor, timesteps: torch.Tensor, prediction: torch.Tensor
    ) -> torch.Tensor:
        """The clean latents implied by one prediction at `timesteps` (inverts add_noise), in float32.

        One-step cycle losses decode this estimate instead of the clean latents, so the gradient reaches
        the denoiser output the way it would at sampling time.
        """
        return self.process.predict_x0(noisy, timesteps, prediction)

    def pipeline(self, **replaced: Any) -> DiffusionPipeline:
        """The family's diffusers pipeline around these parts (shared, not copied), the sampling scheduler
        as its scheduler; `replaced` swaps parts (copies for an export)."""
        parts = {name: getattr(self, name) for name in self.spec.components}
        parts |= {"vae": self.vae, "scheduler": self.sampling_scheduler}
        return self.spec.pipeline(parts | self.pipeline_settings | replaced)


def _run_on_embeddings(
    encoder: PreTrainedModel, token_embeds: torch.Tensor, eos_positions: torch.Tensor | None
) -> Any:
    """The encoder's forward on token embeddings [B, T, D] in place of its embedding layer's output.

    An encoder that takes inputs_embeds (T5) gets them; CLIPTextModel takes none, so its embedding layer's
    output is swapped for them by a hook, and the ids it is called with are placeholders: 0, with the eos id at
    `eos_positions`, so that it pools where the soft caption ends. Gradients flow into token_embeds.
    """
    token_embedding = encoder.get_input_embeddings()
    if token_embeds.ndim != 3 or token_embeds.shape[-1] != token_embedding.embedding_dim:
        raise ValueError(
            f"token_embeds must be [B, T, {token_embedding.embedding_dim}], got {tuple(token_embeds.shape)}"
        )
    if "inputs_embeds" in inspect.signature(encoder.forward).parameters:
        return encoder(inputs_embeds=token_embeds, output_hidden_states=True)
    device = token_embedding.weight.device
    placeholder_ids = torch.zeros(token_embeds.shape[:2], dtype=torch.long, device=device)
    if eos_positions is not None:
        rows = torch.arange(len(placeholder_ids), device=device)
        placeholder_ids[rows, eos_positions.to(device)] = encoder.config.eos_token_id

    def substitute(
        module: torch.nn.Module, inputs: tuple[torch.Tensor, ...], output: torch.Tensor
    ) -> torch.Tensor:
        return token_embeds.to(device=output.device, dtype=output.dtype)

    handle = token_embedding.register_forward_hook(substitute)
    try:
        return encoder(placeholder_ids, output_hidden_states=True)
    finally:
        handle.remove()


def _load_part(
    name_or_path: str,
    model_index: dict[str, Any],
    name: str,
    *,
    revision: str | None,
    torch_dtype: torch.dtype | None,
) -> Any:
    """One pipeline part by the class model_index.json names, from diffusers or transformers only (no code
    from the checkpoint runs); weights in `torch_dtype`, tokenizers as they are."""
    library, class_name = model_index[name]
    part_class = (
        getattr(importlib.import_module(library), class_name, None) if library in _PART_LIBRARIES else None
    )
    if part_class is None:
        raise ValueError(
            f"{name_or_path!r}: model_index.json {name} is {library}.{class_name}, not a class of "
            f"{' or '.join(_PART_LIBRARIES)}"
        )
    kwargs: dict[str, Any] = {"subfolder": name, "revision": revision}
    if issubclass(part_class, ModelMixin):
        kwargs["torch_dtype"] = torch_dtype
    elif issubclass(part_class, PreTrainedModel):
        kwargs.update(dtype=torch_dtype, **WITHOUT_HUB_KERNELS)
    return part_class.from_pretrained(name_or_path, **kwargs)


def _names_component(model_index: dict[str, Any], name: str) -> bool:
    """model_index.json lists absent parts as [null, null] (or not at all)."""
    entry = model_index.get(name)
    return isinstance(entry, (list, tuple)) and len(entry) == 2 and entry[1] is not None


def _first_parameter(module: torch.nn.Module) -> torch.nn.Parameter:
    """Where diffusers' ModelMixin.device / .dtype walk every submodule on each call (~0.4 ms on CPU, several
    times a step), the first parameter answers the same in microseconds."""
    return next(module.parameters())


def _vae_scale_factor(vae: AutoencoderKL | None) -> int:
    """Pixels per latent cell along one side: each VAE down block halves the image; pixel space is 1."""
    return 1 if vae is None else 2 ** (len(vae.config.block_out_channels) - 1)
