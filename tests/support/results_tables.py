"""README results tables against the JSON their make targets wrote (docs/results/).

A table is the first markdown table under its heading. Each table names the JSON it shows and says, for a
row, which stored value each column shows; every number in a cell ("0.52 [0.48, 0.57]", "+0.317 ± 0.006")
must round to what the cell prints, at the precision it prints, and words ("yes") must match exactly.
"""

from __future__ import annotations

import json
import re
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from cycle_runs import REPO

RESULTS = REPO / "docs" / "results"
_NUMBER = re.compile(r"[+\-−]?(?:\d+\.\d+|\d+|nan)")

Row = dict[str, str]
Expected = dict[str, list[float] | str]


@dataclass(frozen=True)
class ResultsTable:
    heading: str
    json_file: Path
    # The stored values a README row shows, by column; columns not named are labels.
    expected: Callable[[dict[str, Any], Row], Expected]


def markdown_table(text: str, heading: str) -> list[Row]:
    """The first table after the heading line `# ... heading`, as {column: cell} rows (backticks dropped)."""
    lines = text.splitlines()
    starts = [i for i, line in enumerate(lines) if re.fullmatch(rf"#+ {re.escape(heading)}", line.strip())]
    assert starts, f"README has no heading {heading!r}"
    body = lines[starts[0] + 1 :]
    first = next((i for i, line in enumerate(body) if line.startswith("|")), None)
    assert first is not None, f"no table under {heading!r}"
    table = []
    for line in body[first:]:
        if not line.startswith("|"):
            break
        table.append([cell.strip().replace("`", "") for cell in line.strip().strip("|").split("|")])
    header, rows = table[0], table[2:]
    return [dict(zip(header, row, strict=True)) for row in rows]


def cell_numbers(cell: str) -> list[tuple[float, int]]:
    """Each number in a cell with its printed decimals ("−" and "+" signs read as such)."""
    found = []
    for text in _NUMBER.findall(cell):
        text = text.replace("−", "-")
        decimals = len(text.split(".")[1]) if "." in text else 0
        found.append((float(text), decimals))
    return found


def cell_mismatch(cell: str, expected: list[float] | str) -> str | None:
    """Why a cell does not show the expected values, or None when it does."""
    if isinstance(expected, str):
        return None if cell == expected else f"{cell!r} != {expected!r}"
    shown = cell_numbers(cell)
    if len(shown) != len(expected):
        return f"{cell!r} shows {len(shown)} numbers, the JSON has {len(expected)}: {expected}"
    for (value, decimals), stored in zip(shown, expected, strict=True):
        both_nan = value != value and stored != stored
        if not both_nan and not abs(value - stored) <= 0.5 * 10**-decimals + 1e-9:
            return f"{cell!r}: {value} is not {stored} at {decimals} decimals"
    return None


def table_mismatches(readme: str, table: ResultsTable) -> list[str]:
    """Every cell of the README table that does not show what the JSON holds, and every row it lacks."""
    stored = json.loads(table.json_file.read_text(encoding="utf-8"))
    rows = markdown_table(readme, table.heading)
    assert rows, f"the table under {table.heading!r} has no rows"
    problems = []
    for row in rows:
        where = f"{table.heading} / {list(row.values())[:4]}"
        try:
            expected = table.expected(stored, row)
        except KeyError as missing:
            problems.append(f"{where}: {table.json_file.name} has no {missing}")
            continue
        for column, values in expected.items():
            problem = cell_mismatch(row[column], values)
            if problem:
                problems.append(f"{where} / {column}: {problem}")
    return problems


def _estimate(estimate: dict[str, float]) -> list[float]:
    return [estimate["value"], estimate["ci_low"], estimate["ci_high"]]


def rerank_study_row(stored: dict[str, Any], row: Row) -> Expected:
    """make rerank-study's table: a row names the direction, inputs (all, seen, unseen), ranking measure
    and quality; its cells show top-1, random pick, their difference and Spearman's rho, with intervals."""
    result = stored["directions"][row["direction"]]["results"][row["inputs"]][row["quality"]]
    measure = result["measures"][row["ranked by"]]
    pick, correlation = measure["top_pick"], measure["correlation"]
    return {
        "top-1": _estimate(pick["top1"]),
        "random pick": _estimate(pick["random"]),
        "top-1 - random": _estimate(pick["gain"]),
        "Spearman ρ, within input": _estimate(correlation["within_query"]),
        "Spearman ρ, pooled": _estimate(correlation["pooled"]),
    }


def experiment_row(stored: dict[str, Any], row: Row) -> Expected:
    """make experiment's (and split-experiment's) table: a metric per row, each arm's mean over seeds, and
    per compared arm its paired difference with control ("cycle - control, mean ± sd") and "cycle > 2 sd"."""
    metric = row["metric (test split)"]
    expected: Expected = {arm: [means[metric]] for arm, means in stored["table"].items() if arm in row}
    for arm, by_metric in stored["paired_differences"].items():
        difference = by_metric[metric]
        column = next((name for name in row if name.startswith(f"{arm} - control")), None)
        if column is None or f"{arm} > 2 sd" not in row:
            raise KeyError(f"columns for {arm} - control in the README table")
        expected[column] = [difference["mean"], difference["sd"]]
        expected[f"{arm} > 2 sd"] = "yes" if difference["passes"] else "no"
    return expected


def reward_agreement_row(stored: dict[str, Any], row: Row) -> Expected:
    """make reward-agreement's table: a frontier or default setting per row (or sampling against itself),
    its cost and its agreement with sampling."""
    if row["setting"] == "sampling vs itself":
        sampling = stored["sampling"]
        return {
            "ms": [sampling["ms"]],
            "cheaper than sampling": [1.0],
            "Spearman ρ, within image": _estimate(sampling["self_rho"]),
        }
    indices = stored["frontier"] if row["setting"] == "frontier" else [stored["default"]]
    chosen = [stored["settings"][index] for index in indices]
    matching = [
        setting
        for setting in chosen
        if (str(setting["num_timesteps"]), setting["timestep_range"], setting["noise"])
        == (row["timesteps"], row["range"], row["noise"])
    ]
    if not matching:
        raise KeyError(f"{row['setting']} setting {row['timesteps']}/{row['range']}/{row['noise']}")
    setting = matching[0]
    return {
        "ms": [setting["ms"]],
        "cheaper than sampling": [setting["speedup"]],
        "Spearman ρ, within image": _estimate(setting["rho"]),
    }


def reward_learning_row(stored: dict[str, Any], row: Row) -> Expected:
    """make reward-learning's table: a held-out metric per row, base and each arm's mean over seeds, the
    paired difference reward - control."""
    metric = row["metric (test split)"]
    difference = stored["reward_minus_control"][metric]
    return {
        "base": [stored["base"][metric]],
        **{arm: [stored["mean"][arm][metric]] for arm in ("control", "reward")},
        "reward - control": [difference["mean"], difference["sd"]],
        "> 2 sd": "yes" if difference["passes"] else "no",
    }


def scaling_row(stored: dict[str, Any], row: Row) -> Expected:
    """make scaling's table: an arm per row, its unseen accuracies (mean over seeds) and, beside each, the
    gain over control (mean, then each seed's)."""
    arm = row["arm"]
    expected: Expected = {}
    for metric, column in (("unseen/caption_exact", "captions"), ("unseen/image_exact", "images")):
        expected[f"unseen {column}"] = [stored["mean"][arm][metric]]
        if arm != "control":
            gain = stored["gain"][arm][metric]
            expected[f"{column}: gain over control"] = [gain["mean"], *gain["differences"]]
    return expected


TABLES = {
    "rerank_study": ResultsTable("Reranking study", RESULTS / "rerank_study.json", rerank_study_row),
    "experiment": ResultsTable("Results", RESULTS / "experiment.json", experiment_row),
    "split_experiment": ResultsTable(
        "The image side on a designed split", RESULTS / "split_experiment.json", experiment_row
    ),
    "reward_agreement": ResultsTable(
        "The cheap reward against the expensive one", RESULTS / "reward_agreement.json", reward_agreement_row
    ),
    "reward_learning": ResultsTable(
        "The T2I2T reward on the shapes world", RESULTS / "reward_learning.json", reward_learning_row
    ),
    "scaling": ResultsTable("Unpaired data as it grows", RESULTS / "scaling.json", scaling_row),
}
