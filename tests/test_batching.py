"""Replicas batch and steps stay on the device, counted operation by operation (a structural oracle that holds on
any device: what a GPU would launch is what the dispatcher sees here).

* The number of tensor operations of a training step does not depend on K: K replicas are one batched
  computation, never a Python loop over replicas (DTP's noise drawn on host generators, replica by replica, is
  the counter-example, and is shown to be one).
* Inside a training step nothing is read back to the host: no ``aten::_local_scalar_dense`` (``.item()``,
  ``bool(tensor)``, ``float(tensor)``); the Trainer reads the device once per ``sync_every`` steps.
"""
from __future__ import annotations

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

from mulocal.algos import make_algo
from mulocal.config import assemble
from mulocal.nets import build
from mulocal.optim import LayerwiseOptimizer
from mulocal.param import preset


class Ops(TorchDispatchMode):
    """Counts the aten operations dispatched, and the host reads among them."""

    def __init__(self):
        super().__init__()
        self.n, self.host_reads = 0, 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.n += 1
        if func is torch.ops.aten._local_scalar_dense.default:
            self.host_reads += 1
        return func(*args, **(kwargs or {}))


THREE = [("bp", {}), ("pc", {"inference": "parallel"}), ("dtp", {"noise_rng": "counter"})]  # one rule each
RULES = [("bp", {}), ("pc", {}), ("pc", {"inference": "parallel"}), ("pc", {"inference": "parallel", "fpa": True}),
         ("dtp", {"noise_rng": "counter"}), ("tp", {"feedback": "ridge"}), ("gnt", {})]


def _step_ops(algo, opts, K, arch="mlp", optimizer="sgd", device="cpu"):
    """(operations, host reads) of the second training step (the first sets up feedback and caches)."""
    net = build(arch, (1, 6, 6), 10, 16, preset("mup", optimizer), depth=4, K=K, seeds=list(range(K)), device=device)
    rule = make_algo(algo, **opts)
    opt = LayerwiseOptimizer.for_net(net, [0.05] * K, optimizer)
    g = torch.Generator().manual_seed(0)
    x, y = torch.randn(K, 8, 1, 6, 6, generator=g), torch.randint(0, 10, (K, 8), generator=g)
    x, y = x.to(device), y.to(device)
    for i in range(2):
        with Ops() as ops:
            grads, loss = rule.step(net, x, y, opt=opt)
            opt.step(grads)
    return ops.n, ops.host_reads


@pytest.mark.parametrize("algo,opts", RULES)
@pytest.mark.parametrize("arch", ["mlp", "resmlp"])
def test_a_step_costs_the_same_operations_for_any_number_of_replicas(algo, opts, arch):
    n1, reads1 = _step_ops(algo, opts, 1, arch)
    n8, reads8 = _step_ops(algo, opts, 8, arch)
    assert n1 == n8, f"{algo} {opts}: {n1} operations at K = 1, {n8} at K = 8 (a loop over replicas)"
    assert reads1 == reads8 == 0, f"{algo} {opts}: {reads8} host reads in a step"


def test_adam_steps_batch_too():
    assert _step_ops("bp", {}, 1, optimizer="adam") == _step_ops("bp", {}, 8, optimizer="adam")


def test_host_noise_is_a_loop_over_replicas():
    """The counter-example the counter noise exists for: DTP drawing on host generators costs operations per
    replica (one draw and a copy per replica and target space)."""
    n1, _ = _step_ops("dtp", {"noise_rng": "host"}, 1)
    n8, _ = _step_ops("dtp", {"noise_rng": "host"}, 8)
    assert n8 > n1


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_dtp_batches_by_default_on_a_gpu():
    """On a GPU, DTP left at its defaults (noise_rng="auto": counter noise there) is one batched step."""
    assert _step_ops("dtp", {}, 1, device="cuda") == _step_ops("dtp", {}, 8, device="cuda")
    assert _step_ops("dtp", {}, 8, device="cuda")[1] == 0


@pytest.mark.parametrize("algo,opts", THREE)
def test_the_trainer_reads_the_device_once_per_sync_interval(algo, opts):
    """Over an epoch of 12 steps with sync_every = 4 the loop reads back 3 times (plus its end-of-epoch reads),
    whatever the rule: no host read inside a step."""
    counts = {}
    for sync in (4, 12):
        run = assemble(dict(algo=algo, dataset="synthetic", width=16, epochs=1, batch_size=32, train_subset=384,
                            test_subset=32, algo_options=opts), [0.1], [0])
        run.train.sync_every = sync
        tr = run.trainer()
        with Ops() as ops:
            tr.run()
        counts[sync] = ops.host_reads
    assert counts[4] - counts[12] == 2  # the interval reads of steps 4 and 8 (step 12 is read in both runs)
