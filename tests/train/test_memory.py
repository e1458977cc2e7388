"""The memory model: its byte counting against autograd's saved tensors, its fake step against the same step on
real tensors, the levers it must see (checkpointing, bf16 weights, optimizer state), and its copy of CUDA's
autocast rules against CUDA's own kernels (run on fake CUDA tensors, which need no GPU for a forward)."""

from __future__ import annotations

import math
import signal
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import replace
from pathlib import Path
from typing import Any

import pytest
import torch
from accelerate import Accelerator
from diffusers.models.attention_processor import AttnProcessor
from torch._subclasses.fake_tensor import FakeTensorMode
from torch.utils._python_dispatch import TorchDispatchMode

from cycletune.models.generator import Generator
from cycletune.train.cli import memory
from cycletune.train.cli.bench.architectures import ARCHITECTURES, save_models
from cycletune.train.cli.bench.bench_modes import MODES, bench_config
from cycletune.train.cli.bench.steps import fixed_batch
from cycletune.train.config import Config
from cycletune.train.memory_autocast import autocast_kernels, cuda_autocast_rules, cuda_policies
from cycletune.train.memory_model import StepMemory, accelerator_state_of_its_own, step_peak
from cycletune.train.memory_tracking import ALLOCATION_UNIT, LiveBytes
from cycletune.train.run import build_run

TINY = replace(ARCHITECTURES["tiny"], precision="no")  # the bench's tiny models, batch 4, 32 px


@pytest.fixture(scope="module")
def out_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("memory")


@pytest.fixture(scope="module")
def weightless(out_dir: Path) -> tuple[Path, Path]:
    return memory.weightless_folders(TINY, out_dir / "weightless")


def _estimate(
    folders: tuple[Path, Path], out_dir: Path, precision: str = "no", checkpointing: str = "none"
) -> memory.Row:
    """The CLI's row for a supervised generator step."""
    return memory.estimate_mode(
        replace(TINY, precision=precision), folders, "generator", checkpointing, out_dir
    )


@pytest.fixture(scope="module")
def fp32_row(weightless: tuple[Path, Path], out_dir: Path) -> memory.Row:
    return _estimate(weightless, out_dir)


@pytest.fixture(scope="module")
def fp32_estimate(fp32_row: memory.Row) -> StepMemory:
    return fp32_row.memory


@pytest.fixture(scope="module")
def real_config(out_dir: Path) -> Config:
    """fp32_row's config on the same models with their weights written out, for a run of real tensors."""
    folders = save_models(TINY, out_dir / "real")
    return bench_config(TINY, *folders, MODES["generator"], out_dir)


def _rounded(nbytes: int) -> int:
    return math.ceil(nbytes / ALLOCATION_UNIT) * ALLOCATION_UNIT


def test_live_activations_are_what_autograd_saved(generator: Generator) -> None:
    """At the end of a real forward pass, the live activations are exactly the storages autograd saved for the
    backward pass plus the inputs and the output (weights counted apart): frees and views are counted right."""
    saved: dict[int, torch.UntypedStorage] = {}

    def pack(tensor: torch.Tensor) -> torch.Tensor:
        saved[tensor.untyped_storage().data_ptr()] = tensor.untyped_storage()
        return tensor

    live = LiveBytes()
    live.track_modules([generator.unet])
    with live, torch.autograd.graph.saved_tensors_hooks(pack, lambda tensor: tensor):
        latents = torch.randn(2, 4, 16, 16, requires_grad=True)
        states = torch.randn(2, 77, generator.text_encoder.config.hidden_size)
        timesteps = torch.tensor([500, 20])
        output = generator.unet(latents, timesteps, states).sample
    weights = {param.untyped_storage().data_ptr() for param in generator.unet.parameters()}
    activations = {pointer: storage for pointer, storage in saved.items() if pointer not in weights}
    activations |= {
        t.untyped_storage().data_ptr(): t.untyped_storage() for t in (latents, states, timesteps, output)
    }
    assert len(activations) > 50
    assert live.live["activations"] == sum(_rounded(storage.nbytes()) for storage in activations.values())
    assert live.live["weights"] == sum(
        _rounded(param.untyped_storage().nbytes()) for param in generator.unet.parameters()
    )


def test_fake_estimate_equals_the_same_step_on_real_tensors(
    weightless: tuple[Path, Path], real_config: Config, fp32_estimate: StepMemory
) -> None:
    """Weightless models, fake tensors and answered questions change nothing: the peak of the same step with
    the weights loaded and real tensors is the estimate's, kind by kind."""
    assert not [path.name for folder in weightless for path in folder.rglob("*.safetensors")]
    with accelerator_state_of_its_own():
        run = build_run(real_config, Accelerator(mixed_precision="no", cpu=True))
        real = step_peak(run, "generator", fixed_batch(real_config, "generator"))
    assert real.parts == fp32_estimate.parts
    # Fake values are finite, so the step checks pass and the update runs; only the logged norm is asked.
    assert real.answered == {}
    assert {site.split(":")[0] for site in fp32_estimate.answered} == {"train/update.py"}
    assert (real.peak, real.stage) == (fp32_estimate.peak, fp32_estimate.stage)
    assert fp32_estimate.parts["activations"] > fp32_estimate.parts["weights"] > 0


def test_optimizer_state_is_two_fp32_moments_per_trained_weight(
    real_config: Config, fp32_estimate: StepMemory
) -> None:
    with accelerator_state_of_its_own():
        run = build_run(real_config, Accelerator(mixed_precision="no", cpu=True))
    trained = [param for param in run.parts.models["generator"][0].parameters() if param.requires_grad]
    moments = sum(2 * _rounded(param.numel() * 4) for param in trained)
    steps = len(trained) * ALLOCATION_UNIT  # AdamW's step count, one scalar tensor per parameter
    assert fp32_estimate.parts["optimizer"] == moments + steps
    assert fp32_estimate.peak == sum(fp32_estimate.parts.values())


def test_bf16_halves_the_frozen_weights(
    weightless: tuple[Path, Path], out_dir: Path, fp32_estimate: StepMemory
) -> None:
    bf16 = _estimate(weightless, out_dir, precision="bf16").memory
    assert bf16.parts["weights"] / fp32_estimate.parts["weights"] == pytest.approx(0.5, abs=0.03)
    assert bf16.parts["optimizer"] == fp32_estimate.parts["optimizer"]  # LoRA trains in fp32 either way


def test_gradient_checkpointing_lowers_the_peak_in_the_table(
    weightless: tuple[Path, Path], out_dir: Path, fp32_row: memory.Row
) -> None:
    checkpointed = _estimate(weightless, out_dir, checkpointing="generator")
    assert checkpointed.memory.parts["activations"] < 0.8 * fp32_row.memory.parts["activations"]
    assert checkpointed.memory.parts["weights"] == fp32_row.memory.parts["weights"]
    table = memory.format_table([fp32_row, checkpointed]).splitlines()
    assert table[2].startswith("| generator | none | 0.0") and table[2].endswith("| yes |")
    assert table[3].startswith("| generator | generator |")


class TookTooLong(Exception):
    """An estimate still running when its alarm went off."""


@contextmanager
def alarm_after(seconds: int) -> Iterator[None]:
    """Raise TookTooLong in the main thread after `seconds`, so a loop that never ends fails the test."""

    def ring(signum: int, frame: Any) -> None:
        raise TookTooLong(f"still running after {seconds} s")

    previous = signal.signal(signal.SIGALRM, ring)
    signal.alarm(seconds)
    try:
        yield
    finally:
        signal.alarm(0)
        signal.signal(signal.SIGALRM, previous)


def test_every_mode_make_memory_estimates_by_default_finishes(
    weightless: tuple[Path, Path], out_dir: Path
) -> None:
    """make memory's default modes each give a row on the tiny models in seconds (~25 s in all here). A mode
    whose step loops until tensor values say stop (transformers' generate) never ends on fake tensors: such a
    mode must be left out of the defaults and the choices, as the CIDEr-D reward is."""
    assert "t2i2t_reward_cider_d" in MODES and "t2i2t_reward" in memory.BUDGET_MODES
    for mode in memory.BUDGET_MODES:
        with alarm_after(120):
            row = memory.estimate_mode(TINY, weightless, mode, "none", out_dir)
        assert row.mode == mode and row.memory.peak > 0
    with pytest.raises(SystemExit):
        memory.parse_args(["--modes", *memory.UNESTIMABLE_MODES])


def test_autocast_rules_cover_exactly_the_ops_cuda_autocast_casts() -> None:
    assert set(cuda_policies()) == autocast_kernels("AutocastCUDA")


class _OutputDtypes(TorchDispatchMode):
    """Each op's name and output dtypes, in order (ops without tensor outputs, like prim.device, left out)."""

    def __init__(self) -> None:
        super().__init__()
        self.ops: list[tuple[str, tuple[torch.dtype, ...]]] = []

    def __torch_dispatch__(self, func: Any, types: Any, args: Any = (), kwargs: Any = None) -> Any:
        out = func(*args, **(kwargs or {}))
        outputs = out if isinstance(out, (tuple, list)) else (out,)
        dtypes = tuple(t.dtype for t in outputs if isinstance(t, torch.Tensor))
        if dtypes:
            self.ops.append((str(func.overloadpacket), dtypes))
        return out


@contextmanager
def _cuda_autocast() -> Iterator[None]:
    """torch.autocast("cuda") without its check for a GPU (fake CUDA tensors need none for a forward)."""
    torch.set_autocast_enabled("cuda", True)
    torch.set_autocast_dtype("cuda", torch.bfloat16)
    torch.autocast_increment_nesting()
    try:
        yield
    finally:
        torch.autocast_decrement_nesting()
        torch.clear_autocast_cache()
        torch.set_autocast_enabled("cuda", False)


def _forward_dtypes(generator: Generator, device: str) -> list[tuple[str, tuple[torch.dtype, ...]]]:
    """The op sequence of the UNet's bf16 forward on fake `device` tensors, under that device's autocast."""
    fake_mode = FakeTensorMode()
    unet = generator.unet
    # Attention as matmuls and softmax: scaled_dot_product_attention picks its kernel by device (a flash
    # kernel on CPU and on a real GPU; without a GPU to ask, fake CUDA tensors get the math fallback).
    unet.set_attn_processor(AttnProcessor())
    with fake_mode:
        for module in unet.modules():
            for name, param in module._parameters.items():
                if param is not None:
                    module._parameters[name] = torch.nn.Parameter(
                        torch.empty(param.shape, dtype=torch.bfloat16, device=device)
                    )
        latents = torch.empty(2, 4, 16, 16, device=device)
        states = torch.empty(2, 77, generator.text_encoder.config.hidden_size, device=device)
        steps = torch.tensor([500, 20], device=device)
    recorder = _OutputDtypes()
    autocast = _cuda_autocast() if device == "cuda" else torch.autocast("cpu", torch.bfloat16)
    with fake_mode, autocast, recorder:
        unet(latents, steps, states)
    return recorder.ops


def test_cpu_tensors_under_the_rules_get_cuda_autocast_dtypes(tiny_models: Any) -> None:
    """The tiny UNet's forward: every op's output dtype on CPU under the copied rules is what CUDA autocast's
    own kernels give (group norms, softmax and upsampling in fp32), unlike plain CPU autocast."""
    cuda = _forward_dtypes(Generator.from_pretrained(str(tiny_models.generator)), "cuda")
    with cuda_autocast_rules():
        emulated = _forward_dtypes(Generator.from_pretrained(str(tiny_models.generator)), "cpu")
    plain_cpu = _forward_dtypes(Generator.from_pretrained(str(tiny_models.generator)), "cpu")
    assert emulated == cuda
    assert ("aten.native_group_norm", (torch.float32,) * 3) in cuda
    assert plain_cpu != cuda
