"""Published figures of the field's standard comparisons (``published.json``), to print beside volad's own.

Each protocol names the healthy training dataset, the labelled dataset it is evaluated
on, the contrasts and the mode of the published comparison, its source, what differs
from volad's run of the same pairing, and the published rows. The figures live in the
data file only; this module reads them and lays them out as rows a benchmark table
prints, each labelled ``published`` with its citation.
"""

from __future__ import annotations

import json
from functools import lru_cache
from pathlib import Path
from typing import Any

from volad.errors import VoladConfigError

PUBLISHED_PATH = Path(__file__).with_name("published.json")


@lru_cache(maxsize=1)
def _protocols() -> dict[str, dict[str, Any]]:
    return json.loads(PUBLISHED_PATH.read_text())["protocols"]


def protocol_names(level: str | None = None) -> list[str]:
    """The protocols with published figures (``level``: only ``"voxel"`` ones, which ``volad bench quality`` runs, or
    ``"image"`` ones, which ``volad protocol`` runs)."""
    return sorted(name for name, spec in _protocols().items() if level is None or spec["level"] == level)


def image_protocol_for(dataset: str) -> str | None:
    """The image-level protocol with published figures for a picture dataset (its manifest name), if any."""
    return next((name for name in protocol_names("image") if _protocols()[name]["dataset"] == dataset), None)


def published_protocol(name: str) -> dict[str, Any]:
    """One protocol's record: datasets, contrasts, mode, source (and its short ``cite``), what differs, unit, metrics and rows.

    Raises:
        VoladConfigError: no such protocol; the message lists the known ones.
    """
    if name not in _protocols():
        raise VoladConfigError(f"no published protocol {name!r} (known: {', '.join(protocol_names())}; figures in {PUBLISHED_PATH})")
    return dict(_protocols()[name])


def published_rows(name: str) -> list[dict[str, Any]]:
    """The protocol's published rows on volad's scale (fractions, as volad's reports), each labelled with its short citation."""
    spec = published_protocol(name)
    scale = 0.01 if spec.get("unit") == "%" else 1.0
    return [
        {"method": row["method"], "role": "published", "source": spec["cite"], **{m: round(row[m] * scale, 6) for m in spec["metrics"] if m in row}}
        for row in spec["rows"]
    ]
