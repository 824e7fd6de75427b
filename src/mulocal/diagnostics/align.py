"""How local updates relate to backprop across width: cosines, alignment exponents, ||C||.

* :func:`cosine_vs_width` - per-layer cosine between an update (PC at inference equilibrium, PC
  single-shot, GNT) and the BP gradient (and the GNT update), over widths (the paper's Fig. 3).
* :func:`alignment_vs_step` - the alignment exponent omega_L of W_L Delta h_{L-1} fitted across
  widths at every step (the paper's Fig. 8), from the coordinate check.
* :func:`preconditioner_vs_width` - spectral norm of deep-linear PC's preconditioner C at init.
"""
from __future__ import annotations

from typing import Sequence

import torch

from ..algos import make_algo
from ..algos.bp import BP
from ..errors import ConfigError
from ..losses import onehot
from ..nets import build
from ..param import preset
from ..util import rule_label
from .coord import coord_check
from .linear import pc_fixed_point, preconditioner


def layer_cosines(a: Sequence[torch.Tensor], b: Sequence[torch.Tensor], net, per_replica: bool = False) -> list:
    """Cosine per weight matrix between two gradient lists: the replica mean, or (``per_replica``) the
    list of each replica's (seed's) value."""
    out = []
    for (i, what), x, y in zip(net.param_info(), a, b):
        if what == "weight":
            x, y = x.flatten(1).double(), y.flatten(1).double()
            cos = (x * y).sum(1) / (x.norm(dim=1) * y.norm(dim=1)).clamp_min(1e-300)
            out.append(cos.tolist() if per_replica else float(cos.mean()))
    return out


def pc_equilibrium_grads(net, x, y, loss: str = "mse"):
    """PC's weight update at the inference equilibrium: closed form for deep linear MSE networks
    without biases, otherwise parallel inference run until the energy stops changing."""
    if net.activation == "linear" and loss == "mse" and not net.use_bias:
        gam = make_algo("pc", loss="mse").energy_weights(net)
        grads = []
        for k in range(net.K):
            Ws = [layer.weight[k] * layer.mult for layer in net.layers]
            xk = net.prepare_input(x)[k]
            yk = onehot(y if y.dim() == 1 else y[k], net.out_dim, xk.dtype)
            grads.append(pc_fixed_point(Ws, xk, yk, gam)["grads"])
        return [torch.stack([g[l] for g in grads]) for l in range(net.depth)]
    gam = make_algo("pc", loss=loss).energy_weights(net)
    kappa = [0.2 / g for g in gam[:-1]]
    algo = make_algo("pc", loss=loss, T=3000, inference="parallel", kappa=kappa, tol=1e-12)
    return algo.step(net, x, y)[0]


def cosine_vs_width(widths: Sequence[int], x: torch.Tensor, y: torch.Tensor, *, activation: str = "linear",
                    gamma_bar_L: float = 0.0, base_width: int = 64, seeds: Sequence[int] = (0, 1, 2),
                    loss: str = "mse", modes: Sequence[str] = ("pc-equilibrium", "pc-single-shot", "gnt"),
                    dtype=torch.float64) -> dict:
    """Per-layer cosine of each update mode with the BP gradient (``cos_bp``, seed mean; ``cos_bp_seeds``,
    one value per seed) and with the GNT update (``cos_gnt``), at each width; networks without biases
    under PC's muP for ``gamma_bar_L``."""
    param = preset("mup", "sgd", gamma_bar_L=gamma_bar_L, algo="pc", base_width=base_width)
    out: dict = {"widths": list(widths), "activation": activation, "gamma_bar_L": gamma_bar_L, "modes": {}}
    for mode in modes:
        if mode not in ("pc-equilibrium", "pc-single-shot", "gnt"):
            raise ConfigError(f"unknown mode '{mode}'; choose pc-equilibrium, pc-single-shot or gnt")
        out["modes"][mode] = {"cos_bp": [], "cos_bp_seeds": [], "cos_gnt": []}
    for w in widths:
        net = build("mlp", tuple(x.shape[1:]), int(y.max()) + 1 if y.numel() else 10, w, param,
                    activation=activation, bias=False, K=len(seeds), seeds=seeds, dtype=dtype)
        bp = BP(loss).step(net, x, y)[0]
        gnt = make_algo("gnt", loss=loss, damping=1e-8).step(net, x, y)[0]
        for mode in modes:
            if mode == "pc-equilibrium":
                g = pc_equilibrium_grads(net, x, y, loss)
            elif mode == "pc-single-shot":
                g = make_algo("pc", loss=loss, T=1).step(net, x, y)[0]
            else:
                g = gnt
            out["modes"][mode]["cos_bp"].append(layer_cosines(g, bp, net))
            out["modes"][mode]["cos_bp_seeds"].append(layer_cosines(g, bp, net, per_replica=True))
            out["modes"][mode]["cos_gnt"].append(layer_cosines(g, gnt, net))
    return out


def alignment_vs_step(configs: Sequence[tuple], widths: Sequence[int], batches, probe, lr: float = 0.1,
                      K: int = 4, input_shape=None, n_classes: int = 10) -> dict:
    """omega_L (and alpha_L, u_L) per step for each (algo, preset) or (algo, preset, rule options) config,
    fitted across widths. A config's key is "algo preset-name" plus its options (``feedback=ridge``)."""
    out = {"widths": list(widths), "steps": len(batches), "configs": {}}
    shape = tuple(input_shape or batches[0][0].shape[1:])
    for config in configs:
        algo, pname, opts = (tuple(config) + ({},))[:3]
        p = preset(pname, "sgd", algo=algo)
        res = coord_check(lambda w: build("mlp", shape, n_classes, w, p, K=K, seeds=range(K)),
                          make_algo(algo, **opts), widths, batches, probe, lr, "sgd")
        L = sum(1 for k in res.slopes if k.startswith("dWh_"))
        key = rule_label(algo, p.name, opts)
        out["configs"][key] = {
            kind: [res.alignment(L, kind, step=t) for t in range(len(batches))] for kind in ("omega", "alpha", "u")}
    return out


def preconditioner_vs_width(widths: Sequence[int], gamma_bars: Sequence[float] = (-1.0, 0.0, 1.0), *,
                            in_dim: int = 784, out_dim: int = 10, depth: int = 3, base_width: int = 64,
                            seeds: Sequence[int] = (0, 1, 2)) -> dict:
    """Spectral norm of C = sum_i (gamma_L/gamma_i) W_{L:i+1} W_{L:i+1}^T at init under PC's muP."""
    out = {"widths": list(widths), "norms": {}}
    for g in gamma_bars:
        p = preset("mup", "sgd", gamma_bar_L=g, algo="pc", base_width=base_width)
        norms = []
        for w in widths:
            net = build("mlp", (in_dim,), out_dim, w, p, depth=depth, activation="linear", bias=False, K=len(seeds),
                        seeds=seeds, dtype=torch.float64)
            gam = [1.0] * (depth - 1) + [p.gamma_L(w)]
            vals = [float(torch.linalg.matrix_norm(preconditioner([l.weight[k] * l.mult for l in net.layers], gam), 2))
                    for k in range(len(seeds))]
            norms.append(sum(vals) / len(vals))
        out["norms"][str(g)] = norms
    return out
