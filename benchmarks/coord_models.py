"""The coordinate checks of docs/api.md (a user's models) and docs/REPRODUCTION.md (the native CNN) at the settings
two CPU cores afford, one command per table row.

What it runs: ``mulocal.diagnostics.coord.coord_check`` on FashionMNIST, ``--steps`` SGD steps of ``--batch`` images
(the first training images, the same at every width), a probe of the last ``--probe`` of the first 2048 training
images, ``--seeds`` replicas per width (seeds 0..n-1, one batched model; ``--chunk c``: c at a time, the checks'
replicas joined after, for memory), for each parameterization in ``--param``. A user's model
(``--model models_user:vgg``, ``tests`` on ``PYTHONPATH``) is built at ``--side`` x ``--side`` images (the factory's
``side`` argument; the images are averaged down to it); a native net (``--arch cnn``) at 28 x 28, its probe and
batches drawn by ``coord_batches``. It prints max |slope| (the verdict, each ``Wdh`` term read by its aligned part
where that is resolved) with its standard error over the replicas (``CoordResult.max_abs_slope_se``) and the raw
one, the leading terms, and each excess' reading, and writes the JSON of each check to ``--out`` when given.

Run (the rows of docs/api.md and REPRODUCTION.md, 2 CPU cores, one thread; ~10 min each at 16 seeds and 64-512
channels; the CNN at 16 seeds and 512 channels needs ``--chunk 8`` within 24 GB):

    PYTHONPATH=tests python benchmarks/coord_models.py --model models_user:vgg --algo bp --param mup,sp --seeds 16
    python benchmarks/coord_models.py --arch cnn --algo pc --param mup --base-width 32 --batch 64 --seeds 16 --chunk 8
"""
from __future__ import annotations

import argparse
import functools
import json
import math
import pathlib
import sys
import time

import torch

from mulocal.adapter import ModuleNet, load_factory
from mulocal.errors import ConfigError
from mulocal.algos import make_algo
from mulocal.data import load_dataset
from mulocal.diagnostics.coord import coord_batches, coord_check, join
from mulocal.nets import build
from mulocal.param import preset


def setup(data, model: str | None, steps: int = 3, batch: int = 32, probe: int = 128, side: int = 14):
    """(factory or None, input shape, batches, probe): a user's model at side x side images (the first ``steps``
    batches of the data, the probe its last images); a native net's from ``coord_batches``."""
    if model:
        make = functools.partial(load_factory(model), side=side)
        x = data.x_train
        if side != x.shape[-1]:
            x = torch.nn.functional.adaptive_avg_pool2d(x, side)
        batches = [(x[i * batch:(i + 1) * batch], data.y_train[i * batch:(i + 1) * batch]) for i in range(steps)]
        return make, (1, side, side), batches, x[-probe:]
    batches, probe_x = coord_batches(data, steps, batch, probe_size=probe, seed=0)
    return None, data.input_shape, batches, probe_x


def check(data, algo: str, pname: str, *, model: str | None = None, arch: str | None = None,
          widths=(64, 128, 256, 512), seeds: int = 16, chunk: int | None = None, lr: float = 0.1, steps: int = 3,
          batch: int = 32, probe: int = 128, side: int = 14, base_width: int = 64):
    """The coordinate check of one table row: ``seeds`` replicas, ``chunk`` at a time (``coord.join``)."""
    make, shape, batches, probe_x = setup(data, model, steps, batch, probe, side)
    param = preset(pname, "sgd", algo=algo).with_(base_width=base_width)

    def make_net(w, seeds):
        if make is not None:
            return ModuleNet(make, shape, w, param, K=len(seeds), seeds=seeds)
        return build(arch, shape, 10, w, param, K=len(seeds), seeds=seeds)

    chunk = chunk or seeds
    return join([coord_check(functools.partial(make_net, seeds=list(range(a, min(a + chunk, seeds)))),
                             make_algo(algo), list(widths), batches, probe_x, lr=lr)
                 for a in range(0, seeds, chunk)])


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    what = ap.add_mutually_exclusive_group(required=True)
    what.add_argument("--model", help="package.module:factory, a factory make(width, side=...) -> nn.Module "
                                       "(from the working directory or PYTHONPATH, as mulocal's --model)")
    what.add_argument("--arch", choices=["cnn", "mlp", "rescnn", "resmlp"], help="a native net")
    ap.add_argument("--algo", default="bp")
    ap.add_argument("--param", default="mup,sp", help="comma-separated presets (default mup,sp)")
    ap.add_argument("--widths", default="64,128,256,512")
    ap.add_argument("--seeds", type=int, default=16, help="replicas per width (default 16)")
    ap.add_argument("--chunk", type=int, default=None, help="replicas per batched model (default: all)")
    ap.add_argument("--lr", type=float, default=0.1)
    ap.add_argument("--steps", type=int, default=3)
    ap.add_argument("--batch", type=int, default=32, help="images per step (default 32)")
    ap.add_argument("--probe", type=int, default=128, help="probe images (default 128)")
    ap.add_argument("--side", type=int, default=14, help="image side for --model (default 14)")
    ap.add_argument("--base-width", type=int, default=64)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--out", help="a folder for each check's JSON")
    args = ap.parse_args(argv)
    widths = [int(w) for w in args.widths.split(",")]
    if args.out:
        out = pathlib.Path(args.out)
        out.mkdir(parents=True, exist_ok=True)
    torch.set_num_threads(args.threads)
    data = load_dataset("fashion-mnist", download=False, train_subset=None if args.arch else 2048)
    name = args.model.rpartition(":")[2] if args.model else args.arch
    for pname in args.param.split(","):
        t0 = time.time()
        try:
            res = check(data, args.algo, pname, model=args.model, arch=args.arch, widths=widths, seeds=args.seeds,
                        chunk=args.chunk, lr=args.lr, steps=args.steps, batch=args.batch, probe=args.probe,
                        side=args.side, base_width=args.base_width)
        except ConfigError as err:
            sys.exit(f"error: {err}")
        worst = sorted(res.counted, key=lambda n: -abs(res.slopes[n]) if math.isfinite(res.slopes[n]) else -math.inf)
        worst = worst[:4]
        print(f"{name} {args.algo} {pname} widths {args.widths} seeds {args.seeds}: max|slope| "
              f"{res.max_abs_slope:.3f} +- {res.max_abs_slope_se:.3f} (raw {res.max_abs_slope_raw:.3f}); leading "
              + ", ".join(f"{n} {res.slopes[n]:+.3f} +- {res.slope_se.get(n, float('nan')):.3f}" for n in worst)
              + f"  [{time.time() - t0:.0f} s]", flush=True)
        for term, e in res.excess.items():
            print(f"  {term}: reads {e['read']}, {e['why']}; aligned exponent {e['slope']:+.3f} +- {e['se']:.3f}")
        if args.out:
            path = out / f"{name}_{args.algo}_{pname}_{args.widths.replace(',', '-')}_K{args.seeds}.json"
            path.write_text(json.dumps(res.to_dict()))
    return 0


if __name__ == "__main__":
    sys.exit(main())
