"""configs/slurm/train.sbatch end to end on this machine: SIGTERM to the batch script makes every rank
checkpoint and stop, and the job is requeued; a requeued job resumes, exports, and is not requeued again.

SLURM's own commands are the only stand-ins: `srun` runs its command here (one node), and `scontrol`
answers the host list and records a requeue. The launcher and the trainer are the real ones.
"""

from __future__ import annotations

import os
import signal
import stat
import subprocess
import time
from pathlib import Path

import pytest
from cycle_runs import REPO, environment, tiny_model_overrides

from cycletune.train.run_dir import RunDir

pytestmark = pytest.mark.slow

SCRIPT = REPO / "configs" / "slurm" / "train.sbatch"
SRUN = """#!/bin/bash
while [[ "$1" == --* ]]; do shift; done
exec "$@"
"""
SCONTROL = """#!/bin/bash
if [ "$1" = show ]; then echo localhost; else echo "$@" >> "$REQUEUE_LOG"; fi
"""


def slurm_commands(folder: Path) -> Path:
    folder.mkdir()
    for name, body in (("srun", SRUN), ("scontrol", SCONTROL)):
        (folder / name).write_text(body)
        (folder / name).chmod(stat.S_IRWXU)
    return folder


def start_job(bin_dir: Path, output_dir: Path, requeue_log: Path, *overrides: str) -> subprocess.Popen:
    env = environment(
        PATH=f"{bin_dir}{os.pathsep}{Path(os.sys.executable).parent}{os.pathsep}{os.environ['PATH']}",
        REQUEUE_LOG=str(requeue_log),
        SLURM_JOB_ID="42",
        SLURM_JOB_NAME="cycletune",
        SLURM_JOB_NODELIST="localhost",
        SLURM_NNODES="1",
        SLURM_NODEID="0",
        CONFIG="configs/tiny.yaml",
        OUTPUT_DIR=str(output_dir),
        ENGINE="configs/accelerate/ddp.yaml",
        GPUS_PER_NODE="1",
        ACCELERATE_USE_CPU="1",
    )
    return subprocess.Popen(
        ["bash", str(SCRIPT), *overrides],
        cwd=REPO,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )


def test_sigterm_checkpoints_and_requeues_then_the_requeued_job_finishes(tiny_models, tmp_path: Path) -> None:
    bin_dir, output_dir, requeue_log = (
        slurm_commands(tmp_path / "bin"),
        tmp_path / "run",
        tmp_path / "requeued",
    )
    models = tiny_model_overrides(tiny_models)
    job = start_job(
        bin_dir,
        output_dir,
        requeue_log,
        *models,
        "train.max_train_steps=1000",
        "train.checkpointing_steps=1000",
    )
    samples = RunDir(output_dir).samples_log
    deadline = time.monotonic() + 300
    while not (samples.exists() and samples.read_text().count("\n") >= 2):
        assert job.poll() is None, job.stdout.read()
        assert time.monotonic() < deadline, "training did not start"
        time.sleep(0.05)
    job.send_signal(signal.SIGTERM)
    output, _ = job.communicate(timeout=300)
    assert job.returncode == 0, output
    assert requeue_log.read_text().split() == ["requeue", "42"], output
    ((stopped_at, _),) = RunDir(output_dir).checkpoints()
    assert stopped_at >= 2 and not RunDir(output_dir).export_dir.exists()

    # The requeued job: resumes from that checkpoint, runs to its end, exports, and asks for nothing more.
    requeue_log.unlink()
    job = start_job(bin_dir, output_dir, requeue_log, *models, f"train.max_train_steps={stopped_at + 1}")
    output, _ = job.communicate(timeout=300)
    assert job.returncode == 0, output
    assert f"resumed from {RunDir(output_dir).checkpoint(stopped_at)}" in output
    assert RunDir(output_dir).export_dir.is_dir() and not requeue_log.exists(), output
