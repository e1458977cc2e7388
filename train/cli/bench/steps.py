"""The steps the bench times: the trainer's own phase step, and the bare diffusers-style baseline step."""

from __future__ import annotations

from collections.abc import Callable
from functools import partial
from typing import Any

import torch
import torch.nn.functional as F
from accelerate import Accelerator
from diffusers import AutoencoderKL, DDPMScheduler, UNet2DConditionModel
from peft import LoraConfig, inject_adapter_in_model
from transformers import CLIPTextModel, CLIPTokenizer

from cycletune.data.mixer import BatchMixer
from cycletune.models.generators.stable_diffusion import StableDiffusionSpec
from cycletune.models.hub_kernels import WITHOUT_HUB_KERNELS
from cycletune.train.builders import (
    BASE_DTYPES,
    build_streams,
)
from cycletune.train.cli.bench.measure import timed
from cycletune.train.cli.bench.stats_ratios import median
from cycletune.train.config import Config
from cycletune.train.run import build_run
from cycletune.train.step import batch_to_device, phase_step


def fixed_batch(config: Config, phase: str) -> dict[str, Any]:
    """The first paired batch of the config's data, through the trainer's streams and mixer."""
    streams, _ = build_streams(config, rank=0, world_size=1)
    return BatchMixer(streams, image_only_ratio=0.0, text_only_ratio=0.0).next(phase, 0.0)


class TrainerStep:
    """One optimizer update of a phase exactly as train/cycle.py runs it, on a fixed batch, fresh draws each time.

    `on_stage` (if set) is called with "forward", "backward", "update" and "done" as the step moves on: the
    profiler uses it to split the step.
    """

    def __init__(self, config: Config, phase: str, device: str) -> None:
        self.config, self.phase, self.steps_done = config, phase, 0
        self.accelerator = Accelerator(mixed_precision=config.mixed_precision, cpu=device == "cpu")
        self.run = build_run(config, self.accelerator)  # the trainer's own build: models, optimizers, bridge
        self.batch = batch_to_device(fixed_batch(config, phase), self.accelerator.device)
        self.generator = self.accelerator.unwrap_model(self.run.models["generator"])
        self.captioner = self.accelerator.unwrap_model(self.run.models["captioner"])
        self.on_stage: Callable[[str], None] = lambda stage: None

    def step(self) -> None:
        result = phase_step(
            self.accelerator,
            self.phase,
            models=self.run.models,
            optimizer=self.run.parts.optimizers[self.phase],
            scheduler=self.run.parts.schedulers[self.phase],
            next_batch=lambda key: self.batch,
            config=self.config,
            step=self.steps_done,
            bridge=self.run.bridge,
            caption_scorer=self.run.caption_scorer,
            on_stage=self.on_stage,
        )
        self.logged = {name: float(value) for name, value in result.terms.items()}
        self.steps_done += 1

    def extra(self) -> dict[str, Any]:
        cache = self.generator.encoder_cache
        return {"cache": cache.stats() if cache is not None else None, "terms": self.logged}


class BareGeneratorStep:
    """The compute floor: the diffusers LoRA recipe in bare torch + peft, on the trainer's model and batch.

    Pre-tokenized captions (a dataloader's job), no caption dropout, global-RNG noise, frozen weights in the
    run's precision with fp32 adapters, AdamW with the trainer's settings, real clipping, and the one loss
    .item() a training loop needs for its log.
    """

    def __init__(self, config: Config, device: str) -> None:
        settings, path = config.generator, config.generator.pretrained_model_name_or_path
        self.dtype = BASE_DTYPES[config.mixed_precision]
        self.device = torch.device(device)
        self.vae = AutoencoderKL.from_pretrained(path, subfolder="vae", torch_dtype=self.dtype).to(device)
        self.text_encoder = CLIPTextModel.from_pretrained(
            path, subfolder="text_encoder", dtype=self.dtype, **WITHOUT_HUB_KERNELS
        ).to(device)
        self.unet = UNet2DConditionModel.from_pretrained(path, subfolder="unet", torch_dtype=self.dtype).to(
            device
        )
        for module in (self.vae, self.text_encoder, self.unet):
            module.requires_grad_(False)
        lora = LoraConfig(
            r=settings.lora.rank,
            lora_alpha=settings.lora.alpha,
            init_lora_weights="gaussian",
            target_modules=StableDiffusionSpec.lora_targets,
        )
        self.unet = inject_adapter_in_model(lora, self.unet)
        self.params = [param for param in self.unet.parameters() if param.requires_grad]
        for param in self.params:
            param.data = param.data.float()
        opt = settings.optimizer
        self.optimizer = torch.optim.AdamW(
            self.params,
            lr=opt.learning_rate,
            betas=(opt.adam_beta1, opt.adam_beta2),
            weight_decay=opt.adam_weight_decay,
            eps=opt.adam_epsilon,
        )
        self.max_grad_norm = opt.max_grad_norm
        self.noise_scheduler = DDPMScheduler.from_pretrained(path, subfolder="scheduler")
        tokenizer = CLIPTokenizer.from_pretrained(path, subfolder="tokenizer")
        batch = fixed_batch(config, "generator")
        self.pixel_values = (batch["pixels"] * 2 - 1).to(device, self.dtype)
        self.input_ids = tokenizer(
            batch["captions"],
            padding="max_length",
            max_length=tokenizer.model_max_length,
            truncation=True,
            return_tensors="pt",
        ).input_ids.to(device)
        self.autocast = partial(
            torch.autocast, self.device.type, self.dtype, enabled=self.dtype != torch.float32
        )

    def _encode(self) -> tuple[torch.Tensor, torch.Tensor]:
        """The frozen encoders' part of a step: sampled latents and text states."""
        with self.autocast(), torch.no_grad():
            latents = self.vae.encode(self.pixel_values).latent_dist.sample() * self.vae.config.scaling_factor
            return latents, self.text_encoder(self.input_ids)[0]

    def step(self) -> None:
        latents, states = self._encode()
        with self.autocast():
            noise = torch.randn_like(latents)
            timesteps = torch.randint(
                0, self.noise_scheduler.config.num_train_timesteps, (latents.shape[0],), device=self.device
            )
            noisy = self.noise_scheduler.add_noise(latents, noise, timesteps)
            prediction = self.unet(noisy, timesteps, states).sample
        loss = F.mse_loss(prediction.float(), noise.float())
        loss.backward()
        torch.nn.utils.clip_grad_norm_(self.params, self.max_grad_norm)
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        self.logged = {"loss": loss.item()}

    def extra(self) -> dict[str, Any]:
        """The loss, and the encoders' median time: the most that caching them can save per step."""
        encoder_seconds = [timed(self._encode, str(self.device)) for _ in range(7)]
        return {"terms": self.logged, "encoders_ms": 1000 * median(encoder_seconds)}
