"""`make bench-gpu`: what a short GPU loan should measure, in at most 9 minutes, written to runs/bench-gpu/.

    python -m train.cli.bench.bench_gpu            # needs CUDA (exits 2 at once without it)
    python -m train.cli.bench.bench_gpu --dry-run  # the commands and the time budget, on any machine

Two parts, one after the other, each logged to its own file:
1. the GPU tests (`pytest -m gpu`, three files side by side: bf16 training with a resume, the sync-debug
   counts of the generator step, the speed levers' CUDA numerics, DeepSpeed ZeRO-2 and ZeRO-3 on one GPU
   against a plain run where the deepspeed package is installed);
2. `python -m train.cli.bench --archs sd15-blip-base` with 10 pairs per mode, every mode (soft and gumbel
   included), and the speed levers stacked as rows of the supervised generator step, with the bench's
   --time-budget set to what the tests left: a mode starts only if it would end in time at the median
   pace of the modes so far, so the report is written even when the estimates below are off.

The modes run in order of what the GPU figures are for: the supervised step and its lever rows, the cached
step, the modes the first GPU run did not time (soft and gumbel failed there; the T2I2T reward came later),
one_step beside the reward so that their peak memories come from one run, then the rest, slowest last, so
that where the budget runs short the rows left out are the ones with a first figure. Without a GPU in
the sessions that wrote this, the estimates come from the first GPU run's step times (README, H200, 4 pairs)
and, where that run had none, from each mode's cost relative to the supervised step on the CPU bench.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass, replace
from pathlib import Path

import torch

from cycletune.train.cli.bench.architectures import GPU_ARCHITECTURES
from cycletune.train.cli.bench.bench_modes import BASELINE, PROFILED_MODES
from cycletune.train.cli.bench.orchestrate import plan_for
from cycletune.train.cli.help_format import HelpFormatter

REPO = Path(__file__).resolve().parents[3]
BUDGET_S = 540
# Kept back from the bench's --time-budget: the bench's imports, a last mode slower than the median (the
# slow ones run last), the baseline worker's closing figures and the report.
REPORT_RESERVE_S = 30
TESTS = ("tests/train/test_gpu.py", "tests/train/test_speed_levers.py", "tests/train/test_deepspeed.py")
# est.: one pytest worker per file; the DeepSpeed file's five tiny trainer launches (~20 s each) take longest
TESTS_ESTIMATE_S = 110
ARCH, PAIRS, WARMUP = "sd15-blip-base", 10, 2
MODE_ORDER = (
    "generator",
    "generator_cached",
    "i2t2i_soft",
    "i2t2i_gumbel",
    "t2i2t_reward",
    "t2i2t_one_step",  # beside t2i2t_reward: the two modes' peak memory, measured in one run
    "t2i2t_one_step_shared",
    "captioner",
    "t2i2t_sample",
    "i2t2i_reward",
    "t2i2t_reward_cider_d",
)
# Stacked in this order (train.cli.bench --levers): the cheap, exact levers first, compile last.
LEVER_ORDER = ("fused", "tf32", "flash", "channels_last", "compile")
# Step times, ms (H200, bf16, batch 8): measured in the first GPU run, or estimated (est.) from the CPU
# bench's ratios to the supervised step; a lever row is charged the supervised step's time.
STEP_MS = {
    BASELINE: 170,
    "captioner": 100,
    "generator": 201,
    "generator_cached": 160,
    "i2t2i_soft": 300,  # est.: the generator's forward and backward plus the captioner's
    "i2t2i_gumbel": 600,  # est.: token-by-token decoding with gradient, 3x soft on the tiny CPU bench
    "i2t2i_reward": 1364,
    "t2i2t_one_step": 781,
    "t2i2t_one_step_shared": 450,  # est.: 0.55x one_step on the small CPU bench
    "t2i2t_sample": 1186,
    "t2i2t_reward": 1400,  # est.: sampling like t2i2t_sample plus the reward's scoring
    "t2i2t_reward_cider_d": 1700,  # est.: a greedy re-caption in place of the likelihood pass, + PTB (Java)
}
WORKER_START_S = 15  # est.: spawn, imports, loading ~1.3B fp32 weights, first CUDA step
COMPILE_S = 120  # est.: inductor on SD 1.5's UNet, forward and backward, cold cache
MODELS_S = 30  # est.: random-init SD 1.5 + BLIP-base on the CPU, saved


@dataclass(frozen=True)
class Part:
    name: str
    command: list[str]
    estimate_s: float


def row_estimate(row: str) -> float:
    """A bench row's seconds: its worker's start, warm-up, pairs (each with a baseline step) and closing
    steps (the FLOP count, and three profiled steps for the profiled modes)."""
    mode = row.split("+")[0]
    closing = 1 + (3 if row in PROFILED_MODES else 0)
    steps = (WARMUP + PAIRS + closing) * STEP_MS[mode] + PAIRS * STEP_MS[BASELINE]
    return WORKER_START_S + steps / 1000 + (COMPILE_S if "compile" in row.split("+") else 0)


def bench_rows() -> list[str]:
    """The bench's rows in the order it runs them (its plan for the modes and levers below)."""
    plan = plan_for(GPU_ARCHITECTURES[ARCH], MODE_ORDER, PAIRS, WARMUP, threads=1, levers=LEVER_ORDER)
    return list(plan.pairs)


def parts(out: Path) -> list[Part]:
    """The two parts' commands (the bench's --time-budget is set when it starts) and their estimates."""
    tests = [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "-m", "gpu", "--durations=15"]
    tests += ["-n", str(len(TESTS)), "--dist", "loadfile"]
    tests += [*TESTS, "--junitxml", str(out / "gpu-tests.xml")]
    bench = [sys.executable, "-m", "train.cli.bench", "--archs", ARCH, "--out", str(out / "bench")]
    bench += ["--pairs", str(PAIRS), "--warmup", str(WARMUP), "--skip-reward", "--modes", *MODE_ORDER]
    bench += ["--levers", *LEVER_ORDER]
    bench_estimate = MODELS_S + WORKER_START_S + sum(row_estimate(row) for row in bench_rows())
    return [Part("gpu-tests", tests, TESTS_ESTIMATE_S), Part("bench", bench, bench_estimate)]


def describe(plan: list[Part], budget: float) -> str:
    """The commands, each bench row's estimate and where the budget runs out by the estimates."""
    lines = [f"time budget: {budget:.0f} s in all"]
    for part in plan:
        lines.append(f"{part.name} (estimate {part.estimate_s:.0f} s): {' '.join(part.command)}")
    elapsed = TESTS_ESTIMATE_S + MODELS_S + WORKER_START_S
    lines.append(f"bench rows, estimated seconds (from {elapsed:.0f} s: tests, models, baseline worker):")
    for row in bench_rows():
        elapsed += row_estimate(row)
        late = "  (past the time budget by the estimate: runs if the measured pace allows)"
        late = late if elapsed > budget - REPORT_RESERVE_S else ""
        lines.append(f"  {row:<48} {row_estimate(row):6.0f} s  ends at {elapsed:4.0f} s{late}")
    return "\n".join(lines)


def run_part(part: Part, out: Path, timeout: float) -> dict[str, float | int | str]:
    """Run one part with its output in out/NAME.log; a part past its timeout is killed (rc 124)."""
    started = time.perf_counter()
    with open(out / f"{part.name}.log", "w") as log:
        try:
            rc = subprocess.run(
                part.command, cwd=REPO, stdout=log, stderr=subprocess.STDOUT, timeout=timeout
            ).returncode
        except subprocess.TimeoutExpired:
            rc = 124
    wall = time.perf_counter() - started
    print(f"{part.name}: exit {rc} after {wall:.0f} s (log: {out / f'{part.name}.log'})", flush=True)
    return {"rc": rc, "wall_s": wall, "command": " ".join(part.command)}


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m train.cli.bench.bench_gpu", description=__doc__, formatter_class=HelpFormatter
    )
    parser.add_argument("--out", default="runs/bench-gpu", help="results and logs folder")
    parser.add_argument("--budget", type=float, default=BUDGET_S, help="seconds for both parts together")
    parser.add_argument(
        "--dry-run", action="store_true", help="print the commands and the budget; run nothing"
    )
    args = parser.parse_args(argv)
    started = time.perf_counter()
    if not args.dry_run and not torch.cuda.is_available():
        print(
            "error: make bench-gpu needs CUDA (torch.cuda.is_available() is False); nothing was run",
            file=sys.stderr,
        )
        return 2
    out = Path(args.out).resolve()
    plan = parts(out)
    print(describe(plan, args.budget), flush=True)
    if args.dry_run:
        return 0
    out.mkdir(parents=True, exist_ok=True)
    tests, bench = plan
    summary = {"gpu": torch.cuda.get_device_name(), "budget_s": args.budget}
    summary["gpu-tests"] = run_part(tests, out, timeout=args.budget / 3)
    left = args.budget - (time.perf_counter() - started)
    bench = replace(bench, command=[*bench.command, "--time-budget", f"{left - REPORT_RESERVE_S:.0f}"])
    summary["bench"] = run_part(bench, out, timeout=left)
    summary["wall_s"] = time.perf_counter() - started
    (out / "summary.json").write_text(json.dumps(summary, indent=1))
    print(
        f"done in {summary['wall_s']:.0f} s: {out / 'summary.json'}, bench report {out / 'bench' / 'latest.md'}"
    )
    return 0 if all(summary[part.name]["rc"] == 0 for part in plan) else 1


if __name__ == "__main__":
    sys.exit(main())
