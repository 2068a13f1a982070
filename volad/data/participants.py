"""Participants tables: the demographics a dataset publishes beside its images (IXI's sheet, a BIDS ``participants.tsv``).

A manifest's ``participants`` entry names the table (relative to the dataset's folder),
its ID column, which field of the subject's file names it matches (``match``: IXI's
``num``; default the subject ID), the columns to read as metadata (``columns``: volad
name → column header) and optional value maps (``values``: IXI's ``SEX_ID`` 1/2 →
male/female). CSV and TSV are read directly; Excel sheets (IXI publishes ``IXI.xls``)
through pandas, which needs ``xlrd`` for ``.xls`` and ``openpyxl`` for ``.xlsx``.
"""

from __future__ import annotations

import csv
from functools import lru_cache
from pathlib import Path

from volad.errors import VoladDataError

#: Age bins (years) of subgroup reports: lower edges; the last bin is open.
AGE_BINS = (0, 30, 45, 60, 75)


def age_bin(age: str) -> str:
    """The bin of an age given as text (``""`` when it is missing or not a number): ``<30``, ``30–44``, …, ``≥75``."""
    try:
        years = float(age)
    except (TypeError, ValueError):
        return ""
    edges = list(AGE_BINS[1:])
    for lo, hi in zip(AGE_BINS, edges):
        if years < hi:
            return f"<{hi}" if lo == 0 else f"{lo}–{hi - 1}"
    return f"≥{edges[-1]}"


def normalise_id(value: str) -> str:
    """IDs compared as the table and the file names write them: ``002``, ``2`` and ``2.0`` are one subject."""
    text = str(value).strip()
    try:
        number = float(text)
    except ValueError:
        return text
    return str(int(number)) if number.is_integer() else text


def read_participants(path: Path, id_column: str) -> dict[str, dict[str, str]]:
    """Rows of a participants table by normalised ID, every cell as text (read once per version of the file).

    Raises:
        VoladDataError: the file cannot be read, or has no ``id_column``.
    """
    return _read(Path(path), id_column, Path(path).stat().st_mtime_ns)


@lru_cache(maxsize=8)
def _read(path: Path, id_column: str, version: int) -> dict[str, dict[str, str]]:
    suffix = path.suffix.lower()
    try:
        if suffix in (".xls", ".xlsx"):
            import pandas as pd

            frame = pd.read_excel(path, dtype=str).fillna("")
            rows = frame.to_dict("records")
            header = list(frame.columns)
        else:
            with open(path, newline="", encoding="utf-8-sig") as f:
                reader = csv.DictReader(f, delimiter="\t" if suffix == ".tsv" else ",")
                rows, header = list(reader), list(reader.fieldnames or [])
    except ImportError as exc:
        raise VoladDataError(path, f"reading an Excel sheet needs pandas with {'xlrd' if suffix == '.xls' else 'openpyxl'} ({exc}): "
                                   "pip install it, or save the sheet as CSV and point the manifest's participants.file at that") from None
    except (OSError, ValueError, csv.Error) as exc:
        raise VoladDataError(path, f"cannot read the participants table ({exc})") from None
    if id_column not in header:
        raise VoladDataError(path, f"participants table has no column {id_column!r} (columns: {', '.join(map(str, header))})")
    return {normalise_id(r[id_column]): {str(k): str(v).strip() for k, v in r.items()} for r in rows if str(r[id_column]).strip()}
