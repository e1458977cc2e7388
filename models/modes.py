"""Module modes (train / eval) in one place.

The policy: the model being trained is in train mode (its dropout and gradient checkpointing as configured);
the frozen partner runs in eval mode with every dropout off, LoRA's included, so its output is a function of
its inputs and the per-sample draws alone, whichever rank or update calls it. Every context here puts back
each submodule's exact previous `training` flag: `module.train(flag)` sets one flag on the whole tree and so
would not restore a mixed state (an eval-mode vision tower under a training wrapper, say).
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import ExitStack, contextmanager

from torch import nn


def module_modes(module: nn.Module) -> dict[str, bool]:
    """Every submodule's `training` flag by name ("" is the module itself): what the contexts restore."""
    return {name: submodule.training for name, submodule in module.named_modules()}


@contextmanager
def modes_restored(module: nn.Module) -> Iterator[nn.Module]:
    """Whatever the body does to modes, each submodule gets its own previous mode back, errors included."""
    saved = [(submodule, submodule.training) for submodule in module.modules()]
    try:
        yield module
    finally:
        for submodule, training in saved:
            submodule.training = training


@contextmanager
def eval_mode(*modules: nn.Module) -> Iterator[None]:
    """Every submodule of every module in eval mode inside (validation, sampling); modes restored after."""
    with ExitStack() as stack:
        for module in modules:
            stack.enter_context(modes_restored(module)).eval()
        yield


@contextmanager
def frozen(module: nn.Module) -> Iterator[nn.Module]:
    """The partner model while the other one trains: gradients pass through it but none land on it.

    requires_grad off and eval mode (no dropout, LoRA dropout included: the partner must not draw from the
    global RNG or give two answers to one input); both restored exactly after, errors included.

    A model whose gradient checkpointing is on stays checkpointed as the partner, where the cycle paths
    backpropagate through it: transformers checkpoints a layer only while that layer's own `training` flag
    is set, so the flag goes back on for exactly the layers (and encoders) that carry `gradient_checkpointing`,
    while every dropout below them stays in eval mode and the recomputation is exact. diffusers' blocks
    checkpoint whenever a gradient is recorded, whatever their mode.
    """
    saved = [(param, param.requires_grad) for param in module.parameters()]
    with eval_mode(module):
        for submodule in module.modules():
            if getattr(submodule, "gradient_checkpointing", False) is True:
                submodule.training = True
        for param, _ in saved:
            param.requires_grad_(False)
        try:
            yield module
        finally:
            for param, requires_grad in saved:
                param.requires_grad_(requires_grad)


@contextmanager
def gradient_checkpointing_off(module: nn.Module) -> Iterator[None]:
    """Switch off the `gradient_checkpointing` flag of every submodule that has one (transformers and
    diffusers layers); each flag restored after.

    For cached step-by-step decoding: a checkpointed layer would write its keys/values into the cache a
    second time when backward recomputes it, so transformers drops the cache instead whenever checkpointing
    is on in train mode, and each step then sees only its own token.
    """
    saved = [
        (submodule, submodule.gradient_checkpointing)
        for submodule in module.modules()
        if isinstance(getattr(submodule, "gradient_checkpointing", None), bool)
    ]
    try:
        for submodule, _ in saved:
            submodule.gradient_checkpointing = False
        yield
    finally:
        for submodule, enabled in saved:
            submodule.gradient_checkpointing = enabled
