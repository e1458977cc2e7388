"""Training needs only the core dependencies: without the [eval] extra's packages the run trains, validates
and exports, and each metric those packages compute is skipped with a message naming the extra."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
from cycle_runs import RECIPE, REPO, TINY_CONFIG, environment, tiny_overrides

from cycletune.evaluation.availability import EVAL_EXTRA_PACKAGES

pytestmark = pytest.mark.slow

# Run the recipe as a script with the [eval] extra's packages made unimportable.
# A None entry in sys.modules is how Python marks a module as absent: importing it raises
# ModuleNotFoundError and importlib.util.find_spec returns None, as for a package never installed.
WITHOUT_EVAL_EXTRA = """
import runpy, sys
sys.modules.update(dict.fromkeys({blocked!r}))
sys.argv = {argv!r}
runpy.run_path({recipe!r}, run_name="__main__")
"""


def test_training_validates_and_exports_without_the_eval_extra(tiny_models, tmp_path: Path) -> None:
    output_dir = tmp_path / "run"
    argv = [
        str(RECIPE),
        "--config",
        str(TINY_CONFIG),
        *tiny_overrides(tiny_models, output_dir),
        "train.max_train_steps=2",
        "train.validation_steps=2",
        "evaluation.validation_metrics=[bleu_4,cider_d,psnr,shapes_caption_accuracy]",
    ]
    script = WITHOUT_EVAL_EXTRA.format(blocked=sorted(EVAL_EXTRA_PACKAGES), argv=argv, recipe=str(RECIPE))
    result = subprocess.run(
        [sys.executable, "-c", script],
        cwd=REPO,
        env=environment(),
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert result.returncode == 0, result.stderr[-4000:]
    for metric, package in (
        ("bleu_4", "pycocoevalcap"),
        ("cider_d", "pycocoevalcap"),
        ("psnr", "torchmetrics"),
    ):
        assert f"{metric} skipped: needs {package}: pip install 'cycletune[eval]'" in result.stderr, metric
    assert (output_dir / "export" / "captioner" / "adapter_model.safetensors").is_file()
