"""Check where a configured model comes from before anything loads it.

A missing folder handed to transformers / diffusers ends in a long traceback about hub repo ids, or in a
network error that names no path; here it is one line naming the config key and the path.
"""

from __future__ import annotations

import os
from pathlib import Path

from huggingface_hub import HfApi, is_offline_mode, try_to_load_from_cache
from huggingface_hub.errors import HFValidationError
from huggingface_hub.utils import validate_repo_id

TINY_MODELS_DIR = Path("runs/tiny-models")
_TRUE = {"1", "ON", "YES", "TRUE"}


class ModelSourceError(ValueError):
    """A model folder or hub id that cannot be loaded; the message names the config key and the path."""


def looks_local(name_or_path: str) -> bool:
    """Whether `name_or_path` can only mean a folder on this machine, never a Hugging Face Hub id.

    Hub ids are "name" or "org/name" (huggingface_hub's validate_repo_id: one slash at most, no "..", no
    backslash). Anything that starts with ".", "~" or "/", exists on disk, or fails that validation (two or
    more slashes like runs/tiny-models/captioner, a backslash, a drive letter) is a local path. A relative
    "org/name"-shaped path such as tiny-models/captioner stays ambiguous: it is a folder if one exists,
    otherwise it is looked up as a hub id, and every error about it names the path as typed.
    """
    if name_or_path.startswith((".", "~", "/")) or Path(name_or_path).expanduser().exists():
        return True
    try:
        validate_repo_id(name_or_path)
    except HFValidationError:
        return True
    return False


def hub_offline() -> bool:
    """Offline as the libraries see it, read now (huggingface_hub's own flag is read once at import)."""
    flags = (os.environ.get(name, "").upper() for name in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE"))
    return is_offline_mode() or any(flag in _TRUE for flag in flags)


def _tiny_hint(name_or_path: str) -> str:
    if Path(name_or_path).parts[:2] == TINY_MODELS_DIR.parts:
        return f"; make the tiny models first: `make tiny` (python -m models.tiny --out {TINY_MODELS_DIR})"
    return ""


def locate_model(name_or_path: str, *, key: str, marker: str, revision: str | None = None) -> str:
    """Return `name_or_path` if it can be loaded, else raise ModelSourceError (one line, naming `key`).

    `marker` is the file every such model has at its root (config.json for a captioner, model_index.json
    for a diffusers pipeline): it must be in the folder, in the local Hugging Face cache, or on the Hub.
    The Hub is asked only when the model is neither a folder nor cached and the machine is online.
    """
    folder = Path(name_or_path).expanduser()
    if folder.is_dir():
        if not (folder / marker).is_file():
            raise ModelSourceError(f"{key}: folder {name_or_path} has no {marker}, so it holds no such model")
        return name_or_path
    if looks_local(name_or_path):
        raise ModelSourceError(f"{key}: model folder {name_or_path} does not exist{_tiny_hint(name_or_path)}")
    if isinstance(try_to_load_from_cache(name_or_path, marker, revision=revision), str):
        return name_or_path
    if hub_offline():
        raise ModelSourceError(
            f"{key}: {name_or_path} is not a local folder nor in the local Hugging Face cache, and this "
            "machine is offline (HF_HUB_OFFLINE / TRANSFORMERS_OFFLINE)"
        )
    try:
        found = HfApi().file_exists(name_or_path, marker, revision=revision)
    except Exception as error:  # connection, authentication or server errors: say which model was asked for
        first_line = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
        raise ModelSourceError(
            f"{key}: {name_or_path} is not a local folder, and the Hugging Face Hub could not be asked for it "
            f"({first_line})"
        ) from None
    if not found:
        raise ModelSourceError(
            f"{key}: {name_or_path} is neither a local folder nor a model on the Hugging Face Hub"
        )
    return name_or_path
