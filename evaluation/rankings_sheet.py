"""The HTML contact sheet of a rankings folder: each query with its candidates in primary-rank order.

It is rendered from the rankings as rankings.jsonl stores them, so a resumed run's sheet shows the queries
an earlier run ranked exactly as those it ranked itself.
"""

from __future__ import annotations

import html
from dataclasses import dataclass
from pathlib import Path


@dataclass(frozen=True)
class StoredRanking:
    """A Ranking (evaluation/ranking.py) read back from rankings.jsonl: image paths instead of tensors."""

    mode: str
    query_id: str
    query_text: str | None
    query_image: Path | None
    captions: list[str]
    images: list[Path]
    kinds: list[str]
    scores: dict[str, list[float]]
    ranks: dict[str, list[int]]
    higher_is_better: dict[str, bool]
    primary: str
    references: list[str]
    reference_image: Path | None

    @property
    def best(self) -> int:
        """Index of the candidate ranked first by the primary measure."""
        return self.ranks[self.primary].index(0)


_STYLE = """
body { font-family: sans-serif; margin: 1.5em; }
section { margin-bottom: 2em; border-bottom: 1px solid #ccc; padding-bottom: 1em; }
.row { display: flex; flex-wrap: wrap; gap: 0.8em; align-items: flex-start; }
figure { margin: 0; width: 12em; font-size: 0.85em; }
figure img { width: 12em; image-rendering: pixelated; border: 3px solid transparent; }
figure.best img { border-color: #2a2; }
figure.query img { border-color: #888; }
table { border-collapse: collapse; } td { padding: 0 0.4em 0 0; }
"""


def html_section(ranking: StoredRanking, folder: Path) -> str:
    """One query's section; its image links are relative to `folder`, the sheet's own."""
    escape = html.escape

    def link(path: Path) -> str:
        return escape(path.relative_to(folder).as_posix())

    figures = []
    if ranking.query_image is not None:
        figures.append(
            f'<figure class="query"><img src="{link(ranking.query_image)}" alt="query">'
            "<figcaption>query</figcaption></figure>"
        )
    if ranking.reference_image is not None:
        figures.append(
            f'<figure class="query"><img src="{link(ranking.reference_image)}" alt="reference">'
            "<figcaption>reference image</figcaption></figure>"
        )
    order = sorted(range(len(ranking.captions)), key=lambda index: ranking.ranks[ranking.primary][index])
    for index in order:
        rows = "".join(
            f"<tr><td>{escape(name)}</td><td>{ranking.scores[name][index]:.4g}</td>"
            f"<td>rank {ranking.ranks[name][index]}</td></tr>"
            for name in ranking.scores
        )
        best = ' class="best"' if index == ranking.best else ""
        figures.append(
            f'<figure{best}><img src="{link(ranking.images[index])}" alt="candidate {index}">'
            f"<figcaption><b>{escape(ranking.captions[index])}</b> <i>({escape(ranking.kinds[index])})</i>"
            f"<table>{rows}</table></figcaption></figure>"
        )
    heading = escape(ranking.query_id) + (f": {escape(ranking.query_text)}" if ranking.query_text else "")
    references = (
        "<p>references: " + " | ".join(escape(text) for text in ranking.references) + "</p>"
        if ranking.references
        else ""
    )
    return f'<section><h2>{heading}</h2>{references}<div class="row">{"".join(figures)}</div></section>'


def html_page(title: str, sections: list[str]) -> str:
    return (
        f'<!DOCTYPE html>\n<html><head><meta charset="utf-8"><title>{html.escape(title)}</title>'
        f"<style>{_STYLE}</style></head><body><h1>{html.escape(title)}</h1>"
        "<p>Candidates in order of the first measure; the best has a green frame.</p>"
        + "\n".join(sections)
        + "</body></html>\n"
    )
