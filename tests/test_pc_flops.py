"""PC's step runs exactly the products of its floor, and BP exactly 3 per layer: the multiply-adds counted by torch's
``FlopCounterMode`` equal closed forms built from the model's own layer shapes (read off the ``nn.Module`` by forward
hooks, not from mulocal's nets).

Per sample, with m_j the multiply-adds of weight layer j (a conv: C_out C_in k_h k_w H_out W_out; a linear: in x out),
S = sum_j m_j and L layers:

    BP                         = 3 S - m_1                                (forward, weight gradient, W^T delta above 1)
    PC, parallel from F-ini    = S + G_T + 2 sum_{t<T} P_t  (+ P_T with the inference status, T > 1)
    P_t                        = sum_{j >= max(2, L - t)} m_j,    G_T = sum_{j >= max(1, L - T)} m_j

(the forward; at step t a prediction mu_j and a W_j^T e_j for every layer j the top error has reached, the
wavefront of ``algos/pc/state.py``; the weight gradients of the layers whose error is nonzero after T steps, G_T = S
from T = L - 1 on; the status' final residual adds one more W_j^T e_j for the layers reached after T steps). The
plain schedule (``SHORTCUTS = False``) runs every layer at every step: 2 S + 2 T (S - m_1). docs/conv.md reads the PC / BP time floor off these counts.
"""
from __future__ import annotations

import pytest
import torch
from torch import nn
from torch.utils.flop_counter import FlopCounterMode

from mulocal import zoo
from mulocal.adapter import ModuleNet
from mulocal.algos import make_algo
from mulocal.algos.pc import PC, state
from mulocal.param import preset

SHAPE = (1, 28, 28)
B = 4


def layer_macs(module: nn.Module) -> list[int]:
    """Per-sample multiply-adds of each weight layer of ``module`` in order, from its output shapes (forward hooks)."""
    macs = []

    def hook(m, inp, out):
        if isinstance(m, nn.Conv2d):
            kh, kw = m.kernel_size
            macs.append(out[0].numel() * (m.in_channels // m.groups) * kh * kw)
        else:
            macs.append(m.in_features * m.out_features)

    hooks = [m.register_forward_hook(hook) for m in module.modules() if isinstance(m, (nn.Conv2d, nn.Linear))]
    with torch.no_grad():
        module(torch.zeros(1, *SHAPE))
    for h in hooks:
        h.remove()
    return macs


def pc_floor(m: list[int], T: int, status: bool) -> int:
    L, S = len(m), sum(m)

    def P(t):
        return sum(m[j - 1] for j in range(max(2, L - t), L + 1))
    G = sum(m[j - 1] for j in range(max(1, L - T), L + 1))
    return S + G + 2 * sum(P(t) for t in range(T)) + (P(T) if status and T > 1 else 0)


def counted(rule, net, x, y) -> int:
    with FlopCounterMode(display=False) as fc:
        rule.step(net, x, y)
    return fc.get_total_flops() // 2  # torch counts a multiply-add as 2 flops


@pytest.fixture(scope="module")
def vgg():
    make = zoo.factory("vgg5", SHAPE, "gelu", 10)
    net = ModuleNet(make, SHAPE, 16, preset("sp", "adam"), K=1, seeds=[0])
    g = torch.Generator().manual_seed(0)
    x, y = torch.randn(B, *SHAPE, generator=g), torch.randint(0, 10, (B,), generator=g)
    return net, layer_macs(make(16)), x, y


def test_bp_runs_three_products_per_layer(vgg):
    """BP: the forward, the weight gradient, and W^T delta for every layer above the first."""
    net, m, x, y = vgg
    assert counted(make_algo("bp", loss="mse"), net, x, y) == B * (3 * sum(m) - m[0])


@pytest.mark.parametrize("T", [1, 2, 3, 4, 5, 6, 7])
@pytest.mark.parametrize("status", [False, True])
def test_pc_runs_the_wavefront_floor(vgg, T, status):
    """PC, PCX's parallel inference from F-ini: exactly the wavefront's products (a layer too many or too few, or
    the status' residual spent without the status, fails)."""
    net, m, x, y = vgg
    pc = PC(loss="mse", T=T, inference="parallel", kappa=0.01, momentum=0.3, no_status=not status)
    assert counted(pc, net, x, y) == B * pc_floor(m, T, status)


def test_plain_schedule_runs_every_layer(vgg, monkeypatch):
    """Without the shortcuts every layer moves at every step: the count the wavefront saves against."""
    net, m, x, y = vgg
    monkeypatch.setattr(state, "SHORTCUTS", False)
    pc = PC(loss="mse", T=4, inference="parallel", kappa=0.01, momentum=0.3, no_status=True)
    assert counted(pc, net, x, y) == B * (2 * sum(m) + 2 * 4 * (sum(m) - m[0]))


def test_pc_over_bp_floor_at_pcx_settings():
    """A check of docs/conv.md's numbers (from the formulas above, which the tests above tie to the code): the
    floor of PC / BP on VGG-5 at width 32, PCX's T = 7, is 3.77 without the status and 4.10 with it."""
    m = layer_macs(zoo.factory("vgg5", SHAPE, "gelu", 10)(32))
    bp = 3 * sum(m) - m[0]
    assert pc_floor(m, 7, False) / bp == pytest.approx(3.77, abs=0.005)
    assert pc_floor(m, 7, True) / bp == pytest.approx(4.10, abs=0.005)
    assert pc_floor(m, 5, False) / bp < 2.5 < pc_floor(m, 6, False) / bp  # 2.5x needs T <= 5
