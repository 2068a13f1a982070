"""A dataset whose validation split lacks one lesion kind: the honest test of what val chooses.

Everything a labelled validation split chooses (a checkpoint, a threshold, a
fusion's members and rule) may fit the kinds of lesion val holds. Removing kind
``K`` from val, choosing everything again, and reporting ``K`` alone on the
unchanged test split measures how a method does on a kind it was not chosen on,
as it will on the lesions of a user's data that no benchmark describes.

:func:`without_kind_in_val` writes such a dataset as a **view**: a folder of
symbolic links to the original root's entries, with its own split file (``val``
without ``K``; ``train`` and ``test`` unchanged). ``--data_root <view>`` then
opens it like the original, and run folders record it as their data.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

from volad.data.manifest import load_dataset
from volad.errors import VoladConfigError
from volad.io import write_json


def _lesion_kinds(statuses) -> list[str]:
    """The lesion kinds (categories of status ``anomalous``) among ``(status, category)`` pairs, in order of first appearance."""
    return list(dict.fromkeys(category for status, category in statuses if status == "anomalous" and category))


def val_kinds(dataset: str, data_root: str | None = None) -> list[str]:
    """The lesion kinds (manifest categories of status ``anomalous``) among a dataset's val subjects, in order."""
    ds = load_dataset(dataset, data_root)
    return _lesion_kinds(ds.status(sid) for sid in ds.split_ids("val"))


def without_kind_in_val(dataset: str, data_root: str | None, kind: str, out: str | Path) -> Path:
    """Write (or reuse) a view of ``dataset`` whose val split has no subject of lesion kind ``kind``; returns its root.

    Args:
        dataset: Manifest name or path.
        data_root: The original data folder (``None``: the manifest's default, generated if need be).
        kind: A lesion kind (manifest category) of the val split.
        out: Folder of the view (made; an existing view of the same splits is reused).

    Raises:
        VoladConfigError: the dataset's splits do not come from a split file, or val has no subject of ``kind``
            (naming the kinds it has), or nothing would be left in val.
    """
    ds = load_dataset(dataset, data_root)
    spec = ds.manifest.get("splits") or {}
    if "file" not in spec or Path(spec["file"]).is_absolute():
        raise VoladConfigError(
            f"dataset {ds.name!r}: leaving a kind out of val needs splits read from a split file inside its root; its manifest gives {sorted(spec)}"
        )
    table = ds.split_table()
    val = [(sid, ds.status(sid)) for sid in table["val"]]
    kinds = _lesion_kinds(status for _, status in val)
    if kind not in kinds:
        raise VoladConfigError(f"dataset {ds.name!r}: its val split has no lesion kind {kind!r} (it has: {', '.join(kinds) or 'none'})")
    splits = {**table, "val": [sid for sid, (_, c) in val if c != kind]}
    if not any(s == "anomalous" for sid, (s, c) in val if c != kind):
        raise VoladConfigError(f"dataset {ds.name!r}: without {kind!r} its val split has no lesion left to choose anything on")
    out = Path(out)
    split_file = out / spec["file"]
    if split_file.is_file() and json.loads(split_file.read_text()) == splits:
        return out
    out.mkdir(parents=True, exist_ok=True)
    for entry in Path(ds.root).iterdir():
        link = out / entry.name
        if entry.name == spec["file"] or os.path.lexists(link):
            continue
        os.symlink(entry.resolve(), link, target_is_directory=entry.is_dir())
    write_json(splits, split_file)
    return out
