"""Predictive coding: one energy, several inference solvers (docs/pc.md).

    energy.py     F, dF/dv, the backward message ``back``, the weight gradients at a solver's final state
    steps.py      step-size policies: 1/gamma, the curvature bound (power iteration), fixed kappa
    observers.py  the inference status every solver reports to, its warning line, the guard's undo
    state.py      state-based solvers: sequential (SI) and parallel gradient steps on the values (+ mupc)
    fused.py      the parallel solver on a plain MLP in few in-place operations
    error.py      the error solver (ePC): errors as free variables, backward recursion + forward map
    rule.py       ``PC``: options, energy weights, which solver runs, status and checkpoints
"""
from .observers import RESIDUAL_CONVERGED, RESIDUAL_WARN, status_warning
from .rule import ERROR_T, INFERENCE, INITS, PC

__all__ = ["ERROR_T", "INFERENCE", "INITS", "PC", "RESIDUAL_CONVERGED", "RESIDUAL_WARN", "status_warning"]
