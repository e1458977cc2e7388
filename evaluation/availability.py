"""One way for every metric to say "not measured, and here is the option that would enable it".

Metrics that need pretrained weights (Inception for FID, CLIP, DINO, LPIPS backbones, SPICE's CoreNLP) are
never downloaded: the libraries behind them fetch weights with no timeout, which hangs an offline run. A metric
whose weights the user has not given is reported as skipped, with the option to set, and the others still run.
The loading the image and text metrics share (a tower of a local CLIP checkpoint) lives here too.
"""

from __future__ import annotations

import importlib
import os
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, TypeVar

from cycletune.models.hub_kernels import WITHOUT_HUB_KERNELS

if TYPE_CHECKING:
    from transformers import CLIPConfig, PreTrainedModel

PathLike = str | os.PathLike[str]
Prepared = TypeVar("Prepared")


# The packages of the [eval] extra: training runs without them, and the metrics they compute are skipped.
EVAL_EXTRA_PACKAGES = frozenset(
    {
        "pycocoevalcap",
        "torchmetrics",
        "lpips",
        "torch_fidelity",
        "sentence_transformers",
        "scipy",
        "matplotlib",
    }
)


class MetricUnavailable(RuntimeError):
    """Raised while preparing a metric whose weights or tools are absent; `prepare` turns it into a skip."""


@dataclass(frozen=True)
class MetricResult:
    """A metric's value, or None with the reason it was skipped (which names the option to set)."""

    name: str
    value: float | None
    skipped_reason: str | None = None

    @property
    def skipped(self) -> bool:
        return self.value is None


def require_package(name: str) -> None:
    """Import a package of the [eval] extra up front, while the metric is prepared: absent, it makes prepare()
    skip the metric, instead of failing later, mid-evaluation, where the metric first imports it."""
    importlib.import_module(name)


def option_path(option: str, value: PathLike | None, wanted: str) -> Path:
    """The local file or folder that `option` names.

    Unset means the user did not ask for this metric's weights: MetricUnavailable, so the metric is skipped.
    Set but absent is a mistake (a typo, an unmounted disk): FileNotFoundError, loud rather than a silent skip.
    """
    if value is None:
        raise MetricUnavailable(f"set {option} to {wanted}")
    path = Path(value).expanduser()
    if not path.exists():
        raise FileNotFoundError(f"{option}={os.fspath(value)!r}: no such file or folder (expected {wanted})")
    return path


def load_clip_tower(
    tower_class: type[PreTrainedModel], folder: PathLike, config: CLIPConfig
) -> PreTrainedModel:
    """The text or vision tower (`tower_class`, a CLIP*ModelWithProjection) of a whole local CLIP checkpoint.

    A whole checkpoint's sub-configs may keep the default projection size (512) while the model projects to
    another: only the top-level config is sure to carry it, so the tower's config takes it from there.
    """
    tower_config = getattr(config, tower_class.config_class.base_config_key)
    tower_config.projection_dim = config.projection_dim
    return tower_class.from_pretrained(
        folder, config=tower_config, local_files_only=True, **WITHOUT_HUB_KERNELS
    )


def check_metric_names(requested: Sequence[str], known: Sequence[str]) -> list[str]:
    """The requested names in order without repeats; an unknown name is an error listing the known ones."""
    if isinstance(requested, str):
        raise TypeError(f"metrics must be a sequence of names, got the single string {requested!r}")
    unknown = [name for name in requested if name not in known]
    if unknown:
        raise ValueError(f"unknown metric(s) {unknown}; known: {list(known)}")
    return list(dict.fromkeys(requested))


def prepare(
    names: Iterable[str], build: Callable[[str], Prepared]
) -> tuple[dict[str, Prepared], dict[str, MetricResult]]:
    """Build what each metric needs; a metric whose build raises MetricUnavailable, or needs a package of the
    [eval] extra that is not installed, becomes a skipped result."""
    ready: dict[str, Prepared] = {}
    skipped: dict[str, MetricResult] = {}
    for name in names:
        try:
            ready[name] = build(name)
        except MetricUnavailable as reason:
            skipped[name] = MetricResult(name, None, f"{name} skipped: {reason}")
        except ModuleNotFoundError as missing:
            if (missing.name or "").split(".")[0] not in EVAL_EXTRA_PACKAGES:
                raise
            reason = f"needs {missing.name.split('.')[0]}: pip install 'cycletune[eval]'"
            skipped[name] = MetricResult(name, None, f"{name} skipped: {reason}")
    return ready, skipped


def split_results(results: Iterable[MetricResult]) -> tuple[dict[str, float], list[str]]:
    """Values for a tracker and skip messages for the log: the two places results end up."""
    values: dict[str, float] = {}
    messages: list[str] = []
    for result in results:
        if result.skipped:
            messages.append(result.skipped_reason or f"{result.name} skipped")
        else:
            values[result.name] = result.value
    return values, messages
