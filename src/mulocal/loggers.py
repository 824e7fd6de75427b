"""Where a run's numbers go: one small interface, and its sinks (JSON lines, TensorBoard, MLflow, Weights & Biases).

A :class:`Logger` is told, by ``train.Trainer``:

    log_params(params, replicas)   once: the run's description (the cell, flattened) and each replica's own
                                   (replica, seed, lr); each sink records them as its hyperparameters
    log_step(step, metrics)        {replica: {"train_loss": loss of that step}} for the running replicas; only at
                                   the steps where the loop reads the device anyway (every ``sync_every`` steps
                                   and at the end of an epoch), so that logging adds no host read-back
    log_epoch(epoch, rows)         the epoch's rows, one per replica (the rows of the metrics JSON lines)
    close(ok=True)                 at the end of ``Trainer.run``; a sink used again afterwards opens again

Every replica is its own run in the sink (a TensorBoard folder ``DIR/replica-<k>``, an MLflow child run, a W&B
run), so that the replicas compare side by side. Per-step numbers are named ``step/<metric>`` (x axis: the
global step), per-epoch ones ``epoch/<column>`` (x axis: the epoch).

The optional packages are imported when a sink is made; a missing one is one :class:`ConfigError` line naming the
extra that installs it (``pip install 'mulocal[tensorboard]'``).
"""
from __future__ import annotations

import json
import math
import time
from typing import Sequence

from .errors import ConfigError, check_choice, choice_error

SINKS = ("jsonl", "tensorboard", "mlflow", "wandb")
ID_COLUMNS = ("epoch", "replica", "seed", "lr")  # a row's identity and hyperparameters, not metrics


class Logger:
    """A sink of a run's numbers (every method a no-op here: a sink overrides what it records)."""

    def log_params(self, params: dict, replicas: Sequence[dict] = ()) -> None:
        """The run's shared ``params`` and each replica's own (``replicas[k]``: replica, seed, lr)."""

    def log_step(self, step: int, metrics: dict[int, dict]) -> None:
        """``metrics[k]``: replica k's numbers at global training step ``step``."""

    def log_epoch(self, epoch: int, rows: list[dict]) -> None:
        """The rows of epoch ``epoch`` (1-based), one per replica."""

    def close(self, ok: bool = True) -> None:
        """Flush and finish (``ok=False``: the run stopped on an error)."""


def flat_params(params: dict, prefix: str = "") -> dict:
    """``params`` one level deep, as numbers, strings and booleans: nested dicts become ``a.b`` keys, lists and
    other values their JSON text, None the text "None"."""
    out = {}
    for key, value in params.items():
        name = f"{prefix}{key}"
        if isinstance(value, dict):
            out.update(flat_params(value, name + "."))
        elif isinstance(value, (bool, int, float, str)):
            out[name] = value
        elif value is None:
            out[name] = "None"
        else:
            out[name] = json.dumps(value, default=str)
    return out


def metrics_of(row: dict) -> dict:
    """The numbers of an epoch row (its identity columns aside), and ``diverged`` 1.0 or 0.0; None (a diverged
    replica's accuracy), strings and booleans are left out."""
    out = {k: float(v) for k, v in row.items()
           if k not in ID_COLUMNS and isinstance(v, (int, float)) and not isinstance(v, bool)}
    out["diverged"] = float(row.get("status") == "diverged")
    return out


def _need(module: str, extra: str):
    """Import ``module`` or raise one ConfigError naming the extra that installs it."""
    import importlib
    try:
        return importlib.import_module(module)
    except ImportError:
        raise ConfigError(f"the {extra} logger needs the '{extra}' package: pip install 'mulocal[{extra}]'") \
            from None


# ------------------------------------------------------------------------------------------ sinks
class JsonlLogger(Logger):
    """Appends one JSON line per replica and epoch to ``path`` (``TrainConfig.metrics_path``, ``--metrics``)."""

    def __init__(self, path):
        self.path = str(path)

    def log_epoch(self, epoch, rows):
        with open(self.path, "a") as fh:
            for row in rows:
                fh.write(json.dumps(row, allow_nan=True) + "\n")


class TensorBoardLogger(Logger):
    """TensorBoard event files, one folder per replica: ``<logdir>/replica-<k>``. The parameters are written as
    the HParams dashboard's session (shared ones and the replica's lr and seed), scalars as
    ``step/train_loss`` (global step) and ``epoch/<column>`` (epoch)."""

    def __init__(self, logdir):
        _need("tensorboard", "tensorboard")
        from torch.utils.tensorboard import SummaryWriter
        self._writer_cls, self.logdir, self._writers = SummaryWriter, str(logdir), {}

    def _writer(self, k: int):
        if k not in self._writers:
            self._writers[k] = self._writer_cls(log_dir=f"{self.logdir}/replica-{k}")
        return self._writers[k]

    def log_params(self, params, replicas=()):
        from torch.utils.tensorboard.summary import hparams
        shared = flat_params(params)
        for own in replicas:
            hp = {**shared, **flat_params(own)}
            metrics = {f"epoch/{m}": 0.0 for m in ("train_loss", "test_loss", "test_accuracy")}
            writer = self._writer(int(own["replica"]))._get_file_writer()
            for summary in hparams(hp, metrics):  # the HParams session, in the replica's own event file
                writer.add_summary(summary)

    def log_step(self, step, metrics):
        for k, values in metrics.items():
            for key, v in values.items():
                self._writer(k).add_scalar(f"step/{key}", v, step)

    def log_epoch(self, epoch, rows):
        for row in rows:
            w = self._writer(int(row["replica"]))
            for key, v in metrics_of(row).items():
                w.add_scalar(f"epoch/{key}", v, epoch)

    def close(self, ok=True):
        for w in self._writers.values():
            w.close()
        self._writers = {}


class MLflowLogger(Logger):
    """An MLflow parent run named ``run_name`` in ``experiment`` at ``tracking_uri`` (None: MLflow's default,
    ``MLFLOW_TRACKING_URI``) and one child run per replica, holding the parameters (shared and the replica's),
    ``step/train_loss`` (global step) and ``epoch/<column>`` (epoch). Non-finite numbers are left out."""

    def __init__(self, tracking_uri: str | None = None, experiment: str = "mulocal", run_name: str = "mulocal"):
        _need("mlflow", "mlflow")
        from mlflow.tracking import MlflowClient
        try:
            self.client = MlflowClient(tracking_uri=tracking_uri)
            exp = self.client.get_experiment_by_name(experiment)
            self.experiment_id = exp.experiment_id if exp else self.client.create_experiment(experiment)
        except Exception as err:  # a store MLflow refuses or cannot open
            text = str(err).strip().splitlines()
            raise ConfigError(f"mlflow at {tracking_uri}: {text[0] if text else type(err).__name__}") from None
        self.run_name, self.parent, self.runs, self._finished = run_name, None, {}, set()

    def _run(self, k: int | None) -> str:
        if self.parent is None:
            self.parent = self.client.create_run(self.experiment_id, run_name=self.run_name).info.run_id
        if k is not None and k not in self.runs:
            self.runs[k] = self.client.create_run(self.experiment_id, run_name=f"{self.run_name}/replica-{k}",
                                                  tags={"mlflow.parentRunId": self.parent}).info.run_id
        run_id = self.parent if k is None else self.runs[k]
        if run_id in self._finished:  # a sink used again after close(): its runs run again
            self._finished.discard(run_id)
            self.client.update_run(run_id, status="RUNNING")
        return run_id

    def _params(self, run_id: str, values: dict) -> None:
        from mlflow.entities import Param
        self.client.log_batch(run_id, params=[Param(k, str(v)[:6000]) for k, v in values.items()])

    def _metrics(self, run_id: str, values: dict, step: int) -> None:
        from mlflow.entities import Metric
        now = int(time.time() * 1000)
        batch = [Metric(k, v, now, int(step)) for k, v in values.items() if math.isfinite(v)]
        if batch:
            self.client.log_batch(run_id, metrics=batch)

    def log_params(self, params, replicas=()):
        shared = flat_params(params)
        self._params(self._run(None), shared)
        for own in replicas:
            self._params(self._run(int(own["replica"])), {**shared, **flat_params(own)})

    def log_step(self, step, metrics):
        for k, values in metrics.items():
            self._metrics(self._run(k), {f"step/{key}": v for key, v in values.items()}, step)

    def log_epoch(self, epoch, rows):
        for row in rows:
            self._metrics(self._run(int(row["replica"])), {f"epoch/{k}": v for k, v in metrics_of(row).items()},
                          epoch)

    def close(self, ok=True):
        for run_id in [*self.runs.values(), self.parent]:
            if run_id is not None and run_id not in self._finished:
                self.client.set_terminated(run_id, status="FINISHED" if ok else "FAILED")
                self._finished.add(run_id)


class WandbLogger(Logger):
    """One Weights & Biases run per replica in ``project`` (``ENTITY/PROJECT`` names the entity too), grouped
    under ``run_name``, its config the parameters (shared and the replica's). ``mode`` is wandb's ("online",
    "offline", ...; None: wandb's default, ``WANDB_MODE``); ``dir`` where it writes its files."""

    def __init__(self, project: str = "mulocal", run_name: str = "mulocal", mode: str | None = None,
                 dir: str | None = None):
        self.wandb = _need("wandb", "wandb")
        self.entity, _, self.project = project.rpartition("/")
        self.run_name, self.mode, self.dir, self.runs, self.ids = run_name, mode, dir, {}, {}
        self._config: dict = {}

    def _run(self, k: int):
        if k not in self.runs:
            kw = dict(project=self.project, entity=self.entity or None, group=self.run_name,
                      name=f"{self.run_name}-replica-{k}", config=self._config.get(k), mode=self.mode, dir=self.dir)
            if k in self.ids:  # used again after close(): the same run, resumed
                kw.update(id=self.ids[k], resume="allow")
            try:
                try:
                    run = self.wandb.init(**kw, reinit="create_new")  # several runs at once (wandb >= 0.19.10)
                except (TypeError, ValueError):
                    run = self.wandb.init(**kw, reinit=True)
            except Exception as err:  # not logged in, no network in online mode, ...: one line
                text = str(err).strip().splitlines()
                raise ConfigError(f"wandb: {text[0] if text else type(err).__name__}") from None
            self.runs[k], self.ids[k] = run, run.id
        return self.runs[k]

    def log_params(self, params, replicas=()):
        shared = flat_params(params)
        for own in replicas:  # the runs start here, before any training: a wandb that cannot start stops nothing
            k = int(own["replica"])
            self._config[k] = {**shared, **flat_params(own)}
            if k in self.runs:
                self.runs[k].config.update(self._config[k], allow_val_change=True)
            self._run(k)

    def log_step(self, step, metrics):
        for k, values in metrics.items():
            self._run(k).log({f"step/{key}": v for key, v in values.items()} | {"step": step})

    def log_epoch(self, epoch, rows):
        for row in rows:
            values = {f"epoch/{k}": v for k, v in metrics_of(row).items() if math.isfinite(v)}
            self._run(int(row["replica"])).log(values | {"epoch": epoch})

    def close(self, ok=True):
        for run in self.runs.values():
            run.finish(exit_code=0 if ok else 1)
        self.runs = {}


# ------------------------------------------------------------------------------------------ specs
def parse_spec(text: str) -> tuple[str, str | None]:
    """``KIND[:TARGET]`` of a ``--log`` flag -> (kind, target): ``tensorboard:DIR``, ``mlflow[:URI]``,
    ``wandb[:PROJECT]``, ``jsonl:FILE`` (the first colon separates: an MLflow URI keeps its own)."""
    kind, sep, target = str(text).partition(":")
    kind = kind.strip().lower()
    check_choice("logger", kind, SINKS, where=f"in --log {text}", hint="KIND:TARGET")
    target = target.strip() if sep else ""
    if not target and kind in ("tensorboard", "jsonl"):
        raise ConfigError(f"--log {kind} needs a {'folder' if kind == 'tensorboard' else 'file'}: "
                          f"--log {kind}:{'DIR' if kind == 'tensorboard' else 'FILE'}")
    return kind, target or None


def make_logger(kind: str, target: str | None, run_name: str = "mulocal") -> Logger:
    """The sink of a parsed ``--log`` flag (``parse_spec``); ``run_name`` names its run(s)."""
    if kind == "jsonl":
        return JsonlLogger(target)
    if kind == "tensorboard":
        return TensorBoardLogger(target)
    if kind == "mlflow":
        return MLflowLogger(target, run_name=run_name)
    if kind == "wandb":
        return WandbLogger(target or "mulocal", run_name=run_name)
    raise choice_error("logger", kind, SINKS)


def run_name(cell: dict) -> str:
    """A run's name in the sinks: rule, preset, architecture, width (e.g. ``bp-mup-mlp-w256``)."""
    return "-".join(str(p) for p in (cell.get("algo"), cell.get("param"), cell.get("arch"),
                                     f"w{cell.get('width')}") if p is not None)


__all__ = ["JsonlLogger", "Logger", "MLflowLogger", "SINKS", "TensorBoardLogger", "WandbLogger", "flat_params",
           "make_logger", "metrics_of", "parse_spec", "run_name"]
