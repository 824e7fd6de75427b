"""What every PC solver reports to (docs/pc.md, "Inference status"): the per-replica status accumulated on the
device (did the energy rise at some inference step; the relative residual ||dF/dv(v_T)|| / ||dF/dv(v_0)||;
guard backtracks), its warning line, and the guard's per-replica undo."""
from __future__ import annotations

import math

import torch

from .energy import bcast

RESIDUAL_WARN = 1.0  # a relative residual above 1: inference ended farther from equilibrium than it started
RESIDUAL_CONVERGED = 0.1  # report: a mean final relative residual above this did not converge


def status_warning(energy_rose=None, residual=None) -> str | None:
    """One line saying what went wrong in a replica's inference status, or None if nothing did.

    Warned: the energy F rose at some inference step in a fraction ``energy_rose`` > 0 of the training
    steps (a descent on F never raises it; nan, as under FPA, is not a warning), or the mean relative
    residual ||dF/dv(v_T)|| / ||dF/dv(v_0)|| exceeds ``RESIDUAL_WARN`` (inference moved away from its
    equilibrium). Arguments: the ``pc_energy_rose`` and ``pc_residual`` of an epoch row (None: not kept)."""
    parts = []
    if energy_rose is not None and energy_rose == energy_rose and energy_rose > 0:
        parts.append(f"energy rose during inference in {100 * energy_rose:.3g}% of steps")
    if residual is not None and residual == residual and residual > RESIDUAL_WARN:
        parts.append(f"final relative residual {residual:.3g} > {RESIDUAL_WARN:g}")
    if not parts:
        return None
    return "; ".join(parts) + " (unstable inference: a smaller --kappa, --guard, or sequential inference)"


class Status:
    """Device accumulators of the inference status over training steps (no host read until :meth:`read`)."""

    def __init__(self):
        self.acc: dict | None = None

    def finish(self, prev, cur, dtype, g0, g_end, backtracks) -> None:
        """Add one training step: whether the energy rose at any inference step (``cur`` vs ``prev``, (n, K),
        beyond 1000 ulp of ``dtype``) and, with ``g0``, the relative residual sqrt(g_end / g0)."""
        rose = (~(cur <= prev + 1000 * torch.finfo(dtype).eps * prev.abs())).any(0)
        self.accumulate(rose, None if g0 is None else (g_end.double() / g0.double().clamp_min(1e-300)).sqrt(),
                        backtracks)

    def accumulate(self, rose, rel_residual, backtracks) -> None:
        """In place: the counts are device tensors too, so a compiled or captured step adds to the same memory
        at every replay."""
        st = self.acc
        if st is None or st["rose"].shape != rose.shape or st["rose"].device != rose.device:
            z = torch.zeros(rose.shape, dtype=torch.float64, device=rose.device)
            n = torch.zeros((), dtype=torch.int64, device=rose.device)
            st = self.acc = {"rose": z, "residual": z.clone(), "backtracks": z.clone(), "n": n, "n_res": n.clone()}
        st["rose"] += rose
        if rel_residual is not None:
            st["residual"] += rel_residual
            st["n_res"] += 1
        if backtracks is not None:
            st["backtracks"] += backtracks
        st["n"] += 1

    def read(self, descent: bool, guard: bool) -> dict:
        """Per replica since the last read (then reset in place): ``energy_rose`` (nan where the move is not a
        descent on F, as under FPA), ``residual``, ``backtracks`` (guard on), ``steps``. One host read."""
        st = self.acc
        if st is None:
            return {}
        host = {k: v.to("cpu", copy=True) for k, v in st.items()}  # a copy: on the CPU .cpu() would alias
        for v in st.values():
            v.zero_()
        n, n_res = int(host["n"]), int(host["n_res"])
        if not n:
            return {}
        out = {"energy_rose": (host["rose"] / n).tolist() if descent else [math.nan] * len(host["rose"])}
        if n_res:
            out["residual"] = (host["residual"] / n_res).tolist()
        if guard:
            out["backtracks"] = (host["backtracks"] / n).tolist()
        out["steps"] = n
        return out


def restore(back: torch.Tensor, state, saved):
    """Where ``back`` (K,) is set, the saved state; elsewhere the new one (lists of tensors, tensors)."""
    def pick(new, old):
        if new is None or new is old:
            return new
        if isinstance(new, list):
            return [pick(n, o) for n, o in zip(new, old)]
        return torch.where(bcast(back, new), old, new)
    return tuple(pick(n, o) for n, o in zip(state, saved))
