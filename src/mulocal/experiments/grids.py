"""LR grids of the transfer experiments: sweep until every optimum is bracketed, and the summary of a transfer.

Shared by ``reproduce`` (the paper's experiments) and ``depth`` (our depth transfer).
"""
from __future__ import annotations

MAX_EXTEND = 2  # rounds of LR-grid extension (two grid points more at an end whose minimum sits on it)


def edges(reports: list[dict]) -> tuple[set, set]:
    """Families (labels) whose best LR sits on the low / high end of the grid at some width, by any report."""
    low, high = set(), set()
    for rep in reports:
        for f in rep["families"]:
            for e in f["best"]:
                if e["best_lr"] is None or not e["at_edge"]:
                    continue
                (low if e["grid_best_lr"] == min(p["lr"] for c in f["curves"] if c["width"] == e["width"]
                                                  for p in c["points"]) else high).add(f["label"])
    return low, high


def run_and_read(spec: dict, store, how: dict) -> list[dict]:
    """Run one sweep spec into ``store`` and return the store's rows of its cells (finished cells are not run
    again). ``how``: the sweep's run options (its ``label`` names the progress bar, followed by the spec's rules),
    and under ``"cells"`` cell fields set in every spec (e.g. the dtype of ``reproduce --dtype``)."""
    from ..config import config_hash
    from ..sweep import expand, run_sweep
    from ..sweep.store import Store
    how = dict(how)
    spec = dict(spec, **(how.pop("cells", None) or {}))
    run_sweep(spec, store, progress=True, **dict(how, label=f"{how.get('label', 'sweep')} ({spec_name(spec)})"))
    with Store(store, create=False) as st:
        return st.rows(hashes=[config_hash(c) for c in expand(spec)])


def spec_name(spec: dict) -> str:
    """A sweep spec's rules and presets, for its progress bar (e.g. 'pc mup,sp')."""
    parts = [",".join(map(str, v)) if isinstance(v, (list, tuple)) else str(v)
             for v in (spec.get("algo"), spec.get("param")) if v is not None]
    if (spec.get("algo_options") or {}).get("readout_only"):
        parts.append("readout only")
    return " ".join(parts) or "sweep"


def best_per_value(f: dict) -> tuple[dict, dict]:
    """A family's best learning rate, and whether it sits on an end of its grid, per value of the transfer axis
    (width or depth, as a string: the experiments' JSON keys)."""
    return ({str(e["width"]): e["best_lr"] for e in f["best"]}, {str(e["width"]): e["at_edge"] for e in f["best"]})


def sweep_until_bracketed(specs, store, how: dict, say) -> tuple[list, list[dict], list[str]]:
    """Run every spec (``how``: the sweep's run options, e.g. device, data_dir, workers, compile); while a spec's
    family has its best LR (by training loss or test accuracy) on an end of its grid, extend that spec's grid by
    two points at that end and run again (``MAX_EXTEND`` rounds).
    Returns (the store's rows of the final grids, the final specs, what was extended)."""
    from ..sweep.transfer import analyze
    specs = [dict(s) for s in specs]
    notes = []
    for round_ in range(MAX_EXTEND + 1):
        per_spec = [run_and_read(spec, store, how) for spec in specs]
        if round_ == MAX_EXTEND:
            break
        grew, before = False, len(notes)
        for i, (spec, rows) in enumerate(zip(specs, per_spec)):
            low, high = edges([analyze(rows, metric=m, n_boot=0) for m in ("train_loss", "test_accuracy")])
            lrs, ratio = sorted(spec["lrs"]), spec["lrs"][1] / spec["lrs"][0]
            if low:
                lrs = [lrs[0] / ratio ** 2, lrs[0] / ratio] + lrs
                notes.append(f"grid extended down to {lrs[0]:.3g} ({', '.join(sorted(low))})")
            if high:
                lrs = lrs + [lrs[-1] * ratio, lrs[-1] * ratio ** 2]
                notes.append(f"grid extended up to {lrs[-1]:.3g} ({', '.join(sorted(high))})")
            if low or high:
                specs[i] = dict(spec, lrs=lrs)
                grew = True
        if not grew:
            break
        for n in notes[before:]:
            say(n)
    return [r for rows in per_spec for r in rows], specs, notes


def transfer_summary(t: dict | None) -> dict:
    keys = ("slope", "slope_err", "slope_bound", "slope_bound_err", "n_censored", "penalty", "penalty_relative",
            "base_best_lr", "value_at_base_lr", "best_value_largest")
    return {k: (t or {}).get(k) for k in keys}


def family_entry(f: dict, acc_transfer: dict) -> dict:
    """A family of a training-loss report as the experiments' JSON holds it: best LR and grid edge per value of the
    axis, the transfer by both metrics (``acc_transfer``: label -> the test-accuracy report's transfer) and the
    best seed-mean test accuracy."""
    from ..sweep.table import best_accuracy
    best_lr, at_edge = best_per_value(f)
    return {"label": f["label"], "family": f["family"], "best_lr": best_lr, "at_edge": at_edge,
            "train_loss": transfer_summary(f["transfer"]), "test_accuracy": transfer_summary(acc_transfer.get(f["label"])),
            "best_test_accuracy": {str(w): a for w, a in best_accuracy(f).items()}}


def say_verdicts(pairs: list[dict], say) -> None:
    for v in pairs:
        say(f"verdict {v['label']} vs {v['control']}: by test accuracy {v['test_accuracy']['verdict']}, "
            f"by training loss {v['train_loss']['verdict']}")
