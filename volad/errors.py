"""Errors that name the file and the problem."""

from __future__ import annotations

from pathlib import Path


class VoladDataError(ValueError):
    """Bad or missing input data. The message always names the file and the problem."""

    def __init__(self, path: str | Path | None, problem: str):
        self.path = None if path is None else str(path)
        self.problem = problem
        super().__init__(f"{self.path}: {problem}" if self.path else problem)


class VoladConfigError(ValueError):
    """A configuration that cannot work (unknown dataset, incompatible checkpoint, ...)."""
