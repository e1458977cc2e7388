"""Text-to-image wrapper around Stable-Diffusion-family parts (UNet, CLIP text encoder, optional VAE).

It exposes the pieces the cycle losses need separately (tokenize, encode, noise, denoise, decode) so that
gradients can flow from a decoded image into a captioner, or from soft tokens into the text encoder.
`forward(fn)` runs a whole training computation under a DDP wrapper (models/forward_routing.py). Sampling
(the DDIM loop, CFG, the checkpoint's own sampler) is in models/image_sampling.py, mixed into Generator.
"""

from __future__ import annotations

from collections.abc import Sequence
from contextlib import nullcontext
from typing import TYPE_CHECKING, Any, NamedTuple

import torch
import torch.nn.functional as F
from diffusers import (
    AutoencoderKL,
    DDPMScheduler,
    DiffusionPipeline,
    SchedulerMixin,
    StableDiffusionPipeline,
    UNet2DConditionModel,
)
from diffusers.training_utils import compute_snr
from transformers import CLIPTextModel, CLIPTokenizer

from models.device_transfer import to_device
from models.forward_routing import RunsInForward
from models.image_sampling import ImageSampling, checkpoint_sampler

if TYPE_CHECKING:
    from models.cache import FrozenEncoderCache

PREDICTION_TYPES = ("epsilon", "v_prediction")
REQUIRED_COMPONENTS = ("unet", "text_encoder", "tokenizer", "scheduler")


class DenoiseOutput(NamedTuple):
    """One denoising UNet call: per-sample loss [B], the noised latents it saw, and its raw prediction."""

    loss: torch.Tensor
    noisy: torch.Tensor
    prediction: torch.Tensor


class Generator(ImageSampling, RunsInForward):
    """Latent (with a VAE) or pixel-space (without) text-to-image diffusion model with a DDPM loss."""

    def __init__(
        self,
        *,
        unet: UNet2DConditionModel,
        text_encoder: CLIPTextModel,
        tokenizer: CLIPTokenizer,
        vae: AutoencoderKL | None,
        noise_scheduler: DDPMScheduler,
        sampling_scheduler: SchedulerMixin,
        resolution: int,
    ) -> None:
        """noise_scheduler is the forward process training draws from; sampling_scheduler the checkpoint's
        own sampler, kept for the pipelines exported from this model (sampling here always runs DDIM)."""
        super().__init__()
        self.unet = unet
        self.text_encoder = text_encoder
        self.tokenizer = tokenizer
        self.vae = vae
        self.noise_scheduler = noise_scheduler
        self.sampling_scheduler = sampling_scheduler
        prediction_type = noise_scheduler.config.prediction_type
        if prediction_type not in PREDICTION_TYPES:
            raise ValueError(
                f"scheduler prediction_type {prediction_type!r} is not one of {PREDICTION_TYPES}"
            )
        if resolution <= 0 or resolution % self.vae_scale_factor:
            raise ValueError(
                f"resolution {resolution} is not a positive multiple of the VAE scale {self.vae_scale_factor}"
            )
        self.resolution = resolution
        # Set by the trainer (train/builders.build_encoder_cache) where reusing frozen encoders is valid.
        self.encoder_cache: FrozenEncoderCache | None = None

    @classmethod
    def from_pretrained(
        cls,
        name_or_path: str,
        *,
        resolution: int | None = None,
        prediction_type: str | None = None,
        revision: str | None = None,
        torch_dtype: torch.dtype | None = None,
    ) -> Generator:
        """Load a hub id or local folder in the StableDiffusionPipeline layout; no VAE means pixel space.

        `prediction_type` overrides the saved scheduler's, as diffusers' trainers do, e.g. to finetune an
        epsilon model into a v-prediction one; it applies to both the training and the sampling scheduler.
        """
        model_index = DiffusionPipeline.load_config(name_or_path, revision=revision)
        missing = [name for name in REQUIRED_COMPONENTS if not _names_component(model_index, name)]
        if missing:
            raise ValueError(f"model_index.json of {name_or_path!r} names no {', '.join(missing)}")
        if prediction_type is not None and prediction_type not in PREDICTION_TYPES:
            raise ValueError(f"prediction_type {prediction_type!r} is not one of {PREDICTION_TYPES}")

        def load(component_cls: Any, subfolder: str, **kwargs: Any) -> Any:
            return component_cls.from_pretrained(
                name_or_path, subfolder=subfolder, revision=revision, **kwargs
            )

        vae = None
        if _names_component(model_index, "vae"):
            vae_class = model_index["vae"][1]
            if vae_class != AutoencoderKL.__name__:
                raise ValueError(
                    f"{name_or_path!r}: vae class {vae_class!r} is not supported (AutoencoderKL)"
                )
            vae = load(AutoencoderKL, "vae", torch_dtype=torch_dtype)
        # Whatever sampler the checkpoint ships (PNDM for SD 1.x), training needs the DDPM forward process.
        overrides = {} if prediction_type is None else {"prediction_type": prediction_type}
        noise_scheduler = load(DDPMScheduler, "scheduler", **overrides)
        sampling_scheduler = checkpoint_sampler(
            name_or_path, model_index, revision=revision, prediction_type=prediction_type
        )
        unet = load(UNet2DConditionModel, "unet", torch_dtype=torch_dtype)
        if resolution is None:
            sample_size = unet.config.sample_size
            if not isinstance(sample_size, int):
                raise ValueError(
                    f"{name_or_path!r}: unet sample_size {sample_size!r} is not square; pass resolution"
                )
            resolution = sample_size * _vae_scale_factor(vae)
        return cls(
            unet=unet,
            text_encoder=load(CLIPTextModel, "text_encoder", dtype=torch_dtype),
            tokenizer=load(CLIPTokenizer, "tokenizer"),
            vae=vae,
            noise_scheduler=noise_scheduler,
            sampling_scheduler=sampling_scheduler,
            resolution=resolution,
        )

    @property
    def device(self) -> torch.device:
        return _first_parameter(self.unet).device

    @property
    def dtype(self) -> torch.dtype:
        """The UNet's base weight dtype (the frozen weights come first; LoRA tensors are fp32)."""
        return _first_parameter(self.unet).dtype

    @property
    def prediction_type(self) -> str:
        return self.noise_scheduler.config.prediction_type

    @property
    def vae_scale_factor(self) -> int:
        return _vae_scale_factor(self.vae)

    def latent_shape(self, batch_size: int) -> tuple[int, int, int, int]:
        side = self.resolution // self.vae_scale_factor
        return (batch_size, self.unet.config.in_channels, side, side)

    def preprocess(self, pixels01: torch.Tensor) -> torch.Tensor:
        """Resize (antialiased, differentiable) to the model resolution and map [0, 1] to [-1, 1]."""
        if pixels01.ndim != 4 or pixels01.shape[1] != 3:
            raise ValueError(f"expected pixels of shape [B, 3, H, W], got {tuple(pixels01.shape)}")
        if pixels01.shape[-2:] != (self.resolution, self.resolution):
            pixels01 = F.interpolate(
                pixels01, size=(self.resolution, self.resolution), mode="bilinear", antialias=True
            )
        return pixels01 * 2 - 1

    def tokenize(self, captions: list[str]) -> torch.Tensor:
        """Pad and truncate as StableDiffusionPipeline does, so prompts embed the same here and there."""
        if isinstance(captions, str):
            raise TypeError("tokenize expects a list of captions, got a single str")
        # A tokenizer saved without model_max_length reports a huge sentinel; encoder positions bound it.
        max_length = min(self.tokenizer.model_max_length, self.text_encoder.config.max_position_embeddings)
        tokens = self.tokenizer(
            list(captions), padding="max_length", max_length=max_length, truncation=True, return_tensors="pt"
        )
        return to_device(tokens.input_ids, self.device)

    def encode_text(self, input_ids: torch.Tensor) -> torch.Tensor:
        """Last hidden state of the text encoder: the UNet's cross-attention context, as in SD."""
        return self.text_encoder(input_ids.to(self.text_encoder.device))[0]

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
        """Scaled float32 latents mean + std * noise (None -> the mean); shared by fresh and cached posteriors."""
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
        """Differentiable decode to float32 pixels01 (clamped, so gradients stop outside [0, 1])."""
        if self.vae is None:
            pixels = latents.float()
        else:
            shift = self.vae.config.shift_factor or 0.0
            scaled = latents / self.vae.config.scaling_factor + shift
            pixels = self.vae.decode(scaled.to(_first_parameter(self.vae).dtype)).sample.float()
        return (pixels / 2 + 0.5).clamp(0, 1)

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
        encoder_hidden_states: torch.Tensor,
        *,
        noise: torch.Tensor,
        timesteps: torch.Tensor,
        snr_gamma: float | None = None,
    ) -> DenoiseOutput:
        """One denoising UNet call on given latents and text context: the per-sample float32 MSE over C, H, W
        against the scheduler's target (optionally Min-SNR weighted), with the call's input and output kept.

        Split from `denoise_loss` so a caller with its own text context (soft tokens) reuses the exact loss,
        and a cycle term can decode the same call's prediction (cycle.t2i2t.share_denoise_pass).
        """
        # At least float32 (a bf16 UNet still gets a float32 loss); a float64 model stays float64 (gradcheck).
        latents = latents.to(
            torch.promote_types(torch.promote_types(latents.dtype, self.unet.dtype), torch.float32)
        )
        if noise.shape != latents.shape:
            raise ValueError(f"noise shape {tuple(noise.shape)} != latent shape {tuple(latents.shape)}")
        noise = noise.to(latents)
        timesteps = timesteps.to(latents.device)
        noisy = self.noise_scheduler.add_noise(latents, noise, timesteps)
        prediction = self.unet(noisy.to(self.dtype), timesteps, encoder_hidden_states.to(self.dtype)).sample
        if self.prediction_type == "epsilon":
            target = noise
        else:
            target = self.noise_scheduler.get_velocity(latents, noise, timesteps)
        loss = F.mse_loss(prediction.to(latents.dtype), target, reduction="none").mean(dim=(1, 2, 3))
        if snr_gamma is not None:
            loss = loss * self._min_snr_weights(timesteps, snr_gamma)
        return DenoiseOutput(loss, noisy, prediction)

    def _min_snr_weights(self, timesteps: torch.Tensor, snr_gamma: float) -> torch.Tensor:
        """Min-SNR-gamma (Hang et al. 2023) in the form of diffusers' trainers.

        epsilon: min(snr, gamma) / snr, written as min(gamma / snr, 1) so a zero-terminal-SNR step gives 1
        instead of 0/0; v-prediction: min(snr, gamma) / (snr + 1).
        """
        snr = compute_snr(self.noise_scheduler, timesteps)
        if self.prediction_type == "epsilon":
            return (snr_gamma / snr).clamp(max=1.0)
        return snr.clamp(max=snr_gamma) / (snr + 1)

    def predict_x0(
        self, noisy: torch.Tensor, timesteps: torch.Tensor, prediction: torch.Tensor
    ) -> torch.Tensor:
        """The clean latents implied by one UNet prediction at `timesteps` (inverts add_noise), in float32.

        One-step cycle losses decode this estimate instead of the clean latents, so the gradient reaches
        the UNet output the way it would at sampling time.
        """
        timesteps = timesteps.to(self.noise_scheduler.alphas_cumprod.device)
        alpha_bar = self.noise_scheduler.alphas_cumprod[timesteps].to(noisy.device, torch.float32)
        alpha_bar = alpha_bar.view(-1, *([1] * (noisy.ndim - 1)))
        noisy, prediction = noisy.float(), prediction.float()
        if self.prediction_type == "epsilon":
            return (noisy - (1 - alpha_bar).sqrt() * prediction) / alpha_bar.sqrt()
        return alpha_bar.sqrt() * noisy - (1 - alpha_bar).sqrt() * prediction


def stable_diffusion_pipeline(
    *,
    vae: AutoencoderKL | None,
    text_encoder: CLIPTextModel,
    tokenizer: CLIPTokenizer,
    unet: UNet2DConditionModel,
    scheduler: Any,
) -> StableDiffusionPipeline:
    """A StableDiffusionPipeline around existing parts (shared, not copied), with no safety checker: the
    folder layout users load, and the object whose LoRA loaders they call."""
    return StableDiffusionPipeline(
        vae=vae,
        text_encoder=text_encoder,
        tokenizer=tokenizer,
        unet=unet,
        scheduler=scheduler,
        safety_checker=None,
        feature_extractor=None,
        requires_safety_checker=False,
    )


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
