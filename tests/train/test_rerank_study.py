"""make rerank-study in miniature: both directions ranked by the rerank tool from the committed base models,
judged, written as JSON and plots; the README table it prints agrees with the JSON by the README check's own
rules; a second run reuses the rankings."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from cycle_runs import REPO
from PIL import Image
from results_tables import ResultsTable, rerank_study_row, table_mismatches

from cycletune.train.cli import rerank_study
from cycletune.train.cli.shapes_base import DEFAULT_BASE, DEFAULT_CONFIG


def test_a_small_study_writes_the_json_the_plots_and_a_matching_table(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    argv = [
        "--config", str(REPO / DEFAULT_CONFIG),
        "--base", str(REPO / DEFAULT_BASE),
        "--out", str(tmp_path / "runs"),
        "--results", str(tmp_path / "results"),
        "--inputs-per-part", "3",
        "--num-beams", "1",
        "--num-samples", "1",
        "--num-images", "2",
        "--inference-steps", "1",
        "--bootstrap-samples", "50",
    ]  # fmt: skip
    assert rerank_study.main(argv) == 0
    printed = capsys.readouterr().out
    summary = json.loads((tmp_path / "results" / "rerank_study.json").read_text())
    captions, images = summary["directions"]["captions"], summary["directions"]["images"]
    assert captions["candidates"] == 2 and images["candidates"] == 2
    assert set(captions["measures"]) == {"reconstruction_mse", "denoise_loss"}
    assert captions["primary"] == "reconstruction_mse" and images["primary"].startswith("recaption_")
    assert [captions["results"][part]["inputs"] for part in ("all", "seen", "unseen")] == [6, 3, 3]
    exact = captions["results"]["all"]["shapes_exact"]["measures"]["reconstruction_mse"]
    assert [point["rank"] for point in exact["by_rank"]] == [0, 1]
    assert exact["top_pick"]["top1"]["value"] == pytest.approx(exact["by_rank"][0]["mean"])
    shares = captions["results"]["all"]["per_attribute"]
    assert set(shares["random_pick"]) == {"shape", "colour", "size", "position"}
    assert set(shares["top1"]) == set(captions["measures"])
    assert summary["test_split"] == {"seeds": {"seen": 104, "unseen": 105}, "inputs_per_part": 3}
    assert summary["settings"]["inference_steps"] == 1 and summary["time"]["total"]["cpu_s"] > 0
    for direction in ("captions", "images"):
        with Image.open(tmp_path / "results" / f"rerank_{direction}.png") as plot:
            assert plot.format == "PNG" and plot.width > 600
    # The printed table is what the README check accepts for this JSON.
    readme = "## Reranking study\n\n" + printed[printed.index("| direction") :]
    table = ResultsTable("Reranking study", tmp_path / "results" / "rerank_study.json", rerank_study_row)
    assert table_mismatches(readme, table) == []
    assert table_mismatches(readme.replace("| captions | all |", "| images | all |", 1), table) != []

    assert rerank_study.main(argv) == 0
    assert capsys.readouterr().out.count("reusing the finished rankings") == 2
