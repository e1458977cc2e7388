"""Output that survives an interruption: JSONL rows written as they are made, kept by --resume.

train.cli.generate (one row per input) and train.cli.rerank (one row per candidate, several per query) both
append each input's rows as soon as they exist, so a killed run keeps its work; --resume keeps every input
whose rows are complete and makes only the rest.
"""

from __future__ import annotations

import argparse
import json
from collections.abc import Callable, Iterator
from pathlib import Path

from tqdm.auto import tqdm


def add_resume_arguments(parser: argparse.ArgumentParser, resume_help: str) -> None:
    """--resume (keep what an interrupted run wrote) and --quiet (no progress bar)."""
    parser.add_argument("--resume", action="store_true", help=resume_help)
    parser.add_argument("--quiet", action="store_true", help="no progress bar (it is off when not a TTY)")


def written_ids(
    jsonl: Path,
    resume: bool,
    *,
    id_field: str = "id",
    complete: Callable[[list[dict]], bool] = lambda rows: True,
) -> set[str]:
    """The ids a previous run wrote to `jsonl` (--resume), whose rows are kept; without --resume the file
    starts afresh. Rows are grouped by `id_field`; a torn line, and every row of an id whose group
    `complete` refuses (an input cut short by the interruption), are dropped, and that input made again."""
    if not resume or not jsonl.is_file():
        jsonl.write_text("", encoding="utf-8")
        return set()
    groups: dict[str, list[tuple[str, dict]]] = {}
    for line in jsonl.read_text(encoding="utf-8").splitlines():
        try:
            row = json.loads(line)
            groups.setdefault(row[id_field], []).append((line, row))
        except (json.JSONDecodeError, KeyError, TypeError):
            continue
    kept = {row_id: lines for row_id, lines in groups.items() if complete([row for _, row in lines])}
    jsonl.write_text("".join(line + "\n" for lines in kept.values() for line, _ in lines), encoding="utf-8")
    return set(kept)


def progress_bar(total: int, quiet: bool, unit: str) -> tqdm:
    """A progress bar on stderr, off with --quiet and whenever stderr is not a TTY (logs, pipes)."""
    return tqdm(total=total, unit=unit, disable=True if quiet else None)


def write_rows(rows: Iterator[dict], jsonl: Path, total: int, quiet: bool) -> Iterator[dict]:
    """Append each row to the JSONL as soon as it is made (an interrupted run keeps what it made), under a
    progress bar (off when not a TTY, or with --quiet)."""
    with jsonl.open("a", encoding="utf-8") as out, progress_bar(total, quiet, "row") as bar:
        for row in rows:
            out.write(json.dumps(row) + "\n")
            out.flush()
            bar.update()
            yield row
