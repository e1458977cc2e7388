"""The distributed engine a run trains under, as Accelerate's launcher configured it: DDP, FSDP2 or DeepSpeed.

Accelerate honours an FSDP config only on accelerator devices: on a CPU-only machine it falls back to DDP
(MULTI_CPU) whatever the config says, while torch's FSDP2 itself runs on CPU over gloo. So that an FSDP run
is developed and tested without a GPU, `honour_fsdp_on_cpu` switches such a run to the FSDP plugin the
launcher configured (its FSDP_* environment), exactly as Accelerate does on GPUs.

Checkpoints and exports hold full tensors whatever the engine, so a run resumes on any process count and
exports what a DDP run exports: `gathered` makes full tensors of FSDP shards, `sharded_like` cuts them again.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Mapping
from typing import Any

import torch
from accelerate import Accelerator
from accelerate.state import PartialState
from accelerate.utils import DistributedType, FullyShardedDataParallelPlugin
from torch.distributed.fsdp import FSDPModule
from torch.distributed.tensor import DTensor, distribute_tensor

from cycletune.models.lockstep import mark_sharded

logger = logging.getLogger(__name__)


def honour_fsdp_on_cpu(accelerator: Accelerator) -> None:
    """Train with the launcher's FSDP plugin where Accelerate fell back to CPU DDP (see the module doc)."""
    wants_fsdp = os.environ.get("ACCELERATE_USE_FSDP", "false").lower() == "true"
    if not wants_fsdp or accelerator.distributed_type != DistributedType.MULTI_CPU:
        return
    plugin = FullyShardedDataParallelPlugin()
    state = accelerator.state
    state.fsdp_plugin = plugin
    state.distributed_type = DistributedType.FSDP
    PartialState._shared_state["distributed_type"] = DistributedType.FSDP
    logger.info(
        "FSDP%d on CPU (gloo): Accelerate's FSDP plugin applied to a CPU-only run", plugin.fsdp_version
    )


def gathered(tensors: Mapping[str, Any]) -> dict[str, Any]:
    """The values with every FSDP shard (a DTensor) gathered into its full tensor, the rest as they are.

    Gathering is a collective: under FSDP every rank calls this, though only the main process writes.
    """
    return {
        name: value.full_tensor() if isinstance(value, DTensor) else value for name, value in tensors.items()
    }


def sharded_like(value: torch.Tensor, live: torch.Tensor) -> torch.Tensor:
    """A full tensor read from a checkpoint, cut into this rank's shard where its live counterpart is an FSDP
    shard. Every rank read the same file, so each takes its own part without communicating."""
    if not isinstance(live, DTensor):
        return value
    return distribute_tensor(value.to(live.dtype), live.device_mesh, live.placements, src_data_rank=None)


def prepare_model(
    accelerator: Accelerator, model: torch.nn.Module, optimizer: torch.optim.Optimizer
) -> tuple[torch.nn.Module, torch.optim.Optimizer]:
    """accelerator.prepare of one model with its optimizer (FSDP2 takes one model per call).

    Under FSDP each block class the model's own libraries declare indivisible (`_no_split_modules` of its
    transformers and diffusers parts: transformer layers, UNet resnet and attention blocks) becomes a unit
    that is gathered only while it runs, so a forward holds one block's full weights at a time. Accelerate
    keeps one plugin for both models; the classes are chosen per model, from the launcher's
    fsdp_transformer_layer_cls_to_wrap where set, else from the model, keeping those that can be units.
    """
    if not accelerator.is_fsdp2:
        return accelerator.prepare(model, optimizer)
    plugin = accelerator.state.fsdp_plugin
    wanted = os.environ.get("FSDP_TRANSFORMER_CLS_TO_WRAP")
    names = (
        wanted.split(",")
        if wanted
        else sorted(
            {name for part in model.modules() for name in getattr(part, "_no_split_modules", None) or ()}
        )
    )
    plugin.transformer_cls_names_to_wrap = [name for name in names if name in _unit_classes(model)]
    prepared_model, prepared_optimizer = accelerator.prepare(model, optimizer)
    mark_sharded(prepared_model)  # its caption decoding then goes on until every rank's captions ended
    units = sum(isinstance(part, FSDPModule) for part in prepared_model.modules())
    logger.info(
        "FSDP2: %s in %d units (%s)",
        type(model).__name__,
        units,
        ", ".join(plugin.transformer_cls_names_to_wrap),
    )
    return prepared_model, prepared_optimizer


def _unit_classes(model: torch.nn.Module) -> set[str]:
    """Names of the module classes in `model` that can be FSDP units, whose weights are gathered only while
    their own forward runs. Two kinds stay in the model's root unit (gathered for its whole forward):
    blocks with a parameter tied to one outside them (BLIP's text embeddings share their weight with the
    output head, and FSDP2 refuses a parameter in two units), and blocks holding token embeddings, whose
    tables the vocabulary bridge reads directly, outside their forward."""
    owners: dict[int, set[str]] = {}
    for path, part in model.named_modules():
        for param in part.parameters(recurse=False):
            owners.setdefault(id(param), set()).add(path)
    classes: dict[str, bool] = {}
    for path, part in model.named_modules():
        inside = {f"{path}.{name}".strip(".") for name, _ in part.named_modules()} | {path}
        tied = any(owners[id(param)] - inside for param in part.parameters())
        embeds = any(isinstance(inner, torch.nn.Embedding) for inner in part.modules())
        classes[type(part).__name__] = classes.get(type(part).__name__, True) and not (tied or embeds)
    return {name for name, can_be_unit in classes.items() if can_be_unit}
