"""Rankings on disk: rankings.jsonl (one row per candidate), PNGs under images/, and an HTML contact sheet.

RankingWriter writes them as they come (a query's rows at once, so an interrupted run keeps whole queries);
read_rankings reads the JSONL back, for reports and for the contact sheet itself.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image
from torch import Tensor

from cycletune.evaluation.ranking import Ranking
from cycletune.evaluation.rankings_sheet import StoredRanking, html_page, html_section

RANKINGS_FILE = "rankings.jsonl"
CONTACT_SHEET_FILE = "index.html"
IMAGES_FOLDER = "images"


class RankingWriter:
    """Writes rankings as they come: PNGs under images/, one JSONL row per candidate, and at close an HTML
    contact sheet (index.html, relative links, candidates in primary-rank order) of every ranking in
    rankings.jsonl, read back from it. With `append`, the rankings a previous run left there stay (the
    caller has dropped any query it cut short) and the sheet shows them too."""

    def __init__(self, out_dir: Path, title: str, *, append: bool = False) -> None:
        self.out_dir = Path(out_dir)
        (self.out_dir / IMAGES_FOLDER).mkdir(parents=True, exist_ok=True)
        self.title = title
        self.jsonl_path = self.out_dir / RANKINGS_FILE
        self.html_path = self.out_dir / CONTACT_SHEET_FILE
        self._jsonl = self.jsonl_path.open("a" if append else "w", encoding="utf-8")
        self._next_query = 0

    def __enter__(self) -> RankingWriter:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    def write(self, ranking: Ranking, query: int | None = None) -> None:
        """Store one ranking as query number `query` (its rows' "query", its files' names): the query's
        position among all the run's, so a resumed run numbers as an uninterrupted one. Default: the
        number after the last one written."""
        query = self._next_query if query is None else query
        self._next_query = query + 1
        stem = f"q{query:05d}"
        query_image = self._save(ranking.query_image, f"{stem}.png")
        reference_image = self._save(ranking.reference_image, f"{stem}_reference.png")
        candidate_images = [
            self._save(image, f"{stem}_c{index:02d}.png") for index, image in enumerate(ranking.images)
        ]
        lines = []
        for index, (caption, image) in enumerate(zip(ranking.captions, candidate_images, strict=True)):
            row = {
                "mode": ranking.mode,
                "query": query,
                "query_id": ranking.query_id,
                "query_text": ranking.query_text,
                "query_image": query_image,
                "references": ranking.references,
                "reference_image": reference_image,
                "candidate": index,
                "kind": ranking.kinds[index],
                "caption": caption,
                "image": image,
                "scores": {name: values[index] for name, values in ranking.scores.items()},
                "ranks": {name: values[index] for name, values in ranking.ranks.items()},
                "higher_is_better": ranking.higher_is_better,
                "primary": ranking.primary,
            }
            lines.append(json.dumps(row) + "\n")
        self._jsonl.write("".join(lines))
        self._jsonl.flush()

    def close(self) -> None:
        if self._jsonl.closed:
            return
        self._jsonl.close()
        sections = [html_section(ranking, self.out_dir) for ranking in read_rankings(self.jsonl_path)]
        self.html_path.write_text(html_page(self.title, sections), encoding="utf-8")

    def _save(self, image: Tensor | None, name: str) -> str | None:
        """Save an image as a PNG under images/; returns its path relative to the output folder."""
        if image is None:
            return None
        relative = f"{IMAGES_FOLDER}/{name}"
        save_png(image, self.out_dir / relative)
        return relative


def save_png(pixels01: Tensor, path: Path) -> None:
    """Save one [3, H, W] pixels01 image as an 8-bit PNG."""
    array = (
        (pixels01.detach().float().clamp(0, 1) * 255).round().to(torch.uint8).permute(1, 2, 0).cpu().numpy()
    )
    Image.fromarray(np.ascontiguousarray(array)).save(path)


def read_rankings(path: Path) -> list[StoredRanking]:
    """The rankings in a rankings.jsonl, queries in file order; image paths resolved against its folder."""
    path = Path(path)
    folder = path.parent
    rows_by_query: dict[int, list[dict[str, Any]]] = {}
    for line_number, line in enumerate(path.read_text(encoding="utf-8").splitlines(), start=1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
            rows_by_query.setdefault(int(row["query"]), []).append(row)
        except (json.JSONDecodeError, KeyError, TypeError, ValueError) as error:
            raise ValueError(f"{path}:{line_number}: not a rankings row ({error})") from error

    def resolved(relative: str | None) -> Path | None:
        return None if relative is None else folder / relative

    stored = []
    for query, rows in rows_by_query.items():
        rows.sort(key=lambda row: row["candidate"])
        first = rows[0]
        try:
            stored.append(
                StoredRanking(
                    mode=first["mode"],
                    query_id=first["query_id"],
                    query_text=first["query_text"],
                    query_image=resolved(first["query_image"]),
                    captions=[row["caption"] for row in rows],
                    images=[folder / row["image"] for row in rows],
                    kinds=[row["kind"] for row in rows],
                    scores={name: [row["scores"][name] for row in rows] for name in first["scores"]},
                    ranks={name: [row["ranks"][name] for row in rows] for name in first["ranks"]},
                    higher_is_better=first["higher_is_better"],
                    primary=first["primary"],
                    references=first["references"],
                    reference_image=resolved(first["reference_image"]),
                )
            )
        except KeyError as error:
            raise ValueError(f"{path}: query {query} rows lack the field {error}") from error
    return stored
