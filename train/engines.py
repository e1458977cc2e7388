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
from cycletune.models.lora import load_trainable_state_dict, trainable_state_dict
from cycletune.train.config import ConfigError, GeneratorSettings

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


def launches_deepspeed() -> bool:
    """Whether the launcher configured DeepSpeed (Accelerate's environment), which on a CPU-only machine the
    accelerator does not say until use_deepspeed_per_model applies it."""
    return os.environ.get("ACCELERATE_USE_DEEPSPEED", "false").lower() == "true"


def check_levers_fit_engine(settings: GeneratorSettings, accelerator: Accelerator) -> None:
    """Refuse generator.channels_last under an engine that keeps the weights in its own layout, before any
    model is built: FSDP2 shards only contiguous parameters, and DeepSpeed broadcasts each weight viewed as
    flat bytes and swaps trained ones for views of its flat buffers. Both would fail deep in their start-up
    (or, for ZeRO's flat buffers, train weights that are no longer the model's); DDP keeps the layout."""
    if not settings.channels_last:
        return
    engine = "FSDP" if accelerator.distributed_type == DistributedType.FSDP else None
    engine = "DeepSpeed" if launches_deepspeed() else engine
    if engine is not None:
        raise ConfigError(
            f"generator.channels_last=true cannot run under {engine}, which needs every weight contiguous "
            "(channels_last strides them); set generator.channels_last=false, or train under DDP "
            "(configs/accelerate/ddp.yaml)"
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
    accelerator: Accelerator, model: torch.nn.Module, optimizer: torch.optim.Optimizer, name: str
) -> tuple[torch.nn.Module, torch.optim.Optimizer]:
    """accelerator.prepare of one model (called `name`) with its optimizer (FSDP2 takes one model per call;
    DeepSpeed makes one engine per call, with the plugin of that name).

    Under FSDP each block class the model's own libraries declare indivisible (`_no_split_modules` of its
    transformers and diffusers parts: transformer layers, UNet resnet and attention blocks) becomes a unit
    that is gathered only while it runs, so a forward holds one block's full weights at a time. Accelerate
    keeps one plugin for both models; the classes are chosen per model, from the launcher's
    fsdp_transformer_layer_cls_to_wrap where set, else from the model, keeping those that can be units.
    """
    if is_deepspeed(accelerator):
        return _prepare_zero(accelerator, name, model, optimizer)
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


# DeepSpeed ZeRO ---------------------------------------------------------------------------------------------
#
# Each model is its own DeepSpeed engine (Accelerate's one-plugin-per-model API), with its own gradient
# clipping. The frozen partner stays inside its engine, placed as the trained model is: the two swap roles
# every update, so moving the partner out and back would copy a whole model twice per step. Under ZeRO-2
# both models' weights are replicated (optimizer state and gradients are cut); under ZeRO-3 they are cut at
# rest and each model is gathered whole while its forward or backward runs, the partner's too. The engine
# drives backward and the update itself (Accelerate's `backward` knows one engine only). Checkpoints hold
# the fp32 master weights and full Adam moments, read through DeepSpeed's full-tensor accessors, so they
# load under any engine and process count.


def is_deepspeed(accelerator: Accelerator) -> bool:
    return accelerator.distributed_type == DistributedType.DEEPSPEED


def shards_weights(accelerator: Accelerator) -> bool:
    """Whether the models' weights are cut over the ranks (FSDP, ZeRO-3): every rank then runs every
    forward, validation included, since each gathers the shards from all ranks."""
    if is_deepspeed(accelerator):
        return accelerator.state.deepspeed_plugin.zero_stage == 3
    return accelerator.is_fsdp2


def reads_state_collectively(accelerator: Accelerator) -> bool:
    """Whether reading full weights or optimizer state is a collective (FSDP, DeepSpeed): every rank reads."""
    return accelerator.is_fsdp2 or is_deepspeed(accelerator)


def use_deepspeed_per_model(
    accelerator: Accelerator, max_grad_norms: Mapping[str, float | None], micro_batch_size: int
) -> None:
    """Give each model its own DeepSpeed plugin (the launcher's config, this model's gradient clipping).

    The trainer accumulates gradients itself (explicit boundaries, loss already divided), so DeepSpeed's
    own accumulation is 1. Models are built whole and cut when their engine starts: transformers' ZeRO-3
    construction hook (which Accelerate arms) is disarmed, since the builders read and edit the weights.
    On a CPU-only machine Accelerate ignores a DeepSpeed launch under ACCELERATE_USE_CPU=1 (and without it
    numbers every process rank 0); there the plugins are applied over gloo, as `honour_fsdp_on_cpu` does.
    """
    if not launches_deepspeed():
        return
    import deepspeed
    from accelerate.utils import DeepSpeedPlugin
    from transformers.integrations import unset_hf_deepspeed_config

    state, precision = accelerator.state, accelerator.mixed_precision
    if accelerator.distributed_type == DistributedType.MULTI_CPU:
        deepspeed.comm.init_distributed(dist_backend="gloo")  # adopts Accelerate's process group
        state.distributed_type = DistributedType.DEEPSPEED
        PartialState._shared_state["distributed_type"] = DistributedType.DEEPSPEED
        logger.info("DeepSpeed on CPU (gloo): the launcher's ZeRO config applied to a CPU-only run")
    if accelerator.num_processes != int(os.environ.get("WORLD_SIZE", "1")):
        raise RuntimeError("DeepSpeed on a machine without accelerators needs ACCELERATE_USE_CPU=1")
    plugins = {}
    for name, max_grad_norm in max_grad_norms.items():
        plugin = DeepSpeedPlugin()
        plugin.set_mixed_precision(precision)
        plugin.deepspeed_config.update(
            train_micro_batch_size_per_gpu=micro_batch_size,
            train_batch_size=micro_batch_size * accelerator.num_processes,
            gradient_accumulation_steps=1,
            gradient_clipping=max_grad_norm or 0.0,
        )
        plugins[name] = plugin
    state.deepspeed_plugins = plugins
    state.select_deepspeed_plugin(next(iter(plugins)))
    unset_hf_deepspeed_config()


def _prepare_zero(
    accelerator: Accelerator, name: str, model: torch.nn.Module, optimizer: torch.optim.Optimizer
) -> tuple[torch.nn.Module, torch.optim.Optimizer]:
    """One model's engine, with the plugin of its name; its optimizer keeps the model's parameters by group
    (ZeRO swaps flat copies into the torch optimizer's groups)."""
    from transformers.integrations import unset_hf_deepspeed_config

    accelerator.state.select_deepspeed_plugin(name)
    unset_hf_deepspeed_config()
    groups = [list(group["params"]) for group in optimizer.param_groups]  # ZeRO replaces them by flat copies
    zero3 = accelerator.state.deepspeed_plugin.zero_stage == 3
    if zero3:
        _gathered_while_running(model)
    engine, prepared_optimizer = accelerator.prepare(model, optimizer)
    prepared_optimizer.trained_groups = groups
    if zero3:
        mark_sharded(engine.module)
    logger.info("DeepSpeed ZeRO-%d: %s", accelerator.state.deepspeed_plugin.zero_stage, type(model).__name__)
    return engine, prepared_optimizer


def _gathered_while_running(model: torch.nn.Module) -> None:
    """ZeRO-3 gathers the whole model for each of its forwards and backwards (one DeepSpeed leaf module),
    not module by module: the vocabulary bridge reads embedding tables outside their modules' forward, and
    gathering per block left weights cut when the partner's backward needed them (measured on CPU)."""
    from deepspeed.utils import set_z3_leaf_modules

    set_z3_leaf_modules(model, [type(model)])


def is_zero_optimizer(optimizer: torch.optim.Optimizer) -> bool:
    """Whether `optimizer` is one that _prepare_zero returned (its state lives in ZeRO's partitions)."""
    return hasattr(optimizer, "trained_groups")


def trained_parameters(optimizer: torch.optim.Optimizer) -> list[list[torch.nn.Parameter]]:
    """The optimizer's parameters by group as the model holds them (under DeepSpeed, not ZeRO's flat copies)."""
    groups = getattr(optimizer, "trained_groups", None)
    return groups if groups is not None else [list(group["params"]) for group in optimizer.param_groups]


def zero_backward(model: torch.nn.Module, loss: torch.Tensor, last_micro_batch: bool) -> None:
    """The engine's backward: gradients reduced into their partitions on the last micro-batch only."""
    model.set_gradient_accumulation_boundary(last_micro_batch)
    model.backward(loss)


def zero_update(
    model: torch.nn.Module, scheduler: torch.optim.lr_scheduler.LRScheduler
) -> tuple[float, bool]:
    """The engine's update: clipped to its gradient_clipping, skipped on every rank alike where a gradient
    is not finite (ZeRO's overflow check, every precision); then the schedule. Returns (norm, skipped)."""
    model.step()
    scheduler.step()
    return float(model.get_global_grad_norm() or 0.0), not model.was_step_applied()


def full_trainable_state(
    accelerator: Accelerator, module: torch.nn.Module, names: list[str]
) -> dict[str, torch.Tensor]:
    """The trained tensors whole (every rank calls this under FSDP and DeepSpeed): under DeepSpeed the fp32
    master weights, which is what a DDP run trains and saves, whatever the engine's precision."""
    if not is_deepspeed(accelerator):
        return gathered(trainable_state_dict(module, names))
    from deepspeed.utils import safe_get_full_fp32_param

    wanted = set(names)
    return {
        name: safe_get_full_fp32_param(param).detach().cpu()
        for name, param in module.named_parameters()
        if name in wanted
    }


def load_full_trainable_state(
    accelerator: Accelerator, module: torch.nn.Module, names: list[str], weights: dict[str, torch.Tensor]
) -> None:
    """Restore full tensors (as read by every rank) into the model and, under DeepSpeed, its fp32 masters."""
    if not is_deepspeed(accelerator):
        live = dict(module.named_parameters())
        cut = {
            key: sharded_like(value, live[key]) if key in live else value for key, value in weights.items()
        }
        load_trainable_state_dict(module, cut, names)
        return
    from deepspeed.runtime.zero import GatheredParameters
    from deepspeed.utils import safe_set_full_fp32_param

    wanted = set(names)
    params = {name: param for name, param in module.named_parameters() if name in wanted}
    with GatheredParameters(list(params.values()), modifier_rank=0):  # ZeRO-3: whole while inside
        load_trainable_state_dict(module, weights, names)
    for name, param in params.items():
        if name in weights:
            safe_set_full_fp32_param(param, weights[name].to(accelerator.device, torch.float32))


def zero_optimizer_state(optimizer: torch.optim.Optimizer) -> dict[str, Any]:
    """optimizer.state_dict()'s layout (state by parameter index, groups naming their indices) with full
    Adam moments, read from ZeRO's partitions (a collective: every rank calls this)."""
    from deepspeed.utils import safe_get_full_optimizer_state

    base = optimizer.optimizer.optimizer  # Accelerate's wrapper > ZeRO > the torch optimizer
    state: dict[int, dict[str, Any]] = {}
    groups, first = [], 0
    for live, params in zip(base.param_groups, trained_parameters(optimizer), strict=True):
        flat_state = next((base.state[flat] for flat in live["params"] if flat in base.state), {})
        indices = list(range(first, first + len(params)))
        for index, param in zip(indices, params, strict=True):
            if flat_state:
                state[index] = {
                    key: safe_get_full_optimizer_state(param, key).cpu()
                    if _is_moment(value)
                    else _copy(value)
                    for key, value in flat_state.items()
                }
        groups.append({**{key: value for key, value in live.items() if key != "params"}, "params": indices})
        first += len(params)
    return {"state": state, "param_groups": groups}


def load_zero_optimizer_state(
    optimizer: torch.optim.Optimizer, state: dict[int, dict[str, Any]], groups: list[dict[str, Any]]
) -> None:
    """Write zero_optimizer_state's layout into ZeRO's partitions (every rank, each from the same file)."""
    from deepspeed.utils import safe_set_full_optimizer_state

    zero = optimizer.optimizer
    base = zero.optimizer
    if state and not base.state:
        _start_optimizer_state(zero, base)
    for live, saved, params in zip(base.param_groups, groups, trained_parameters(optimizer), strict=True):
        live.update({key: value for key, value in saved.items() if key != "params"})
        for index, param in zip(saved["params"], params, strict=True):
            for key, value in state.get(index, {}).items():
                if _is_moment(value):
                    safe_set_full_optimizer_state(param, value.to(param.device, torch.float32), key)
                else:  # the step count, one per flat partition
                    for flat in live["params"]:
                        base.state[flat][key] = _copy(value)


def _copy(value: Any) -> Any:
    """A step count of its own for each parameter (one flat partition's is shared by all of its parameters)."""
    return value.clone() if torch.is_tensor(value) else value


def _is_moment(value: Any) -> bool:
    return torch.is_tensor(value) and value.dim() > 0


def _start_optimizer_state(zero: Any, base: torch.optim.Optimizer) -> None:
    """AdamW makes its moments at its first step, and a resumed model may not have had one yet: one step at
    learning rate 0 on zero gradients makes them and moves no weight; ZeRO then links them to the params."""
    rates = [group["lr"] for group in base.param_groups]
    for group in base.param_groups:
        group["lr"] = 0.0
        for flat in group["params"]:
            flat.grad = torch.zeros_like(flat)
    base.step()
    for group, rate in zip(base.param_groups, rates, strict=True):
        group["lr"] = rate
        for flat in group["params"]:
            flat.grad = None
    link = getattr(zero, "_lazy_init_hp_params_optimizer_state", None)  # ZeRO-1/2 link lazily
    if link is not None:
        link()
