"""The README's main job: learning-rate transfer across widths on real FashionMNIST.

For each parameterization (muP and SP, BP with SGD) and each width, every learning rate of a
log2 grid trains as one replica of a single batched model, for one epoch. The best learning
rate per width is the one with the lowest training loss (averaged over the epoch); under muP it
stays put as the width grows, under SP it moves.
"""
from __future__ import annotations

import json
import math
import sys
import time
from pathlib import Path

DEMO = dict(widths=[64, 128, 256, 512], lrs=[2.0 ** k for k in range(-6, 3)], epochs=1, train_subset=None,
            configs=[("bp", "mup", "sgd"), ("bp", "sp", "sgd")])
QUICK = dict(widths=[64, 256], lrs=[2.0 ** k for k in range(-5, 2)], epochs=1, train_subset=8000,
             configs=[("bp", "mup", "sgd"), ("bp", "sp", "sgd")])


def run_demo(out_dir: str = "runs/demo", quick: bool = False, data_dir=None, json_mode: bool = False,
             seed: int = 0) -> dict:
    from .algos import make_algo
    from .data import load_dataset
    from .nets import build
    from .param import preset
    from .train import Trainer, TrainConfig

    spec = QUICK if quick else DEMO
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    data = load_dataset("fashion-mnist", data_dir, train_subset=spec["train_subset"], seed=seed)
    say = (lambda *a: print(*a, file=sys.stderr)) if json_mode else print
    say(f"muTransfer demo: FashionMNIST ({len(data.x_train)} training samples), 3-layer tanh MLP, "
        f"widths {spec['widths']}, {len(spec['lrs'])} learning rates as replicas, {spec['epochs']} epoch(s)")
    results = []
    t0 = time.perf_counter()
    for algo_name, pname, opt in spec["configs"]:
        param = preset(pname, opt)
        curves = {}
        for width in spec["widths"]:
            K = len(spec["lrs"])
            net = build("mlp", data.input_shape, data.n_classes, width, param, K=K, seeds=[seed] * K)
            res = Trainer(net, make_algo(algo_name), data,
                          TrainConfig(epochs=spec["epochs"], lr=spec["lrs"], optimizer=opt),
                          seeds=[seed] * K).run()
            curves[width] = [{"lr": r["lr"], "train_loss": r["train_loss"], "test_accuracy": r["test_accuracy"],
                              "status": r["status"]} for r in res["replicas"]]
            best = min(curves[width], key=lambda r: r["train_loss"])
            say(f"  {algo_name} {param.name:<8} width {width:>4}: best lr {best['lr']:g} "
                f"(train loss {best['train_loss']:.4f}, test acc {best['test_accuracy']:.4f})")
        best_lrs = {w: min(c, key=lambda r: r["train_loss"])["lr"] for w, c in curves.items()}
        ws = sorted(best_lrs)
        shift = math.log2(best_lrs[ws[-1]]) - math.log2(best_lrs[ws[0]])
        results.append({"algo": algo_name, "param": param.name, "optimizer": opt, "curves": curves,
                        "best_lr": best_lrs, "log2_shift": shift})
    summary = {"widths": spec["widths"], "lrs": spec["lrs"], "seconds": time.perf_counter() - t0,
               "results": results, "plot": str(out / "transfer.png")}
    _plot(results, out / "transfer.png")
    (out / "demo.json").write_text(json.dumps(summary, indent=1, default=str))
    say("\nbest learning rate per width (argmin of training loss):")
    say(f"{'config':<18}" + "".join(f"{w:>9}" for w in spec["widths"]) + f"{'log2 shift':>12}")
    for r in results:
        say(f"{r['algo'] + ' ' + r['param']:<18}" + "".join(f"{r['best_lr'][w]:>9.3g}" for w in spec["widths"])
            + f"{r['log2_shift']:>12.1f}")
    say(f"plot: {out / 'transfer.png'}   results: {out / 'demo.json'}   ({summary['seconds']:.0f} s)")
    return summary


def _plot(results, path: Path) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(results), figsize=(5 * len(results), 3.8), squeeze=False)
    for ax, r in zip(axes[0], results):
        widths = sorted(r["curves"])
        cmap = plt.get_cmap("viridis")
        for i, w in enumerate(widths):
            c = r["curves"][w]
            color = cmap(i / max(len(widths) - 1, 1))
            loss = [x["train_loss"] if math.isfinite(x["train_loss"]) else float("nan") for x in c]
            ax.plot([x["lr"] for x in c], loss, "o-", color=color, label=f"width {w}")
            ax.axvline(r["best_lr"][w], color=color, ls=":", lw=1)
        ax.set_xscale("log", base=2)
        ax.set_yscale("log")
        ax.set_xlabel("base learning rate")
        ax.set_ylabel("training loss (1 epoch)")
        ax.set_title(f"{r['algo'].upper()} {r['param']} (best LR shift {r['log2_shift']:+.1f} octaves)")
        ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
