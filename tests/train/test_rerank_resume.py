"""Feedback on long work: an interrupted `train.cli.rerank` keeps the queries it ranked and `--resume` ends
with the folder an uninterrupted run leaves; progress bars over rerank's queries and validation's batches."""

from __future__ import annotations

import io
import json
import re
import shutil
import sys
from collections.abc import Callable
from pathlib import Path

import pytest
import torch
from cycle_runs import TINY_CONFIG, tiny_overrides

from cycletune.data.shapes import all_scenes, describe, render
from cycletune.train.builders import build_captioner, build_generator, build_validation_batch
from cycletune.train.cli import rerank
from cycletune.train.config import load_config
from cycletune.train.validation import validate

QUERIES = 3
CANDIDATES = 2  # one beam, one nucleus sample


class TerminalStream(io.StringIO):
    """stderr as a terminal: tqdm shows its bar only on a TTY."""

    def isatty(self) -> bool:
        return True


@pytest.fixture(scope="module")
def images(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Three shapes images with their captions (metadata.jsonl), as a user's folder."""
    folder = tmp_path_factory.mktemp("images")
    scenes = all_scenes()[:QUERIES]
    for index, scene in enumerate(scenes):
        render(scene, 32, seed=index).save(folder / f"shape{index}.png")
    (folder / "metadata.jsonl").write_text(
        "".join(
            json.dumps({"file_name": f"shape{index}.png", "text": describe(scene)}) + "\n"
            for index, scene in enumerate(scenes)
        )
    )
    return folder


def _argv(tiny_models, images: Path, out: Path, *flags: str) -> list[str]:
    return [
        "captions",
        *("--captioner", str(tiny_models.captioner), "--generator", str(tiny_models.generator)),
        *("--images", str(images), "--out", str(out), "--device", "cpu", "--batch-size", "1"),
        *("--num-beams", "1", "--num-samples", "1", "--inference-steps", "2", "--score-timesteps", "1"),
        *flags,
    ]


@pytest.fixture(scope="module")
def uninterrupted(tiny_models, images: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("uninterrupted") / "out"
    assert rerank.main(_argv(tiny_models, images, out, "--quiet")) == 0
    rows, page, files = _outcome(out)
    assert [row["query"] for row in rows] == [query for query in range(QUERIES) for _ in range(CANDIDATES)]
    links = re.findall(r'src="images/([^"]+)"', page)
    assert page.count("<section>") == QUERIES and len(links) == QUERIES * (1 + CANDIDATES)
    assert set(links) == set(files)  # every image on the sheet, and nothing else
    return out


class CountedRankings:
    """rerank_captions that records the query ids it ranks, and can stop the run (Ctrl-C) at a given call."""

    def __init__(self, monkeypatch: pytest.MonkeyPatch, interrupt_at_call: int | None = None) -> None:
        self.ids: list[str] = []
        self.interrupt_at_call = interrupt_at_call
        self.calls = 0
        self._rank = rerank.rerank_captions
        monkeypatch.setattr(rerank, "rerank_captions", self)

    def __call__(self, captioner, generator, pixels, ids, **options):
        self.calls += 1
        if self.calls == self.interrupt_at_call:
            raise KeyboardInterrupt
        self.ids.extend(ids)
        return self._rank(captioner, generator, pixels, ids, **options)


def _outcome(out: Path) -> tuple[list[dict], str, dict[str, bytes]]:
    """What a run leaves: the rows, the contact sheet and every image file."""
    rows = [json.loads(line) for line in (out / "rankings.jsonl").read_text().splitlines()]
    images = {path.name: path.read_bytes() for path in sorted((out / "images").iterdir())}
    return rows, (out / "index.html").read_text(), images


def _earlier_run(uninterrupted: Path, out: Path, edit: Callable[[list[str]], list[str]]) -> Path:
    """What an earlier run left in `out`: the uninterrupted folder, its rankings.jsonl lines edited."""
    shutil.copytree(uninterrupted, out)
    jsonl = out / "rankings.jsonl"
    jsonl.write_text("".join(edit(jsonl.read_text().splitlines(keepends=True))))
    return out


def _query_ids(out: Path) -> list[str]:
    rows = [json.loads(line) for line in (out / "rankings.jsonl").read_text().splitlines()]
    return list(dict.fromkeys(row["query_id"] for row in rows))


def test_an_interrupted_run_resumes_to_the_folder_of_an_uninterrupted_one(
    tiny_models, images: Path, uninterrupted: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    out = tmp_path / "out"
    every_query = _query_ids(uninterrupted)
    assert len(every_query) == QUERIES
    counted = CountedRankings(monkeypatch, interrupt_at_call=2)
    with pytest.raises(KeyboardInterrupt):
        rerank.main(_argv(tiny_models, images, out, "--quiet"))  # Ctrl-C while ranking query 2 of 3
    assert _query_ids(out) == every_query[:1]
    counted.ids, counted.interrupt_at_call = [], None
    assert rerank.main(_argv(tiny_models, images, out, "--quiet", "--resume")) == 0
    assert counted.ids == every_query[1:]  # the kept query was not ranked again
    assert _outcome(out) == _outcome(uninterrupted)


@pytest.mark.parametrize("cut", ["a row short", "a torn line"])
def test_a_query_cut_short_is_ranked_again(
    tiny_models,
    images: Path,
    uninterrupted: Path,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    cut: str,
) -> None:
    def cut_short(lines: list[str]) -> list[str]:
        kept = lines[: CANDIDATES + 1]  # query 1 whole, query 2's first row
        return [*kept, lines[CANDIDATES + 1][:40]] if cut == "a torn line" else kept

    out = _earlier_run(uninterrupted, tmp_path / "out", cut_short)
    (out / "index.html").unlink()
    counted = CountedRankings(monkeypatch)
    assert rerank.main(_argv(tiny_models, images, out, "--quiet", "--resume")) == 0
    assert counted.ids == _query_ids(uninterrupted)[1:]
    assert _outcome(out) == _outcome(uninterrupted)


def test_without_resume_a_run_starts_afresh(
    tiny_models, images: Path, uninterrupted: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    def with_a_stale_query(lines: list[str]) -> list[str]:
        return [*lines, json.dumps(json.loads(lines[0]) | {"query_id": "stale"}) + "\n"]

    out = _earlier_run(uninterrupted, tmp_path / "out", with_a_stale_query)
    counted = CountedRankings(monkeypatch)
    assert rerank.main(_argv(tiny_models, images, out, "--quiet")) == 0
    assert counted.ids == _query_ids(uninterrupted)
    assert _outcome(out) == _outcome(uninterrupted)


@pytest.mark.parametrize("quiet", [False, True])
def test_a_progress_bar_over_the_queries_on_a_terminal_unless_quiet(
    tiny_models,
    images: Path,
    uninterrupted: Path,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    quiet: bool,
) -> None:
    out = _earlier_run(uninterrupted, tmp_path / "out", lambda lines: lines[:-CANDIDATES])  # 1 query to rank
    terminal = TerminalStream()
    monkeypatch.setattr(sys, "stderr", terminal)
    flags = ["--resume", *(["--quiet"] if quiet else [])]
    assert rerank.main(_argv(tiny_models, images, out, *flags)) == 0
    # rerank's bar (its unit: "2.9query/s" or "1.2s/query"), not transformers' loading bars
    bar = re.search(r" 1/1 \[[^\]]*query", terminal.getvalue())
    assert (bar is None) is quiet


def test_validation_shows_a_bar_over_its_batches_and_batching_changes_no_sample(
    tiny_models, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    def validated(batch_size: int) -> tuple[dict[str, float], list]:
        config = load_config(
            TINY_CONFIG,
            [
                *tiny_overrides(tiny_models, tmp_path),
                f"data.train_batch_size={batch_size}",
                "evaluation.validation_metrics=[psnr, bleu_1]",
                "train.validation_inference_steps=2",
            ],
        )
        torch.manual_seed(0)
        captioner, _ = build_captioner(config.captioner)
        generator, _ = build_generator(config.generator)
        return validate(captioner, generator, build_validation_batch(config), config)

    whole_metrics, whole_rows = validated(batch_size=2)
    terminal = TerminalStream()
    monkeypatch.setattr(sys, "stderr", terminal)
    metrics, rows = validated(batch_size=1)
    assert re.search(r"validation: .* 2/2 \[[^\]]*batch", terminal.getvalue())
    assert metrics == pytest.approx(whole_metrics)
    assert [row.generated_caption for row in rows] == [row.generated_caption for row in whole_rows]
    for row, whole in zip(rows, whole_rows, strict=True):
        torch.testing.assert_close(row.generated_image, whole.generated_image)
