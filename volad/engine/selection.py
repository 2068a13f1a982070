"""Choosing a fusion's members and rule on the labelled validation split (greedy forward selection).

Members are added one at a time, each time the one that raises the validation
voxel AUPRC of the fused map most, while the gain is at least ``min_gain``; this is
done for every combination rule and the best wins. Every candidate tried is recorded.
"""

from __future__ import annotations

from typing import Any, Callable, Sequence

import numpy as np

from volad.methods.fusion import COMBINE_RULES


def choose_rule(
    val_auprc: Callable[[list[int], str], float],
    names: Sequence[str],
    *,
    combine: str = "auto",
    select_members: bool = True,
    min_gain: float = 0.005,
) -> dict[str, Any]:
    """The members and rule with the highest validation AUPRC; every candidate tried is recorded.

    Members are added greedily (each time the one whose addition raises the AUPRC
    of the fused map most) while the gain is at least ``min_gain``, for each rule;
    the best rule wins, the first of :data:`volad.methods.fusion.COMBINE_RULES` on a tie.

    Args:
        val_auprc: Val voxel AUPRC of the map fusing members (indices) by a rule (one of ``COMBINE_RULES``).
        names: Member names.
        combine: ``"auto"`` (every rule) or one rule.
        select_members: ``False`` keeps every member.
        min_gain: Least AUPRC gain for which a member is added.
    """
    auprc = val_auprc
    n = len(names)

    def rank(value: float) -> float:
        return float(np.nan_to_num(value, nan=-1.0))

    tried: list[dict[str, Any]] = []
    singles = {i: auprc([i], COMBINE_RULES[0]) for i in range(n)}  # one member: every rule gives its own map
    for i, v in singles.items():
        tried.append({"members": [names[i]], "rule": "single", "val_auprc": v})
    best: dict[str, Any] | None = None
    for rule in list(COMBINE_RULES) if combine == "auto" else [combine]:
        if not select_members:
            keep = list(range(n))
            value = auprc(keep, rule)
            tried.append({"members": list(names), "rule": rule, "val_auprc": value})
        else:
            keep = [max(singles, key=lambda i: (rank(singles[i]), -i))]
            value = singles[keep[0]]
            while len(keep) < n:
                gains = {i: auprc(keep + [i], rule) for i in range(n) if i not in keep}
                tried += [{"members": [names[j] for j in keep + [i]], "rule": rule, "val_auprc": v} for i, v in gains.items()]
                i, v = max(gains.items(), key=lambda kv: (rank(kv[1]), -kv[0]))
                if not rank(v) >= rank(value) + min_gain:
                    break
                keep, value = keep + [i], v
        if best is None or rank(value) > rank(best["val_auprc"]) + 1e-12:
            best = {"keep": sorted(keep), "rule": rule, "val_auprc": value}
    assert best is not None
    return {
        "members": [names[i] for i in best["keep"]],
        "keep": best["keep"],
        "rule": best["rule"],
        "val_auprc": best["val_auprc"],
        "single_val_auprc": {names[i]: v for i, v in singles.items()},
        "candidates": tried,
    }
