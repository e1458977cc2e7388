"""A checkpoint's manifest: every file's name, size and SHA-256, written last, checked before anything is read.

Why: a folder can be damaged after its save finished (a full disk, a truncated copy, a preempted rsync, a
file replaced by someone else). Verifying sizes and checksums first turns each of these into one message
naming the bad file, instead of a parser error deep in safetensors or a silently wrong resume.
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path

MANIFEST_NAME = "manifest.json"
FORMAT = "cycletune-checkpoint"
FORMAT_VERSION = 1
_CHUNK = 1 << 20


def sha256_of(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as handle:
        while chunk := handle.read(_CHUNK):
            digest.update(chunk)
    return digest.hexdigest()


def fsync_file(path: Path) -> None:
    """Flush a file's bytes to the disk, so a manifest never describes data still only in the page cache."""
    with path.open("rb+") as handle:
        os.fsync(handle.fileno())


def fsync_directory(path: Path) -> None:
    """Flush a folder's entries (a rename into it), so the new name survives a power loss."""
    descriptor = os.open(path, os.O_RDONLY)
    try:
        os.fsync(descriptor)
    finally:
        os.close(descriptor)


def write_manifest(folder: Path, required: list[str]) -> Path:
    """Describe every file in `folder` (each flushed to disk first), then write and flush the manifest.

    `required` names the files a loader needs; verification fails if one is not listed.
    """
    files = {}
    for path in sorted(folder.iterdir()):
        if path.is_file() and path.name != MANIFEST_NAME:
            fsync_file(path)
            files[path.name] = {"bytes": path.stat().st_size, "sha256": sha256_of(path)}
    absent = sorted(set(required) - files.keys())
    if absent:
        raise FileNotFoundError(f"{folder}: cannot write the manifest, missing {absent}")
    manifest = folder / MANIFEST_NAME
    manifest.write_text(
        json.dumps(
            {"format": FORMAT, "version": FORMAT_VERSION, "required": required, "files": files}, indent=1
        )
    )
    fsync_file(manifest)
    return manifest


def manifest_problem(folder: Path) -> str | None:
    """None if every file the manifest lists is there with its size and checksum; else what is wrong, by file."""
    manifest = folder / MANIFEST_NAME
    if not manifest.is_file():
        legacy = sorted(path.name for path in folder.glob("*.pkl")) + sorted(
            path.name for path in folder.glob("*.bin")
        )
        if legacy:
            return (
                f"no {MANIFEST_NAME}; it holds pickled state ({', '.join(legacy)}) from an older CycleTune or "
                "another trainer, which is never loaded because unpickling can run code"
            )
        return f"no {MANIFEST_NAME} (the save did not finish)"
    try:
        content = json.loads(manifest.read_text())
        files, required = content["files"], content["required"]
        if content.get("format") != FORMAT:
            return f"{manifest} is not a CycleTune manifest (format {content.get('format')!r})"
    except (UnicodeDecodeError, ValueError, KeyError, TypeError) as error:
        return f"{manifest} is unreadable ({type(error).__name__}: {error})"
    for name in required:
        if name not in files:
            return f"{manifest} does not list the required file {name}"
    for name, expected in files.items():
        path = folder / name
        if Path(name).name != name:
            return f"{manifest} lists {name!r}, which is not a plain file name"
        if not path.is_file():
            return f"{path} is missing"
        size = path.stat().st_size
        if size != expected["bytes"]:
            return f"{path} has {size} bytes, the manifest says {expected['bytes']} (truncated or replaced)"
        if sha256_of(path) != expected["sha256"]:
            return f"{path} does not match its SHA-256 in the manifest (damaged or replaced)"
    return None
