"""Verdicts of a transfer report: each muP family against its control, by the rule of docs/REPRODUCTION.md."""
from __future__ import annotations

import math

from ..config import canonical_json

TRANSFER_BOUND = 0.25  # |d log2(best LR) / d log2(width)| within which an optimum "transfers" (2x over 8x widths)
SEPARATION_SIGMAS = 2.0


def verdict(mup: dict | None, sp: dict | None) -> dict:
    """The verdict rule of docs/REPRODUCTION.md, on one metric: the ``transfer`` dicts of a muP family and
    of its control (SP across width, the depth-free net across depth; same rule and options).

        separated  <=>  |slope_muP - slope_ctrl| > SEPARATION_SIGMAS * sqrt(err_muP^2 + err_ctrl^2)
        transfers  <=>  |slope_muP| <= TRANSFER_BOUND
        "reproduced" iff both; else "not separated" (the control's optimum does not drift measurably more) or
        "muP slope beyond bound"; "no estimate" without slopes and errors.

    The control's optimum may drift either way (SP's falls with width under SGD; across depth the control
    without PC's depth factor needs a larger LR as depth grows), hence |gap|. Where the control diverged at
    every learning rate at its largest widths or depths (``_transfer``'s ``slope_bound``: those values put at
    the grid point below the grid, an upper bound on its best LR there, so the bounded slope is an upper bound
    on the control's slope), the control's drift is downward and the test is one-sided on the bound:
    slope_muP - slope_bound > SEPARATION_SIGMAS * sqrt(err_muP^2 + err_bound^2), a lower bound on the true gap.

    Returns {"verdict", "separated", "transfers", "gap" (slope_muP - slope_ctrl), "gap_err", "bounded"}."""
    out = {"verdict": "no estimate", "separated": None, "transfers": None, "gap": None, "gap_err": None,
           "bounded": False}
    if not mup or not sp or mup.get("slope") is None:
        return out
    bounded = sp.get("slope_bound") is not None
    s2, e2 = (sp["slope_bound"], sp.get("slope_bound_err")) if bounded else (sp.get("slope"), sp.get("slope_err"))
    e1 = mup.get("slope_err")
    if s2 is None or e1 is None or e2 is None:
        return out
    gap, err = mup["slope"] - s2, math.hypot(e1, e2)
    separated = gap > SEPARATION_SIGMAS * err if bounded else abs(gap) > SEPARATION_SIGMAS * err
    transfers = abs(mup["slope"]) <= TRANSFER_BOUND
    out.update(separated=bool(separated), transfers=bool(transfers), gap=float(gap), gap_err=float(err),
               bounded=bounded,
               verdict="reproduced" if separated and transfers else ("muP slope beyond bound" if not transfers
                                                                    else "not separated"))
    return out


PAIRING_FREE = ("param", "gamma_bar_L", "param_options", "param_resolved", "algo_resolved")


def is_sp(fam: dict) -> bool:
    return fam.get("param") == "sp"


def is_depth_free(fam: dict) -> bool:
    """The depth control: no depth scaling (``depth_alpha = 0``, ``depth_c = 0``, docs/depth.md)."""
    opts = fam.get("param_options") or {}
    return opts.get("depth_alpha") == 0.0 and opts.get("depth_c") == 0.0


# per transfer axis: which family is the control, and the keys in which a family and its control may differ
CONTROLS = {"width": (is_sp, PAIRING_FREE), "depth": (is_depth_free, ("param_options", "param_resolved", "algo_resolved"))}


def _pair_key(fam: dict, free=PAIRING_FREE) -> str:
    return canonical_json({k: v for k, v in fam.items() if k not in free})


def verdicts(report: dict, other: dict | None = None) -> list[dict]:
    """Every family of ``report`` that is not a control paired with its control family (``CONTROLS`` of the
    report's axis: across width SP, with the same rule and options, the parameterization and gbar_L free; across
    depth the depth-free version of the same configuration), judged by ``verdict`` by the report's metric and,
    with ``other``, by the other metric too. One entry per pair: {"label", "control", <metric>: verdict(...)}."""
    control, free = CONTROLS[report.get("axis", "width")]
    fams = report["families"]
    controls = {_pair_key(f["family"], free): f for f in fams if control(f["family"])}
    others = {f["label"]: f["transfer"] for f in (other or {}).get("families", [])}
    out = []
    for f in fams:
        c = controls.get(_pair_key(f["family"], free))
        if control(f["family"]) or c is None:
            continue
        entry = {"label": f["label"], "control": c["label"], report["metric"]: verdict(f["transfer"], c["transfer"])}
        if other is not None:
            entry[other["metric"]] = verdict(others.get(f["label"]), others.get(c["label"]))
        out.append(entry)
    return out
