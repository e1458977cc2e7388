"""Optimizer state dicts as safetensors: tensors in the file, param groups and scalars in its JSON metadata.

Why not torch.save: loading a pickle can run code, and a checkpoint folder may be writable by others.
`torch.load(weights_only=True)` would refuse code but still parses a pickle; safetensors parses only a
JSON header and raw tensor bytes.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open
from safetensors.torch import save_file

from cycletune.train.engines import (
    gathered,
    is_zero_optimizer,
    load_zero_optimizer_state,
    sharded_like,
    zero_optimizer_state,
)

_METADATA_KEY = "optimizer"
# AdamW group keys that choose a kernel rather than hold state.
_IMPLEMENTATION_FLAGS = ("fused", "foreach", "capturable", "differentiable")


@dataclass(frozen=True)
class OptimizerStateFile:
    """An optimizer checkpoint file: tensors as `state.<param index>.<name>`, everything else as JSON."""

    tensors: dict[str, torch.Tensor]
    metadata: dict[str, str]

    def save(self, path: Path) -> None:
        save_file(self.tensors, str(path), metadata=self.metadata)


def optimizer_state_file(optimizer: torch.optim.Optimizer) -> OptimizerStateFile:
    """optimizer.state_dict() in full tensors (FSDP shards gathered, ZeRO partitions read whole: under FSDP
    and DeepSpeed every rank calls this)."""
    state_dict = zero_optimizer_state(optimizer) if is_zero_optimizer(optimizer) else optimizer.state_dict()
    tensors: dict[str, torch.Tensor] = {}
    scalars: dict[str, Any] = {}
    for index, param_state in state_dict["state"].items():
        for name, value in gathered(param_state).items():
            if torch.is_tensor(value):
                tensors[f"state.{index}.{name}"] = value.detach().cpu().contiguous()
            else:
                scalars[f"{index}.{name}"] = value
    metadata = {"param_groups": state_dict["param_groups"], "scalars": scalars}
    return OptimizerStateFile(tensors, {_METADATA_KEY: json.dumps(metadata)})


def load_optimizer_state(optimizer: torch.optim.Optimizer, path: Path) -> None:
    """Restore what optimizer_state_file wrote; groups' tuples (betas) come back as tuples."""
    with safe_open(str(path), framework="pt") as handle:
        metadata = json.loads(handle.metadata()[_METADATA_KEY])
        state: dict[int, dict[str, Any]] = {}
        for key in handle.keys():  # noqa: SIM118 (safe_open handles are not iterable)
            _, index, name = key.split(".", 2)
            state.setdefault(int(index), {})[name] = handle.get_tensor(key)
    for key, value in metadata["scalars"].items():
        index, name = key.split(".", 1)
        state.setdefault(int(index), {})[name] = value
    groups = metadata["param_groups"]
    if len(groups) != len(optimizer.param_groups):
        raise ValueError(
            f"{path}: {len(groups)} parameter groups saved, the optimizer has {len(optimizer.param_groups)}"
        )
    for saved, live in zip(groups, optimizer.param_groups, strict=True):
        for name, value in saved.items():
            if isinstance(live.get(name), tuple):
                saved[name] = tuple(value)
        # How the update is computed (fused / foreach kernels) is the run's config, not the checkpoint's.
        saved.update({name: live[name] for name in _IMPLEMENTATION_FLAGS if name in live})
    if is_zero_optimizer(optimizer):
        load_zero_optimizer_state(optimizer, state, groups)
        return
    params = [param for group in optimizer.param_groups for param in group["params"]]
    for index, param_state in state.items():  # moments cut like their (possibly FSDP-sharded) parameter
        for name, value in param_state.items():
            if torch.is_tensor(value) and value.shape == params[index].shape:
                param_state[name] = sharded_like(value, params[index])
    optimizer.load_state_dict({"state": state, "param_groups": groups})
