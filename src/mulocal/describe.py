"""What a parameterization resolves to at one width, as the readable table of ``mulocal describe``.

``param.Parameterization.describe`` fills it in with the net's layer shapes; the table reads the parameterization it
is given (its exponents and ``rule``) and imports none.
"""
from __future__ import annotations

from typing import Sequence


def resolved_table(p, width: int, layers: Sequence[tuple[str, int, int]], depth: int = 3, lr: float = 1.0) -> str:
    """The table of ``p`` (a ``param.Parameterization``) at ``width``: a line per layer of ``layers`` ((role, fan_in,
    fan_out), as ``param.layer_shapes`` lists them), learning rates at base ``lr``; ``depth`` > 3 adds what each
    block of a residual net of that depth gets."""
    m = p.width_mult(width)
    lines = [
        f"{p.name}: width {width}, base width {p.base_width} (m = {m:g})"
        + (f"; {p.note}" if p.note else ""),
        f"  b = {_fmt(p.b)}  c = {_fmt(p.c)}  a = {_fmt(p.a)}  c_bias = {_fmt(p.c_bias)}",
    ]
    if p.gamma_bar_L or p.gamma_L_prime != 1.0:
        lines.append(f"  PC: gamma_L = {p.gamma_L_prime:g} * m^{-p.gamma_bar_L:g} = {p.gamma_L(width):.4g}")
    lines.append(f"  {'layer':<6}{'role':<8}{'shape':>14}{'init std':>12}{'mult':>9}{'lr':>12}{'bias lr':>12}"
                 f"{'eps x':>9}{'wd x':>11}{'bias wd x':>11}")
    for i, (role, fi, fo) in enumerate(layers, start=1):
        r = p.rule(role, fi, width)
        lines.append(
            f"  {i:<6}{role:<8}{f'{fo}x{fi}':>14}{r.init_std:>12.4g}{r.multiplier:>9.4g}"
            f"{lr * r.lr_scale:>12.4g}{lr * r.bias_lr_scale:>12.4g}"
            f"{r.eps_scale:>9.4g}{r.wd_scale:>11.4g}{r.bias_wd_scale:>11.4g}"
        )
    wd = ("independent (w = -c: lr x wd x is the base lr, the decay per step lr * wd at every width)"
          if p.wd_exponents is None
          else f"wd * m^-w, w = {_fmt(p.wd_exponents)}")
    lines.append(f"  eps x: Adam's eps_l = eps * m^-e, e = {_fmt(p.eps_exponents)}")
    lines.append(f"  wd x: decoupled weight decay (weight_decay_mode decoupled): {wd}")
    if depth > 3:  # what a residual net of this depth adds to each block (resmlp / rescnn)
        b = p.rule("hidden", width, width, depth=depth, residual=True)
        lines.append(f"  residual net (resmlp, rescnn) of depth {depth}: d = {p.depth_mult(depth):g} blocks / base "
                     f"(H_0 = {p.base_depth}); each block's branch multiplier a = d^-{p.depth_alpha:g} = "
                     f"{b.branch:.4g}, its LR {lr * b.lr_scale:.4g} (x d^-{p.depth_lr_exponent():g})")
    return "\n".join(lines)


def _fmt(t: Sequence[float]) -> str:
    return "(" + ", ".join(f"{v:g}" for v in t) + ")"
