"""The demo report: its three files, the checks that ✓/✗ and badges are right, and refusal of bad input."""

from __future__ import annotations

import html
import json
import logging
import math
import re
from pathlib import Path

import pytest
import torch
from PIL import Image

from cycletune.evaluation.demo_report import (
    CELL_PIXELS,
    GAP_PIXELS,
    MAX_CURVES,
    ContactSheet,
    _plot_order,
    _plotted_key,
    ema,
    format_table,
    read_metrics,
    write_demo_report,
)

REFERENCES = ["a small red circle in the top left", "a big blue square at the middle & <more>"]
TABLE = {
    "base": {"caption_accuracy": 0.25, "fid": math.nan},
    "cycle": {"caption_accuracy": 0.75, "fid": 12.3456},
}


def _sheet(**changes) -> ContactSheet:
    torch.manual_seed(0)
    fields = {
        "images": torch.rand(2, 3, 32, 32),
        "captions": REFERENCES,
        "unseen": [True, False],
        "arm_captions": {
            "base": ["a small blue circle in the top left", "a <b>square</b>"],
            "cycle": ["the circle in the top left is small and red", "a large blue square in the center"],
        },
        "arm_images": {"base": torch.rand(2, 3, 32, 32), "cycle": torch.rand(2, 3, 32, 32)},
    }
    return ContactSheet(**(fields | changes))


def _jsonl(path: Path, records: list[dict]) -> Path:
    path.write_text("".join(json.dumps(record) + "\n" for record in records))
    return path


def _metrics(folder: Path, arm: str, offset: float) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    records = []
    for step in range(20, 420, 20):
        records.append(
            {"step": step, "captioner/caption_ce": 2.0 - step / 400 + offset, "captioner/lr": 1e-3}
        )
        records.append({"step": step, "generator/denoise": 0.1 + offset, "samples_per_second": 50.0})
        if step % 100 == 0:
            records.append({"step": step, "shapes_caption_accuracy": step / 400, "skipped_records": 0})
    return _jsonl(folder / "metrics.jsonl", records)


def test_report_writes_pngs_and_an_html_with_every_caption_mark_and_value(tmp_path: Path) -> None:
    curves = {arm: _metrics(tmp_path / arm, arm, offset) for arm, offset in (("base", 0.0), ("cycle", 0.5))}
    report = write_demo_report(
        tmp_path / "report",
        title="Shapes <demo>",
        table=TABLE,
        curves=curves,
        sheet=_sheet(),
        notes=["Cycle beats base & control."],
    )
    assert report == tmp_path / "report" / "report.html"
    with Image.open(report.parent / "contact_sheet.png") as sheet_png:
        scale = CELL_PIXELS // 32
        assert sheet_png.format == "PNG"
        assert sheet_png.size == (
            3 * (32 * scale + GAP_PIXELS) + GAP_PIXELS,
            2 * (32 * scale + GAP_PIXELS) + GAP_PIXELS,
        )
    with Image.open(report.parent / "curves.png") as curves_png:
        assert curves_png.format == "PNG" and curves_png.size[0] > 0
    page = report.read_text(encoding="utf-8")
    assert "Shapes &lt;demo&gt;" in page and "Cycle beats base &amp; control." in page
    assert 'src="curves.png"' in page and 'href="contact_sheet.png"' in page
    for text in [
        *REFERENCES,
        *(caption for captions in _sheet().arm_captions.values() for caption in captions),
    ]:
        assert html.escape(text) in page
    assert "<b>square</b>" not in page
    for value in ("0.250", "0.750", "12.346", "n/a", ">base<", ">cycle<"):
        assert value in page
    assert page.count('class="unseen"') == 1
    assert page.count("data:image/png;base64,") == 6  # 2 test images + 2 arms x 2 generated
    # Row 1: base got the colour wrong, cycle paraphrased correctly. Row 2: base's caption names no scene
    # (wrong), cycle says "large"/"center" for "big"/"middle" (right).
    marks = [
        part.split("</span>")[0] for part in page.split('<span class="')[1:] if not part.startswith("unseen")
    ]
    assert marks == ['wrong">✗', 'right">✓', 'wrong">✗', 'right">✓']


def test_report_without_metrics_says_so_and_removes_a_stale_plot(tmp_path: Path) -> None:
    (tmp_path / "curves.png").write_bytes(b"old")
    report = write_demo_report(tmp_path, title="t", table=TABLE, curves={}, sheet=_sheet())
    assert not (tmp_path / "curves.png").exists()
    assert "No training curves" in report.read_text(encoding="utf-8")


def test_format_table_rows_are_metrics_columns_are_arms() -> None:
    assert format_table(TABLE).splitlines() == [
        "| metric | base | cycle |",
        "|---|---:|---:|",
        "| caption_accuracy | 0.250 | 0.750 |",
        "| fid | n/a | 12.346 |",
    ]


def test_ema_decays_with_the_step_gap() -> None:
    time_constant = 1 / math.log(2)  # halves the past's weight per step
    assert ema([0, 1, 2, 4], [0.0, 1.0, 1.0, 0.0], time_constant) == pytest.approx([0.0, 0.5, 0.75, 0.1875])
    assert ema([0, 5], [1.0, 3.0], 0.0) == [1.0, 3.0]


def test_read_metrics_keeps_the_last_value_of_a_repeated_step(tmp_path: Path) -> None:
    path = _jsonl(
        tmp_path / "m.jsonl", [{"step": 1, "a": 1.0}, {"step": 2, "a": 2.0, "b": 5}, {"step": 2, "a": 3.0}]
    )
    assert read_metrics(path) == {"a": {1: 1.0, 2: 3.0}, "b": {2: 5.0}}


def test_only_the_first_curves_are_plotted_and_the_rest_logged(tmp_path: Path, caplog) -> None:
    keys = {f"metric_{index:02d}": float(index) for index in range(MAX_CURVES + 3)}
    path = _jsonl(tmp_path / "m.jsonl", [{"step": 1, **keys}, {"step": 2, **keys}])
    with caplog.at_level(logging.WARNING, logger="cycletune.evaluation.demo_report"):
        write_demo_report(tmp_path / "out", title="t", table=TABLE, curves={"base": path}, sheet=_sheet())
    assert "3 more left out" in caplog.text
    assert (tmp_path / "out" / "curves.png").is_file()


@pytest.mark.parametrize(
    ("changes", "message"),
    [
        ({"arm_images": {"base": torch.rand(2, 3, 32, 32)}}, r"arms differ.*'cycle'"),
        ({"captions": REFERENCES[:1]}, r"captions has 1 entries, images has K = 2"),
        ({"arm_captions": {"base": ["x"], "cycle": ["y", "z"]}}, r"arm 'base' wrote 1 captions"),
        ({"images": torch.rand(2, 32, 32)}, r"must be \[K, 3, H, W\]"),
        (
            {"arm_images": {"base": torch.rand(3, 3, 32, 32), "cycle": torch.rand(2, 3, 32, 32)}},
            r"arm 'base' images",
        ),
    ],
)
def test_contact_sheet_refuses_misaligned_inputs(changes: dict, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        _sheet(**changes)


def test_bad_table_and_metrics_files_are_named(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match=r"arm 'cycle' lacks metrics \['fid'\]"):
        format_table({"base": {"fid": 1.0}, "cycle": {}})
    missing = tmp_path / "nowhere" / "metrics.jsonl"
    with pytest.raises(ValueError, match=rf"arm 'base' does not exist: {re.escape(str(missing))}"):
        write_demo_report(tmp_path / "out", title="t", table=TABLE, curves={"base": missing}, sheet=_sheet())
    broken = tmp_path / "metrics.jsonl"
    broken.write_text('{"step": 1, "a": 1.0}\n\n{"step": 2, "a": \n')
    with pytest.raises(ValueError, match=rf"{re.escape(str(broken))}, line 3: not JSON"):
        write_demo_report(tmp_path / "out", title="t", table=TABLE, curves={"base": broken}, sheet=_sheet())
    broken.write_text('{"a": 1.0}\n')
    with pytest.raises(ValueError, match=r"line 1: expected a JSON object with a numeric 'step'"):
        read_metrics(broken)
    broken.write_text('{"step": 1, "phase": "captioner"}\n')
    with pytest.raises(ValueError, match=r"line 1: value of 'phase' is not a number"):
        read_metrics(broken)


def test_curves_show_validation_metrics_first_and_leave_out_optimizer_diagnostics() -> None:
    keys = ["generator/denoise", "captioner/grad_norm", "validation/shapes_image_accuracy", "captioner/lr"]
    keys += ["validation/shapes_image_accuracy_position"]
    plotted = sorted(filter(_plotted_key, keys), key=_plot_order)
    assert plotted == ["validation/shapes_image_accuracy", "generator/denoise"]
