"""The PCX side of ``bench_conv.py --pcx-python PATH``: PCX's VGG PC training (and a plain JAX BP of the same net) in
PCX 0.6.3 (JAX, jit-compiled), run as a child process with PCX's own Python. Not part of mulocal: the package and
the tests never import it (they need no JAX).

The model is the ``ConvNet`` of PCX's benchmark scripts (``examples/discriminative_experiments/VGG5``, VGG7): blocks
conv(3 x 3) -> activation [-> 2 x 2 max pool], flatten, a linear readout, each block's output a value node
(``pxc.Vode``, squared-error energy), the readout's an output vode with the loss as its energy (``pxc.se_energy``
or ``pxc.ce_energy``, its value frozen at the one-hot target). ``placement`` says where a block's value node sits:

    post   after the block's pooling (PCX's scripts: x = vode(pool(act(conv(x))))): the timed PCX model;
    pre    after the conv, before the activation (x = pool(act(vode(conv(x))))): mulocal's value nodes (u_l = the
           unit's output), used for the agreement check with mulocal.

One training step (``pxf.jit``-compiled, the T inference steps unrolled), as PCX's scripts: forward initialisation of
the values; T steps of ``optax.sgd(h_lr, momentum)`` on the values (the optimizer state reset every batch) on the
energy E = pmean over the batch of the per-sample energy (its gradient per sample is dE_b/dh_b / B: PCX's
``h_lr`` is a per-sample step h_lr / B); then ``optax.adamw(w_lr, weight_decay=wd)`` on the weights with the
gradient of the same E at the final values (a batch mean). BP: ``optax.adamw`` on the gradient of the batch-mean
loss of the same layers without value nodes (one jit-compiled step).

Protocol (one JSON object per line on stdout, commands one per line on stdin):
    start:            reads ``--npz``: blocks (n, 3: channels, pool, padding), in_shape, fan (readout fan-in),
                      n_classes, act, loss (ce | se), T, h_lr, h_momentum, w_lr, wd, batch, seed; x_train, y_train,
                      x_test, y_test; for the check: x_check (S, B, ...), y_check (S, B) and the weights W0 b0 W1 b1
                      ... (conv weights (out, in, 3, 3), readout (out, in), as torch's and equinox's); answers
                      {"ready": ..., versions, backend, cores}
    "check":          S PC steps (placement pre) from the given weights on the check batches: {"losses": [...]} and
                      the weights after them to ``--out`` (run with ``--x64``: float64 throughout, so that Adam's
                      update of a gradient entry near its eps, a sum that cancels to ~1e-9, is not float32 noise)
    "train R P E":    a fresh model (PCX's own initialisation, ``seed``) trained E epochs by rule R (pc | bp; pc with
                      placement P: post | pre) on the training set in a shuffled order (full batches only, as PCX's
                      loaders: drop_last), after one untimed compile on a throwaway model: {"compile_s", "epochs":
                      [{"seconds", "loss_mean", "acc"}]} (seconds: the training loop of the epoch, the summed loss
                      read back once at its end; acc: test accuracy after it, not timed)
    "quit"
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time

from _pcx_side import _version  # the installed version of a distribution (both sides run from benchmarks/)


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--npz", required=True)
    p.add_argument("--out", default=None, help="where to write the weights after 'check' (npz)")
    p.add_argument("--x64", action="store_true", help="float64 throughout (the agreement check)")
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

    jax.config.update("jax_enable_x64", bool(args.x64))
    DT, NP = (jnp.float64, np.float64) if args.x64 else (jnp.float32, np.float32)
    d = np.load(args.npz)
    blocks = [tuple(int(v) for v in row) for row in d["blocks"]]
    in_shape = tuple(int(s) for s in d["in_shape"])
    fan, n_classes = int(d["fan"]), int(d["n_classes"])
    act_name, loss_kind = str(d["act"]), str(d["loss"])
    T, h_lr, h_mom = int(d["T"]), float(d["h_lr"]), float(d["h_momentum"])
    w_lr, wd, B, seed = float(d["w_lr"]), float(d["wd"]), int(d["batch"]), int(d["seed"])
    act = {"relu": jax.nn.relu, "tanh": jnp.tanh, "gelu": lambda u: jax.nn.gelu(u, approximate=False),
           "hardtanh": jax.nn.hard_tanh, "linear": lambda u: u}[act_name]
    out_energy = pxc.ce_energy if loss_kind == "ce" else pxc.se_energy

    def model_class(placement: str):
        class Model(pxc.EnergyModule):
            def __init__(self):
                super().__init__()
                c = in_shape[0]
                self.convs = []
                for ch, _, pad in blocks:
                    self.convs.append(pxnn.Conv2d(c, ch, kernel_size=(3, 3), stride=(1, 1), padding=(pad, pad)))
                    c = ch
                self.pools = [pxnn.MaxPool2d(kernel_size=2, stride=2) for _ in blocks]
                self.readout = pxnn.Linear(fan, n_classes)
                self.vodes = [pxc.Vode() for _ in blocks] + [pxc.Vode(out_energy)]
                self.vodes[-1].h.frozen = True

            def load(self, ws):
                for i, layer in enumerate(self.convs):
                    layer.nn.weight.set(jnp.asarray(ws[2 * i]))
                    layer.nn.bias.set(jnp.asarray(ws[2 * i + 1]).reshape(-1, 1, 1))
                self.readout.nn.weight.set(jnp.asarray(ws[-2]))
                self.readout.nn.bias.set(jnp.asarray(ws[-1]))

            def weights(self):
                out = []
                for layer in self.convs:
                    out += [np.asarray(layer.nn.weight.get()), np.asarray(layer.nn.bias.get()).reshape(-1)]
                return out + [np.asarray(self.readout.nn.weight.get()), np.asarray(self.readout.nn.bias.get())]

            def __call__(self, x, y=None):
                for conv, pool, node, (_, pooled, _) in zip(self.convs, self.pools, self.vodes, blocks):
                    if placement == "pre":
                        x = act(node(conv(x)))
                        x = pool(x) if pooled else x
                    else:
                        x = act(conv(x))
                        x = node(pool(x) if pooled else x)
                f = self.vodes[-1](self.readout(x.flatten()), output="u")
                if y is not None:
                    self.vodes[-1].set("h", y)  # the output vode's value: the one-hot target (frozen)
                return f

            def plain(self, x):
                """The same layers without value nodes (BP and evaluation)."""
                for conv, pool, (_, pooled, _) in zip(self.convs, self.pools, blocks):
                    x = act(conv(x))
                    x = pool(x) if pooled else x
                return self.readout(x.flatten())
        return Model

    vmask = pxu.M(pxc.VodeParam | pxc.VodeParam.Cache).to((None, 0))

    @pxf.vmap(vmask, in_axes=(0, 0), out_axes=0)
    def forward(x, y, *, model):
        return model(x, y)

    @pxf.vmap(vmask, in_axes=(0,), out_axes=(None, 0), axis_name="batch")
    def energy(x, *, model):
        f = model(x, None)
        return jax.lax.pmean(model.energy(), "batch"), f  # as PCX's scripts: the batch mean

    def plain(x, *, model):
        return jax.vmap(model.plain)(x)  # the model's parameters closed over (not mapped), no value nodes

    def batch_loss(f, y):
        if loss_kind == "ce":
            return -(y * jax.nn.log_softmax(f)).sum(-1).mean()
        return 0.5 * ((f - y) ** 2).sum(-1).mean()

    @pxf.jit(static_argnums=0)
    def pc_step(T, x, y, *, model, optim_w, optim_h):
        model.train()
        with pxu.step(model, pxc.STATUS.INIT, clear_params=pxc.VodeParam.Cache):
            f = forward(x, y, model=model)
        loss = batch_loss(f, y)  # the feed-forward loss, as mulocal's PC.step returns
        optim_h.init(pxu.M_hasnot(pxc.VodeParam, frozen=True)(model))
        for _ in range(T):
            with pxu.step(model, clear_params=pxc.VodeParam.Cache):
                _, g = pxf.value_and_grad(pxu.M_hasnot(pxc.VodeParam, frozen=True).to([False, True]),
                                          has_aux=True)(energy)(x, model=model)
            optim_h.step(model, g["model"])
        optim_h.clear()
        with pxu.step(model, clear_params=pxc.VodeParam.Cache):
            _, g = pxf.value_and_grad(pxu.M(pxnn.LayerParam).to([False, True]), has_aux=True)(energy)(x, model=model)
        optim_w.step(model, g["model"])
        return loss

    def bp_loss(x, y, *, model):
        f = plain(x, model=model)
        return batch_loss(f, y)

    @pxf.jit()
    def bp_step(x, y, *, model, optim_w):
        loss, g = pxf.value_and_grad(pxu.M(pxnn.LayerParam).to([False, True]))(bp_loss)(x, y, model=model)
        optim_w.step(model, g["model"])
        return loss

    @pxf.jit()
    def predict(x, *, model):
        return plain(x, model=model).argmax(-1)

    def fresh(placement: str, weights=None, key: int = seed):
        pcx.RKG.seed(key)
        model = model_class(placement)()
        if weights is not None:
            model.load(weights)
        with pxu.step(model, pxc.STATUS.INIT, clear_params=pxc.VodeParam.Cache):
            forward(jnp.zeros((B, *in_shape), DT), None, model=model)
        optim_h = pxu.Optim(lambda: optax.sgd(h_lr, momentum=h_mom if h_mom else None))
        optim_w = pxu.Optim(lambda: optax.adamw(w_lr, weight_decay=wd), pxu.M(pxnn.LayerParam)(model))
        return model, optim_w, optim_h

    def onehot(y):
        return jax.nn.one_hot(jnp.asarray(y), n_classes, dtype=DT)

    def send(obj):
        sys.stdout.write(json.dumps(obj) + "\n")
        sys.stdout.flush()

    x_train, y_train = np.asarray(d["x_train"], NP), np.asarray(d["y_train"])
    x_test, y_test = np.asarray(d["x_test"], NP), np.asarray(d["y_test"])

    def accuracy(model) -> float:
        hits = 0
        for i in range(0, len(x_test), 1000):
            hits += int((np.asarray(predict(jnp.asarray(x_test[i:i + 1000]), model=model)) == y_test[i:i + 1000]).sum())
        return hits / len(x_test)

    def one_step(rule, model, ow, oh, xb, yb):
        if rule == "pc":
            return pc_step(T, jnp.asarray(xb), onehot(yb), model=model, optim_w=ow, optim_h=oh)
        return bp_step(jnp.asarray(xb), onehot(yb), model=model, optim_w=ow)

    send(dict(ready=True, pcx=_version("pcx"), jax=jax.__version__, jaxlib=_version("jaxlib"),
              backend=jax.default_backend(), devices=[str(x) for x in jax.devices()], cpu_count=os.cpu_count(),
              xla_flags=os.environ.get("XLA_FLAGS", "")))
    for line in sys.stdin:
        cmd = line.split()
        if not cmd or cmd[0] == "quit":
            break
        try:
            if cmd[0] == "check":
                init = [np.asarray(d[f"w{i}"], NP) for i in range(2 * len(blocks) + 2)]
                m, ow, oh = fresh("pre", init)
                losses = [float(one_step("pc", m, ow, oh, np.asarray(xb, NP), yb))
                          for xb, yb in zip(d["x_check"], d["y_check"])]
                if args.out:
                    np.savez(args.out, *m.weights())
                send(dict(losses=losses))
            elif cmd[0] == "train":
                rule, placement, epochs = cmd[1], cmd[2], int(cmd[3])
                t0 = time.perf_counter()
                m, ow, oh = fresh(placement, key=seed + 1)  # compile on a throwaway model
                one_step(rule, m, ow, oh, x_train[:B], y_train[:B]).block_until_ready()
                predict(jnp.asarray(x_test[:1000]), model=m).block_until_ready()
                compile_s = time.perf_counter() - t0
                m, ow, oh = fresh(placement)
                rng = np.random.default_rng(seed)
                out = []
                for _ in range(epochs):
                    order = rng.permutation(len(x_train))
                    n = len(order) // B
                    t0 = time.perf_counter()
                    total = jnp.zeros((), jnp.float32)
                    for s in range(n):
                        idx = order[s * B:(s + 1) * B]
                        total = total + one_step(rule, m, ow, oh, x_train[idx], y_train[idx])
                    total.block_until_ready()  # the one read-back
                    seconds = time.perf_counter() - t0
                    out.append(dict(seconds=seconds, steps=n, loss_mean=float(total) / max(n, 1), acc=accuracy(m)))
                send(dict(compile_s=compile_s, epochs=out))
            else:
                send(dict(error=f"unknown command {cmd[0]!r}"))
        except Exception as err:  # noqa: BLE001 - one line back to the parent, not a hang
            send(dict(error=f"{type(err).__name__}: {err}"))
    return 0


if __name__ == "__main__":
    sys.exit(main())
