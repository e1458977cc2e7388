"""Speed levers on a generator's denoiser: torch.compile, channels_last memory, one pinned attention kernel;
and TF32 for the process. Each leaves the weights, their names and the step's mathematics as they were, so
checkpoints, exports and resumes do not see them.

Why these forms:
- `Module.compile()` compiles the module in place (its `__call__`), so the state dict keys, peft's adapter
  lookup and the pipelines built around the denoiser stay the same object and names; the family's `predict`
  calls it as a module, so training, the partner's forward and sampling all run compiled.
- The attention kernel is pinned inside each attention processor, not around the denoiser's forward:
  gradient checkpointing recomputes the forward during backward, outside any context entered around the
  forward, and a recomputation on another kernel saves tensors of other shapes than the first pass did.
  Every family's processors reach torch's scaled_dot_product_attention (SD/SDXL/SD3 directly, Flux through
  diffusers' native dispatch), so one wrapper serves all.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import torch
from torch.nn.attention import SDPBackend, sdpa_kernel

if TYPE_CHECKING:
    from cycletune.models.generator import Generator

logger = logging.getLogger(__name__)

# generator.attention -> the kernels torch may pick from; "sdpa" leaves the choice to torch, per call.
ATTENTION_KERNELS: dict[str, SDPBackend | None] = {
    "sdpa": None,
    "flash": SDPBackend.FLASH_ATTENTION,
    "efficient": SDPBackend.EFFICIENT_ATTENTION,
    "cudnn": SDPBackend.CUDNN_ATTENTION,
    "math": SDPBackend.MATH,
}


@dataclass(frozen=True)
class DenoiserLevers:
    """What to do to the denoiser: compile with a torch.compile backend (None: not compiled), channels_last
    (denoiser and VAE), and the attention kernel (an ATTENTION_KERNELS name)."""

    compile_backend: str | None = None
    channels_last: bool = False
    attention: str = "sdpa"

    def describe(self) -> str:
        levers = [f"torch.compile ({self.compile_backend})"] if self.compile_backend else []
        levers += ["channels_last"] if self.channels_last else []
        levers += [f"attention kernel {self.attention}"] if self.attention != "sdpa" else []
        return ", ".join(levers) or "none"


class PinnedKernelProcessor:
    """An attention processor that runs another one with scaled_dot_product_attention pinned to one kernel."""

    def __init__(self, processor: Any, kernel: SDPBackend) -> None:
        self.processor, self.kernel = processor, kernel

    def __call__(self, attn: torch.nn.Module, hidden_states: torch.Tensor, *args: Any, **kwargs: Any) -> Any:
        with sdpa_kernel(self.kernel):
            return self.processor(attn, hidden_states, *args, **kwargs)


def pin_attention_kernel(denoiser: torch.nn.Module, attention: str) -> None:
    """Wrap every attention processor of a diffusers denoiser so its attention runs on one kernel."""
    kernel = ATTENTION_KERNELS[attention]
    if kernel is None:
        return
    denoiser.set_attn_processor(
        {
            name: PinnedKernelProcessor(processor, kernel)
            for name, processor in denoiser.attn_processors.items()
        }
    )


def apply_denoiser_levers(generator: Generator, levers: DenoiserLevers) -> None:
    """Apply the levers to a built generator (after its adapters and dtypes are set), and log them once."""
    denoiser = generator.denoiser
    pin_attention_kernel(denoiser, levers.attention)
    if levers.channels_last:
        for module in (denoiser, generator.vae):
            if module is not None:
                module.to(memory_format=torch.channels_last)
    if levers.compile_backend is not None:
        denoiser.compile(backend=levers.compile_backend)
    logger.info("generator speed levers: %s", levers.describe())


def set_tf32(allowed: bool) -> None:
    """train.allow_tf32: TF32 for float32 CUDA matmuls and cuDNN convolutions, by the flags diffusers'
    --allow_tf32 sets. torch keeps its newer fp32_precision settings in step with them, while the reverse
    fails: once fp32_precision is set, reading these flags raises, and parts of torch.compile still read them.
    Off leaves torch's defaults alone."""
    if not allowed:
        return
    torch.backends.cuda.matmul.allow_tf32 = True
    torch.backends.cudnn.allow_tf32 = True
    logger.info("TF32: on for float32 CUDA matmuls and convolutions (train.allow_tf32)")
