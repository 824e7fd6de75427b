"""What a coordinate check measures on a net after each step (``coord.coord_check`` runs the steps): per layer, the
activity and its change, the layer's own update and the change it inherits through W_l(0), with the random-matrix
control of the latter (``excess``); across depth, the same at fixed positions of a residual net. The table of
quantities is in the docstring of :mod:`mulocal.diagnostics.coord`."""
from __future__ import annotations

import torch

from ..nets import Net
from .excess import aligned_excess, null_variance, random_matrix_rms, rms


def norm(t: torch.Tensor) -> torch.Tensor:
    """Frobenius norm per replica: (K, ...) -> (K,), float64."""
    return t.detach().flatten(1).double().pow(2).sum(1).sqrt()


def _part(name: str, part: str) -> str:
    """The name of a term's part: ``Wdh_3`` -> ``Wdh_xs_3``, ``df`` -> ``df_xs``."""
    head, _, tail = name.rpartition("_")
    return f"{head}_{part}_{tail}" if head and tail.isdigit() else f"{name}_{part}"


def own_update(layer, inp: torch.Tensor, w0, b0: torch.Tensor | None) -> torch.Tensor:
    """(W(t) - W(0)) inp + b(t) - b(0): the layer's own update applied to ``inp``, as the layer applies it
    (its multipliers, a residual branch's included). A general block (a user's module, ``adapter.ModuleLayer``;
    ``w0`` its tensors at the start) is not linear in its weights: g(inp; theta(t)) - g(inp; theta(0))."""
    if _block(layer):
        return layer.own_change(inp, w0)
    return layer.forward(inp, layer.weight - w0, False if layer.bias is None else layer.bias - b0)


def _block(layer) -> bool:
    """A layer that is not linear in its input (a user's general module): W_l(0) Delta a is its change through the
    frozen block, g(a(t); theta(0)) - g(a(0); theta(0)), with no random-matrix control (it has no single W)."""
    return not getattr(layer, "linear_in_input", True)


@torch.no_grad()
def _measure(net: Net, w0, b0, acts0, f0, probe_x) -> tuple[dict[str, torch.Tensor], dict]:
    """The width check's quantities per replica, and per term with a random-matrix part its cells' ingredients:
    {"d": raw_k^2 - ctrl_k^2, "var0": the null variance} (K,) each."""
    us, acts = net.forward(probe_x)
    out, var0 = {}, {}
    L = net.depth
    for l in range(1, L):
        out[f"h_{l}"] = rms(acts[l])
        out[f"dh_{l}"] = rms(acts[l] - acts0[l])
    for l in range(1, L + 1):
        layer = net.layers[l - 1]
        out[f"dWh_{l}"] = rms(own_update(layer, acts[l - 1], w0[l - 1], b0[l - 1]))
        if _block(layer):  # the change through the frozen block; its first matrix for W_l and dW_l
            start = w0[l - 1][layer.matrix_index]
            if l >= 2:
                out[f"Wdh_{l}"] = rms(layer.input_change(acts[l - 1], acts0[l - 1], w0[l - 1]))
            out[f"W_{l}"] = rms(start) * layer.mults[layer.matrix_index]
            out[f"dW_{l}"] = rms(layer.weight - start) * layer.mults[layer.matrix_index]
            continue
        dw = layer.weight - w0[l - 1]
        if l >= 2:
            da = acts[l - 1] - acts0[l - 1]
            out[f"Wdh_{l}"] = rms(layer.forward(da, w0[l - 1], False))
            out[f"Wdh_ctrl_{l}"] = random_matrix_rms(layer, w0[l - 1], da)
            var0[l] = null_variance(layer, da, out[f"Wdh_ctrl_{l}"])
            out[f"dWdh_{l}"] = rms(layer.forward(da, dw, False))
        out[f"W_{l}"] = rms(w0[l - 1]) * layer.mult
        out[f"dW_{l}"] = rms(dw) * layer.mult
    out["df"] = rms(us[-1] - f0)
    out["f"] = rms(us[-1])
    # the aligned excess over the random-matrix part, and its floor; df = dWh_L + Wdh_L has Wdh_L's random part
    terms = [(f"Wdh_{l}", l) for l in range(2, L + 1) if l in var0] + ([("df", L)] if L in var0 else [])
    if L in var0:
        out["df_ctrl"] = out[f"Wdh_ctrl_{L}"]
    cells = {}
    for name, l in terms:
        raw, ctrl = out[name], out[_part(name, "ctrl")]
        xs, floor = aligned_excess(raw, ctrl, var0[l])
        out[_part(name, "xs")], out[_part(name, "floor")] = (torch.tensor(v, dtype=torch.float64) for v in (xs, floor))
        cells[name] = {"d": raw.double().pow(2) - ctrl.double().pow(2), "var0": var0[l].double()}
    return out, cells


# shown but not counted across depth: f (as across width), and a single block's own update (~ 1/(H - 2) by design)
NOT_COUNTED_DEPTH = ("f", "dWh_first", "dWh_mid", "dWh_last")


def positions(depth: int) -> dict[str, int]:
    """The layers a depth check reads: the input layer, the first, middle and last residual block."""
    return {"in": 1, "first": 2, "mid": max(2, depth // 2), "last": depth - 1}


@torch.no_grad()
def _measure_depth(net: Net, w0, b0, acts0, f0, probe_x, us0) -> dict[str, torch.Tensor]:
    us, acts = net.forward(probe_x)
    own = {l: own_update(net.layers[l - 1], acts[l - 1], w0[l - 1], b0[l - 1]) for l in range(1, net.depth)}
    out = {}
    for name, l in positions(net.depth).items():
        out[f"h_{name}"] = rms(us[l])
        out[f"dh_{name}"] = rms(us[l] - us0[l])
        out[f"dWh_{name}"] = rms(own[l])
    out["dWh_blocks"] = rms(sum(own[l] for l in range(2, net.depth)))
    out["df"] = rms(us[-1] - f0)
    out["f"] = rms(us[-1])
    return out
