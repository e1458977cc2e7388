"""The benchmark's machinery: statistics on synthetic timings, the acceptance checks, the step profiler and
FLOP count on the trainer's real step, and one mode end to end through worker processes."""

from __future__ import annotations

import json
import subprocess
import sys
import time
from dataclasses import asdict
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

from cycletune.models.generators import SPECS
from cycletune.models.tiny import PRESETS
from cycletune.train.cli.bench import bench_gpu
from cycletune.train.cli.bench.architectures import (
    ARCHITECTURES,
    CPU_ARCHITECTURES,
    MODEL_PRESETS,
    Architecture,
)
from cycletune.train.cli.bench.bench_modes import (
    BASELINE,
    LEVERS,
    MODES,
    bench_config,
    lever_rows,
    measured,
    mode_named,
)
from cycletune.train.cli.bench.bench_report import format_checks, format_table
from cycletune.train.cli.bench.checks import acceptance
from cycletune.train.cli.bench.cli import parse_args, run
from cycletune.train.cli.bench.measure import step_flops
from cycletune.train.cli.bench.orchestrate import DEFAULT_PAIRS, bench_architecture, plan_for
from cycletune.train.cli.bench.profiler import profile_step
from cycletune.train.cli.bench.stats_ratios import (
    mean_spearman,
    speed_ratio_interval,
    step_summary,
    time_ratio,
)
from cycletune.train.cli.bench.steps import BareGeneratorStep, TrainerStep
from cycletune.train.cli.bench.workers import Worker, WorkerDied, WorkerSpec, worker_context

REPO = Path(__file__).resolve().parents[2]


def test_step_summary_reports_median_min_and_throughput() -> None:
    summary = step_summary([0.2, 0.1, 0.4], batch_size=4)
    assert summary == pytest.approx({"median_ms": 200.0, "min_ms": 100.0, "samples_per_s": 20.0})


def test_speed_ratio_interval_brackets_the_true_ratio_and_shrugs_off_bursts() -> None:
    generator = torch.Generator().manual_seed(0)
    baseline = (1.0 + 0.05 * torch.rand(40, generator=generator)).tolist()
    ours = [time / 0.9 for time in baseline]  # 10% slower: speed ratio 0.9
    ours[3] *= 8  # another process's burst hits one of our steps
    interval = speed_ratio_interval(ours, baseline)
    assert interval["pairs"] == 40
    assert interval["low"] <= 0.9 <= interval["high"]
    assert interval["ratio"] == pytest.approx(0.9)
    assert interval["high"] - interval["low"] < 0.02


def test_speed_ratio_interval_widens_with_noise_and_needs_pairs() -> None:
    generator = torch.Generator().manual_seed(1)
    baseline = [1.0] * 30
    noisy = (1.0 + 0.5 * torch.rand(30, generator=generator)).tolist()
    quiet = (1.0 + 0.01 * torch.rand(30, generator=generator)).tolist()
    wide, narrow = speed_ratio_interval(noisy, baseline), speed_ratio_interval(quiet, baseline)
    assert wide["high"] - wide["low"] > 5 * (narrow["high"] - narrow["low"])
    with pytest.raises(ValueError, match="pairs"):
        speed_ratio_interval([1.0], [1.0])


def test_time_ratio_and_spearman() -> None:
    assert time_ratio([2.0, 3.0, 10.0], [1.0, 1.0, 1.0]) == pytest.approx(3.0)
    assert mean_spearman([[1, 2, 3], [1, 2, 3]], [[10, 20, 30], [30, 20, 10]]) == pytest.approx(0.0)
    assert mean_spearman([[1, 2, 3]], [[0.1, 0.5, 0.9]]) == pytest.approx(1.0)


def _figures(ours: list[float], baseline: list[float], **extra) -> dict:
    return {
        **step_summary(ours, 4),
        "seconds": ours,
        "baseline_seconds": baseline,
        "time_vs_baseline": time_ratio(ours, baseline),
        "peak_memory_mb": 100.0,
        "flops_per_step": 2e9,
        **extra,
    }


def test_acceptance_checks_read_the_measured_figures() -> None:
    base = [1.0] * 30
    results = {
        "small": {
            "generator": _figures([1.01] * 30, base),
            "captioner": _figures([0.5] * 4, [1.0] * 4),
            "i2t2i_soft": _figures([1.0] * 4, [1.0] * 4),
            "i2t2i_reward": {"error": "bench worker 'i2t2i_reward' died (1):\nout of memory"},
        },
        "tiny": {
            "generator": _figures([1.0] * 30, base),
            "generator_cached": _figures([0.75] * 30, base),
            "t2i2t_one_step": _figures([1.5] * 4, [1.0] * 4),
            BASELINE: {**_figures(base, base), "encoders_ms": 300.0},
        },
    }
    checks = acceptance(results)
    overhead = checks["framework_overhead"]
    assert overhead["passes"] and overhead["ratio"] == pytest.approx(1 / 1.01)
    cache = checks["cache_speedup"]
    assert cache["passes"] and cache["ratio"] == pytest.approx(1 / 0.75)
    assert cache["ceiling"] == pytest.approx(1000 / 700) and cache["vs_uncached"] == pytest.approx(1 / 0.75)
    costs = checks["cycle_costs"]
    assert costs["small/i2t2i_soft"]["relative_to_supervised"] == pytest.approx(2.0)
    assert not costs["small/i2t2i_soft"]["within_limit"]
    assert costs["tiny/t2i2t_one_step"]["within_limit"]
    assert "small/i2t2i_reward" not in costs, "a failed mode is left out of the checks"
    table = format_table(results)
    assert "| small | i2t2i_soft | 1000.0 | 1000.0 | 4.00 | 2.00 | 1.00x | 2.00x | 100 |" in table
    assert "| small | i2t2i_reward | failed: bench worker 'i2t2i_reward' died (1): |" in table


def test_acceptance_fails_with_too_few_pairs_or_a_slow_step() -> None:
    results = {"small": {"generator": _figures([1.2] * 30, [1.0] * 30)}}
    assert not acceptance(results)["framework_overhead"]["passes"]
    results = {"small": {"generator": _figures([1.0] * 10, [1.0] * 10)}}
    assert not acceptance(results)["framework_overhead"]["passes"], "fewer than 30 pairs never pass"


def test_every_architecture_has_a_model_preset() -> None:
    assert MODEL_PRESETS.keys() == ARCHITECTURES.keys()
    assert set(MODEL_PRESETS.values()) <= PRESETS.keys()


def _config(tiny_models, mode: str, arch: Architecture, tmp_path: Path):
    return bench_config(arch, tiny_models.captioner, tiny_models.generator, MODES[mode], tmp_path)


def test_profile_splits_the_trainers_one_step_by_component(tiny_models, tmp_path: Path) -> None:
    runner = TrainerStep(
        _config(tiny_models, "t2i2t_one_step", CPU_ARCHITECTURES["tiny"], tmp_path), "generator", "cpu"
    )
    profile = profile_step(runner, "cpu")
    assert profile["unet"]["calls"] == 2, "the denoising term and the one-step term each run the UNet"
    for part in ("unet", "VAE decoder", "captioner vision"):
        assert profile[part]["forward_ms"] > 0 and profile[part]["backward_ms"] > 0, part
    assert profile["VAE encoder"]["backward_ms"] == 0, "the reference latents need no gradient"
    assert set(profile["step"]) == {"forward", "backward", "update"}
    parts_backward = sum(values["backward_ms"] for name, values in profile.items() if name != "step")
    assert parts_backward <= profile["step"]["backward"] * 1.01
    assert step_flops(runner.step) > 0


def test_the_baseline_runs_in_bf16_with_fp32_adapters_as_on_the_gpu(tiny_models, tmp_path: Path) -> None:
    # The trainer's own bf16 path is tested end to end in test_trainer.py; the bare baseline's is here.
    arch = Architecture("tiny-bf16", resolution=32, batch_size=2, precision="bf16")
    baseline = BareGeneratorStep(_config(tiny_models, "generator", arch, tmp_path), "cpu")
    before = [param.detach().clone() for param in baseline.params]
    baseline.step()
    assert torch.isfinite(torch.tensor(baseline.logged["loss"]))
    assert baseline.unet.conv_in.weight.dtype == torch.bfloat16
    assert all(param.dtype == torch.float32 for param in baseline.params), "adapters train in fp32"
    assert any(not torch.equal(old, new) for old, new in zip(before, baseline.params, strict=True))
    assert baseline.extra()["encoders_ms"] > 0


@pytest.mark.slow
def test_one_mode_end_to_end_writes_the_table_and_json(tmp_path: Path) -> None:
    command = [
        sys.executable,
        "-m",
        "train.cli.bench",
        "--out",
        str(tmp_path),
        "--archs",
        "tiny",
        "--modes",
        "generator",
        "generator_cached",
        "--pairs",
        "3",
        "--warmup",
        "1",
        "--threads",
        "1",
        "--skip-reward",
    ]
    result = subprocess.run(command, cwd=REPO, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "GPU part skipped" in result.stdout
    report = json.loads((tmp_path / "latest.json").read_text())
    tiny = report["results"]["tiny"]
    assert set(tiny) == {"generator", "generator_cached", BASELINE}
    assert len(tiny["generator"]["seconds"]) == 3 and len(tiny[BASELINE]["seconds"]) == 6
    assert tiny["generator"]["cache"] is None and tiny["generator_cached"]["cache"]["image_hits"] > 0
    # The same model work as the baseline, and caching removes the encoders' share of it.
    assert tiny["generator"]["flops_per_step"] == tiny[BASELINE]["flops_per_step"]
    assert tiny["generator_cached"]["flops_per_step"] < tiny["generator"]["flops_per_step"]
    assert tiny[BASELINE]["peak_memory_mb"] > 0 and tiny[BASELINE]["encoders_ms"] > 0
    assert "profile" in tiny["generator"]
    assert report["machine"]["torch_threads"] == 1 and "torch" in report["machine"]["versions"]
    assert "cache_speedup" in report["checks"]
    assert "| tiny | generator_cached |" in (tmp_path / "latest.md").read_text()


@pytest.mark.slow
def test_a_worker_that_dies_raises_with_its_log(tmp_path: Path) -> None:
    missing = str(tmp_path / "no-such-model")
    spec = WorkerSpec(CPU_ARCHITECTURES["tiny"], "generator", missing, missing, str(tmp_path), 1, 0)
    with pytest.raises(WorkerDied, match="no-such-model"):
        Worker(worker_context(cuda=False), spec, tmp_path / "generator.log")


def test_each_generator_family_has_a_tiny_and_a_small_row_group_and_sdxl_a_gpu_one() -> None:
    families = sorted(spec.name for spec in SPECS)
    for size in ("tiny", "small"):
        sd = CPU_ARCHITECTURES[size]
        groups = [
            arch for arch in CPU_ARCHITECTURES.values() if MODEL_PRESETS[arch.name] == MODEL_PRESETS[size]
        ]
        assert sorted(arch.family for arch in groups) == families, size
        for arch in groups:
            assert (arch.resolution, arch.batch_size) == (sd.resolution, sd.batch_size), arch.name
            assert arch.family in PRESETS[MODEL_PRESETS[arch.name]][1], (
                f"{arch.name}: no preset of its family"
            )
            assert arch.has_baseline == (arch.family == "sd")
    sdxl = ARCHITECTURES["sdxl-blip-base"]
    assert (sdxl.family, sdxl.device, sdxl.precision, sdxl.resolution) == ("sdxl", "cuda", "bf16", 1024)
    # By default the other families run their supervised step and the cycle modes through their denoiser.
    family_plan = plan_for(CPU_ARCHITECTURES["tiny-flux"], None, None, None, threads=1)
    assert list(family_plan.pairs) == ["generator", "i2t2i_soft", "t2i2t_one_step"]
    assert list(plan_for(sd, None, None, None, threads=1).pairs) == list(MODES)
    assert plan_for(sd, ["generator"], 3, 0, threads=1).pairs == {"generator": 3}


def test_a_family_without_a_baseline_is_checked_and_reported_on_its_own_medians() -> None:
    def alone(ours: list[float]) -> dict:
        return {key: value for key, value in _figures(ours, ours).items() if "baseline" not in key}

    results = {"tiny-flux": {"generator": alone([0.1] * 4), "t2i2t_one_step": alone([0.3] * 4)}}
    checks = acceptance(results)
    assert checks["cycle_costs"]["tiny-flux/t2i2t_one_step"]["relative_to_supervised"] == pytest.approx(3.0)
    assert "framework_overhead" not in checks and "cache_speedup" not in checks
    architectures = {"tiny-flux": asdict(CPU_ARCHITECTURES["tiny-flux"])}
    table = format_table(results, architectures)
    assert table.startswith("**tiny-flux** (flux generator): Flux 2 double + 2 single blocks")
    assert "| tiny-flux | t2i2t_one_step | 300.0 | 300.0 | 13.33 | 2.00 |  | 3.00x | 100 |" in table


def _bench(tmp_path: Path, *arguments: str) -> dict:
    """run() in this process, with its torch threads left as they are (run sets them)."""
    common = ["--out", str(tmp_path), "--threads", str(torch.get_num_threads()), "--skip-reward"]
    return run(parse_args([*common, *arguments]))


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the refusal without CUDA")
def test_the_gpu_architectures_need_cuda(tmp_path: Path) -> None:
    for name in ("sd15-blip-base", "sdxl-blip-base"):
        with pytest.raises(SystemExit, match=f"--archs {name} needs CUDA"):
            _bench(tmp_path, "--archs", name)
    assert not any(tmp_path.iterdir())


@pytest.mark.slow
def test_a_family_architecture_benches_one_mode_end_to_end(tmp_path: Path, capsys) -> None:
    report = _bench(tmp_path, "--archs", "tiny-sd3", "--modes", "generator", "--pairs", "2", "--warmup", "0")
    assert "GPU part skipped" in capsys.readouterr().out
    assert report["architectures"]["tiny-sd3"]["family"] == "sd3"
    rows = report["results"]["tiny-sd3"]
    assert set(rows) == {"generator"}, "no baseline row: the bare baseline is SD's"
    generator = rows["generator"]
    assert len(generator["seconds"]) == 2 and min(generator["seconds"]) > 0 and generator["median_ms"] > 0
    assert generator["flops_per_step"] > 0 and "time_vs_baseline" not in generator
    assert generator["profile"]["transformer"]["backward_ms"] > 0, "the profile finds the family's denoiser"
    assert "**tiny-sd3** (sd3 generator)" in (tmp_path / "latest.md").read_text()


def test_lever_rows_stack_one_lever_each_after_their_mode(tiny_models, tmp_path: Path) -> None:
    assert lever_rows("generator", ["fused", "compile"]) == ["generator+fused", "generator+fused+compile"]
    stacked = mode_named("generator+fused+compile")
    assert stacked.phase == "generator" and not stacked.cache
    assert stacked.overrides == (*LEVERS["fused"], *LEVERS["compile"])
    sd = CPU_ARCHITECTURES["tiny"]
    plan = plan_for(sd, ["generator_cached", "generator"], 3, 0, threads=1, levers=["fused", "tf32"])
    assert list(plan.pairs) == ["generator_cached", "generator", "generator+fused", "generator+fused+tf32"]
    assert set(plan.pairs.values()) == {3}
    alone = plan_for(sd, ["captioner"], None, 0, threads=1, levers=["flash"])
    assert list(alone.pairs) == ["generator+flash", "captioner"], "without their mode the lever rows lead"
    assert alone.pairs["generator+flash"] == DEFAULT_PAIRS["tiny"]["generator"]
    config = bench_config(
        sd,
        tiny_models.captioner,
        tiny_models.generator,
        mode_named("+".join(["generator", *LEVERS])),
        tmp_path,
    )
    generator = config.generator
    assert (generator.compile, generator.channels_last, generator.attention) == (True, True, "flash")
    assert generator.optimizer.fused and config.captioner.optimizer.fused and config.train.allow_tf32
    assert bench_config(sd, tiny_models.captioner, tiny_models.generator, MODES["generator"], tmp_path) == (
        bench_config(sd, tiny_models.captioner, tiny_models.generator, mode_named("generator"), tmp_path)
    )


def _gpu_results(lever_seconds: float, lever_mfu: float) -> dict:
    base = [0.17] * 10
    return {
        "generator": _figures([0.17] * 10, base, mfu=0.17),
        "generator_cached": _figures([0.125] * 10, base, mfu=0.14),
        "generator+fused": _figures([0.16] * 10, base, mfu=0.18),
        "generator+fused+compile": _figures([lever_seconds] * 10, base, mfu=lever_mfu),
        "t2i2t_reward": {"skipped": "time budget spent (a mode took 25 s, median)"},
        BASELINE: _figures(base, base, mfu=0.17),
    }


def test_gpu_targets_are_checked_and_reported() -> None:
    checks = acceptance({"sd15-blip-base": _gpu_results(0.11, 0.36)})["gpu_targets"]
    assert checks["uncached"]["passes"] and checks["uncached"]["ratio"] == pytest.approx(1.0)
    assert checks["cached"]["passes"] and checks["cached"]["ratio"] == pytest.approx(0.17 / 0.125)
    levers = checks["levers"]
    assert levers["row"] == "generator+fused+compile" and levers["passes"]
    assert levers["ratio"] == pytest.approx(0.17 / 0.11) and levers["mfu"] == 0.36
    assert checks["mfu_everywhere"], "a skipped row is not measured, so it needs no MFU"
    text = format_checks({"gpu_targets": checks}, None)
    assert "sd15-blip-base best lever row generator+fused+compile: speed 1.55x the baseline's" in text
    assert "MFU 36.0% (>= 35%) -> PASS" in text
    table = format_table({"sd15-blip-base": _gpu_results(0.11, 0.36)})
    assert "| sd15-blip-base | t2i2t_reward | not run: time budget spent" in table
    slow = acceptance({"sd15-blip-base": _gpu_results(0.12, 0.36)})["gpu_targets"]["levers"]
    assert not slow["passes"], "1.42x is short of 1.5x"
    low_mfu = acceptance({"sd15-blip-base": _gpu_results(0.11, 0.30)})["gpu_targets"]["levers"]
    assert not low_mfu["passes"], "fast enough, but 30% MFU"
    results = _gpu_results(0.11, 0.36)
    del results["generator_cached"]["mfu"]
    assert not acceptance({"sd15-blip-base": results})["gpu_targets"]["mfu_everywhere"]
    assert "gpu_targets" not in acceptance({"tiny": {}})


def test_a_spent_time_budget_skips_modes_without_starting_them(tmp_path: Path) -> None:
    arch = CPU_ARCHITECTURES["tiny-sd3"]  # no baseline worker to start either
    plan = plan_for(arch, ["generator", "i2t2i_soft"], 2, 0, threads=1)
    missing = (tmp_path / "no-captioner", tmp_path / "no-generator")  # a started worker would die on these
    results = bench_architecture(arch, missing, plan, tmp_path, deadline=time.perf_counter() - 1)
    assert set(results) == {"generator", "i2t2i_soft"}
    assert all("time budget spent" in figures["skipped"] for figures in results.values())
    assert measured(results) == {}


def test_bench_gpu_dry_run_prints_its_commands_and_budget(capsys) -> None:
    assert bench_gpu.main(["--dry-run"]) == 0
    printed = capsys.readouterr().out
    assert "time budget: 540 s in all" in printed
    tests_line = next(line for line in printed.splitlines() if line.startswith("gpu-tests"))
    assert "-m gpu" in tests_line and "tests/train/test_gpu.py" in tests_line
    bench_line = next(line for line in printed.splitlines() if line.startswith("bench "))
    assert "--archs sd15-blip-base" in bench_line and "--pairs 10" in bench_line
    assert f"--levers {' '.join(LEVERS)}" in bench_line
    assert set(bench_gpu.MODE_ORDER) == set(MODES) and set(bench_gpu.STEP_MS) == {*MODES, BASELINE}
    for row in ("i2t2i_soft", "i2t2i_gumbel", "generator+fused+tf32+flash+channels_last+compile"):
        assert f"  {row} " in printed


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the refusal without CUDA")
def test_bench_gpu_without_cuda_exits_2_at_once(tmp_path: Path, capsys) -> None:
    assert bench_gpu.main(["--out", str(tmp_path / "out")]) == 2
    assert "needs CUDA" in capsys.readouterr().err
    assert not (tmp_path / "out").exists()


def test_bench_gpu_runs_the_tests_then_the_bench_within_its_budget(tmp_path: Path, monkeypatch) -> None:
    """Even if each part runs until it is killed, the two end within the 9 minutes."""
    clock, calls = [0.0], []

    def run_to_its_limit(command: list[str], *, timeout: float, **options) -> subprocess.CompletedProcess:
        calls.append(command)
        clock[0] += timeout
        return subprocess.CompletedProcess(command, 0)

    monkeypatch.setattr(bench_gpu, "time", SimpleNamespace(perf_counter=lambda: clock[0]))
    monkeypatch.setattr(bench_gpu.torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(bench_gpu.torch.cuda, "get_device_name", lambda: "a stand-in GPU")
    monkeypatch.setattr(bench_gpu.subprocess, "run", run_to_its_limit)
    assert bench_gpu.main(["--out", str(tmp_path)]) == 0
    tests, bench = calls
    assert tests[1:4] == ["-m", "pytest", "-q"] and bench[1:3] == ["-m", "train.cli.bench"]
    assert clock[0] <= bench_gpu.BUDGET_S == 540
    time_budget = float(bench[bench.index("--time-budget") + 1])
    assert time_budget <= bench_gpu.BUDGET_S - bench_gpu.BUDGET_S / 3 - bench_gpu.REPORT_RESERVE_S
    summary = json.loads((tmp_path / "summary.json").read_text())
    assert summary["gpu"] == "a stand-in GPU" and summary["bench"]["rc"] == 0
