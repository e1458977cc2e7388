"""The speed levers (generator.compile, channels_last, attention; optimizer.fused; train.allow_tf32): each set
by its config key reaches the model or optimizer the trainer builds, and leaves the step's loss as it was.
CUDA-only numerics (TF32 products, flash attention, the fused kernel on the GPU) run where CUDA does."""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import replace

import pytest
import torch
import torch._dynamo
from accelerate import Accelerator
from cycle_runs import tiny_config
from torch.nn.attention import SDPBackend

from cycletune.models.speed_levers import (
    ATTENTION_KERNELS,
    PinnedKernelProcessor,
    pin_attention_kernel,
    set_tf32,
)
from cycletune.train.builders import build_optimizer
from cycletune.train.cli.bench.architectures import CPU_ARCHITECTURES, save_models
from cycletune.train.cli.bench.bench_modes import MODES, bench_config, mode_named
from cycletune.train.cli.bench.steps import TrainerStep
from cycletune.train.config import ConfigError, OptimizerSettings
from cycletune.train.engines import check_levers_fit_engine

# Every lever on, compiled by dynamo's eager backend: the same tracing and graph as inductor, without the
# minutes inductor takes to generate kernels for the tiny UNet on a CPU (it gave the same loss, run once).
ALL_LEVERS = mode_named("generator+fused+tf32+flash+channels_last+compile")
# What scaled_dot_product_attention raises when the kernels it may use cannot run the inputs (CPU / CUDA).
NO_KERNEL = "No viable backend|No available kernel"
LEVERED = replace(ALL_LEVERS, overrides=(*ALL_LEVERS.overrides, "generator.compile_backend=eager"))


@pytest.fixture
def default_tf32() -> Iterator[None]:
    """Put torch's TF32 settings back after a test that sets them (they are process-wide)."""
    saved = (torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32)
    yield
    torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = saved


@pytest.fixture(scope="module")
def steps(tmp_path_factory: pytest.TempPathFactory) -> dict[str, TrainerStep]:
    """The trainer's own build and generator step (bench's TrainerStep: build_run + phase_step on a fixed
    batch), plain and with every lever, one step each, on the bench's tiny models (their attention weighs
    enough in the loss for a changed attention to show)."""
    saved = (torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32)
    arch = CPU_ARCHITECTURES["tiny"]
    captioner, generator = save_models(arch, tmp_path_factory.mktemp("models"))
    built = {}
    for name, mode in (("plain", MODES["generator"]), ("levered", LEVERED)):
        config = bench_config(arch, captioner, generator, mode, tmp_path_factory.mktemp(name))
        built[name] = TrainerStep(config, "generator", "cpu")
    built["tf32_after_build"] = torch.backends.cuda.matmul.allow_tf32
    torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = saved
    torch._dynamo.reset()
    graphs_before = torch._dynamo.utils.counters["stats"]["unique_graphs"]
    for step in (built["plain"], built["levered"]):
        step.step()
    built["graphs_compiled"] = torch._dynamo.utils.counters["stats"]["unique_graphs"] - graphs_before
    return built


def test_config_keys_default_off_and_are_validated(tiny_models) -> None:
    config = tiny_config(tiny_models)
    generator = config.generator
    assert (generator.compile, generator.channels_last, generator.attention) == (False, False, "sdpa")
    assert (
        not config.train.allow_tf32 and not generator.optimizer.fused and not config.captioner.optimizer.fused
    )
    assert generator.denoiser_levers().describe() == "none"
    for override, key in (
        ("generator.attention=xformers", "generator.attention"),
        ("generator.compile_backend=tensorrt", "generator.compile_backend"),
        ("generator.optimizer.fused=maybe", "generator.optimizer.fused"),
    ):
        with pytest.raises(ConfigError, match=key):
            tiny_config(tiny_models, override)
    assert set(ATTENTION_KERNELS) == {"sdpa", "flash", "efficient", "cudnn", "math"}


def test_each_lever_reaches_what_the_trainer_built(steps: dict) -> None:
    levered = steps["levered"]
    generator = levered.generator
    optimizer = levered.run.parts.optimizers["generator"]
    assert optimizer.param_groups[0]["fused"] is True
    assert steps["plain"].run.parts.optimizers["generator"].param_groups[0]["fused"] is None
    for module in (generator.denoiser, generator.vae):
        weights = [param for param in module.parameters() if param.ndim == 4]
        assert weights and all(param.is_contiguous(memory_format=torch.channels_last) for param in weights)
    assert not steps["plain"].generator.denoiser.conv_in.weight.is_contiguous(
        memory_format=torch.channels_last
    )
    processors = generator.denoiser.attn_processors.values()
    assert processors and all(
        isinstance(processor, PinnedKernelProcessor) and processor.kernel == SDPBackend.FLASH_ATTENTION
        for processor in processors
    )
    assert generator.denoiser._compiled_call_impl is not None
    assert steps["plain"].generator.denoiser._compiled_call_impl is None


def test_the_levered_step_runs_compiled_and_gives_the_same_loss(steps: dict) -> None:
    assert steps["graphs_compiled"] >= 1, "the step ran the compiled denoiser"
    plain, levered = steps["plain"].logged, steps["levered"].logged
    assert plain.keys() == levered.keys()
    for term, value in plain.items():
        # Kernels and memory layouts round differently (~4e-7 here); attention 1% off moves it by 3e-5.
        assert levered[term] == pytest.approx(value, rel=1e-5), term


def test_the_trainer_applies_allow_tf32(steps: dict) -> None:
    """build_run sets train.allow_tf32 before it builds anything (the flag is process-wide)."""
    assert steps["tf32_after_build"], (
        "train.allow_tf32 did not reach torch: build_run must call models.speed_levers.set_tf32"
    )


def test_set_tf32_sets_the_flags_both_torch_apis_read_and_off_leaves_torch_alone(default_tf32) -> None:
    torch.backends.cuda.matmul.allow_tf32 = False
    set_tf32(False)
    assert not torch.backends.cuda.matmul.allow_tf32
    set_tf32(True)
    assert torch.backends.cuda.matmul.allow_tf32 and torch.backends.cudnn.allow_tf32
    # torch.compile's inductor reads the newer API, parts of dynamo the flags: both must answer.
    assert torch.backends.cuda.matmul.fp32_precision == "tf32"
    assert torch.backends.cudnn.conv.fp32_precision == "tf32"


class _KernelSpy:
    """An attention processor that records which SDPA kernels torch may use each time it runs."""

    def __init__(self, processor, calls: list[tuple[bool, bool]]) -> None:
        self.processor, self.calls = processor, calls

    def __call__(self, attn, hidden_states, *args, **kwargs):
        self.calls.append((torch.backends.cuda.flash_sdp_enabled(), torch.backends.cuda.math_sdp_enabled()))
        return self.processor(attn, hidden_states, *args, **kwargs)


def test_the_pinned_kernel_holds_in_gradient_checkpointings_recomputation(generator) -> None:
    """The kernel is pinned in the processor, so the backward's recomputation of a checkpointed block runs
    on the same kernel as the forward (a context around the forward alone would be gone by then)."""
    unet = generator.denoiser
    calls: list[tuple[bool, bool]] = []
    unet.set_attn_processor({name: _KernelSpy(proc, calls) for name, proc in unet.attn_processors.items()})
    pin_attention_kernel(unet, "math")
    unet.enable_gradient_checkpointing()
    unet.train()
    latents = torch.randn(generator.latent_shape(2), requires_grad=True)
    states = torch.randn(2, 77, unet.config.cross_attention_dim)
    unet(latents, torch.tensor([10, 500]), states).sample.square().mean().backward()
    attention_layers = len(unet.attn_processors)
    assert len(calls) == 2 * attention_layers, "each attention ran in the forward and again in the backward"
    assert set(calls) == {(False, True)}, "only the math kernel, forward and recomputation"
    assert latents.grad is not None


def test_a_pinned_kernel_that_cannot_run_fails_instead_of_falling_back(generator) -> None:
    """On the CPU torch has no memory-efficient kernel: pinned to it, attention must refuse, which shows the
    pin reaches scaled_dot_product_attention."""
    pin_attention_kernel(generator.denoiser, "efficient")
    states = torch.randn(1, 77, generator.denoiser.config.cross_attention_dim)
    with pytest.raises(RuntimeError, match=NO_KERNEL), torch.no_grad():
        generator.denoiser(torch.randn(generator.latent_shape(1)), torch.tensor([10]), states)


def test_fused_adamw_takes_the_same_step(default_tf32) -> None:
    weights = {}
    for fused in (False, True):
        torch.manual_seed(0)
        module = torch.nn.Linear(8, 4)
        optimizer = build_optimizer(module, ["weight", "bias"], OptimizerSettings(fused=fused))
        for _ in range(3):
            module(torch.randn(5, 8)).square().mean().backward()
            optimizer.step()
            optimizer.zero_grad()
        weights[fused] = module.weight.detach()
        assert optimizer.param_groups[0]["fused"] is (True if fused else None)
    torch.testing.assert_close(weights[True], weights[False])


cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")


@pytest.mark.gpu
@cuda
def test_tf32_changes_float32_matmuls_on_cuda(default_tf32) -> None:
    generator = torch.Generator("cuda").manual_seed(0)
    a, b = (torch.randn(512, 512, device="cuda", generator=generator) for _ in range(2))
    exact = (a.double() @ b.double()).float()
    ieee = (a @ b - exact).abs().max()
    set_tf32(True)
    tf32 = (a @ b - exact).abs().max()
    assert tf32 > 10 * ieee, f"TF32 error {tf32} vs IEEE {ieee}: the setting did not reach cuBLAS"


@pytest.mark.gpu
@cuda
def test_pinned_flash_attention_runs_in_bf16_and_refuses_float32_on_cuda(generator) -> None:
    unet = generator.denoiser.to("cuda")
    states = torch.randn(2, 77, unet.config.cross_attention_dim, device="cuda")
    latents, timesteps = (
        torch.randn(generator.latent_shape(2), device="cuda"),
        torch.tensor([10, 500], device="cuda"),
    )
    with torch.no_grad(), torch.autocast("cuda", torch.bfloat16):
        reference = unet(latents, timesteps, states).sample
        pin_attention_kernel(unet, "flash")
        flash = unet(latents, timesteps, states).sample
    torch.testing.assert_close(flash.float(), reference.float(), atol=2e-2, rtol=2e-2)
    with pytest.raises(RuntimeError, match=NO_KERNEL), torch.no_grad():
        unet(latents, timesteps, states)  # flash attention has no float32 kernel


@pytest.mark.gpu
@cuda
def test_fused_adamw_steps_on_cuda() -> None:
    torch.manual_seed(0)
    module = torch.nn.Linear(64, 64).cuda()
    optimizer = build_optimizer(module, ["weight", "bias"], OptimizerSettings(fused=True))
    before = module.weight.detach().clone()
    module(torch.randn(8, 64, device="cuda")).square().mean().backward()
    optimizer.step()
    assert optimizer.param_groups[0]["fused"] and not torch.equal(before, module.weight)


def test_channels_last_is_refused_under_a_deepspeed_launch(
    tiny_models, monkeypatch: pytest.MonkeyPatch
) -> None:
    """DeepSpeed views each weight as flat bytes to broadcast it; the launcher's DeepSpeed environment is
    enough to refuse (on a CPU machine the accelerator says DeepSpeed only once its plugins are applied)."""
    config = tiny_config(tiny_models, "generator.channels_last=true")
    accelerator = Accelerator(cpu=True)
    check_levers_fit_engine(config.generator, accelerator)  # DDP or one process: channels_last runs
    monkeypatch.setenv("ACCELERATE_USE_DEEPSPEED", "true")
    with pytest.raises(ConfigError, match=r"generator\.channels_last=true cannot run under DeepSpeed"):
        check_levers_fit_engine(config.generator, accelerator)
    check_levers_fit_engine(tiny_config(tiny_models).generator, accelerator)
