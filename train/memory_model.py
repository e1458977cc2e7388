"""Peak GPU memory of training steps, from the trainer's own step run on fake tensors: nothing large is
allocated and nothing is computed, so a laptop can size a GPU run.

How: the run is built as the trainer builds it (train/run.build_run: both models, LoRA, dtypes, optimizers,
bridge) with every model built from its config on the meta device (`weightless_models`), then each weight
becomes a fake tensor (torch's FakeTensorMode: real shapes, dtypes and strides, no storage). The step is
train/step.phase_step itself, under CUDA's autocast rules (train/memory_autocast.py) and with the dispatch
modes of train/memory_tracking.py counting live bytes as the CUDA caching allocator would (each storage
rounded up to 512 bytes, freed when its last tensor dies, autograd's saved tensors included).

The peak is the most that was live at once during one step: weights (both models, frozen in the run's
precision, LoRA in fp32), gradients of the trainable ones, AdamW's two fp32 moments (made before the step,
as every step after a run's first carries them through its forward), and activations (saved tensors,
temporaries, the batch). Left out: the CUDA context (~0.5 GB, outside torch's allocator), cuDNN and cuBLAS workspaces and
the scratch memory inside a kernel (a convolution's workspace can reach hundreds of MB), and the caching
allocator's fragmentation and block splitting (up to ~1 MB per large tensor). So the figure is a floor
for torch.cuda.max_memory_allocated, and nvidia-smi shows more again.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from contextlib import ExitStack, contextmanager, suppress
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from unittest import mock

import torch
from accelerate import Accelerator
from accelerate.state import AcceleratorState, PartialState
from accelerate.utils import extract_model_from_parallel
from diffusers import ModelMixin
from torch._subclasses.fake_tensor import FakeTensorMode
from transformers import AutoConfig, GenerationConfig, PreTrainedModel

from cycletune.train.config import Config
from cycletune.train.memory_autocast import cuda_autocast_rules
from cycletune.train.memory_tracking import KINDS, FakeValues, LiveBytes
from cycletune.train.run import Run, build_run
from cycletune.train.step import phase_step


@dataclass(frozen=True)
class StepMemory:
    """The peak of live bytes during a step, by kind (memory_tracking.KINDS), and where it was."""

    peak: int
    parts: dict[str, int]
    stage: str  # where: "forward", "backward" or "update" (phase_step's stages), or "optimizer state"
    answered: dict[str, int]  # questions of fake values answered by policy, by call site (memory_tracking)


def _diffusers_from_config(
    cls: type[ModelMixin],
    name_or_path: str,
    *,
    subfolder: str | None = None,
    revision: str | None = None,
    torch_dtype: torch.dtype | None = None,
    **_: Any,
) -> ModelMixin:
    config = cls.load_config(name_or_path, subfolder=subfolder, revision=revision)
    with torch.device("meta"):
        model = cls.from_config(config)
    return (model.to(torch_dtype) if torch_dtype is not None else model).eval()


def _transformers_from_config(
    cls: type[PreTrainedModel],
    name_or_path: str,
    *_: Any,
    config: Any = None,
    revision: str | None = None,
    subfolder: str = "",
    dtype: torch.dtype | None = None,
    **__: Any,
) -> PreTrainedModel:
    config = config or AutoConfig.from_pretrained(name_or_path, revision=revision, subfolder=subfolder)
    with torch.device("meta"):
        model = cls._from_config(config, dtype=dtype)
    # None saved: the one built from the config stands, as from_pretrained leaves it.
    with suppress(OSError):
        if model.can_generate():
            model.generation_config = GenerationConfig.from_pretrained(name_or_path, subfolder=subfolder)
    return model.eval()


def _save_config_of_diffusers_model(model: ModelMixin, save_directory: str | Path, **_: Any) -> None:
    model.save_config(save_directory)


def _save_config_of_transformers_model(model: PreTrainedModel, save_directory: str | Path, **_: Any) -> None:
    model.config.save_pretrained(save_directory)
    if model.can_generate():
        model.generation_config.save_pretrained(save_directory)


@contextmanager
def weightless_models() -> Iterator[None]:
    """Within: diffusers and transformers models are saved as their configs only and loaded from their configs
    onto the meta device (weights are never read), so SD- and SDXL-sized folders are written (models built
    under accelerate's init_empty_weights) and loaded in seconds with no memory. Tokenizers, processors and
    schedulers are saved and loaded as ever."""
    patches = {
        (ModelMixin, "from_pretrained"): classmethod(_diffusers_from_config),
        (PreTrainedModel, "from_pretrained"): classmethod(_transformers_from_config),
        (ModelMixin, "save_pretrained"): _save_config_of_diffusers_model,
        (PreTrainedModel, "save_pretrained"): _save_config_of_transformers_model,
    }
    with ExitStack() as stack:
        for (owner, name), replacement in patches.items():
            stack.enter_context(mock.patch.object(owner, name, replacement))
        yield


@contextmanager
def accelerator_state_of_its_own() -> Iterator[None]:
    """Within: a fresh Accelerate state, so an Accelerator of any mixed precision can be made beside one that a
    test or tool made before (Accelerate keeps one process-wide state, fixed at its first precision); the
    previous state comes back after."""
    saved = (dict(PartialState._shared_state), dict(AcceleratorState._shared_state))
    AcceleratorState._reset_state(reset_partial_state=True)
    try:
        yield
    finally:
        AcceleratorState._reset_state(reset_partial_state=True)
        PartialState._shared_state.update(saved[0])
        AcceleratorState._shared_state.update(saved[1])


def _fake_copy(tensor: torch.Tensor, fake_mode: FakeTensorMode) -> torch.Tensor:
    with fake_mode:
        return torch.empty_strided(tensor.shape, tensor.stride(), dtype=tensor.dtype, device="cpu")


def _make_fake(
    modules: Iterable[torch.nn.Module], optimizers: Iterable[torch.optim.Optimizer], fake_mode: FakeTensorMode
) -> None:
    """Every parameter and buffer replaced by a fake one of its shape and dtype (tied weights stay tied), and
    the optimizers pointed at the new parameters (they hold no state before their first step)."""
    replaced: dict[int, torch.nn.Parameter] = {}
    for module in modules:
        for submodule in module.modules():
            for name, param in submodule._parameters.items():
                if param is not None and id(param) not in replaced:
                    replaced[id(param)] = torch.nn.Parameter(
                        _fake_copy(param, fake_mode), requires_grad=param.requires_grad
                    )
                if param is not None:
                    submodule._parameters[name] = replaced[id(param)]
            for name, buffer in submodule._buffers.items():
                if buffer is not None:
                    submodule._buffers[name] = _fake_copy(buffer, fake_mode)
    for optimizer in optimizers:
        for group in optimizer.param_groups:
            group["params"] = [replaced[id(param)] for param in group["params"]]


def _optimizer_state_made(optimizer: torch.optim.Optimizer) -> None:
    """The optimizer as on a GPU from its second update on: its multi-tensor (foreach) implementation, which
    AdamW picks by itself for CUDA tensors, and its state as a first update (on zero gradients) leaves it."""
    for group in optimizer.param_groups:
        if group.get("foreach") is None:
            group["foreach"] = True
    for group in optimizer.param_groups:
        for param in group["params"]:
            param.grad = torch.zeros_like(param)
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)


def _run_modules(run: Run) -> list[torch.nn.Module]:
    """Every module a step touches: both models (unwrapped) and the vocabulary bridge."""
    modules = [extract_model_from_parallel(model) for model in run.models.values()]
    return modules + ([run.bridge] if run.bridge is not None else [])


def step_peak(
    run: Run, phase: str, batch: dict[str, Any], fake_mode: FakeTensorMode | None = None
) -> StepMemory:
    """Peak memory of one optimizer update of `phase` on `batch` in a built run, as from its second update on
    (the optimizer state exists), and how it splits. The run's tensors and the batch's are real, or fake ones
    of `fake_mode` (estimate_step); either way the step runs under CUDA's autocast rules."""
    optimizer = run.parts.optimizers[phase]
    live, values = LiveBytes(), FakeValues()
    live.track_modules(_run_modules(run))
    for value in batch.values():
        if torch.is_tensor(value):
            live.add(value, "activations")
    with ExitStack() as stack:
        for context in (cuda_autocast_rules(), fake_mode, values, live, live.optimizer_steps_tracked()):
            if context is not None:
                stack.enter_context(context)
        live.stage = "optimizer state"
        _optimizer_state_made(getattr(optimizer, "optimizer", optimizer))
        phase_step(
            run.accelerator,
            phase,
            models=run.models,
            optimizer=optimizer,
            scheduler=run.parts.schedulers[phase],
            next_batch=lambda key: batch,
            config=run.config,
            step=1,
            bridge=run.bridge,
            caption_scorer=run.caption_scorer,
            on_stage=lambda stage: setattr(live, "stage", stage),
        )
    parts = {kind: live.at_peak.get(kind, 0) for kind in KINDS}
    return StepMemory(live.peak, parts, live.peak_stage, dict(values.answered))


def estimate_step(config: Config, phase: str, batch: dict[str, Any]) -> StepMemory:
    """step_peak of `phase` on `batch` under `config`, with the run built weightless and made of fake tensors
    (the module doc says how, and what the figure leaves out)."""
    fake_mode = FakeTensorMode(allow_non_fake_inputs=True)
    with accelerator_state_of_its_own():
        accelerator = Accelerator(mixed_precision=config.mixed_precision, cpu=True, device_placement=False)
        with weightless_models():
            run = build_run(config, accelerator)
        optimizers = [
            getattr(optimizer, "optimizer", optimizer) for optimizer in run.parts.optimizers.values()
        ]
        _make_fake(_run_modules(run), optimizers, fake_mode)
        fake_batch = {
            key: _fake_copy(value, fake_mode) if torch.is_tensor(value) else value
            for key, value in batch.items()
        }
        return step_peak(run, phase, fake_batch, fake_mode)
