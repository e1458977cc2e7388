"""`make bench`: time every phase and cycle mode through the trainer's own code, beside a bare baseline.

    python -m train.bench                      # CPU: tiny + small architectures, ~4 minutes on 2 cores
    python -m train.bench --archs tiny --modes generator --pairs 5   # a quick look

Each mode runs in its own worker process (a process's peak RSS never goes down), which builds the models and
a fixed, seeded batch, warms up, and then times one optimizer update per request: the phase function run as
the trained model's forward, accelerator.backward and optimizer_update, as train/cycle.py does. A second
worker runs the baseline, a supervised generator step written with bare torch + peft on the same model,
batch, LoRA targets, optimizer and real gradient clipping (the compute floor). The orchestrator alternates
single steps of the two in random order, so every figure comes with its ratio to a baseline measured at the
same moment on the same (possibly shared) machine.

Also measured: the frozen-encoder cache on vs off, where the time of each cycle mode goes (per-component
forward and backward), the cost of likelihood reward scoring vs sampling + image similarity and how well
their rankings agree, and, with CUDA, bf16 SD 1.5- and BLIP-base-architecture models with MFU. Results are
printed as a table and written as JSON to runs/bench/.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import math
import multiprocessing
import os
import platform
import random
import resource
import sys
import time
from collections import defaultdict
from collections.abc import Callable, Iterator, Sequence
from dataclasses import asdict, dataclass
from datetime import datetime, timezone
from functools import partial
from multiprocessing.connection import Connection
from multiprocessing.context import BaseContext
from pathlib import Path
from typing import Any

import accelerate
import diffusers
import numpy as np
import peft
import torch
import torch.nn.functional as F
import transformers
from accelerate import Accelerator
from diffusers import AutoencoderKL, DDPMScheduler, UNet2DConditionModel
from peft import LoraConfig, inject_adapter_in_model
from scipy import stats
from torch.utils.flop_counter import FlopCounterMode
from transformers import (
    BlipConfig,
    BlipForConditionalGeneration,
    CLIPTextConfig,
    CLIPTextModel,
    CLIPTokenizer,
)

from data.mixer import BatchMixer
from data.sources import shapes as shapes_source
from data.streams import Stream
from models.generator import Generator
from models.lora import GENERATOR_LORA_TARGETS
from models.randomness import DrawKey
from models.scoring import caption_scores
from models.tiny import save_tiny_captioner, save_tiny_generator
from train.builders import (
    BASE_DTYPES,
    build_bridge,
    build_captioner,
    build_encoder_cache,
    build_generator,
    build_lr_scheduler,
    build_optimizer,
    build_streams,
)
from train.config import Config, load_config
from train.step import batch_to_device, phase_step

REPO = Path(__file__).resolve().parents[1]
# bf16 dense throughput measured on this workplace's H100 (the MFU denominator).
H100_BF16_FLOPS = 790e12
CYCLE_COST_LIMIT = 1.6
FRAMEWORK_RATIO_FLOOR = 0.95
CACHE_SPEEDUP_TARGET = 1.25


# ------------------------------------------------------------------------------------------ architectures


@dataclass(frozen=True)
class Architecture:
    """Models and batch shape of one benchmark row group; `device` and `precision` as the trainer takes them."""

    name: str
    resolution: int
    batch_size: int
    device: str = "cpu"
    precision: str = "no"
    description: str = ""


CPU_ARCHITECTURES = {
    "tiny": Architecture(
        "tiny",
        resolution=32,
        batch_size=4,
        description="UNet (32,64) 1 layer/block, attention at 64 ch, xattn 32 (0.99M), VAE (32,64), "
        "CLIP text 32x5, BLIP 32x2, 32 px",
    ),
    "small": Architecture(
        "small",
        resolution=64,
        batch_size=4,
        description="UNet (64,128,256) 2 layers/block xattn 128 (17.8M), VAE (32,64), CLIP text 128x2, "
        "BLIP 128x2, 64 px",
    ),
}
GPU_ARCHITECTURE = Architecture(
    "sd15-blip-base",
    resolution=512,
    batch_size=8,
    device="cuda",
    precision="bf16",
    description="SD 1.5 UNet/VAE/CLIP-L text at 512 px + BLIP-base at 384 px, random weights, bf16",
)
# The shapes demo's committed base generator (make base), scored by the reward-cost comparison.
SHAPES_BASE_GENERATOR = REPO / "pretrained" / "shapes-base" / "generator"
ARCHITECTURES = {**CPU_ARCHITECTURES, GPU_ARCHITECTURE.name: GPU_ARCHITECTURE}


def _replace_generator_parts(folder: Path, *, unet: dict, vae: dict, text: dict) -> None:
    """Overwrite a tiny generator folder's UNet, VAE and text encoder with other sizes (tokenizer and scheduler
    stay), each saved with save_pretrained as diffusers / transformers would."""
    saved_text = CLIPTextConfig.from_pretrained(folder / "text_encoder")
    text_config = CLIPTextConfig(
        **{key: getattr(saved_text, key) for key in ("bos_token_id", "eos_token_id", "pad_token_id")},
        max_position_embeddings=saved_text.max_position_embeddings,
        **text,
    )
    text_config.vocab_size = max(text_config.vocab_size, saved_text.vocab_size)
    with torch_seed(0):
        CLIPTextModel(text_config).save_pretrained(folder / "text_encoder")
        UNet2DConditionModel(cross_attention_dim=text_config.hidden_size, **unet).save_pretrained(
            folder / "unet"
        )
        AutoencoderKL(**vae).save_pretrained(folder / "vae")


def _replace_captioner_model(folder: Path, *, vision: dict, text: dict) -> None:
    """Overwrite a tiny captioner folder's BLIP weights with another size; its processor and tokenizer stay."""
    saved = BlipConfig.from_pretrained(folder).text_config
    special = {
        key: getattr(saved, key) for key in ("bos_token_id", "pad_token_id", "sep_token_id", "eos_token_id")
    }
    config = BlipConfig(
        vision_config={**vision, "initializer_range": 0.02},
        text_config={**special, **text, "vocab_size": max(text.get("vocab_size", 0), saved.vocab_size)},
        projection_dim=text["hidden_size"],
        image_text_hidden_size=text["hidden_size"],
    )
    with torch_seed(0):
        BlipForConditionalGeneration(config).save_pretrained(folder)


@contextlib.contextmanager
def torch_seed(seed: int) -> Iterator[None]:
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        yield


def _vae_config(channels: tuple[int, ...], *, layers: int, resolution: int) -> dict:
    return {
        "block_out_channels": channels,
        "down_block_types": ("DownEncoderBlock2D",) * len(channels),
        "up_block_types": ("UpDecoderBlock2D",) * len(channels),
        "layers_per_block": layers,
        "latent_channels": 4,
        "norm_num_groups": 32,
        "sample_size": resolution,
    }


def _unet_config(
    channels: tuple[int, ...], *, layers: int, attention: tuple[bool, ...], latent_size: int
) -> dict:
    """UNet2DConditionModel arguments; attention[i] says whether level i (high resolution first) cross-attends."""
    return {
        "sample_size": latent_size,
        "layers_per_block": layers,
        "block_out_channels": channels,
        "down_block_types": tuple("CrossAttnDownBlock2D" if on else "DownBlock2D" for on in attention),
        "up_block_types": tuple("CrossAttnUpBlock2D" if on else "UpBlock2D" for on in reversed(attention)),
    }


def _save_generator(folder: Path, resolution: int, *, unet: dict, vae: dict, text: dict) -> Path:
    """A tiny generator folder (tokenizer, scheduler) whose UNet, VAE and text encoder get the given sizes."""
    generator = save_tiny_generator(folder, resolution=resolution)
    _replace_generator_parts(generator, unet=unet, vae=vae, text=text)
    return generator


def _save_tiny(out_dir: Path) -> tuple[Path, Path]:
    """A 0.99M-parameter SD UNet with diffusers' fast-test VAE and CLIP text encoder (77-token captions)."""
    resolution = CPU_ARCHITECTURES["tiny"].resolution
    generator = _save_generator(
        out_dir / "generator",
        resolution,
        unet=_unet_config((32, 64), layers=1, attention=(False, True), latent_size=resolution // 2),
        vae=_vae_config((32, 64), layers=1, resolution=resolution),
        text={"hidden_size": 32, "intermediate_size": 37, "num_hidden_layers": 5, "num_attention_heads": 4},
    )
    return save_tiny_captioner(out_dir / "captioner"), generator


def _save_small(out_dir: Path) -> tuple[Path, Path]:
    resolution = CPU_ARCHITECTURES["small"].resolution
    unet = _unet_config((64, 128, 256), layers=2, attention=(True, True, False), latent_size=resolution // 2)
    generator = _save_generator(
        out_dir / "generator",
        resolution,
        unet={**unet, "attention_head_dim": 8},
        vae=_vae_config((32, 64), layers=1, resolution=resolution),
        text={"hidden_size": 128, "intermediate_size": 512, "num_hidden_layers": 2, "num_attention_heads": 2},
    )
    captioner = save_tiny_captioner(out_dir / "captioner", image_size=resolution, hidden_size=128)
    return captioner, generator


def _save_sd15_blip_base(out_dir: Path) -> tuple[Path, Path]:
    resolution = GPU_ARCHITECTURE.resolution
    unet = _unet_config(
        (320, 640, 1280, 1280), layers=2, attention=(True, True, True, False), latent_size=resolution // 8
    )
    generator = _save_generator(
        out_dir / "generator",
        resolution,
        unet={**unet, "attention_head_dim": 8},
        vae=_vae_config((128, 256, 512, 512), layers=2, resolution=resolution),
        text={**_BASE_LAYERS, "hidden_act": "quick_gelu", "vocab_size": 49408},
    )
    captioner = save_tiny_captioner(out_dir / "captioner", image_size=384)
    _replace_captioner_model(
        captioner,
        vision={**_BASE_LAYERS, "image_size": 384, "patch_size": 16},
        text={**_BASE_LAYERS, "vocab_size": 30524, "max_position_embeddings": 512},
    )
    return captioner, generator


# Transformer layers of CLIP ViT-L/14's text tower and of BLIP-base's vision and text towers.
_BASE_LAYERS = {
    "hidden_size": 768,
    "intermediate_size": 3072,
    "num_hidden_layers": 12,
    "num_attention_heads": 12,
}
MODEL_BUILDERS: dict[str, Callable[[Path], tuple[Path, Path]]] = {
    "tiny": _save_tiny,
    "small": _save_small,
    GPU_ARCHITECTURE.name: _save_sd15_blip_base,
}


# ---------------------------------------------------------------------------------------------------- modes


@dataclass(frozen=True)
class Mode:
    """A benchmarked step: which phase updates, with which cycle term and cache setting."""

    phase: str
    overrides: tuple[str, ...] = ()
    cache: bool = False


MODES: dict[str, Mode] = {
    "captioner": Mode("captioner"),
    "generator": Mode("generator"),
    "generator_cached": Mode("generator", cache=True),
    "i2t2i_soft": Mode("captioner", ("cycle.i2t2i.mode=soft",)),
    "i2t2i_gumbel": Mode("captioner", ("cycle.i2t2i.mode=gumbel",)),
    "i2t2i_reward": Mode("captioner", ("cycle.i2t2i.mode=reward",)),
    "t2i2t_one_step": Mode("generator", ("cycle.t2i2t.mode=one_step",)),
    "t2i2t_one_step_shared": Mode(
        "generator", ("cycle.t2i2t.mode=one_step", "cycle.t2i2t.share_denoise_pass=true")
    ),
    "t2i2t_sample": Mode("generator", ("cycle.t2i2t.mode=sample",)),
}
BASELINE = "baseline"
# Cycle modes whose cost must stay within CYCLE_COST_LIMIT x their supervised step, or be explained.
FLAGGED_MODES = ("i2t2i_soft", "t2i2t_one_step", "t2i2t_one_step_shared")
PROFILED_MODES = ("captioner", "generator", *FLAGGED_MODES)


def bench_config(
    arch: Architecture, captioner: Path, generator: Path, mode: Mode, output_dir: Path
) -> Config:
    """The trainer config for one mode: LoRA rank 4 (alpha 4) on both models, AdamW 1e-4, clipping at 1.0."""
    base = {
        "output_dir": str(output_dir),
        "seed": 0,
        "report_to": "none",
        "mixed_precision": arch.precision,
        "captioner": {"pretrained_model_name_or_path": str(captioner), "max_length": 24},
        "generator": {"pretrained_model_name_or_path": str(generator), "cache_frozen_encoders": mode.cache},
        "data": {
            "resolution": arch.resolution,
            "train_batch_size": arch.batch_size,
            "paired": [{"type": "shapes", "num_samples": arch.batch_size, "seed": 0}],
        },
        "train": {"max_train_steps": 1_000_000},
    }
    for model in ("captioner", "generator"):
        base[model] |= {
            "lora": {"rank": 4, "alpha": 4.0},
            "optimizer": {"learning_rate": 1e-4, "max_grad_norm": 1.0},
        }
    return load_config(None, mode.overrides, base=base)


# ------------------------------------------------------------------------------------------- worker steps


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
        self.config, self.phase, self.update = config, phase, 0
        self.accelerator = Accelerator(mixed_precision=config.mixed_precision, cpu=device == "cpu")
        captioner, captioner_names = build_captioner(config.captioner, config.mixed_precision)
        generator, generator_names = build_generator(config.generator, config.mixed_precision)
        generator.encoder_cache = build_encoder_cache(config, generator)
        trained, names = (
            (captioner, captioner_names) if phase == "captioner" else (generator, generator_names)
        )
        settings = config.phase_settings(phase).optimizer
        optimizer = build_optimizer(trained, names, settings)
        self.scheduler = build_lr_scheduler(optimizer, settings, num_updates=1_000_000)
        self.bridge = build_bridge(config, captioner, generator, self.accelerator.device)
        self.batch = batch_to_device(fixed_batch(config, phase), self.accelerator.device)
        captioner, generator, self.optimizer = self.accelerator.prepare(captioner, generator, optimizer)
        self.models = {"captioner": captioner, "generator": generator}
        self.generator = self.accelerator.unwrap_model(generator)
        self.captioner = self.accelerator.unwrap_model(captioner)
        self.on_stage: Callable[[str], None] = lambda stage: None

    def step(self) -> None:
        result = phase_step(
            self.accelerator,
            self.phase,
            models=self.models,
            optimizer=self.optimizer,
            scheduler=self.scheduler,
            next_batch=lambda key: self.batch,
            config=self.config,
            update=self.update,
            bridge=self.bridge,
            on_stage=self.on_stage,
        )
        self.logged = {name: float(value) for name, value in result.terms.items()}
        self.update += 1

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
            path, subfolder="text_encoder", dtype=self.dtype
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
            target_modules=GENERATOR_LORA_TARGETS,
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
        return {"terms": self.logged, "encoders_ms": 1000 * _median(encoder_seconds)}


# --------------------------------------------------------------------------------------- measuring a step


def synchronize(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def timed(step: Callable[[], None], device: str) -> float:
    """Wall seconds of one call, with the accelerator's queue drained before and after."""
    synchronize(device)
    started = time.perf_counter()
    step()
    synchronize(device)
    return time.perf_counter() - started


def step_flops(step: Callable[[], None]) -> int:
    """Model FLOPs of one step (forward, backward, recomputation) as torch's FLOP counter sees them."""
    with FlopCounterMode(display=False) as counter:
        step()
    return int(counter.get_total_flops())


def _profiled_parts(runner: TrainerStep) -> dict[str, Any]:
    """The big frozen or trained parts whose time a profile reports separately."""
    generator, blip = runner.generator, runner.captioner.model
    if hasattr(blip, "get_base_model"):
        blip = blip.get_base_model()
    parts = {
        "text encoder": generator.text_encoder,
        "UNet": generator.unet,
        "captioner vision": blip.vision_model,
        "captioner text decoder": blip.text_decoder,
    }
    if generator.vae is not None:
        parts |= {"VAE encoder": generator.vae.encoder, "VAE decoder": generator.vae.decoder}
    return parts


class StepProfiler:
    """Where one step's milliseconds go, by component and by stage (forward, backward, optimizer update).

    Forward: hooks around each call of a component (recomputation during backward is not counted here).
    Backward: from the moment the gradient reaches a component's output to the moment it reaches the next
    component's (or backward ends), so small glue ops between components count with the one before them.
    """

    def __init__(self, device: str) -> None:
        self.device = device
        self.stages: dict[str, float] = defaultdict(float)
        self.parts: dict[str, dict[str, float]] = defaultdict(
            lambda: {"forward_ms": 0.0, "backward_ms": 0.0, "calls": 0}
        )
        self._stage, self._stage_since = "idle", 0.0
        self._backward_part: str | None = None
        self._backward_since = 0.0
        self._forward_since: dict[str, float] = {}

    def _now(self) -> float:
        synchronize(self.device)
        return time.perf_counter()

    def stage(self, name: str) -> None:
        at = self._now()
        if self._stage == "backward":
            self._close_backward(at)
        self.stages[self._stage] += 1000 * (at - self._stage_since)
        self._stage, self._stage_since = name, at

    def attach(self, parts: dict[str, torch.nn.Module]) -> list[Any]:
        handles = []
        for name, module in parts.items():
            handles.append(module.register_forward_pre_hook(partial(self._forward_pre, name)))
            handles.append(module.register_forward_hook(partial(self._forward_post, name)))
        return handles

    def report(self) -> dict[str, dict[str, float]]:
        stages = {name: ms for name, ms in self.stages.items() if name not in ("idle", "done")}
        return {**{name: dict(values) for name, values in self.parts.items()}, "step": stages}

    def _forward_pre(self, name: str, *_: Any) -> None:
        if self._stage == "forward":
            self._forward_since[name] = self._now()

    def _forward_post(self, name: str, module: Any, inputs: Any, output: Any) -> None:
        if self._stage != "forward" or name not in self._forward_since:
            return
        self.parts[name]["forward_ms"] += 1000 * (self._now() - self._forward_since.pop(name))
        self.parts[name]["calls"] += 1
        for tensor in _output_tensors(output):
            if tensor.requires_grad:
                tensor.register_hook(partial(self._backward_reaches, name))

    def _backward_reaches(self, name: str, grad: torch.Tensor) -> None:
        at = self._now()
        self._close_backward(at)
        self._backward_part, self._backward_since = name, at

    def _close_backward(self, at: float) -> None:
        if self._backward_part is not None:
            self.parts[self._backward_part]["backward_ms"] += 1000 * (at - self._backward_since)
        self._backward_part = None


def _output_tensors(output: Any) -> list[torch.Tensor]:
    """The tensors of a module's output: a tensor, a tuple, or a ModelOutput / BaseOutput (dicts)."""
    if torch.is_tensor(output):
        return [output]
    values = output.values() if isinstance(output, dict) else output if isinstance(output, tuple) else ()
    return [value for value in values if torch.is_tensor(value)]


def profile_step(runner: TrainerStep, device: str, repeats: int = 3) -> dict[str, dict[str, float]]:
    """The least disturbed of `repeats` profiled steps (a shared machine's bursts hit single steps):
    {component: {forward_ms, backward_ms, calls}, "step": {stage: ms}}."""
    reports = []
    for _ in range(repeats):
        profiler = StepProfiler(device)
        handles = profiler.attach(_profiled_parts(runner))
        runner.on_stage = profiler.stage
        try:
            runner.step()
        finally:
            runner.on_stage = lambda stage: None
            for handle in handles:
                handle.remove()
        reports.append(profiler.report())
    return min(reports, key=lambda report: sum(report["step"].values()))


def peak_memory_mb(device: str) -> float:
    """Peak accelerator memory allocated (CUDA) or peak resident set size of this process (CPU)."""
    if device.startswith("cuda"):
        return torch.cuda.max_memory_allocated() / 2**20
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux reports KiB


# ------------------------------------------------------------------------------------------------ workers


@dataclass
class WorkerSpec:
    """What a worker process builds: one mode (or the baseline) of one architecture."""

    arch: Architecture
    mode: str
    captioner: str
    generator: str
    output_dir: str
    threads: int
    warmup: int
    profile: bool = False


def worker_main(spec: WorkerSpec, connection: Connection, log_path: str) -> None:
    """Build, warm up, then answer "step" and "finish" requests until finished (runs in a worker process)."""
    with open(log_path, "w") as log:  # the libraries' progress bars and warnings, out of the bench's output
        os.dup2(log.fileno(), 1)
        os.dup2(log.fileno(), 2)
    torch.set_num_threads(spec.threads)
    arch = spec.arch
    mode = MODES.get(spec.mode, MODES["generator"])
    config = bench_config(arch, Path(spec.captioner), Path(spec.generator), mode, Path(spec.output_dir))
    runner = (
        BareGeneratorStep(config, arch.device)
        if spec.mode == BASELINE
        else TrainerStep(config, mode.phase, arch.device)
    )
    for _ in range(spec.warmup):
        runner.step()
    connection.send({"ready": True})
    while (command := connection.recv()) == "step":
        connection.send({"seconds": timed(runner.step, arch.device)})
    if command != "finish":
        raise ValueError(f"bench worker: unknown command {command!r}")
    report: dict[str, Any] = {"peak_memory_mb": peak_memory_mb(arch.device), **runner.extra()}
    if spec.profile and isinstance(runner, TrainerStep):
        report["profile"] = profile_step(runner, arch.device)
    report["flops_per_step"] = step_flops(runner.step)
    connection.send(report)


class WorkerDied(RuntimeError):
    """A worker process exited before answering (its log holds the traceback)."""


class Worker:
    """The orchestrator's handle on one worker process.

    Workers are forked from a server that has imported this module once (multiprocessing's forkserver with a
    preload), so each starts in a fraction of a second instead of re-importing torch, diffusers and
    transformers, yet in a fresh process of its own for peak memory.
    """

    def __init__(self, context: BaseContext, spec: WorkerSpec, log_path: Path) -> None:
        log_path.parent.mkdir(parents=True, exist_ok=True)
        self.name, self.log_path = spec.mode, log_path
        self._connection, child_end = context.Pipe()
        self.process = context.Process(
            target=worker_main, args=(spec, child_end, str(log_path)), name=f"bench-{spec.mode}", daemon=True
        )
        self.process.start()
        child_end.close()
        self._receive()

    def step(self) -> float:
        self._connection.send("step")
        return self._receive()["seconds"]

    def finish(self) -> dict[str, Any]:
        self._connection.send("finish")
        report = self._receive()
        self.process.join(timeout=120)
        return report

    def _receive(self) -> dict[str, Any]:
        try:
            return self._connection.recv()
        except EOFError:
            self.process.join(timeout=60)
            tail = self.log_path.read_text()[-3000:] if self.log_path.exists() else ""
            raise WorkerDied(f"bench worker {self.name!r} died ({self.process.exitcode}):\n{tail}") from None


def worker_context(cuda: bool) -> BaseContext:
    """A forkserver that has imported the bench (and so torch, diffusers, transformers) once; spawn for CUDA,
    which cannot be used in a process forked from one where a library already initialised it."""
    for name, value in {
        "HF_HUB_OFFLINE": "1",
        "TRANSFORMERS_OFFLINE": "1",
        "HF_DATASETS_OFFLINE": "1",
        "TOKENIZERS_PARALLELISM": "false",
    }.items():
        os.environ.setdefault(name, value)
    if cuda:
        return multiprocessing.get_context("spawn")
    context = multiprocessing.get_context("forkserver")
    context.set_forkserver_preload([__name__ if __name__ != "__main__" else "train.bench"])
    return context


# ---------------------------------------------------------------------------------------------- statistics


def step_summary(seconds: Sequence[float], batch_size: int) -> dict[str, float]:
    """Median and min ms per step and samples per second at the median."""
    median = _median(seconds)
    return {"median_ms": 1000 * median, "min_ms": 1000 * min(seconds), "samples_per_s": batch_size / median}


def _median(values: Sequence[float]) -> float:
    return float(np.median(np.asarray(values, dtype=float)))


def speed_ratio_interval(
    ours: Sequence[float],
    baseline: Sequence[float],
    *,
    confidence: float = 0.95,
    resamples: int = 10_000,
    seed: int = 0,
) -> dict[str, float]:
    """Median speed ratio of paired steps (baseline time / our time; > 1 is faster), bootstrap percentile CI.

    The pairs ran back to back, so each ratio cancels the machine's state at that moment; the median (not the
    mean) keeps the few pairs that caught another process's burst from deciding the answer.
    """
    if len(ours) != len(baseline) or len(ours) < 2:
        raise ValueError(f"need >= 2 pairs of equal length, got {len(ours)} and {len(baseline)}")
    ratios = np.asarray(baseline, dtype=float) / np.asarray(ours, dtype=float)
    draws = np.random.default_rng(seed).choice(ratios, size=(resamples, len(ratios)), replace=True)
    low, high = np.quantile(np.median(draws, axis=1), [(1 - confidence) / 2, (1 + confidence) / 2])
    return {"pairs": len(ratios), "ratio": float(np.median(ratios)), "low": float(low), "high": float(high)}


def time_ratio(ours: Sequence[float], baseline: Sequence[float]) -> float:
    """Our step time in baseline steps: the median of the per-pair ratios."""
    return _median([mine / theirs for mine, theirs in zip(ours, baseline, strict=True)])


def mean_spearman(first: Sequence[Sequence[float]], second: Sequence[Sequence[float]]) -> float:
    """Mean over groups (images) of the Spearman rank correlation of two scorings of the same candidates."""
    values = [stats.spearmanr(a, b).statistic for a, b in zip(first, second, strict=True)]
    finite = [value for value in values if not math.isnan(value)]
    return sum(finite) / len(finite) if finite else float("nan")


# ------------------------------------------------------------------------------------------- orchestration

CYCLE_MODES = (
    "i2t2i_soft",
    "i2t2i_gumbel",
    "i2t2i_reward",
    "t2i2t_one_step",
    "t2i2t_one_step_shared",
    "t2i2t_sample",
)
# Interleaved pairs per mode and untimed warm-up steps per worker, sized so `make bench` stays within
# 10 minutes on 2 CPU cores: 30 pairs where an acceptance check needs them, fewer for the slow modes.
DEFAULT_PAIRS = {
    "tiny": {"captioner": 10, "generator": 12, "generator_cached": 30, **dict.fromkeys(CYCLE_MODES, 8)},
    "small": {
        "captioner": 6,
        "generator": 30,
        "generator_cached": 6,
        **dict.fromkeys(CYCLE_MODES, 4),
        "i2t2i_reward": 3,
        "t2i2t_sample": 3,
    },
    GPU_ARCHITECTURE.name: {**dict.fromkeys(MODES, 10)},
}
DEFAULT_WARMUP = {"tiny": 3, "small": 1, GPU_ARCHITECTURE.name: 3}


@dataclass(frozen=True)
class Plan:
    """Which modes of one architecture run, with how many pairs, warm-up steps and torch threads."""

    pairs: dict[str, int]
    warmup: int
    threads: int


def bench_architecture(
    arch: Architecture, models: tuple[Path, Path], plan: Plan, out_dir: Path
) -> dict[str, Any]:
    """All planned modes of one architecture, each interleaved pair by pair with one long-lived baseline."""
    order = random.Random(0)
    logs = out_dir / "logs" / arch.name
    context = worker_context(cuda=arch.device.startswith("cuda"))

    def start(mode: str) -> Worker:
        spec = WorkerSpec(
            arch,
            mode,
            str(models[0]),
            str(models[1]),
            str(out_dir / "scratch"),
            plan.threads,
            plan.warmup,
            profile=mode in PROFILED_MODES,
        )
        return Worker(context, spec, logs / f"{mode}.log")

    baseline = start(BASELINE)
    results: dict[str, Any] = {}
    all_baseline: list[float] = []
    for mode, pairs in plan.pairs.items():
        started, load = time.perf_counter(), os.getloadavg()[0]
        ours, base = [], []
        try:
            worker = start(mode)
            for _ in range(pairs):
                first, second = (worker, baseline) if order.random() < 0.5 else (baseline, worker)
                for current in (first, second):
                    (ours if current is worker else base).append(current.step())
            report = worker.finish()
        except WorkerDied as error:  # e.g. out of memory: keep the other modes' results
            results[mode] = {"error": str(error)}
            print(f"  {arch.name:<6} {mode:<17} failed, see {logs / f'{mode}.log'}", flush=True)
            continue
        all_baseline += base
        results[mode] = {
            **step_summary(ours, arch.batch_size),
            "time_vs_baseline": time_ratio(ours, base),
            "seconds": ours,
            "baseline_seconds": base,
            "load_average": (load, os.getloadavg()[0]),
            "wall_s": time.perf_counter() - started,
            **report,
        }
        print(f"  {arch.name:<6} {mode:<17} {results[mode]['median_ms']:9.1f} ms/step", flush=True)
    results[BASELINE] = {
        **step_summary(all_baseline, arch.batch_size),
        "seconds": all_baseline,
        **baseline.finish(),
    }
    if arch.device.startswith("cuda"):
        for figures in measured(results).values():
            figures["mfu"] = figures["flops_per_step"] / (figures["median_ms"] / 1000) / H100_BF16_FLOPS
    return results


def measured(modes: dict[str, Any]) -> dict[str, Any]:
    """The modes that ran to the end (a failed one holds only its error)."""
    return {mode: figures for mode, figures in modes.items() if "error" not in figures}


def acceptance(results: dict[str, dict[str, Any]]) -> dict[str, Any]:
    """The benchmark's acceptance checks, from the measured figures of whichever architectures and modes ran."""
    results = {arch_name: measured(modes) for arch_name, modes in results.items()}
    checks: dict[str, Any] = {}
    small = results.get("small", {})
    if "generator" in small:
        interval = speed_ratio_interval(small["generator"]["seconds"], small["generator"]["baseline_seconds"])
        checks["framework_overhead"] = {
            **interval,
            "passes": interval["pairs"] >= 30 and interval["low"] >= FRAMEWORK_RATIO_FLOOR,
            "rule": f"small, generator (cache off) vs baseline, >= 30 pairs: 95% CI low >= {FRAMEWORK_RATIO_FLOOR}",
        }
    tiny = results.get("tiny", {})
    if "generator_cached" in tiny:
        cached, baseline = tiny["generator_cached"], tiny[BASELINE]
        interval = speed_ratio_interval(cached["seconds"], cached["baseline_seconds"])
        # Caching can at most remove the encoders' time from a step: the baseline's share bounds the gain.
        ceiling = baseline["median_ms"] / (baseline["median_ms"] - baseline["encoders_ms"])
        checks["cache_speedup"] = {
            **interval,
            "ceiling": ceiling,
            "passes": interval["ratio"] >= CACHE_SPEEDUP_TARGET,
            "rule": f"tiny, generator (cache on) vs baseline: median speed ratio >= {CACHE_SPEEDUP_TARGET}",
        }
        if "generator" in tiny:
            checks["cache_speedup"]["vs_uncached"] = _relative_cost(tiny, "generator", "generator_cached")
    costs: dict[str, Any] = {}
    for arch_name, modes in results.items():
        for mode in CYCLE_MODES:
            reference = MODES[mode].phase
            if mode in modes and reference in modes:
                relative = _relative_cost(modes, mode, reference)
                modes[mode]["relative_to_supervised"] = relative
                entry = {"relative_to_supervised": relative, "reference": reference}
                if mode in FLAGGED_MODES:
                    entry["within_limit"] = relative <= CYCLE_COST_LIMIT
                costs[f"{arch_name}/{mode}"] = entry
    checks["cycle_costs"] = costs
    return checks


def _relative_cost(modes: dict[str, Any], mode: str, reference: str) -> float:
    """Step time of `mode` over `reference`, each first taken relative to its own interleaved baseline steps."""
    return modes[mode]["time_vs_baseline"] / modes[reference]["time_vs_baseline"]


# -------------------------------------------------------------------------------------------- reward cost


def reward_cost(
    generator_dir: Path,
    resolution: int,
    *,
    images: int = 4,
    candidates: int = 8,
    score_timesteps: int = 4,
    sampling_steps: int = 20,
    guidance_scale: float = 3.0,
    repeats: int = 3,
    seed: int = 0,
) -> dict[str, Any]:
    """Likelihood scoring (models/scoring.caption_scores, what I2T2I reward uses) vs sampling an image per
    candidate and scoring its similarity to the real image (negative pixel MSE, i.e. PSNR order), on the same
    candidates: the time of each and the mean per-image Spearman correlation of their rankings.

    Candidates of image i: its own shapes-world caption and candidates - 1 captions of other scenes. Both
    scorers use common random numbers per image (the same noise for all its candidates).
    """
    generator = Generator.from_pretrained(str(generator_dir), resolution=resolution)
    generator.requires_grad_(False)
    records, _ = shapes_source(num_samples=images * candidates, seed=seed, resolution=resolution)
    batch = Stream(records, batch_size=len(records), seed=seed, resolution=resolution).next()
    pixels, ids = batch["pixels"][:images], batch["ids"][:images]
    others = batch["captions"][images:]
    groups = [
        [batch["captions"][i], *others[i * (candidates - 1) : (i + 1) * (candidates - 1)]]
        for i in range(images)
    ]
    flat = [caption for group in groups for caption in group]
    initial = torch.randn(
        images, *generator.latent_shape(1)[1:], generator=torch.Generator().manual_seed(seed)
    )
    initial = initial.repeat_interleave(candidates, dim=0)

    def likelihood() -> torch.Tensor:
        scores = caption_scores(
            generator, pixels, groups, key=DrawKey(seed, 0), ids=ids, num_timesteps=score_timesteps
        )
        return -scores  # higher is better

    def sampled() -> torch.Tensor:
        made = generator.sample(
            flat, num_inference_steps=sampling_steps, guidance_scale=guidance_scale, latents=initial
        )
        references = pixels.repeat_interleave(candidates, dim=0)
        return -((made - references) ** 2).mean(dim=(1, 2, 3)).view(images, candidates)

    results: dict[str, Any] = {}
    for name, scorer in (("likelihood", likelihood), ("sampling", sampled)):
        scores = scorer()  # warm-up, and the scores compared below
        seconds = [timed(scorer, "cpu") for _ in range(repeats)]
        results[name] = {"median_ms": 1000 * _median(seconds), "scores": scores.tolist()}
    results["speed_ratio"] = results["sampling"]["median_ms"] / results["likelihood"]["median_ms"]
    results["spearman"] = mean_spearman(results["likelihood"]["scores"], results["sampling"]["scores"])
    own_first = [group.index(max(group)) == 0 for group in results["likelihood"]["scores"]]
    results["likelihood_top1_is_true_caption"] = sum(own_first) / len(own_first)
    results["setup"] = {
        "generator": str(generator_dir),
        "images": images,
        "candidates": candidates,
        "score_timesteps": score_timesteps,
        "sampling_steps": sampling_steps,
        "guidance_scale": guidance_scale,
    }
    return results


# ------------------------------------------------------------------------------------------------- report


def machine_info(threads: int) -> dict[str, Any]:
    cpu_model = platform.processor()
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu_model = line.split(":", 1)[1].strip()
                break
    info = {
        "date": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "platform": platform.platform(),
        "cpu": cpu_model,
        "cpu_count": os.cpu_count(),
        "torch_threads": threads,
        "load_average": os.getloadavg(),
        "python": platform.python_version(),
        "versions": {
            module.__name__: module.__version__
            for module in (torch, diffusers, transformers, peft, accelerate)
        },
    }
    if torch.cuda.is_available():
        info["gpu"] = torch.cuda.get_device_name()
    return info


def format_table(results: dict[str, dict[str, Any]]) -> str:
    """Markdown table: one row per architecture and mode, every figure with its baseline ratio."""
    lines = [
        "| arch | mode | ms/step median | min | samples/s | GFLOP/step | time vs baseline | vs supervised | "
        "peak memory MiB |",
        "|---|---|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for arch_name, modes in results.items():
        for mode, figures in modes.items():
            if "error" in figures:
                lines.append(f"| {arch_name} | {mode} | failed: {figures['error'].splitlines()[0]} |")
                continue
            relative = figures.get("relative_to_supervised")
            mfu = f" (MFU {figures['mfu']:.1%})" if "mfu" in figures else ""
            lines.append(
                f"| {arch_name} | {mode} | {figures['median_ms']:.1f} | {figures['min_ms']:.1f} | "
                f"{figures['samples_per_s']:.2f}{mfu} | {figures['flops_per_step'] / 1e9:.2f} | "
                f"{figures.get('time_vs_baseline', 1.0):.2f}x | "
                f"{'' if relative is None else f'{relative:.2f}x'} | {figures['peak_memory_mb']:.0f} |"
            )
    return "\n".join(lines)


def format_checks(checks: dict[str, Any], reward: dict[str, Any] | None) -> str:
    lines = []
    overhead = checks.get("framework_overhead")
    if overhead:
        lines.append(
            f"framework overhead (small, {overhead['pairs']} pairs): speed ratio {overhead['ratio']:.3f}, 95% CI "
            f"[{overhead['low']:.3f}, {overhead['high']:.3f}] -> {'PASS' if overhead['passes'] else 'FAIL'} "
            f"(lower bound >= {FRAMEWORK_RATIO_FLOOR})"
        )
    cache = checks.get("cache_speedup")
    if cache:
        uncached = (
            f", {cache['vs_uncached']:.2f}x our uncached step's speed" if "vs_uncached" in cache else ""
        )
        lines.append(
            f"caching (tiny, {cache['pairs']} pairs): median speed ratio vs baseline {cache['ratio']:.2f} "
            f"[{cache['low']:.2f}, {cache['high']:.2f}]{uncached}; ceiling {cache['ceiling']:.2f} (the "
            f"encoders' share of the baseline step) -> {'PASS' if cache['passes'] else 'FAIL'} "
            f"(>= {CACHE_SPEEDUP_TARGET})"
        )
    for name, cost in checks.get("cycle_costs", {}).items():
        verdict = ""
        if "within_limit" in cost:
            verdict = f" -> {'within' if cost['within_limit'] else 'OVER'} {CYCLE_COST_LIMIT}x"
        lines.append(
            f"{name}: {cost['relative_to_supervised']:.2f}x the supervised {cost['reference']} step{verdict}"
        )
    if reward:
        lines.append(
            f"reward scoring ({reward['setup']['images']} images x {reward['setup']['candidates']} candidates): "
            f"likelihood {reward['likelihood']['median_ms']:.0f} ms, sampling + similarity "
            f"{reward['sampling']['median_ms']:.0f} ms ({reward['speed_ratio']:.1f}x slower), "
            f"Spearman {reward['spearman']:.2f}"
        )
    return "\n".join(lines)


def format_profiles(results: dict[str, dict[str, Any]]) -> str:
    lines = []
    for arch_name, modes in results.items():
        for mode, figures in modes.items():
            profile = figures.get("profile")
            if not profile:
                continue
            stages = profile["step"]
            parts = ", ".join(
                f"{name} {values['forward_ms']:.0f}+{values['backward_ms']:.0f}"
                for name, values in profile.items()
                if name != "step" and values["forward_ms"] + values["backward_ms"] >= 0.5
            )
            lines.append(
                f"{arch_name}/{mode}: forward {stages.get('forward', 0):.0f} ms, backward {stages.get('backward', 0):.0f}"
                f" ms, update {stages.get('update', 0):.0f} ms; by part (forward+backward ms): {parts}"
            )
    return "\n".join(lines)


# --------------------------------------------------------------------------------------------------- main


def run(args: argparse.Namespace) -> dict[str, Any]:
    """Build the models, bench every planned architecture, compare reward scorers, check, write the report."""
    started = time.perf_counter()
    out_dir = Path(args.out)
    torch.set_num_threads(args.threads)
    architectures = [ARCHITECTURES[name] for name in args.archs]
    if GPU_ARCHITECTURE in architectures and not torch.cuda.is_available():
        raise SystemExit(
            f"error: --archs {GPU_ARCHITECTURE.name} needs CUDA (torch.cuda.is_available() is False)"
        )
    if GPU_ARCHITECTURE not in architectures:
        if torch.cuda.is_available() and not args.skip_gpu:
            architectures.append(GPU_ARCHITECTURE)
        else:
            print(
                "GPU part skipped: "
                + ("--skip-gpu" if args.skip_gpu else "torch.cuda.is_available() is False")
            )
    report: dict[str, Any] = {"machine": machine_info(args.threads), "architectures": {}, "results": {}}
    models = {arch.name: MODEL_BUILDERS[arch.name](out_dir / "models" / arch.name) for arch in architectures}
    for arch in architectures:
        print(f"{arch.name}: {arch.description}", flush=True)
        plan = Plan(
            pairs={
                mode: args.pairs or n for mode, n in DEFAULT_PAIRS[arch.name].items() if mode in args.modes
            },
            warmup=DEFAULT_WARMUP[arch.name] if args.warmup is None else args.warmup,
            threads=args.threads,
        )
        report["architectures"][arch.name] = {**asdict(arch), **asdict(plan)}
        report["results"][arch.name] = bench_architecture(arch, models[arch.name], plan, out_dir)
    if not args.skip_reward:
        if args.reward_generator:
            generator_dir = Path(args.reward_generator)
        elif (SHAPES_BASE_GENERATOR / "model_index.json").is_file():
            generator_dir = SHAPES_BASE_GENERATOR  # trained: its rankings mean something
        else:
            generator_dir = (models.get("tiny") or MODEL_BUILDERS["tiny"](out_dir / "models" / "tiny"))[1]
        report["reward_cost"] = reward_cost(generator_dir, args.reward_resolution)
    report["checks"] = acceptance(report["results"])
    report["machine"]["load_average_end"] = os.getloadavg()
    report["wall_s"] = time.perf_counter() - started
    write_report(report, out_dir)
    return report


def write_report(report: dict[str, Any], out_dir: Path) -> Path:
    table = format_table(report["results"])
    checks = format_checks(report["checks"], report.get("reward_cost"))
    profiles = format_profiles(report["results"])
    machine = report["machine"]
    header = (
        f"{machine['date']} | {machine['cpu']} | {machine['cpu_count']} CPUs, {machine['torch_threads']} torch "
        f"threads | torch {machine['versions']['torch']} | {report['wall_s']:.0f} s"
    )
    text = f"{header}\n\n{table}\n\n{checks}\n\n{profiles}\n"
    print("\n" + text)
    out_dir.mkdir(parents=True, exist_ok=True)
    stamp = machine["date"].replace(":", "").replace("+0000", "Z")
    path = out_dir / f"bench-{stamp}.json"
    for target in (path, out_dir / "latest.json"):
        target.write_text(json.dumps(report, indent=1))
    (out_dir / "latest.md").write_text(text)
    print(f"written: {path}")
    return path


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--out", default=str(REPO / "runs" / "bench"), help="results, models and logs folder")
    parser.add_argument(
        "--archs",
        nargs="+",
        default=list(CPU_ARCHITECTURES),
        choices=list(ARCHITECTURES),
        help=f"default: the CPU ones, plus {GPU_ARCHITECTURE.name} where CUDA works",
    )
    parser.add_argument("--modes", nargs="+", default=list(MODES), choices=list(MODES))
    parser.add_argument(
        "--pairs", type=int, default=None, help="interleaved pairs per mode (default: a plan)"
    )
    parser.add_argument("--warmup", type=int, default=None, help="untimed steps per worker (default: a plan)")
    parser.add_argument("--threads", type=int, default=os.cpu_count() or 1, help="torch threads per worker")
    parser.add_argument("--skip-reward", action="store_true", help="skip the reward-cost comparison")
    parser.add_argument(
        "--reward-generator",
        default=None,
        help="generator folder for the reward comparison (default: pretrained/shapes-base, else the tiny one)",
    )
    parser.add_argument("--reward-resolution", type=int, default=32)
    parser.add_argument("--skip-gpu", action="store_true", help="skip the CUDA part even where CUDA works")
    return parser.parse_args(argv)


def main(argv: Sequence[str] | None = None) -> int:
    run(parse_args(argv))
    return 0


if __name__ == "__main__":
    sys.exit(main())
