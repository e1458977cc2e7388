"""--help of every command: the module docstring with its line breaks, and every flag's default."""

from __future__ import annotations

import argparse
import copy


class HelpFormatter(argparse.RawDescriptionHelpFormatter, argparse.ArgumentDefaultsHelpFormatter):
    """RawDescription keeps the usage examples in the docstring readable; each flag with a default shows
    "(default: X)", also when it has no help text, so a user sees what an omitted flag means. Flags without a
    real default (None, or off for a switch) show none."""

    def _format_action(self, action: argparse.Action) -> str:
        if action.help is None and _has_default(action):
            action = copy.copy(action)
            action.help = "(default: %(default)s)"
        return super()._format_action(action)

    def _get_help_string(self, action: argparse.Action) -> str | None:
        return super()._get_help_string(action) if _has_default(action) else action.help


def _has_default(action: argparse.Action) -> bool:
    return (
        bool(action.option_strings)
        and action.default not in (None, argparse.SUPPRESS)
        and action.default is not False
    )
