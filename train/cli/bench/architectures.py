"""The model sizes the bench times, and their models (built from models/tiny.py's presets)."""

from __future__ import annotations

from dataclasses import dataclass, replace
from pathlib import Path

from cycletune.models.generators.stable_diffusion import StableDiffusionSpec
from cycletune.models.tiny import save_preset


@dataclass(frozen=True)
class Architecture:
    """Models and batch shape of one benchmark row group; `device` and `precision` as the trainer takes them,
    `family` the generator family (a models/generators/ name)."""

    name: str
    resolution: int
    batch_size: int
    device: str = "cpu"
    precision: str = "no"
    family: str = StableDiffusionSpec.name
    description: str = ""

    @property
    def has_baseline(self) -> bool:
        """The bare torch + peft baseline (steps.BareGeneratorStep) is written for SD's one CLIP text encoder
        and UNet; the other families' rows are timed on their own."""
        return self.family == StableDiffusionSpec.name


_SD_ARCHITECTURES = {
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


def _family_architectures(size: str, descriptions: dict[str, str]) -> dict[str, Architecture]:
    """The other generator families' rows at the resolution, batch and model preset of the SD architecture
    `size`, with denoisers of about its UNet's size (models/tiny.py's PRESETS); by family."""
    sibling = _SD_ARCHITECTURES[size]
    return {
        family: replace(sibling, name=f"{size}-{family}", family=family, description=description)
        for family, description in descriptions.items()
    }


FAMILY_ARCHITECTURES = {
    "tiny": _family_architectures(
        "tiny",
        {
            "sdxl": "SDXL UNet (32,64) 1 layer/block, attention at 64 ch, xattn 32+48 (1.04M), VAE (32,64), "
            "CLIP-L text 32x5 + bigG 48x2, BLIP 32x2, 32 px",
            "sd3": "SD3 MMDiT 6 joint blocks 64 wide (0.90M), 16-ch VAE (32,64), CLIP-L text 32x5 + bigG 48x2 "
            "+ T5 96x2, BLIP 32x2, 32 px",
            "flux": "Flux 2 double + 2 single blocks 96 wide (1.07M), 16-ch VAE (32,64), CLIP-L text 32x5 + "
            "T5 96x2, BLIP 32x2, 32 px",
        },
    ),
    "small": _family_architectures(
        "small",
        {
            "sdxl": "SDXL UNet (64,128,192) 2 layers/block, attention at 128 and 192 ch, xattn 128+192 "
            "(16.9M), VAE (32,64), CLIP-L text 128x2 + bigG 192x2, BLIP 128x2, 64 px",
            "sd3": "SD3 MMDiT 8 joint blocks 256 wide (18.6M), 16-ch VAE (32,64), CLIP-L text 128x2 + bigG "
            "192x2 + T5 384x2, BLIP 128x2, 64 px",
            "flux": "Flux 4 double + 8 single blocks 256 wide (18.0M), 16-ch VAE (32,64), CLIP-L text 128x2 + "
            "T5 384x2, BLIP 128x2, 64 px",
        },
    ),
}
CPU_ARCHITECTURES = {
    **_SD_ARCHITECTURES,
    **{arch.name: arch for by_family in FAMILY_ARCHITECTURES.values() for arch in by_family.values()},
}
GPU_ARCHITECTURES = {
    "sd15-blip-base": Architecture(
        "sd15-blip-base",
        resolution=512,
        batch_size=8,
        device="cuda",
        precision="bf16",
        description="SD 1.5 UNet/VAE/CLIP-L text at 512 px + BLIP-base at 384 px, random weights, bf16",
    ),
    "sdxl-blip-base": Architecture(
        "sdxl-blip-base",
        resolution=1024,
        batch_size=2,
        device="cuda",
        precision="bf16",
        family="sdxl",
        description="SDXL base UNet (2.6B)/VAE/CLIP-L + bigG text at 1024 px + BLIP-base at 384 px, random "
        "weights, bf16",
    ),
}
ARCHITECTURES = {**CPU_ARCHITECTURES, **GPU_ARCHITECTURES}
# The models/tiny.py preset of each architecture's captioner and generator (in its family).
MODEL_PRESETS = {
    "tiny": "bench-tiny",
    "small": "bench-small",
    **{
        arch.name: f"bench-{size}"
        for size, by_family in FAMILY_ARCHITECTURES.items()
        for arch in by_family.values()
    },
    "sd15-blip-base": "bench-sd15-blip-base",
    "sdxl-blip-base": "bench-sdxl-blip-base",
}


def save_models(arch: Architecture, out_dir: Path) -> tuple[Path, Path]:
    """The architecture's random-init (seed 0) captioner and generator folders under out_dir."""
    return save_preset(out_dir, MODEL_PRESETS[arch.name], generator=arch.family)
