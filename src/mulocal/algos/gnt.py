"""Gauss-Newton targets (GNT): the reference PC and TP are compared with.

    t_l = h_l - beta J_l^T (J_l J_l^T + lambda I)^{-1} dloss/df,     J_l = df/dh_l   (per sample)
    t_L = f - beta dloss/df

Each layer then minimises its local loss 1/2 ||t_l - h_l||^2 in W_l, as in TP (in a residual net h_l is the
stream u_l, and J_l = df/du_l includes the identity paths:
J_{l-1} = J_l + J_l (d a_l-branch / d u_{l-1})). The Jacobians of
all samples come from one batched backward pass of the C output basis vectors (no per-sample
Python loop): J_l has shape (K, B, C, n_l).
"""
from __future__ import annotations

import torch

from ..errors import ConfigError
from .declared import GNT_OPTIONS, family
from .tp import TargetRule


class GNT(TargetRule):
    name = "gnt"
    family = family("gnt")
    OPTIONS = GNT_OPTIONS

    def __init__(self, loss: str = "ce", beta: float = 1.0, damping: float = 1e-4, record: bool = False):
        super().__init__(loss, beta, record)
        if not damping >= 0:
            raise ConfigError(f"damping lambda must be non-negative, got {damping}")
        self.damping = float(damping)

    @staticmethod
    def jacobians(net, us, acts) -> list:
        """J_l = df/dh_l for l = 1..L-1 (index l), each (K, B, C, *h_l.shape[2:]) (h_l: ``TargetRule.space``)."""
        L = net.depth
        K, B, C = us[-1].shape
        eye = torch.eye(C, dtype=us[-1].dtype, device=us[-1].device)
        g = eye.expand(K, B, C, C).reshape(K, B * C, C)  # rows: (sample, output unit)
        J = [None] * L
        if net.residual_net:  # rows of df/du_l, through the identity paths
            for l in range(L - 1, 0, -1):
                a = acts[l].repeat_interleave(C, dim=1)
                back = net.linearize(l, us[l].repeat_interleave(C, dim=1), a)(net.layers[l].backward_input(g, a))
                g = back + g if net.residual(l + 1) else back
                J[l] = g.reshape(K, B, C, *g.shape[2:])
            return J
        for l in range(L - 1, 0, -1):
            layer = net.layers[l]  # d f / d a_l, rows (K, B*C, ...) (a layer not linear in a_l reads a_l)
            g = layer.backward_input(g, None if layer.linear_in_input else acts[l].repeat_interleave(C, dim=1))
            J[l] = g.reshape(K, B, C, *g.shape[2:])
            if l > 1:
                u = us[l].repeat_interleave(C, dim=1)
                a = acts[l].repeat_interleave(C, dim=1)
                g = net.linearize(l, u, a)(g)
        return J

    def targets(self, net, us, acts, f, dldf):
        L = net.depth
        C = f.shape[-1]
        J = self.jacobians(net, us, acts)
        h = self.space(net, us, acts)
        t = [None] * (L + 1)
        t[L] = f - self.beta * dldf
        eye = torch.eye(C, dtype=f.dtype, device=f.device)
        for l in range(1, L):
            Jf = J[l].flatten(3)  # (K, B, C, n)
            gram = Jf @ Jf.transpose(-1, -2) + self.damping * eye
            # (K, B, C, 1); solve_ex: no error check, so no device sync, and a singular system (a zeroed, frozen
            # replica's J = 0 at damping 0) gives non-finite targets for that replica alone (it stays diverged)
            z = torch.linalg.solve_ex(gram, dldf.unsqueeze(-1))[0]
            step = (Jf.transpose(-1, -2) @ z).squeeze(-1)  # (K, B, n)
            t[l] = h[l] - self.beta * step.reshape(h[l].shape)
        return t
