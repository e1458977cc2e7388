"""The HTML contact sheet of a rankings folder: each query with its candidates in primary-rank order."""

from __future__ import annotations

import html

from cycletune.evaluation.ranking import Ranking

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


def html_section(
    ranking: Ranking, query_image: str | None, reference_image: str | None, candidate_images: list[str]
) -> str:
    escape = html.escape
    figures = []
    if query_image is not None:
        figures.append(
            f'<figure class="query"><img src="{escape(query_image)}" alt="query">'
            "<figcaption>query</figcaption></figure>"
        )
    if reference_image is not None:
        figures.append(
            f'<figure class="query"><img src="{escape(reference_image)}" alt="reference">'
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
            f'<figure{best}><img src="{escape(candidate_images[index])}" alt="candidate {index}">'
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
