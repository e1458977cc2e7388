"""The shapes-world demo's report: a folder that shows, without any tracker, how the trained arms compare.

Three views, because each hides what another shows: the metric table (final numbers), the training curves
(whether an arm was still improving, or diverged), and the contact sheet (what the captions and images
actually look like, with the colour-shape combinations unseen in paired training flagged).
"""

from __future__ import annotations

import base64
import html
import io
import json
import logging
import math
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

import torch
from PIL import Image

from cycletune.data.shapes import parse

logger = logging.getLogger(__name__)

MAX_CURVES = 12
CELL_PIXELS = 96  # the contact sheet upscales the tiny images by an integer factor to about this size
GAP_PIXELS = 4
SMOOTHING_HORIZON = 0.02  # EMA time constant as a share of the plotted step range (see `ema`)
_CSS = """body{font-family:sans-serif;margin:2em}table{border-collapse:collapse}
td,th{border:1px solid #ccc;padding:4px 8px;vertical-align:middle}td.number{text-align:right}
img.pixels{width:96px;image-rendering:pixelated}.unseen{background:#f0a020;color:#fff;border-radius:4px;
padding:1px 5px;font-size:80%}.right{color:#080}.wrong{color:#c00}"""


@dataclass(frozen=True)
class ContactSheet:
    """Test examples shown side by side: each arm's caption of a test image and each arm's image for a test caption."""

    images: torch.Tensor
    captions: list[str]
    unseen: list[bool]
    arm_captions: dict[str, list[str]]
    arm_images: dict[str, torch.Tensor]

    def __post_init__(self) -> None:
        """Mismatched inputs would silently misalign rows, so they are refused here, at construction."""
        if self.images.ndim != 4 or self.images.shape[1] != 3 or self.images.shape[0] == 0:
            raise ValueError(
                f"ContactSheet.images must be [K, 3, H, W] with K > 0, got {list(self.images.shape)}"
            )
        count = self.images.shape[0]
        for name, values in (("captions", self.captions), ("unseen", self.unseen)):
            if len(values) != count:
                raise ValueError(f"ContactSheet.{name} has {len(values)} entries, images has K = {count}")
        if self.arm_captions.keys() != self.arm_images.keys():
            raise ValueError(
                f"ContactSheet arms differ: arm_captions has {sorted(self.arm_captions)}, "
                f"arm_images has {sorted(self.arm_images)}"
            )
        for arm, captions in self.arm_captions.items():
            if len(captions) != count:
                raise ValueError(f"arm {arm!r} wrote {len(captions)} captions, expected K = {count}")
            shape = self.arm_images[arm].shape
            if len(shape) != 4 or shape[0] != count or shape[1] != 3:
                raise ValueError(f"arm {arm!r} images must be [{count}, 3, H, W], got {list(shape)}")


def format_table(table: Mapping[str, Mapping[str, float]]) -> str:
    """The metric table as GitHub markdown: a row per metric (first-seen order), a column per arm."""
    metrics = _metric_names(table)
    lines = [
        "| metric | " + " | ".join(table) + " |",
        "|---|" + "---:|" * len(table),
        *(
            f"| {metric} | " + " | ".join(_number(table[arm][metric]) for arm in table) + " |"
            for metric in metrics
        ),
    ]
    return "\n".join(lines)


def ema(steps: Sequence[float], values: Sequence[float], time_constant: float) -> list[float]:
    """Exponential moving average that decays by exp(-step gap / time_constant) between consecutive points.

    Measured in steps rather than points, so sparse series (validation every 1000 steps) stay nearly raw
    while dense ones (losses every 20 steps) are smoothed; the curves use time_constant = SMOOTHING_HORIZON
    (2%) of the plotted step range, e.g. a weight of exp(-20 / 200) = 0.90 on the past for a 10000-step run
    logged every 20 steps. Starts at the first value, so there is no bias towards zero.
    """
    smoothed: list[float] = []
    for index, value in enumerate(values):
        if index == 0 or time_constant <= 0:
            smoothed.append(value)
            continue
        keep = math.exp(-(steps[index] - steps[index - 1]) / time_constant)
        smoothed.append(keep * smoothed[-1] + (1 - keep) * value)
    return smoothed


def read_metrics(path: Path) -> dict[str, dict[int, float]]:
    """A trainer's metrics.jsonl as key -> step -> value; a step logged twice (resumed run) keeps the last."""
    series: dict[str, dict[int, float]] = {}
    for number, line in enumerate(Path(path).read_text(encoding="utf-8").splitlines(), start=1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError as error:
            raise ValueError(f"{path}, line {number}: not JSON ({error})") from error
        if not isinstance(record, dict) or not _is_number(record.get("step")):
            raise ValueError(f"{path}, line {number}: expected a JSON object with a numeric 'step'")
        for key, value in record.items():
            if not _is_number(value):
                raise ValueError(f"{path}, line {number}: value of {key!r} is not a number: {value!r}")
            if key != "step":
                series.setdefault(key, {})[int(record["step"])] = float(value)
    return series


def write_demo_report(
    out_dir: Path,
    *,
    title: str,
    table: Mapping[str, Mapping[str, float]],
    curves: Mapping[str, Path],
    sheet: ContactSheet,
    notes: Sequence[str] = (),
) -> Path:
    """Write curves.png (when any arm has metrics), contact_sheet.png and report.html into out_dir."""
    _metric_names(table)  # validates before anything is written
    for arm, path in curves.items():
        if not Path(path).is_file():
            raise ValueError(f"metrics file of arm {arm!r} does not exist: {path}")
    metrics = {arm: read_metrics(path) for arm, path in curves.items()}
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    curves_png = out_dir / "curves.png"
    curves_png.unlink(missing_ok=True)  # a stale plot from an earlier report must not pass for this one's
    plotted = _plot_curves(metrics, curves_png)
    _contact_sheet_png(sheet).save(out_dir / "contact_sheet.png")
    curves_html = (
        f'<img src="{curves_png.name}" alt="training curves">'
        if plotted
        else "<p>No training curves: no arm has logged metrics to plot.</p>"
    )
    body = [
        f"<h1>{html.escape(title)}</h1>",
        *(f"<p>{html.escape(note)}</p>" for note in notes),
        "<h2>Metrics</h2>",
        _table_html(table),
        "<h2>Training curves</h2>",
        curves_html,
        "<h2>Test examples</h2>",
        '<p>Test images and each arm\'s images for their captions (<a href="contact_sheet.png">PNG</a>); '
        "✓/✗: the arm's caption reads back as the same scene as the reference.</p>",
        _sheet_html(sheet),
    ]
    report = out_dir / "report.html"
    report.write_text(
        f'<!DOCTYPE html>\n<html><head><meta charset="utf-8"><title>{html.escape(title)}</title>'
        f"<style>{_CSS}</style></head>\n<body>\n" + "\n".join(body) + "\n</body></html>\n",
        encoding="utf-8",
    )
    return report


def _metric_names(table: Mapping[str, Mapping[str, float]]) -> list[str]:
    """Metric names in first-seen order; every arm must report the same ones, or rows would have holes."""
    names = list(dict.fromkeys(metric for metrics in table.values() for metric in metrics))
    for arm, metrics in table.items():
        if set(metrics) != set(names):
            raise ValueError(f"table arm {arm!r} lacks metrics {sorted(set(names) - set(metrics))}")
    return names


def _number(value: float) -> str:
    return "n/a" if math.isnan(value) else f"{value:.3f}"


def _is_number(value: object) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool)


_PER_ATTRIBUTE = re.compile(r"accuracy_(shape|colour|size|position)$")


def _plotted_key(key: str) -> bool:
    """Learning rates, gradient norms, throughput and skip counters say nothing about which arm learns
    better; per-attribute accuracies are in the table, and would crowd out the training terms."""
    return not (
        key.endswith(("/lr", "/grad_norm", "samples_per_second"))
        or key.split("/")[-1].startswith("skipped_")
        or _PER_ATTRIBUTE.search(key)
    )


def _plot_order(key: str) -> tuple[bool, str]:
    """Validation metrics first (what the arms are compared on), then the training terms, each sorted."""
    return (not key.startswith("validation/"), key)


def _plot_curves(metrics: Mapping[str, dict[str, dict[int, float]]], path: Path) -> bool:
    """One subplot per metric, one colour per arm; raw points faint under their EMA. False if nothing to plot."""
    from matplotlib.figure import Figure  # no pyplot: no global backend or figure state to manage

    keys = sorted(
        {key for series in metrics.values() for key in series if _plotted_key(key)}, key=_plot_order
    )
    if not keys:
        return False
    if len(keys) > MAX_CURVES:
        logger.warning("curves.png shows %d metrics; %d more left out", MAX_CURVES, len(keys) - MAX_CURVES)
        keys = keys[:MAX_CURVES]
    columns = min(4, len(keys))
    rows = math.ceil(len(keys) / columns)
    figure = Figure(figsize=(4 * columns, 3 * rows), layout="constrained")
    axes = figure.subplots(rows, columns, squeeze=False).flat
    colours = {arm: f"C{index}" for index, arm in enumerate(metrics)}
    for ax, key in zip(axes, keys, strict=False):
        points = {
            arm: sorted((step, value) for step, value in series[key].items() if math.isfinite(value))
            for arm, series in metrics.items()
            if key in series
        }
        steps = [step for arm_points in points.values() for step, _ in arm_points]
        time_constant = SMOOTHING_HORIZON * (max(steps) - min(steps)) if steps else 0.0
        for arm, arm_points in points.items():
            x, y = [step for step, _ in arm_points], [value for _, value in arm_points]
            ax.plot(x, y, color=colours[arm], alpha=0.25, linewidth=0.8)
            ax.plot(x, ema(x, y, time_constant), color=colours[arm], label=arm)
        ax.set_title(key, fontsize=9)
        ax.set_xlabel("step")
        ax.legend(fontsize=7)
    for ax in list(axes)[len(keys) :]:
        ax.set_visible(False)
    figure.savefig(path, dpi=100)
    return True


def _pil(pixels: torch.Tensor) -> Image.Image:
    """A [3, H, W] image in [0, 1] as 8-bit RGB."""
    array = pixels.detach().float().nan_to_num(0).clamp(0, 1).mul(255).round().byte().permute(1, 2, 0)
    return Image.fromarray(array.cpu().numpy())


def _contact_sheet_png(sheet: ContactSheet) -> Image.Image:
    """Row per example: the test image, then each arm's generated image, all at one integer-upscaled cell size."""
    height, width = sheet.images.shape[-2:]
    scale = max(1, round(CELL_PIXELS / max(height, width)))
    cell = (width * scale, height * scale)
    columns = [sheet.images, *sheet.arm_images.values()]
    grid = Image.new(
        "RGB",
        (
            len(columns) * (cell[0] + GAP_PIXELS) + GAP_PIXELS,
            len(sheet.captions) * (cell[1] + GAP_PIXELS) + GAP_PIXELS,
        ),
        "white",
    )
    for row in range(len(sheet.captions)):
        for column, images in enumerate(columns):
            tile = _pil(images[row]).resize(cell, Image.Resampling.NEAREST)
            grid.paste(
                tile,
                (GAP_PIXELS + column * (cell[0] + GAP_PIXELS), GAP_PIXELS + row * (cell[1] + GAP_PIXELS)),
            )
    return grid


def _data_uri(pixels: torch.Tensor) -> str:
    """The image at its own resolution, inlined, so the report needs no folder of example files."""
    buffer = io.BytesIO()
    _pil(pixels).save(buffer, format="PNG")
    return "data:image/png;base64," + base64.b64encode(buffer.getvalue()).decode("ascii")


def _table_html(table: Mapping[str, Mapping[str, float]]) -> str:
    header = "".join(f"<th>{html.escape(arm)}</th>" for arm in table)
    rows = "".join(
        f"<tr><th>{html.escape(metric)}</th>"
        + "".join(f'<td class="number">{_number(table[arm][metric])}</td>' for arm in table)
        + "</tr>\n"
        for metric in _metric_names(table)
    )
    return f"<table><tr><th>metric</th>{header}</tr>\n{rows}</table>"


def _caption_mark(caption: str, reference: str) -> str:
    """✓/✗ by parsed scene; none when the reference is no full shapes-world caption (nothing to compare)."""
    expected = parse(reference)
    if expected.scene is None:
        return ""
    return ' <span class="right">✓</span>' if parse(caption) == expected else ' <span class="wrong">✗</span>'


def _sheet_html(sheet: ContactSheet) -> str:
    arms = list(sheet.arm_captions)
    header = "<th>test image</th><th>reference caption</th>" + "".join(
        f"<th>{html.escape(arm)} caption</th><th>{html.escape(arm)} image</th>" for arm in arms
    )
    rows = []
    for row, reference in enumerate(sheet.captions):
        badge = ' <span class="unseen">unseen</span>' if sheet.unseen[row] else ""
        cells = [
            f'<td><img class="pixels" src="{_data_uri(sheet.images[row])}" alt="test image {row}"></td>',
            f"<td>{html.escape(reference)}{badge}</td>",
        ]
        for arm in arms:
            caption = sheet.arm_captions[arm][row]
            cells.append(f"<td>{html.escape(caption)}{_caption_mark(caption, reference)}</td>")
            cells.append(
                f'<td><img class="pixels" src="{_data_uri(sheet.arm_images[arm][row])}" '
                f'alt="{html.escape(arm)} image {row}"></td>'
            )
        rows.append("<tr>" + "".join(cells) + "</tr>")
    return f"<table><tr>{header}</tr>\n" + "\n".join(rows) + "\n</table>"
