"""Every number in a README results table equals the JSON its make target wrote (docs/results/); the
tables and their rules are in tests/support/results_tables.py."""

from __future__ import annotations

import pytest
from results_tables import REPO, TABLES, cell_mismatch, experiment_row, markdown_table, table_mismatches


@pytest.mark.parametrize("name", sorted(TABLES))
def test_readme_table_shows_the_stored_numbers(name: str) -> None:
    readme = (REPO / "README.md").read_text(encoding="utf-8")
    assert table_mismatches(readme, TABLES[name]) == []


def test_a_changed_number_or_word_is_caught() -> None:
    stored = {"paired_differences": {"cycle": {"m": {"mean": 0.3166, "sd": 0.0055, "passes": True}}}}
    stored["table"] = {arm: {"m": 0.25} for arm in ("base", "control", "cycle")}
    readme = (
        "## Results\n\ntext\n\n| metric (test split) | base | control | cycle | cycle - control, mean ± sd |"
        " cycle > 2 sd |\n|---|---:|---:|---:|---:|:---:|\n| m | 0.250 | 0.25 | 0.250 | +0.317 ± 0.006 | yes |\n"
    )
    row = markdown_table(readme, "Results")[0]
    assert all(cell_mismatch(row[c], v) is None for c, v in experiment_row(stored, row).items())
    assert cell_mismatch("+0.318 ± 0.006", [0.3166, 0.0055]) is not None
    assert cell_mismatch("0.25 [0.2, 0.3]", [0.25, 0.2]) is not None
    assert cell_mismatch("−0.120 [−0.200, +0.010]", [-0.12, -0.2, 0.01]) is None
    assert cell_mismatch("no", "yes") is not None
    with pytest.raises(AssertionError, match="no heading"):
        markdown_table(readme, "Reranking study")
