"""Where one trainer step's time goes: per component (forward, backward) and per stage (forward, backward,
optimizer update)."""

from __future__ import annotations

import time
from collections import defaultdict
from functools import partial
from typing import Any

import torch

from cycletune.train.cli.bench.measure import synchronize
from cycletune.train.cli.bench.steps import TrainerStep


def _profiled_parts(runner: TrainerStep) -> dict[str, Any]:
    """The big frozen or trained parts whose time a profile reports separately."""
    generator, blip = runner.generator, runner.captioner.model
    if hasattr(blip, "get_base_model"):
        blip = blip.get_base_model()
    encoders = {
        slot.encoder.replace("_", " "): getattr(generator, slot.encoder)
        for slot in generator.spec.text_encoders
    }
    parts = {
        **encoders,
        generator.spec.denoiser: generator.denoiser,
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
