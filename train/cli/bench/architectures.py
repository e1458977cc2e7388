"""The model sizes the bench times, and their models (built from models/tiny.py's presets)."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from models.tiny import save_preset


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
ARCHITECTURES = {**CPU_ARCHITECTURES, GPU_ARCHITECTURE.name: GPU_ARCHITECTURE}
# The models/tiny.py preset of each architecture's captioner and generator.
MODEL_PRESETS = {"tiny": "bench-tiny", "small": "bench-small", GPU_ARCHITECTURE.name: "bench-sd15-blip-base"}


def save_models(arch: Architecture, out_dir: Path) -> tuple[Path, Path]:
    """The architecture's random-init (seed 0) captioner and generator folders under out_dir."""
    return save_preset(out_dir, MODEL_PRESETS[arch.name])
