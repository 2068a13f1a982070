"""Splits for datasets that ship none: a seeded, reproducible rule over discovered subjects.

Real datasets come without volad's ``train``/``val``/``test`` lists. A manifest
states how to draw them (``"splits": {"rule": ...}``)::

    "health": {"field": "cls", "healthy": ["no"], "anomalous": ["yes"]},
    "splits": {"rule": {
        "seed": 0,
        "group": "^(BraTS-GLI-\\\\d+)-\\\\d+$",
        "assign": {
            "train": {"healthy": 1000},
            "val":   {"healthy": 50, "anomalous": 0.1},
            "test":  {"healthy": "rest", "anomalous": "rest"}}}}

* ``health`` gives every subject a status (``healthy``/``anomalous``) and a
  category: ``"healthy"`` or ``"anomalous"`` for the whole dataset, a captured
  pattern field whose values map to statuses (the value is the category), or
  ``"annotations"`` (FastMRI+: from the annotation CSV). Subjects without a status
  are in no split.
* ``assign`` lists, per split and in order, how many subjects of a status or
  category it takes: an integer (exact; too few is an error), a fraction of
  that status/category, or ``"rest"``.
* ``group`` (optional) is a regular expression whose first group names the
  patient: all scans of one patient land in one split (BraTS 2023 has several
  time points per patient).
* ``seed`` fixes the shuffle; the same files and seed always give the same splits.
"""

from __future__ import annotations

import re
from typing import Any, Mapping

import numpy as np

from volad.errors import VoladConfigError, VoladDataError

STATUSES = ("healthy", "anomalous")


def classify(spec: Any, fields: Mapping[str, str], annotation_status: str | None = None) -> tuple[str | None, str | None]:
    """``(status, category)`` of one subject under a manifest's ``health`` entry."""
    if spec in STATUSES:
        return spec, spec
    if spec == "annotations":
        return annotation_status, annotation_status
    if isinstance(spec, Mapping) and "field" in spec:
        value = fields.get(spec["field"])
        for status in STATUSES:
            if value in spec.get(status, ()):
                return status, value
        return None, value
    raise VoladConfigError(f"unknown health specification {spec!r}")


def assign(
    members: Mapping[str, tuple[str | None, str | None]],
    rule: Mapping[str, Any],
    *,
    where: str = "dataset",
) -> dict[str, list[str]]:
    """Draw splits from subjects' ``(status, category)`` following ``rule``.

    Args:
        members: Subject ID → (status, category).
        rule: ``{"seed", "assign", "group"?}`` as described in the module docstring.
        where: Names the dataset in errors.

    Raises:
        VoladDataError: an exact count asks for more subjects than exist.
    """
    seed = int(rule.get("seed", 0))
    group_rx = re.compile(rule["group"]) if rule.get("group") else None
    groups: dict[str, list[str]] = {}
    for sid in sorted(members):
        if members[sid][0] is None:
            continue
        m = group_rx.match(sid) if group_rx else None
        groups.setdefault(m.group(1) if m else sid, []).append(sid)
    # A group's status is anomalous if any member is; its category that of its first member.
    info = {}
    for g, sids in groups.items():
        statuses = {members[s][0] for s in sids}
        info[g] = ("anomalous" if "anomalous" in statuses else "healthy", members[sids[0]][1])
    order = sorted(groups)
    rng = np.random.default_rng(seed)
    order = [order[i] for i in rng.permutation(len(order))]
    taken: set[str] = set()
    out: dict[str, list[str]] = {}
    for split, wants in rule["assign"].items():
        chosen: list[str] = []
        for key, amount in wants.items():
            pool_all = [g for g in order if key in info[g]]
            pool = [g for g in pool_all if g not in taken]
            if amount == "rest":
                n = len(pool)
            elif isinstance(amount, float) and 0 <= amount <= 1:
                n = min(int(round(amount * len(pool_all))), len(pool))
            elif isinstance(amount, int) and amount >= 0:
                n = amount
                if n > len(pool):
                    raise VoladDataError(
                        where, f"split {split!r} needs {n} {key} subjects but only {len(pool)} are left ({len(pool_all)} found)"
                    )
            else:
                raise VoladConfigError(f"{where}: split {split!r}: amount {amount!r} for {key!r} must be an integer, a fraction or 'rest'")
            pick = pool[:n]
            taken.update(pick)
            chosen.extend(pick)
        out[split] = sorted(s for g in chosen for s in groups[g])
    return out
