"""Fault drill: SIGKILL a tiny training run at random points, resume each, and demand bit-exact results.

    python -m train.cli.drill [--seed 0] [--trials 20] [--work runs/drill] [--jobs 2]

Half the trials kill anywhere in the run (start-up included), half inside a checkpoint save: the drill
watches the run folder for a `.tmp-checkpoint-N` staging folder, kills after a short random delay, and
afterwards checks that the staging folder was left behind (else the kill missed the save and the trial
retries at another point). The save trials also truncate a file of the newest finished checkpoint (a
storage fault), which `latest` must pass over. Each killed run is resumed with train.resume_from_checkpoint=latest in the same
folder, as a user would, and must export exactly the tensors of an uninterrupted run, from a checkpoint that
verified before the resume. The last line is `N/T resumed equal, M damaged checkpoints chosen`; the exit
status is 0 only when every trial resumed equal and no damaged checkpoint was chosen.
"""

from __future__ import annotations

import argparse
import os
import random
import re
import shutil
import signal
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

import torch
from safetensors.torch import load_file

from cycletune.train.cli.help_format import HelpFormatter
from cycletune.train.manifest import MANIFEST_NAME, manifest_problem
from cycletune.train.run_dir import RunDir, checkpoint_step, staging_step

REPO = Path(__file__).resolve().parents[2]
CONFIG = REPO / "configs" / "tiny.yaml"
STEPS, CHECKPOINT_EVERY = 12, 2
RUN_SETTINGS = [
    f"train.max_train_steps={STEPS}",
    f"train.checkpointing_steps={CHECKPOINT_EVERY}",
    "train.validation_steps=null",
    "captioner.lora.dropout=0.1",
    "generator.lora.dropout=0.1",
    "cycle.i2t2i.mode=gumbel",
    "cycle.t2i2t.mode=one_step",
]
RESUMED = re.compile(r"resumed from (\S+) at update (\d+)")
POLL_S = 0.001
ATTEMPTS = 10


def environment() -> dict[str, str]:
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join([str(REPO), env.get("PYTHONPATH", "")])
    env.update(OMP_NUM_THREADS="1", WANDB_MODE="offline", HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1")
    return env


def start_run(models: Path, output_dir: Path, log: Path, *extra: str) -> subprocess.Popen:
    """The real entry point in its own process group, so a SIGKILL takes every process it started."""
    command = [
        sys.executable,
        str(REPO / "train" / "cycle.py"),
        "--config",
        str(CONFIG),
        f"output_dir={output_dir}",
        f"captioner.pretrained_model_name_or_path={models / 'captioner'}",
        f"generator.pretrained_model_name_or_path={models / 'generator'}",
        *RUN_SETTINGS,
        *extra,
    ]
    with log.open("w") as handle:
        return subprocess.Popen(
            command,
            cwd=REPO,
            env=environment(),
            stdout=handle,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )


def finish(process: subprocess.Popen, log: Path) -> None:
    if process.wait() != 0:
        raise RuntimeError(f"run failed ({process.returncode}); its output: {log}\n{log.read_text()[-3000:]}")


def kill(process: subprocess.Popen) -> None:
    os.killpg(process.pid, signal.SIGKILL)
    process.wait()


def exported(output_dir: Path) -> dict[str, torch.Tensor]:
    """Every tensor of every safetensors file the run exported, keyed by file and tensor name."""
    tensors = {}
    export_dir = RunDir(output_dir).export_dir
    for path in sorted(export_dir.rglob("*.safetensors")):
        relative = path.relative_to(export_dir)
        tensors |= {f"{relative}:{key}": value for key, value in load_file(str(path)).items()}
    return tensors


def differing_tensors(expected: dict[str, torch.Tensor], actual: dict[str, torch.Tensor]) -> list[str]:
    """Names whose tensors are not bit-for-bit equal (or present on one side only)."""
    names = sorted(expected.keys() | actual.keys())
    return [
        name
        for name in names
        if name not in expected or name not in actual or not torch.equal(expected[name], actual[name])
    ]


def checkpoint_states(output_dir: Path) -> dict[str, str | None]:
    """Every checkpoint-N and staging folder left in the run folder, with what is wrong with it (or None)."""
    states: dict[str, str | None] = {}
    for child in sorted(output_dir.iterdir()) if output_dir.is_dir() else []:
        if checkpoint_step(child.name) is not None:
            states[child.name] = manifest_problem(child)
        elif staging_step(child.name) is not None:
            states[child.name] = "staging folder of an unfinished save"
    return states


def newest_intact(states: dict[str, str | None]) -> str | None:
    intact = [
        name for name, problem in states.items() if problem is None and checkpoint_step(name) is not None
    ]
    return max(intact, key=checkpoint_step, default=None)


@dataclass
class Trial:
    index: int
    kind: str  # "anywhere" or "save"
    attempts: int = 0
    landed: bool = False
    kill_note: str = ""
    left: dict[str, str | None] = field(default_factory=dict)
    resumed_from: str | None = None
    chose_damaged: bool = False
    equal: bool = False
    note: str = ""

    def line(self) -> str:
        left = ", ".join(
            f"{name}{'' if problem is None else ' (damaged)'}" for name, problem in self.left.items()
        )
        chosen = self.resumed_from or "nothing (started fresh)"
        outcome = "export equal" if self.equal else "EXPORT DIFFERS"
        damaged = " DAMAGED CHECKPOINT CHOSEN" if self.chose_damaged else ""
        return (
            f"trial {self.index:02d} [{self.kind}] attempt {self.attempts}: {self.kill_note}; left: "
            f"{left or 'no checkpoint'}; resumed from {chosen}{damaged}; {outcome}{self.note}"
        )


def kill_anywhere(trial: Trial, rng: random.Random, models: Path, run: Path, run_seconds: float) -> bool:
    """Kill at a uniform time within an uninterrupted run's duration; False if the run had already ended."""
    delay = rng.uniform(0, run_seconds)
    process = start_run(models, run, run.parent / f"killed-{trial.attempts}.log")
    try:
        process.wait(timeout=delay)
        return False
    except subprocess.TimeoutExpired:
        kill(process)
    trial.kill_note = f"killed {delay:.2f} s after start"
    return True


def kill_inside_save(trial: Trial, rng: random.Random, models: Path, run: Path, save_seconds: float) -> bool:
    """Kill a random delay after a chosen save's staging folder appears; True if the kill left it behind."""
    step = rng.randrange(CHECKPOINT_EVERY, STEPS + 1, CHECKPOINT_EVERY)
    staging = RunDir(run).staging(step)
    delay = rng.uniform(0, save_seconds)
    process = start_run(models, run, run.parent / f"killed-{trial.attempts}.log")
    while not staging.exists() and process.poll() is None:
        time.sleep(POLL_S)
    if process.poll() is not None:
        return False
    time.sleep(delay)
    if process.poll() is not None:
        return False
    kill(process)
    final = RunDir(run).checkpoint(step)
    trial.kill_note = f"killed {delay * 1000:.1f} ms into the save of {final.name}"
    return staging.exists() or (final.exists() and manifest_problem(final) is not None)


def tear_newest_checkpoint(run: Path, rng: random.Random) -> None:
    """Truncate one file of the newest finished checkpoint, as a full disk or a cut copy would leave it:
    a SIGKILL alone never damages a finished folder (saves are renamed into place), so `latest` is tested
    against this storage fault in the same trials."""
    finished = RunDir(run).checkpoints()
    if not finished:
        return
    files = sorted(path for path in finished[-1][1].iterdir() if path.name != MANIFEST_NAME)
    victim = rng.choice(files)
    victim.write_bytes(victim.read_bytes()[: victim.stat().st_size // 2])


def run_trial(
    trial: Trial, seed: int, work: Path, models: Path, reference: dict[str, torch.Tensor], timing: Timing
) -> Trial:
    rng = random.Random(f"{seed}/{trial.index}")
    folder = work / f"trial-{trial.index:02d}"
    while not trial.landed and trial.attempts < ATTEMPTS:
        trial.attempts += 1
        shutil.rmtree(folder, ignore_errors=True)
        folder.mkdir(parents=True)
        if trial.kind == "anywhere":
            trial.landed = kill_anywhere(trial, rng, models, folder / "run", timing.run_seconds)
        else:
            trial.landed = kill_inside_save(trial, rng, models, folder / "run", timing.save_seconds)
    if not trial.landed:
        trial.kill_note = f"no kill landed {'inside a save' if trial.kind == 'save' else 'in the run'}"
        return trial
    run = folder / "run"
    if trial.kind == "save":
        tear_newest_checkpoint(run, rng)
    trial.left = checkpoint_states(run)
    log = folder / "resumed.log"
    if start_run(models, run, log, "train.resume_from_checkpoint=latest").wait() != 0:
        trial.note = f"; the resumed run failed, see {log}"
        return trial
    match = RESUMED.search(log.read_text())
    if match:
        chosen = Path(match.group(1)).name
        trial.resumed_from = chosen
        trial.chose_damaged = trial.left.get(chosen, "not in the folder before the resume") is not None
    if trial.resumed_from != newest_intact(trial.left):
        trial.note = f" (the newest intact checkpoint was {newest_intact(trial.left)})"
    different = differing_tensors(reference, exported(run))
    trial.equal = not different
    if different:
        trial.note += f"; {len(different)} tensors differ, e.g. {different[0]}"
    return trial


@dataclass(frozen=True)
class Timing:
    run_seconds: float  # the uninterrupted run, start-up included: bounds the "anywhere" kills
    save_seconds: float  # its longest checkpoint save: bounds the delay of the "save" kills


def reference_run(models: Path, work: Path) -> tuple[dict[str, torch.Tensor], Timing]:
    """The uninterrupted run, timed from outside by watching its staging and checkpoint folders."""
    run, log = work / "reference" / "run", work / "reference.log"
    started = time.monotonic()
    process = start_run(models, run, log)
    staged: dict[int, float] = {}
    saves: dict[int, float] = {}
    while process.poll() is None:
        names = [child.name for child in run.iterdir()] if run.is_dir() else []
        now = time.monotonic()
        for name in names:
            if (step := staging_step(name)) is not None:
                staged.setdefault(step, now)
            elif (step := checkpoint_step(name)) in staged:
                saves.setdefault(step, now - staged[step])
        time.sleep(POLL_S)
    finish(process, log)
    # At least 5 ms, in case polling caught no save in the act.
    return exported(run), Timing(time.monotonic() - started, max([0.005, *saves.values()]))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=HelpFormatter)
    parser.add_argument("--seed", type=int, default=0, help="seeds every kill point (printed)")
    parser.add_argument("--trials", type=int, default=20, help="half anywhere, half inside a save")
    parser.add_argument("--work", type=Path, default=REPO / "runs" / "drill", help="emptied first")
    parser.add_argument("--jobs", type=int, default=2, help="trials run in parallel")
    args = parser.parse_args(argv)
    if args.trials < 1 or args.jobs < 1:
        parser.error("--trials and --jobs must be at least 1")

    started = time.monotonic()
    print(
        f"fault drill: seed {args.seed}, {args.trials} trials, {STEPS} updates, checkpoint every {CHECKPOINT_EVERY}"
    )
    shutil.rmtree(args.work, ignore_errors=True)
    args.work.mkdir(parents=True)
    models = args.work / "tiny-models"
    subprocess.run(
        [sys.executable, "-m", "models.tiny", "--out", str(models)],
        cwd=REPO,
        env=environment(),
        check=True,
        capture_output=True,
    )
    reference, timing = reference_run(models, args.work)
    print(
        f"uninterrupted run: {timing.run_seconds:.1f} s, longest checkpoint save "
        f"{timing.save_seconds * 1000:.1f} ms"
    )
    anywhere = args.trials // 2
    trials = [Trial(index, "anywhere" if index < anywhere else "save") for index in range(args.trials)]
    with ThreadPoolExecutor(max_workers=args.jobs) as pool:
        done = list(pool.map(lambda t: run_trial(t, args.seed, args.work, models, reference, timing), trials))
    for trial in done:
        print(trial.line())
    equal = sum(trial.equal for trial in done)
    damaged = sum(trial.chose_damaged for trial in done)
    print(f"drill took {time.monotonic() - started:.0f} s; runs and logs in {args.work}")
    print(f"{equal}/{args.trials} resumed equal, {damaged} damaged checkpoints chosen")
    return 0 if equal == args.trials and damaged == 0 else 1


if __name__ == "__main__":
    sys.exit(main())
