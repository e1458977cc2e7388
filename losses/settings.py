"""The base of every settings section: unknown keys are errors, not silently ignored settings.

It lives in losses/, the lowest layer that defines settings types (each loss module owns the settings it
reads; train/config.py composes them and its own sections into the run's Config).
"""

from __future__ import annotations

from pydantic import BaseModel, ConfigDict


class Strict(BaseModel):
    """Base for every section: unknown keys are errors, not silently ignored settings."""

    model_config = ConfigDict(extra="forbid", validate_assignment=True)
