"""`make memory`: peak GPU memory per phase and cycle mode, estimated on a CPU.

    python -m train.cli.memory             # SD 1.5 + BLIP-base, 512 px, batch 4, bf16: the 24 GB table (~10 min)
    python -m train.cli.memory --measured  # ... and the check against peaks measured on a GPU (~15 min)
    python -m train.cli.memory --arch sdxl-blip-base --batch-size 1 --modes generator t2i2t_one_step

Each row is one optimizer update of a mode as `make bench` runs it (LoRA rank 4 on both models, the mode's
cycle settings at their defaults, the frozen-encoder cache off), run through the trainer's own step on
fake tensors (train/memory_model.py): the peak of what is live at once, with its split into weights (both
models), gradients, optimizer state and activations at that moment, and where in the step it falls. Not
counted: the CUDA context (~0.5 GB), cuDNN/cuBLAS workspaces and the allocator's fragmentation, so a row
"fits" a 24 GB card when it leaves 1 GiB of it free for those. Sizes are in GiB (2^30 bytes). Models
have the architectures' real sizes and random weights; none is downloaded or even materialised.
"""

from __future__ import annotations

import argparse
import tempfile
import time
from collections.abc import Sequence
from dataclasses import dataclass, replace
from pathlib import Path

from accelerate import init_empty_weights

from cycletune.train.cli.bench.architectures import (
    ARCHITECTURES,
    GPU_ARCHITECTURES,
    Architecture,
    save_models,
)
from cycletune.train.cli.bench.bench_modes import CYCLE_MODES, MODES, Mode, bench_config
from cycletune.train.cli.bench.steps import fixed_batch
from cycletune.train.cli.help_format import HelpFormatter
from cycletune.train.memory_model import StepMemory, estimate_step, weightless_models

GIB = 2**30
MIB = 2**20
CARD_GIB = 24.0
# Kept free on the card for what the estimate leaves out (CUDA context, workspaces, fragmentation).
HEADROOM_GIB = 1.0
# Gradient checkpointing settings: which models' `gradient_checkpointing` key is on.
CHECKPOINTING = {
    "none": (),
    "captioner": ("captioner",),
    "generator": ("generator",),
    "both": ("captioner", "generator"),
}
# Modes whose step calls transformers' generate(), whose loop ends only once every row has produced its end
# token: a question about token values that fake tensors answer "not yet", so the loop never ends. The CIDEr-D
# reward re-captions that way; its training memory is t2i2t_reward's plus a no-grad decoding's cache.
UNESTIMABLE_MODES = ("t2i2t_reward_cider_d",)
# Every phase and cycle mode at its defaults (the shared one-step pass is a memory lever of t2i2t one_step).
BUDGET_MODES = tuple(
    mode for mode in ("captioner", "generator", *CYCLE_MODES) if mode not in UNESTIMABLE_MODES
)
# torch.cuda.max_memory_allocated (MiB) of the README's sd15-blip-base benchmark on one H200: batch 8, bf16,
# no gradient checkpointing (`python -m train.cli.bench --archs sd15-blip-base`, 2026-11-26).
MEASURED_ARCH, MEASURED_BATCH, MEASURED_PRECISION = "sd15-blip-base", 8, "bf16"
MEASURED_MIB = {
    "captioner": 3093,
    "generator": 11491,
    "generator_cached": 11490,
    "i2t2i_reward": 11792,
    "t2i2t_one_step": 61754,
    "t2i2t_sample": 53063,
}
AGREEMENT = 0.15


@dataclass(frozen=True)
class Row:
    mode: str
    checkpointing: str
    memory: StepMemory
    seconds: float


def estimate_mode(
    arch: Architecture, folders: tuple[Path, Path], mode_name: str, checkpointing: str, out_dir: Path
) -> Row:
    """One mode's estimate, its config built as the bench builds it plus the checkpointing keys."""
    started = time.perf_counter()
    base = MODES[mode_name]
    keys = tuple(f"{model}.gradient_checkpointing=true" for model in CHECKPOINTING[checkpointing])
    mode = Mode(base.phase, base.overrides + keys, base.cache)
    config = bench_config(arch, *folders, mode, out_dir)
    memory = estimate_step(config, mode.phase, fixed_batch(config, mode.phase))
    return Row(mode_name, checkpointing, memory, time.perf_counter() - started)


def weightless_folders(arch: Architecture, out_dir: Path) -> tuple[Path, Path]:
    """The architecture's captioner and generator folders, configs without weights (memory_model); the models
    are built with their parameters on the meta device (schedulers and buffers as ever)."""
    with weightless_models(), init_empty_weights():
        return save_models(arch, out_dir)


def fits(memory: StepMemory) -> bool:
    return memory.peak / GIB <= CARD_GIB - HEADROOM_GIB


def format_table(rows: Sequence[Row], measured: dict[str, int] | None = None) -> str:
    """Markdown: peak and split in GiB per row, the 24 GB verdict, and the measured peak where given."""
    header = (
        "| mode | grad. checkpointing | peak GiB | weights | grads | optimizer | activations | peak in | "
    )
    header += "measured GiB | estimate / measured |" if measured else f"fits {CARD_GIB:.0f} GB |"
    lines = [header, "|---|---|" + "---:|" * 5 + "---|" + ("---:|---:|" if measured else "---|")]
    for row in rows:
        parts = " | ".join(f"{row.memory.parts[kind] / GIB:.2f}" for kind in row.memory.parts)
        line = f"| {row.mode} | {row.checkpointing} | {row.memory.peak / GIB:.2f} | {parts} | {row.memory.stage} | "
        if measured:
            line += f"{measured[row.mode] / 1024:.2f} | {row.memory.peak / MIB / measured[row.mode]:.3f} |"
        else:
            line += ("yes" if fits(row.memory) else "no") + " |"
        lines.append(line)
    return "\n".join(lines)


def answered_notes(rows: Sequence[Row]) -> list[str]:
    """Where the steps asked a fake value a question, and how often (memory_tracking.FakeValues answers)."""
    sites: dict[str, int] = {}
    for row in rows:
        for site, count in row.memory.answered.items():
            sites[site] = sites.get(site, 0) + count
    return [f"  {site}: {count}" for site, count in sorted(sites.items())]


def check_measured(out_dir: Path) -> list[Row]:
    """The estimate at the measured benchmark's settings beside its measured peaks."""
    arch = replace(GPU_ARCHITECTURES[MEASURED_ARCH], batch_size=MEASURED_BATCH, precision=MEASURED_PRECISION)
    folders = weightless_folders(arch, out_dir / "measured-models")
    rows = [estimate_mode(arch, folders, mode, "none", out_dir) for mode in MEASURED_MIB]
    print(
        f"\n{MEASURED_ARCH}, batch {MEASURED_BATCH}, {MEASURED_PRECISION}, no gradient checkpointing, "
        "against torch.cuda.max_memory_allocated on one H200:\n"
    )
    print(format_table(rows, MEASURED_MIB))
    ratios = [row.memory.peak / MIB / MEASURED_MIB[row.mode] for row in rows]
    within = all(abs(ratio - 1) <= AGREEMENT for ratio in ratios)
    print(
        f"\nagreement within {AGREEMENT:.0%}: {'yes' if within else 'no'} "
        f"(ratios {min(ratios):.3f} to {max(ratios):.3f})"
    )
    return rows


def run(args: argparse.Namespace) -> list[Row]:
    arch = replace(ARCHITECTURES[args.arch], batch_size=args.batch_size, precision=args.precision)
    rows: list[Row] = []
    with tempfile.TemporaryDirectory(prefix="cycletune-memory-") as scratch:
        out_dir = Path(scratch)
        folders = weightless_folders(arch, out_dir / "models")
        print(
            f"{arch.name}: {arch.description}; batch {arch.batch_size}, precision {arch.precision}\n",
            flush=True,
        )
        for mode in args.modes:
            for checkpointing in args.gradient_checkpointing:
                rows.append(estimate_mode(arch, folders, mode, checkpointing, out_dir))
        print(format_table(rows))
        if args.measured:
            rows += check_measured(out_dir)
    notes = answered_notes(rows)
    if notes:
        print("\nvalues the steps asked of fake tensors, answered by policy (train/memory_tracking.py):")
        print("\n".join(notes))
    print(f"\n{len(rows)} estimates in {sum(row.seconds for row in rows):.0f} s")
    return rows


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="python -m train.cli.memory", description=__doc__, formatter_class=HelpFormatter
    )
    parser.add_argument(
        "--arch", default=MEASURED_ARCH, choices=list(ARCHITECTURES), help="the bench's model sizes"
    )
    parser.add_argument("--batch-size", type=int, default=4, help="per GPU")
    parser.add_argument("--precision", default="bf16", choices=["no", "bf16"], help="mixed precision")
    parser.add_argument(
        "--gradient-checkpointing",
        nargs="+",
        default=["none", "both"],
        choices=list(CHECKPOINTING),
        help="which models' gradient_checkpointing key is on; one row per setting",
    )
    parser.add_argument(
        "--modes",
        nargs="+",
        default=list(BUDGET_MODES),
        choices=[mode for mode in MODES if mode not in UNESTIMABLE_MODES],
        help=f"not {', '.join(UNESTIMABLE_MODES)}: its generate() loop never ends on fake tensors",
    )
    parser.add_argument(
        "--measured",
        action="store_true",
        help=f"also estimate {MEASURED_ARCH} at batch {MEASURED_BATCH} {MEASURED_PRECISION} beside its measured GPU peaks",
    )
    return parser.parse_args(argv)


def main(argv: Sequence[str] | None = None) -> int:
    run(parse_args(argv))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
