"""The one help format of every ``volad`` command: descriptions as written, defaults shown."""

from __future__ import annotations

import argparse
import json
from typing import Any


class HelpFormatter(argparse.RawDescriptionHelpFormatter):
    """Keeps a command's description as written and appends ``(default: X)`` to an option's help,
    unless the help already says what the default is or there is none to show."""

    def _get_help_string(self, action: argparse.Action) -> str:
        text = action.help or ""
        if "default" in text or action.required or any(action.default is d for d in (None, False, argparse.SUPPRESS)):
            return text
        return f"{text} (default: %(default)s)"


def cli_value(text: str) -> Any:
    """Command-line value as JSON (numbers, lists, null, booleans) or else a string, as monai.bundle reads overrides."""
    try:
        return json.loads(text)
    except json.JSONDecodeError:
        return text
