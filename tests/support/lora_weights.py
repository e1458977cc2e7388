"""Give LoRA adapters values in tests: B starts at zero, so A would get no gradient and B's path none."""

from __future__ import annotations

import torch


def perturb_lora(
    module: torch.nn.Module, names: list[str], *, seed: int, scale: float, replace: bool
) -> None:
    """Seeded normal values times `scale` for every parameter in `names`: added to it, or replacing it."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, param in module.named_parameters():
            if name in names:
                values = torch.randn(param.shape, generator=generator) * scale
                param.copy_(values) if replace else param.add_(values)
