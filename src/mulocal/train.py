"""The training loop: K replicas, seeded per-replica data order, evaluation, divergence, checkpoints.

Replica k trains with seed ``seeds[k]`` (its init and its own data order) and base learning
rate ``lr[k]``: the result equals K separate runs. A replica whose loss or weights stop being
finite is recorded as "diverged", zeroed and frozen; the others go on. The step compiled or captured as a CUDA
graph (``TrainConfig.compile``): ``train_compile.py``; reading a checkpoint back: ``checkpoint.py``.
"""
from __future__ import annotations

import math
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Sequence

import torch

from .checkpoint import load_checkpoint, read_checkpoint
from .errors import CheckpointError, ConfigError, check_choice
from .loggers import JsonlLogger, Logger
from .losses import check_loss, loss_value
from .nets import Net
from .optim import DEFAULT_LR, OPTIMIZERS, LayerwiseOptimizer, check_hyper, replica_lrs
from .streams import generators
from .train_compile import CAPTURE_WARMUP, CaptureError, CompiledStep, capture_step, check_compile, fp32_precision
from .util import COMPILE_MODES  # TrainConfig.compile's choices


@dataclass
class TrainConfig:
    """How to train (the model, the learning rule and the parameterization are given separately).

    epochs, batch_size     passes over the training set; samples per step
    lr                     base learning rate, or one per replica (K values); None: 0.1 for SGD, 1e-3 for Adam
    optimizer              "sgd" or "adam"; None: the one the parameterization's exponents are for
                           (``Parameterization.optimizer``); naming another one is a ConfigError
    momentum, weight_decay SGD momentum; weight decay wd (>= 0)
    weight_decay_mode      "l2": wd * theta added to the gradient (torch's SGD / Adam ``weight_decay``, not
                           width-scaled); "decoupled": theta <- theta - lr_l (update + wd_l theta) (AdamW with
                           Adam, SGDW with SGD; wd_l from ``Parameterization.wd_exponents``, default lr_l wd_l =
                           lr wd at every width)
    adam_eps               Adam's epsilon at the base width; layer l uses adam_eps * m^-e
                           (``Parameterization.eps_exponents``, default e = 0: not scaled)
    diverge_factor         a replica diverges when its loss is non-finite or exceeds this times its loss at
                           the first step (None or 0: only non-finite); it is then zeroed and frozen
    sync_every             the training loop reads nothing back from the device between these many steps:
                           losses accumulate there, the first diverging step of each replica is kept there,
                           and every ``sync_every`` steps (and at the end of an epoch) diverged replicas are
                           recorded with that exact step, zeroed and frozen. The other replicas' numbers do
                           not depend on it (replicas are independent); 1 acts at every step
    eval_batch_size        samples per evaluation batch
    max_steps              stop each epoch after this many steps (quick runs)
    progress               a progress bar on stderr; its loss (the mean over the running replicas of the last
                           step's) is refreshed when the loop reads the device anyway: every ``sync_every`` steps
    metrics_path           append one JSON line per replica and epoch to this file (``loggers.JsonlLogger``;
                           ``Trainer(loggers=...)`` adds TensorBoard, MLflow, W&B)
    checkpoint_path        write a checkpoint here after every epoch; ``resume`` continues from it
    compile                "off" (eager), "default" or "reduce-overhead": after one eager step, the training
                           step (the rule's step, the optimizer step and the device-side bookkeeping) runs
                           through ``torch.compile(fullgraph=True, mode=...)``; "reduce-overhead" captures it
                           as a CUDA graph on a GPU (no launch per operation). Same numbers up to float
                           rounding (fused kernels). A step that cannot be compiled (a rule that draws from
                           host generators, e.g. DTP's noise on a CPU; a PC tolerance that stops
                           inference early) runs eagerly instead: the result's ``compile`` entry says which
                           and why. "cuda-graph": no compiler; each batch shape's eager step, after
                           ``CAPTURE_WARMUP`` steps, is recorded once as a CUDA graph (``torch.cuda.CUDAGraph``,
                           milliseconds where torch.compile takes tens of seconds: for short runs such as sweep
                           cells) and replayed; the same kernels as eager, so the same numbers. A GPU only (on a
                           CPU it runs eagerly and says so)
    tf32                   on a GPU, float32 matrix products and convolutions in TensorFloat-32 during
                           ``run`` (10-bit mantissa: several times faster on A100/H100, ~1e-3 relative
                           rounding); False: strict IEEE float32 for both (PyTorch's own default lets cuDNN
                           convolutions use TF32). The CPU computes in float32 either way
    """

    epochs: int = 1
    batch_size: int = 128
    lr: float | Sequence[float] | None = None
    optimizer: str | None = None
    momentum: float = 0.0
    weight_decay: float = 0.0
    weight_decay_mode: str = "l2"
    adam_eps: float = 1e-8
    diverge_factor: float | None = 10.0
    sync_every: int = 32
    eval_batch_size: int = 2000
    max_steps: int | None = None  # per epoch, for quick runs
    progress: bool = True
    metrics_path: str | None = None  # JSON lines, one per replica and epoch
    checkpoint_path: str | None = None  # written after every epoch
    resume: bool = False
    compile: str = "off"
    tf32: bool = False

    def __post_init__(self):
        for key in ("epochs", "batch_size", "eval_batch_size", "sync_every"):
            v = getattr(self, key)
            if isinstance(v, bool) or not isinstance(v, int) or v < (0 if key == "epochs" else 1):
                raise ConfigError(f"{key.replace('_', ' ')} must be a positive integer, got {v!r}")
        if self.optimizer is not None:
            check_choice("optimizer", self.optimizer, OPTIMIZERS)
        check_hyper(self.adam_eps, self.weight_decay, self.weight_decay_mode)
        check_compile(self.compile)
        if self.diverge_factor is not None and not (math.isfinite(self.diverge_factor) and self.diverge_factor >= 0):
            raise ConfigError(f"diverge_factor must be a non-negative number or None, got {self.diverge_factor!r}")


def resolve_optimizer(cfg_optimizer: str | None, param) -> str:
    """The optimizer a run uses: the one its parameterization is for, unless the config names it (a mismatch
    is an error: the exponents of muP for SGD are wrong for Adam and vice versa)."""
    mine = getattr(param, "optimizer", None)
    if cfg_optimizer and mine and cfg_optimizer != mine:
        raise ConfigError(f"the parameterization '{param.name}' has exponents for {mine}, but the training config "
                          f"asks for {cfg_optimizer}: use preset(..., '{cfg_optimizer}') or optimizer='{mine}'")
    return cfg_optimizer or mine or "sgd"


def _finite_replicas(net: Net) -> torch.Tensor:
    ok = torch.ones(net.K, dtype=torch.bool, device=net.device)
    for p in net.params():
        ok &= torch.isfinite(p).flatten(1).all(1)
    return ok.cpu()


@torch.no_grad()
def evaluate(net: Net, x: torch.Tensor, y: torch.Tensor, loss: str, batch_size: int = 2000) -> dict:
    """Mean loss and accuracy per replica on (x, y) shared by all replicas."""
    total = torch.zeros(net.K, dtype=torch.float64)
    correct = torch.zeros(net.K, dtype=torch.float64)
    for i in range(0, len(x), batch_size):
        xb, yb = x[i:i + batch_size], y[i:i + batch_size].to(net.device)
        f = net(xb)
        total += loss_value(f, yb, loss).double().cpu()
        correct += (f.argmax(-1) == yb).sum(-1).double().cpu()
    n = max(len(x), 1)
    return {"loss": (total / n).tolist(), "accuracy": (correct / n).tolist()}


class Trainer(CompiledStep):
    """Runs ``algo`` on ``net`` over a dataset. Small on purpose: state is the net, the optimizer
    and the per-replica history; everything else is derived from ``TrainConfig``.

    ``loggers`` (``loggers.Logger``: TensorBoard, MLflow, W&B, ...) get the run's parameters (``cell``, the run's
    description from ``config.assemble``, else what the Trainer knows), the per-step loss of each running replica
    when the loop reads the device anyway (every ``sync_every`` steps: no read-back of its own) and every epoch's
    rows; they are closed at the end of :meth:`run`. ``cell`` is also kept in the checkpoint (``mulocal eval``
    finds the dataset there)."""

    def __init__(self, net: Net, algo, data, cfg: TrainConfig, seeds: Sequence[int] | None = None,
                 loggers: Sequence[Logger] = (), cell: dict | None = None):
        self.net, self.algo, self.data, self.cfg = net, algo, data, cfg
        self.loggers, self.cell, self._params_logged = list(loggers), cell, False
        self.seeds = list(range(net.K)) if seeds is None else [int(s) for s in seeds]
        if len(self.seeds) != net.K:
            raise ConfigError(f"need one seed per replica: got {len(self.seeds)} for K = {net.K}")
        self.loss = check_loss(getattr(algo, "loss", "ce"))
        self.optimizer = resolve_optimizer(cfg.optimizer, net.param)
        self.lrs = replica_lrs(DEFAULT_LR[self.optimizer] if cfg.lr is None else cfg.lr, net.K)
        self.opt = LayerwiseOptimizer.for_net(net, self.lrs, self.optimizer, momentum=cfg.momentum,
                                              weight_decay=cfg.weight_decay, weight_decay_mode=cfg.weight_decay_mode,
                                              eps=cfg.adam_eps)
        self.loss0: torch.Tensor | None = None  # each replica's loss at its first step (the divergence bound)
        self.status = ["running"] * net.K
        self.history: list[list[dict]] = [[] for _ in range(net.K)]
        self.epoch = 0
        self.gens = generators("data_order", self.seeds)
        self._limit: torch.Tensor | None = None  # the divergence bound, diverge_factor * |loss0|, on the device
        self._acc: dict | None = None
        self._train_set: tuple | None = None
        self._init_compiling(cfg.compile)
        if cfg.resume and cfg.checkpoint_path and Path(cfg.checkpoint_path).exists():
            self.load(cfg.checkpoint_path)

    # ------------------------------------------------------------------ loop
    def _mark_diverged(self, bad: torch.Tensor, step) -> None:
        """Zero, freeze and record the running replicas where ``bad`` (K,) is set; ``step``: the step recorded,
        one for all or a (K,) tensor of per-replica steps."""
        bad = bad.cpu() & torch.tensor([s == "running" for s in self.status])
        if not bad.any():
            return
        self.opt.freeze(bad)
        with torch.no_grad():
            for p in self.net.params():
                p[bad.to(p.device)] = 0
        steps = step.cpu().tolist() if isinstance(step, torch.Tensor) else [step] * len(self.status)
        for k in torch.nonzero(bad).flatten().tolist():
            self.status[k] = "diverged"
            self.history[k].append({"epoch": self.epoch, "step": int(steps[k]), "event": "diverged"})

    def run(self, on_epoch: Callable[[int, list[dict]], None] | None = None) -> dict:
        """Train until ``cfg.epochs`` (a finished run whose ``cfg.epochs`` was raised trains on: its done
        replicas run again, its diverged ones stay frozen). Returns :meth:`result`."""
        with fp32_precision("tf32" if self.cfg.tf32 else "ieee"):
            return self._run(on_epoch)

    def params(self) -> dict:
        """What the loggers record as the run's parameters: the cell (without its lr and seed: per replica), or
        what the Trainer knows of the run."""
        if self.cell is not None:
            return {k: v for k, v in self.cell.items() if k not in ("lr", "seed")}
        cfg = self.cfg
        return {"algo": getattr(self.algo, "name", type(self.algo).__name__), "param": self.net.param.name,
                "optimizer": self.optimizer, "net": self.net.config(), "epochs": cfg.epochs,
                "batch_size": cfg.batch_size, "momentum": cfg.momentum, "weight_decay": cfg.weight_decay,
                "max_steps": cfg.max_steps, "dtype": str(self.net.dtype).replace("torch.", "")}

    def _sinks(self) -> list[Logger]:
        return ([JsonlLogger(self.cfg.metrics_path)] if self.cfg.metrics_path else []) + self.loggers

    def _log_step(self, bar, sinks, step: int, loss: torch.Tensor, every: int) -> None:
        """The loss of ``step`` (read with the sync's read-back) to the progress bar and the loggers."""
        values = {k: float(loss[k]) for k, s in enumerate(self.status) if s == "running" and math.isfinite(loss[k])}
        if bar is not None:
            shown = f"{sum(values.values()) / len(values):.4f}" if values else "nan"
            bar.set_postfix_str(f"loss {shown} (every {every} steps)", refresh=False)
        for lg in sinks:
            lg.log_step(step, {k: {"train_loss": v} for k, v in values.items()})

    def _run(self, on_epoch) -> dict:
        sinks, ok = self._sinks(), False
        try:
            if not self._params_logged:
                replicas = [{"replica": k, "seed": s, "lr": float(lr)} for k, (s, lr) in enumerate(zip(self.seeds,
                                                                                                       self.lrs))]
                for lg in sinks:
                    lg.log_params(self.params(), replicas)
                self._params_logged = True
            out = self._loop(on_epoch, sinks)
            ok = True
            return out
        finally:
            for lg in sinks:
                lg.close(ok=ok)

    def _loop(self, on_epoch, sinks) -> dict:
        cfg, net, data = self.cfg, self.net, self.data
        self.status = ["running" if s == "done" else s for s in self.status]
        n = len(data.x_train)
        steps = math.ceil(n / cfg.batch_size)
        if cfg.max_steps:
            steps = min(steps, cfg.max_steps)
        bar = None
        if cfg.progress:
            from tqdm.auto import tqdm
            bar = tqdm(total=(cfg.epochs - self.epoch) * steps, desc=f"{getattr(self.algo, 'name', 'train')} "
                       f"M={net.width} K={net.K}", unit="step", leave=False, dynamic_ncols=True)
        if self._train_set is None:  # on the device once per Trainer (a compiled step reads it in place)
            self._train_set = (data.x_train.to(net.device), data.y_train.to(net.device))
        x_all, y_all = self._train_set
        if self.epoch == 0 and getattr(self.algo, "pretrain_epochs", 0):
            self._pretrain(x_all, n, steps)
        acc = self._accumulators()
        while self.epoch < cfg.epochs and any(s == "running" for s in self.status):
            t0 = time.perf_counter()
            perms = torch.stack([torch.randperm(n, generator=g) for g in self.gens]).to(net.device)
            # on the device until the next sync: the loss sum and each replica's first diverging step (-1: none)
            acc["loss_sum"].zero_(), acc["first_bad"].fill_(-1), acc["i"].zero_()
            for i in range(steps):
                idx = self._batch_index(perms[:, i * cfg.batch_size:(i + 1) * cfg.batch_size])
                loss = self._step(x_all, y_all, idx)
                if (i + 1) % cfg.sync_every == 0 or i == steps - 1:  # the one host read-back of the interval
                    if bar is not None or sinks:  # the step's loss comes along in the same read
                        both = torch.stack([acc["first_bad"].to(loss.dtype), loss]).cpu()
                        fb, step_loss = both[0].long(), both[1]
                    else:
                        fb, step_loss = acc["first_bad"].cpu(), None
                    self._mark_diverged(fb >= 0, fb)
                    acc["first_bad"].fill_(-1)
                    if step_loss is not None:
                        self._log_step(bar, sinks, self.epoch * steps + i + 1, step_loss, min(cfg.sync_every, steps))
                if bar is not None:
                    bar.update(1)
            self._mark_diverged(~_finite_replicas(net), steps)
            loss_sum = acc["loss_sum"].cpu()
            self.epoch += 1
            train_time = time.perf_counter() - t0
            test = evaluate(net, data.x_test, data.y_test, self.loss, cfg.eval_batch_size)
            val = (evaluate(net, data.x_val, data.y_val, self.loss, cfg.eval_batch_size)
                   if getattr(data, "x_val", None) is not None else None)
            # the rule's per-replica inference status over this epoch (predictive coding: did the energy rise
            # during inference, relative residual at its end), as pc_<key> columns
            inference = self.algo.inference_status() if hasattr(self.algo, "inference_status") else {}
            facts = getattr(self.algo, "run_facts", dict)()  # how the rule ran, beyond its options (DTP's noise)
            rows = []
            for k in range(net.K):
                row = {"epoch": self.epoch, "replica": k, "seed": self.seeds[k], "lr": float(self.lrs[k]),
                       "status": self.status[k], "train_loss": float(loss_sum[k] / steps),
                       "test_loss": test["loss"][k], "test_accuracy": test["accuracy"][k],
                       "epoch_time": train_time, **facts}
                if val is not None:
                    row.update(val_loss=val["loss"][k], val_accuracy=val["accuracy"][k])
                row.update({f"pc_{key}": vals[k] for key, vals in inference.items() if isinstance(vals, list)})
                if self.status[k] == "diverged":
                    row.update(train_loss=math.inf, test_loss=math.inf, test_accuracy=None)
                    row.pop("val_loss", None), row.pop("val_accuracy", None)
                self.history[k].append(row)
                rows.append(row)
            for lg in sinks:  # the metrics JSON lines first (``metrics_path``), then the loggers
                lg.log_epoch(self.epoch, rows)
            if cfg.checkpoint_path:
                self.save(cfg.checkpoint_path)
            if on_epoch:
                on_epoch(self.epoch, rows)
        if bar is not None:
            bar.close()
        self.status = ["done" if s == "running" else s for s in self.status]
        return self.result()

    # ------------------------------------------------------------------ one training step
    def _accumulators(self) -> dict:
        """The device-side bookkeeping of a sync interval, allocated once and reset in place (a captured step
        keeps writing to the same memory): the loss sum, each replica's first diverging step (-1: none), and
        the step index within the epoch."""
        if self._acc is None:
            dev, K = self.net.device, self.net.K
            self._acc = {"loss_sum": torch.zeros(K, dtype=torch.float64, device=dev),
                         "first_bad": torch.full((K,), -1, dtype=torch.long, device=dev),
                         "i": torch.zeros((), dtype=torch.long, device=dev)}
        return self._acc

    def _set_loss0(self, loss0: torch.Tensor) -> None:
        """Each replica's loss at its first step, and the divergence bound diverge_factor * |loss0| (None: only
        non-finite losses diverge), both on the device."""
        self.loss0 = loss0
        self._limit = self.cfg.diverge_factor * loss0.abs() if self.cfg.diverge_factor else None

    def _train_step(self, x_all: torch.Tensor, y_all: torch.Tensor, idx: torch.Tensor) -> torch.Tensor:
        """One step of every replica: the rule's step and the optimizer's, then the interval's bookkeeping on
        the device (the loss sum; a replica's first step whose loss is not finite or exceeds
        ``diverge_factor`` times its first loss). Nothing is read back to the host."""
        grads, loss = self.algo.step(self.net, x_all[idx], y_all[idx], opt=self.opt)
        self.opt.step(grads)
        loss = loss.detach().double()
        if self.loss0 is None:  # the first step of a run (always eager: compiling starts after it)
            self._set_loss0(loss.clone())
        acc = self._acc
        acc["loss_sum"] += torch.nan_to_num(loss, nan=0.0, posinf=0.0)
        bad = ~torch.isfinite(loss)
        if self._limit is not None:
            bad |= loss > self._limit
        first = acc["first_bad"]
        first.copy_(torch.where(bad & (first < 0), acc["i"], first))
        acc["i"] += 1
        return loss

    def _pretrain(self, x_all, n: int, steps: int) -> None:
        """Feedback-only epochs (target propagation) on their own data-order stream."""
        gens = generators("pretrain_order", self.seeds)
        for _ in range(self.algo.pretrain_epochs):
            perms = torch.stack([torch.randperm(n, generator=g) for g in gens]).to(self.net.device)
            for i in range(steps):
                self.algo.pretrain(self.net, x_all[perms[:, i * self.cfg.batch_size:(i + 1) * self.cfg.batch_size]])

    def result(self) -> dict:
        reps = []
        for k in range(self.net.K):
            epochs = [h for h in self.history[k] if "event" not in h]
            last = epochs[-1] if epochs else {}
            reps.append({"replica": k, "seed": self.seeds[k], "lr": float(self.lrs[k]), "status": self.status[k],
                         "test_accuracy": last.get("test_accuracy"), "test_loss": last.get("test_loss"),
                         "train_loss": last.get("train_loss"), "history": self.history[k]})
            inference = {key[3:]: v for key, v in last.items() if key.startswith("pc_")}
            if inference:  # the rule's inference status over the last epoch (predictive coding)
                reps[-1]["inference"] = inference
        self._count_graphs()
        return {"replicas": reps, "epochs": self.epoch, "compile": dict(self.compile_info)}

    # ------------------------------------------------------------------ checkpoints
    def save(self, path: str) -> None:
        tmp = Path(str(path) + ".tmp")
        torch.save({"net": self.net.config(), "param": self.net.param.to_dict(), "state": self.net.state(),
                    "opt": self.opt.state_dict(), "epoch": self.epoch, "status": self.status,
                    "history": self.history, "seeds": self.seeds, "lrs": [float(v) for v in self.lrs],
                    "cell": self.cell,  # the run's description (config.assemble), None when not given
                    "gens": [g.get_state() for g in self.gens],
                    "loss0": None if self.loss0 is None else self.loss0.cpu(),
                    # the rule's own state (TP/DTP: feedback weights, their optimizer, the noise streams; PC:
                    # the bound step's power-iteration vectors), and which rule wrote it
                    "algo": self.algo.state_dict() if hasattr(self.algo, "state_dict") else None,
                    "algo_name": getattr(self.algo, "name", None)}, tmp)
        tmp.replace(path)

    def load(self, path: str) -> None:
        ck = load_checkpoint(path, self.net)
        theirs, mine = ck.get("algo_name"), getattr(self.algo, "name", None)
        if theirs is not None and mine is not None and theirs != mine:  # older checkpoints do not say
            raise CheckpointError(f"checkpoint {path} was written by the learning rule '{theirs}', this run uses "
                                  f"'{mine}'")
        self.opt.load_state_dict(ck["opt"])
        self.epoch, self.status, self.history = ck["epoch"], ck["status"], ck["history"]
        if ck.get("loss0") is not None:
            self._set_loss0(ck["loss0"].to(self.net.device))  # on the device: no copy per step
        if ck.get("algo") is not None and hasattr(self.algo, "load_state_dict"):
            self.algo.load_state_dict(ck["algo"], self.net)
        for g, s in zip(self.gens, ck["gens"]):
            g.set_state(s)


__all__ = ["CAPTURE_WARMUP", "COMPILE_MODES", "CaptureError", "TrainConfig", "Trainer", "capture_step", "evaluate",
           "load_checkpoint", "read_checkpoint"]
