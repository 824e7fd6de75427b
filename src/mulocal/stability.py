"""The stable range of a learning rule's parameterizations, and the warning outside it.

``param.preset`` warns (:class:`~mulocal.errors.UnstableParameterizationWarning`, not an error: the unstable regime
can be studied on purpose) when :func:`instability` finds a reason. The functions read the exponents of the
parameterization they are given (a ``param.Parameterization``) and import none.
"""
from __future__ import annotations

import warnings

from .errors import UnstableParameterizationWarning


def instability(param, algo: str) -> str | None:
    """One line saying why ``param`` is outside the stable range of the learning rule ``algo``, or None.

    PC: the inference perturbation of v_{L-1} is gamma_L W_L^T e_L ~ M^{-gbar_L} M^{-1} under muP
    (b_L = 1), so it scales like M^{-1 - gbar_L} and grows with width for gbar_L < -1: the stable
    range is gbar_L >= -1 (-1 is the maximal, Theta(1), perturbation).
    """
    g = float(param.gamma_bar_L)
    if str(algo).lower() == "pc" and g < -1:
        return (f"gamma_bar_L = {g:g} < -1 is unstable for PC: the inference perturbation of v_(L-1) scales like "
                f"M^(-1 - gbar_L) = M^{-1 - g:g}, which grows with width (stable range: gbar_L >= -1)")
    return None


def warn_if_unstable(param, algo: str) -> None:
    """Warn (:class:`UnstableParameterizationWarning`, not an error: it still runs) when
    :func:`instability` finds a reason (``stacklevel``: the caller of ``param.preset``)."""
    reason = instability(param, algo)
    if reason:
        warnings.warn(reason, UnstableParameterizationWarning, stacklevel=3)
