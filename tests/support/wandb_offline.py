"""Read an offline W&B run file (`run-<id>.wandb`) so tests can check what a run really logged.

The file is W&B's 7-byte header followed by LevelDB-log framed protobuf `Record`s (32 KiB blocks, each
chunk with a 7-byte header: crc32c, little-endian length, chunk type).
"""

from __future__ import annotations

import json
import struct
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from wandb.proto import wandb_internal_pb2

BLOCK = 32768
HEADER = 7
FULL, FIRST, MIDDLE, LAST = 1, 2, 3, 4


def records(path: Path) -> Iterator[wandb_internal_pb2.Record]:
    data = path.read_bytes()
    assert data[:4] == b":W&B", f"{path} is not a W&B run file"
    offset, pending = HEADER, b""
    while offset + HEADER <= len(data):
        room = BLOCK - offset % BLOCK
        if room < HEADER:  # block trailer padding
            offset += room
            continue
        length, kind = struct.unpack_from("<HB", data, offset + 4)
        if length == 0 and kind == 0:
            break
        chunk = data[offset + HEADER : offset + HEADER + length]
        offset += HEADER + length
        pending = chunk if kind in (FULL, FIRST) else pending + chunk
        if kind in (FULL, LAST):
            record = wandb_internal_pb2.Record()
            record.ParseFromString(pending)
            yield record


def _key(item: Any) -> str:
    return item.key or "/".join(item.nested_key)


def logged_config(path: Path) -> dict[str, Any]:
    """The run's config as W&B stored it (from the run record and later config updates)."""
    config: dict[str, Any] = {}
    for record in records(path):
        kind = record.WhichOneof("record_type")
        updates = (
            record.run.config.update if kind == "run" else record.config.update if kind == "config" else []
        )
        for item in updates:
            config[_key(item)] = json.loads(item.value_json)
    return config


def history(path: Path) -> list[dict[str, Any]]:
    """Every logged row, as {metric: value} with `_step`."""
    rows = []
    for record in records(path):
        if record.HasField("history"):
            rows.append({_key(item): json.loads(item.value_json) for item in record.history.item})
    return rows
