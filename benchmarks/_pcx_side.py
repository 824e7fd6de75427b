"""The PCX side of ``bench_pc.py --pcx-python PATH``: a PC MLP in PCX 0.6.3 (JAX, jit-compiled), run as a child
process with PCX's own Python. Not part of mulocal: the package and the tests never import it (they need no JAX).

The model is the one mulocal's ``PC(T, inference="parallel", kappa=h_lr)`` trains on an SP ``MLP`` (so gamma_l = 1,
multipliers 1, one learning rate for every tensor):

    value nodes v_1, v_2 = the hidden pre-activations (``pxc.Vode``, squared-error energy), forward-initialised;
    mu_1 = W_1 x + b_1,  mu_2 = W_2 tanh(v_1) + b_2,  f = W_3 tanh(v_2) + b_3;
    E = sum over the batch of  1/2 ||v_1 - mu_1||^2 + 1/2 ||v_2 - mu_2||^2 + CE(f, y)   (output vode: ``pxc.ce_energy``,
        its value frozen at the one-hot target);
    T inference steps: SGD on the values, v <- v - h_lr dE/dv (per sample: the sum over the batch keeps each sample's
        gradient its own);
    learning: dE/dW at the final values, scaled by 1/B (the batch mean, as mulocal), then SGD with w_lr.

One ``train_on_batch`` is one ``pxf.jit``-compiled function (the T inference steps unrolled in it), called once per
batch; it returns the feed-forward loss (batch-mean cross-entropy before inference), as mulocal's ``PC.step``.

Protocol (one JSON object per line on stdout, commands one per line on stdin):
    start:            reads ``--npz`` (W1 b1 W2 b2 W3 b3: weights laid out (out, in) as mulocal's (K = 1) and
                      equinox's; x_check (S, B, 784), y_check (S, B); x_time (N, 784), y_time (N,); T, h_lr, w_lr,
                      batch) and answers {"ready": ..., versions, threads}
    "check":          S training steps on the check batches from the initial weights: {"losses": [...]} (and the
                      final weights to ``--out`` if given)
    "time N":         N training steps on batches of x_time in a shuffled order (the model keeps training), the loss
                      summed on the device and read back once at the end: {"seconds": ...}
    "quit"
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--npz", required=True)
    p.add_argument("--out", default=None, help="where to write the weights after 'check' (npz)")
    args = p.parse_args()

    import jax
    import jax.numpy as jnp
    import numpy as np
    import optax
    import pcx
    import pcx.functional as pxf
    import pcx.nn as pxnn
    import pcx.predictive_coding as pxc
    import pcx.utils as pxu

    jax.config.update("jax_enable_x64", False)
    d = np.load(args.npz)
    T, h_lr, w_lr, B = int(d["T"]), float(d["h_lr"]), float(d["w_lr"]), int(d["batch"])
    init = [np.asarray(d[k], dtype=np.float32) for k in ("W1", "b1", "W2", "b2", "W3", "b3")]
    dims = [init[0].shape[1], init[0].shape[0], init[2].shape[0], init[4].shape[0]]

    class Model(pxc.EnergyModule):
        def __init__(self):
            super().__init__()
            self.layers = [pxnn.Linear(dims[i], dims[i + 1]) for i in range(3)]
            self.vodes = [pxc.Vode(), pxc.Vode(), pxc.Vode(pxc.ce_energy)]
            self.vodes[-1].h.frozen = True

        def load(self, ws):
            for i, layer in enumerate(self.layers):
                layer.nn.weight.set(jnp.asarray(ws[2 * i]))
                layer.nn.bias.set(jnp.asarray(ws[2 * i + 1]))

        def __call__(self, x, y=None):
            v1 = self.vodes[0](self.layers[0](x))  # value nodes hold pre-activations, as in mulocal
            v2 = self.vodes[1](self.layers[1](jnp.tanh(v1)))
            f = self.vodes[2](self.layers[2](jnp.tanh(v2)), output="u")
            if y is not None:
                self.vodes[2].set("h", y)  # the output vode's value: the one-hot target (frozen)
            return f

    @pxf.vmap(pxu.M(pxc.VodeParam | pxc.VodeParam.Cache).to((None, 0)), in_axes=(0, 0), out_axes=0)
    def forward(x, y, *, model):
        return model(x, y)

    @pxf.vmap(pxu.M(pxc.VodeParam | pxc.VodeParam.Cache).to((None, 0)), in_axes=(0,), out_axes=(None, 0),
              axis_name="batch")
    def energy(x, *, model):
        f = model(x, None)
        return jax.lax.psum(model.energy(), "batch"), f

    @pxf.jit(static_argnums=0)
    def train_on_batch(T, x, y, *, model, optim_w, optim_h):
        model.train()
        with pxu.step(model, pxc.STATUS.INIT, clear_params=pxc.VodeParam.Cache):
            f = forward(x, y, model=model)
        loss = -(y * jax.nn.log_softmax(f)).sum(-1).mean()  # the feed-forward loss, as PC.step returns
        optim_h.init(pxu.M_hasnot(pxc.VodeParam, frozen=True)(model))
        for _ in range(T):
            with pxu.step(model, clear_params=pxc.VodeParam.Cache):
                _, g = pxf.value_and_grad(pxu.M_hasnot(pxc.VodeParam, frozen=True).to([False, True]),
                                          has_aux=True)(energy)(x, model=model)
            optim_h.step(model, g["model"])
        optim_h.clear()
        with pxu.step(model, clear_params=pxc.VodeParam.Cache):
            _, g = pxf.value_and_grad(pxu.M(pxnn.LayerParam).to([False, True]), has_aux=True)(energy)(x, model=model)
        optim_w.step(model, g["model"], scale_by=1.0 / x.shape[0])
        return loss

    def fresh():
        model = Model()
        model.load(init)
        with pxu.step(model, pxc.STATUS.INIT, clear_params=pxc.VodeParam.Cache):
            forward(jnp.zeros((B, dims[0]), jnp.float32), None, model=model)
        optim_h = pxu.Optim(lambda: optax.sgd(h_lr))
        optim_w = pxu.Optim(lambda: optax.sgd(w_lr), pxu.M(pxnn.LayerParam)(model))
        return model, optim_w, optim_h

    def onehot(y):
        return jax.nn.one_hot(jnp.asarray(y), dims[-1], dtype=jnp.float32)

    def send(obj):
        sys.stdout.write(json.dumps(obj) + "\n")
        sys.stdout.flush()

    x_check, y_check = np.asarray(d["x_check"], np.float32), np.asarray(d["y_check"])
    x_time, y_time = np.asarray(d["x_time"], np.float32), np.asarray(d["y_time"])
    model, optim_w, optim_h = fresh()
    train_on_batch(T, jnp.asarray(x_check[0]), onehot(y_check[0]), model=model, optim_w=optim_w,
                   optim_h=optim_h).block_until_ready()  # compile once (the timed model is reset below)
    model, optim_w, optim_h = fresh()
    rng = np.random.default_rng(0)
    order, pos = rng.permutation(len(x_time)), 0
    send(dict(ready=True, pcx=getattr(pcx, "__version__", None) or _version("pcx"), jax=jax.__version__,
              jaxlib=_version("jaxlib"), backend=jax.default_backend(), devices=[str(x) for x in jax.devices()],
              cpu_count=os.cpu_count(), xla_flags=os.environ.get("XLA_FLAGS", "")))
    for line in sys.stdin:
        cmd = line.split()
        if not cmd or cmd[0] == "quit":
            break
        if cmd[0] == "check":
            m, ow, oh = fresh()
            losses = [float(train_on_batch(T, jnp.asarray(xb), onehot(yb), model=m, optim_w=ow, optim_h=oh))
                      for xb, yb in zip(x_check, y_check)]
            if args.out:
                np.savez(args.out, *[np.asarray(p) for layer in m.layers
                                     for p in (layer.nn.weight.get(), layer.nn.bias.get())])
            send(dict(losses=losses))
        elif cmd[0] == "time":
            n = int(cmd[1])
            t0 = time.perf_counter()
            total = jnp.zeros((), jnp.float32)
            for _ in range(n):
                if pos + B > len(order):
                    order, pos = rng.permutation(len(x_time)), 0
                idx = order[pos:pos + B]
                pos += B
                total = total + train_on_batch(T, x_time[idx], onehot(y_time[idx]), model=model, optim_w=optim_w,
                                               optim_h=optim_h)
            total.block_until_ready()  # the one read-back
            send(dict(seconds=time.perf_counter() - t0, loss_mean=float(total) / max(n, 1)))
        else:
            send(dict(error=f"unknown command {cmd[0]!r}"))
    return 0


def _version(name: str) -> str | None:
    try:
        from importlib.metadata import version
        return version(name)
    except Exception:
        return None


if __name__ == "__main__":
    sys.exit(main())
