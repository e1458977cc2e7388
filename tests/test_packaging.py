"""An installed CycleTune lives under one `cycletune` namespace: it shadows no user module named data, models,
train, losses or evaluation, ships its configs, and trains from `cycletune train --config tiny`.

The wheel is built from this checkout and installed with pip into a fresh virtualenv. Its dependencies are
read from the test's own environment through a path file, so nothing is downloaded; that environment's
editable install is not visible there (the path file adds a folder, whose own .pth files Python never runs).
"""

from __future__ import annotations

import shlex
import subprocess
import sys
import sysconfig
import zipfile
from pathlib import Path

import pytest
from cycle_runs import REPO, environment
from import_graph import NAMESPACE, PACKAGES

tomllib = pytest.importorskip("tomllib", reason="Python 3.11+ reads pyproject.toml with tomllib")

PYPROJECT = tomllib.loads((REPO / "pyproject.toml").read_text(encoding="utf-8"))

# From this checkout, with the build backend of the test environment (nothing downloaded).
BUILD_WHEEL = [sys.executable, "-m", "pip", "wheel", "--quiet", "--no-deps", "--no-build-isolation"]


def package_folders() -> set[str]:
    """Every folder of the project's packages that holds an __init__.py, as its installed dotted name."""
    return {
        ".".join((NAMESPACE, *init.parent.relative_to(REPO).parts))
        for package in PACKAGES
        for init in (REPO / package).rglob("__init__.py")
    }


def test_every_package_folder_is_installed_under_the_namespace() -> None:
    """A subpackage missing from pyproject's list would be missing from the wheel, found only by a user."""
    listed = set(PYPROJECT["tool"]["setuptools"]["packages"])
    assert package_folders() <= listed, sorted(package_folders() - listed)
    assert listed - package_folders() == {f"{NAMESPACE}.configs"}
    mapping = PYPROJECT["tool"]["setuptools"]["package-dir"]
    assert mapping == {f"{NAMESPACE}.{folder}": folder for folder in (*PACKAGES, "configs")}


def run(command: list[str], cwd: Path, timeout: float = 600) -> subprocess.CompletedProcess[str]:
    env = environment()
    env.pop("PYTHONPATH", None)  # nothing of the checkout on the path: only what was installed
    result = subprocess.run(command, cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout)
    assert result.returncode == 0, f"{' '.join(command)}\n{result.stdout[-3000:]}\n{result.stderr[-3000:]}"
    return result


@pytest.fixture(scope="module")
def installed(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A fresh virtualenv with the wheel of this checkout pip-installed; returns its bin folder."""
    root = tmp_path_factory.mktemp("installed")
    wheel_dir = root / "wheel"
    run(
        [*BUILD_WHEEL, "-w", str(wheel_dir), str(REPO)],
        cwd=root,
    )
    venv = root / "venv"
    run([sys.executable, "-m", "venv", str(venv)], cwd=root)
    bin_dir = venv / "bin"
    site = Path(
        run(
            [str(bin_dir / "python"), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
            cwd=root,
        ).stdout.strip()
    )
    (site / "dependencies.pth").write_text(sysconfig.get_paths()["purelib"] + "\n", encoding="utf-8")
    (wheel,) = wheel_dir.glob("cycletune-*.whl")
    run(
        [str(bin_dir / "python"), "-m", "pip", "install", "--quiet", "--no-deps", "--no-index", str(wheel)],
        cwd=root,
    )
    return bin_dir


def test_the_wheel_holds_only_the_namespace(installed: Path) -> None:
    (wheel,) = (installed.parents[1] / "wheel").glob("cycletune-*.whl")
    names = zipfile.ZipFile(wheel).namelist()
    top_level = {name.split("/")[0] for name in names}
    assert {name for name in top_level if not name.endswith(".dist-info")} == {NAMESPACE}
    assert f"{NAMESPACE}/configs/tiny.yaml" in names
    assert f"{NAMESPACE}/train/cycle.py" in names


# The README's first steps with an installed CycleTune, run here as written (in a fresh folder).
README_COMMANDS = (
    "cycletune tiny --out runs/tiny-models",
    "cycletune train --config tiny",
    "cycletune generate --help",
)


@pytest.mark.slow
def test_installed_cycletune_trains_from_a_packaged_config_and_shadows_nothing(
    installed: Path, tmp_path: Path
) -> None:
    python = str(installed / "python")
    probe = "import importlib.util as u; print([n for n in ('data','models','train','losses','evaluation') if u.find_spec(n)])"
    assert run([python, "-c", probe], cwd=tmp_path).stdout.strip() == "[]"

    outputs = [
        run([str(installed / words[0]), *words[1:]], cwd=tmp_path)
        for words in map(shlex.split, README_COMMANDS)
    ]
    trained, generate_help = outputs[1], outputs[2]
    assert "checkpoint-4" in trained.stdout + trained.stderr
    export = tmp_path / "runs" / "tiny" / "export"
    assert (export / "captioner" / "adapter_model.safetensors").is_file()
    assert (export / "generator" / "pytorch_lora_weights.safetensors").is_file()
    assert generate_help.stdout.startswith("usage: cycletune generate")
