"""The one help format of every ``volad`` command: descriptions as written, defaults shown."""

from __future__ import annotations

import argparse
import ast
import json
from typing import Any, Sequence


class HelpFormatter(argparse.RawDescriptionHelpFormatter):
    """Keeps a command's description as written and appends ``(default: X)`` to an option's help,
    unless the help already says what the default is or there is none to show."""

    def _get_help_string(self, action: argparse.Action) -> str:
        text = action.help or ""
        if "default" in text or action.required or any(action.default is d for d in (None, False, argparse.SUPPRESS)):
            return text
        return f"{text} (default: %(default)s)"


def cli_value(text: Any) -> Any:
    """A command-line value as ``python -m monai.bundle run`` (python-fire) reads it: a Python literal (numbers,
    lists, ``None``, ``True``), else JSON (``null``, ``true``), else the string itself. The one parser of every command."""
    if not isinstance(text, str):
        return text
    try:
        return ast.literal_eval(text)
    except (ValueError, SyntaxError):
        pass
    try:
        return json.loads(text)
    except json.JSONDecodeError:
        return text


def parse_assignments(items: Sequence[str], command: str = "volad") -> dict[str, Any]:
    """``ID=VALUE`` strings as a dict, each value read by :func:`cli_value` (``96``, ``[8,16]``, ``cosine``).

    Raises:
        SystemExit: an item without ``=``, named with the ``command`` (argparse's way of refusing a value).
    """
    out = {}
    for item in items:
        key, sep, value = item.partition("=")
        if not sep or not key:
            raise SystemExit(f"{command}: error: {item!r} is not ID=VALUE")
        out[key] = cli_value(value)
    return out
