"""Loggers (mulocal.loggers): what a sink was told is read back from what it wrote (TensorBoard's event files,
MLflow's store, W&B's offline run), and compared with the run's own history; logging adds no read-back."""
import json
import math
import sys

import pytest
import torch

from mulocal.algos import make_algo
from mulocal.cli import main
from mulocal.config import assemble
from mulocal.loggers import Logger, WandbLogger
from mulocal.nets import build
from mulocal.param import preset
from mulocal.train import Trainer, TrainConfig

CELL = dict(algo="bp", dataset="synthetic", width=16, epochs=2, batch_size=32, train_subset=32 * 12, test_subset=64)
STEPS = 12  # per epoch


class Recorder(Logger):
    """Keeps what it is told."""

    def __init__(self):
        self.params, self.steps, self.epochs, self.closed = None, {}, {}, []

    def log_params(self, params, replicas=()):
        self.params = (params, list(replicas))

    def log_step(self, step, metrics):
        self.steps[step] = metrics

    def log_epoch(self, epoch, rows):
        self.epochs[epoch] = rows

    def close(self, ok=True):
        self.closed.append(ok)


def _train(loggers, sync_every, lrs=(0.05, 0.2), seeds=(1, 2)):
    run = assemble(CELL, list(lrs), list(seeds), loggers=loggers)
    run.train.sync_every = sync_every
    return run.trainer().run()


def _sync_steps(every):
    """The global steps at which the loop reads the device: every ``every`` steps and at each epoch's end."""
    return sorted({e * STEPS + i + 1 for e in range(2) for i in range(STEPS) if (i + 1) % every == 0 or i == STEPS - 1})


def test_step_losses_come_at_the_syncs_and_average_to_the_epochs_train_loss():
    every1, every5 = Recorder(), Recorder()
    res = _train([every1], 1)
    _train([every5], 5)
    assert sorted(every1.steps) == list(range(1, 2 * STEPS + 1)) and sorted(every5.steps) == _sync_steps(5)
    for step, metrics in every5.steps.items():  # the same numbers, whatever the sync interval
        assert metrics == every1.steps[step]
    for k, rep in enumerate(res["replicas"]):
        rows = [h for h in rep["history"] if "event" not in h]
        for e, row in enumerate(rows):
            losses = [every1.steps[e * STEPS + i + 1][k]["train_loss"] for i in range(STEPS)]
            assert math.isclose(sum(losses) / STEPS, row["train_loss"], rel_tol=1e-12)
            assert every1.epochs[e + 1][k] == row
    params, replicas = every1.params
    assert params["width"] == 16 and params["algo"] == "bp" and "lr" not in params and "seed" not in params
    assert replicas == [{"replica": 0, "seed": 1, "lr": 0.05}, {"replica": 1, "seed": 2, "lr": 0.2}]
    assert every1.closed == [True]


def test_logging_adds_no_host_read_back(monkeypatch):
    """With a logger, the step's loss comes in the sync's own read: the count of read-backs does not change."""
    from oracles import host_reads
    assert host_reads(monkeypatch, lambda: _train([Recorder()], 1000)) == host_reads(monkeypatch, lambda: _train([], 1000))


def test_progress_bar_shows_the_synced_loss_and_says_how_often(monkeypatch):
    import tqdm.auto
    shown = []

    class Bar:
        def __init__(self, *a, **kw):
            self.n = 0

        def update(self, n):
            self.n += n

        def set_postfix_str(self, text, refresh=True):
            shown.append((self.n, text))

        def close(self):
            pass
    monkeypatch.setattr(tqdm.auto, "tqdm", Bar)
    rec = Recorder()
    run = assemble(CELL, [0.05, 0.2], [1, 2], loggers=[rec], progress=True)
    run.train.sync_every = 5
    run.trainer().run()
    assert [n + 1 for n, _ in shown] == _sync_steps(5)  # set just before the bar counts the step
    for n, text in shown:
        mean = sum(v["train_loss"] for v in rec.steps[n + 1].values()) / 2
        assert text == f"loss {mean:.4f} (every 5 steps)"


def test_tensorboard_event_files_read_back(tmp_path):
    pytest.importorskip("tensorboard")
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
    from tensorboard.plugins.hparams import plugin_data_pb2
    from mulocal.loggers import TensorBoardLogger
    rec = Recorder()
    res = _train([TensorBoardLogger(tmp_path / "tb"), rec], 5)
    for k, rep in enumerate(res["replicas"]):
        acc = EventAccumulator(str(tmp_path / "tb" / f"replica-{k}"))
        acc.Reload()
        steps = acc.Scalars("step/train_loss")
        assert [s.step for s in steps] == _sync_steps(5)
        assert [s.value for s in steps] == [pytest.approx(rec.steps[s.step][k]["train_loss"], rel=1e-6) for s in steps]
        rows = [h for h in rep["history"] if "event" not in h]
        for key in ("train_loss", "test_loss", "test_accuracy"):
            got = acc.Scalars(f"epoch/{key}")
            assert [(s.step, s.value) for s in got] == [(r["epoch"], pytest.approx(r[key], rel=1e-6)) for r in rows]
        session = [plugin_data_pb2.HParamsPluginData.FromString(c).session_start_info
                   for c in acc.PluginTagToContent("hparams").values()]
        hp = {k2: v for s in session for k2, v in s.hparams.items()}
        assert hp["lr"].number_value == pytest.approx(rep["lr"]) and hp["seed"].number_value == rep["seed"]
        assert hp["width"].number_value == 16 and hp["algo"].string_value == "bp"


@pytest.mark.parametrize("store", ["sqlite", "file"])
def test_mlflow_store_read_back_through_the_command_line(tmp_path, monkeypatch, capsys, store):
    pytest.importorskip("mlflow")
    if store == "sqlite":
        pytest.importorskip("sqlalchemy")
        uri = f"sqlite:///{tmp_path}/ml/mlflow.db"
    else:
        monkeypatch.setenv("MLFLOW_ALLOW_FILE_STORE", "true")  # MLflow 3 keeps its file store on request only
        uri = f"file://{tmp_path}/mlruns"
    from mlflow.tracking import MlflowClient
    metrics = tmp_path / "m.jsonl"
    argv = ["train", "--dataset", "synthetic", "--width", "16", "--lrs", "0.05,0.2", "--seeds", "1,2", "--epochs",
            "2", "--batch-size", "32", "--train-subset", str(32 * 12), "--test-subset", "64", "--no-progress",
            "--metrics", str(metrics), "--log", f"mlflow:{uri}", "--log", f"jsonl:{tmp_path}/j/copy.jsonl", "--json"]
    assert main(argv) == 0
    capsys.readouterr()
    rows = [json.loads(line) for line in metrics.read_text().splitlines()]
    assert (tmp_path / "j" / "copy.jsonl").read_text() == metrics.read_text()
    client = MlflowClient(uri)
    exp = client.get_experiment_by_name("mulocal")
    runs = {r.info.run_name: r for r in client.search_runs([exp.experiment_id])}
    parent = runs.pop("bp-mup-sgd-mlp-w16")
    assert sorted(runs) == ["bp-mup-sgd-mlp-w16/replica-0", "bp-mup-sgd-mlp-w16/replica-1"]
    assert parent.data.params["width"] == "16" and parent.info.status == "FINISHED"
    for k, (lr, seed) in enumerate([(0.05, 1), (0.2, 2)]):
        run = runs[f"bp-mup-sgd-mlp-w16/replica-{k}"]
        assert run.info.status == "FINISHED" and run.data.tags["mlflow.parentRunId"] == parent.info.run_id
        assert (float(run.data.params["lr"]), int(run.data.params["seed"])) == (lr, seed)
        assert run.data.params["dataset"] == "synthetic"
        mine = [r for r in rows if r["replica"] == k]
        for key in ("train_loss", "test_loss", "test_accuracy"):
            hist = client.get_metric_history(run.info.run_id, f"epoch/{key}")
            assert sorted((m.step, m.value) for m in hist) == [(r["epoch"], r[key]) for r in mine]
        steps = client.get_metric_history(run.info.run_id, "step/train_loss")
        assert sorted(m.step for m in steps) == _sync_steps(32)


def test_a_missing_package_or_an_unknown_sink_is_one_line_before_training(tmp_path, monkeypatch, capsys):
    monkeypatch.setitem(sys.modules, "tensorboard", None)  # as if not installed
    ck = tmp_path / "c.pt"
    base = ["train", "--dataset", "synthetic", "--width", "8", "--checkpoint", str(ck), "--no-progress"]
    for extra, needle in ((["--log", f"tensorboard:{tmp_path}/tb"], "pip install 'mulocal[tensorboard]'"),
                          (["--log", "neptune:x"], "unknown logger 'neptune'"),
                          (["--log", "tensorboard"], "--log tensorboard needs a folder")):
        try:
            rc = main(base + extra)
        except SystemExit as e:
            rc = e.code
        err = [line for line in capsys.readouterr().err.splitlines() if line.strip()]
        assert rc == 2 and len(err) == 1 and needle in err[0], err
    assert not ck.exists()

    class Refusing(FakeWandb):
        def init(self, **kw):
            raise RuntimeError("api_key not configured (no-tty)\ncall wandb.login")
    monkeypatch.setitem(sys.modules, "wandb", Refusing())  # its runs start before the first step: nothing trains
    assert main(base + ["--log", "wandb:proj"]) == 2
    err = [line for line in capsys.readouterr().err.splitlines() if line.strip()]
    assert err == ["mulocal: error: wandb: api_key not configured (no-tty)"] and not ck.exists()


class FakeWandb:
    """Stands in for the wandb package: keeps every run's init arguments, config and logged dicts."""

    def __init__(self):
        self.runs = []

    def init(self, **kw):
        run = type("Run", (), {})()
        run.kw, run.logged, run.finished, run.id = kw, [], None, f"id{len(self.runs)}"
        run.config = type("Config", (), {"update": lambda self, *a, **k: None})()
        run.log = run.logged.append
        run.finish = lambda exit_code=0, run=run: setattr(run, "finished", exit_code)
        self.runs.append(run)
        return run


def test_wandb_runs_get_the_config_and_every_number(monkeypatch):
    fake = FakeWandb()
    monkeypatch.setitem(sys.modules, "wandb", fake)
    res = _train([WandbLogger("team/proj", run_name="r")], 5)
    assert [r.kw["name"] for r in fake.runs] == ["r-replica-0", "r-replica-1"]
    for k, (run, rep) in enumerate(zip(fake.runs, res["replicas"])):
        assert (run.kw["project"], run.kw["entity"], run.kw["group"], run.finished) == ("proj", "team", "r", 0)
        assert run.kw["config"]["lr"] == rep["lr"] and run.kw["config"]["width"] == 16
        steps = [d for d in run.logged if "step" in d]
        assert [d["step"] for d in steps] == _sync_steps(5)
        epochs = [d for d in run.logged if "epoch" in d]
        rows = [h for h in rep["history"] if "event" not in h]
        assert [(d["epoch"], d["epoch/test_loss"]) for d in epochs] == [(r["epoch"], r["test_loss"]) for r in rows]


def test_wandb_offline_run_read_back(tmp_path, monkeypatch):
    pytest.importorskip("wandb")
    monkeypatch.setenv("WANDB_SILENT", "true")
    import time
    import wandb
    res = _train([WandbLogger("proj", run_name="r", mode="offline", dir=str(tmp_path))], 5)
    wandb.teardown()  # wandb's service writes the run files on its own time: wait for it
    for _ in range(100):
        logged = {}
        for path in sorted((tmp_path / "wandb").glob("offline-run-*/run-*.wandb")):
            name, config, history, done = _read_wandb(path)
            if done:
                logged[name] = (config, history)
        if len(logged) == 2:
            break
        time.sleep(0.2)
    for k, rep in enumerate(res["replicas"]):
        config, history = logged[f"r-replica-{k}"]
        assert json.loads(config["lr"]) == rep["lr"] and json.loads(config["seed"]) == rep["seed"]
        rows = [h for h in rep["history"] if "event" not in h]
        got = [(h["epoch"], h["epoch/test_loss"]) for h in history if "epoch" in h]
        assert got == [(r["epoch"], r["test_loss"]) for r in rows]
        assert [h["step"] for h in history if "step/train_loss" in h] == _sync_steps(5)


def _read_wandb(path):
    """(run name, config, history rows, whether the run's exit is written) of a W&B offline run file: a 7-byte
    header, then LevelDB-log records (32 KiB blocks; each record checksum, length, type, data) holding protobuf
    ``Record`` messages."""
    from wandb.proto import wandb_internal_pb2 as pb
    raw, pos, block, parts = path.read_bytes(), 7, 32768, b""
    name, config, history, done = None, {}, [], False
    while pos + 7 <= len(raw):
        if block - pos % block < 7:  # a block's tail too short for a record header is padding
            pos += block - pos % block
            continue
        length, kind = int.from_bytes(raw[pos + 4:pos + 6], "little"), raw[pos + 6]
        if (length == 0 and kind == 0) or pos + 7 + length > len(raw):  # the end, or a record still being written
            break
        parts += raw[pos + 7:pos + 7 + length]
        pos += 7 + length
        if kind in (1, 4):  # a full record, or the last part of one
            rec, parts = pb.Record.FromString(parts), b""
            which = rec.WhichOneof("record_type")
            if which == "run":
                name = rec.run.display_name
                config.update({i.key: i.value_json for i in rec.run.config.update})
            elif which == "config":
                config.update({i.key: i.value_json for i in rec.config.update})
            elif which == "history":
                history.append({i.key or "/".join(i.nested_key): json.loads(i.value_json) for i in rec.history.item})
            done |= which == "exit"
    return name, config, history, done


def test_trainer_without_a_cell_logs_what_it_knows(tmp_path):
    """A Trainer made by hand (no cell) still describes its run; the loggers close even when the run fails."""
    from mulocal.data import load_dataset
    data = load_dataset("synthetic", train_subset=64, test_subset=32, seed=0)
    net = build("mlp", data.input_shape, data.n_classes, 8, preset("mup", "sgd"), K=1, seeds=[0])
    rec = Recorder()
    tr = Trainer(net, make_algo("bp"), data, TrainConfig(epochs=1, batch_size=32, progress=False), loggers=[rec])
    tr.run()
    params, replicas = rec.params
    assert params["algo"] == "bp" and params["net"]["width"] == 8 and params["optimizer"] == "sgd"
    assert replicas == [{"replica": 0, "seed": 0, "lr": 0.1}]

    class Boom(Recorder):
        def log_epoch(self, epoch, rows):
            raise RuntimeError("boom")
    bad = Boom()
    tr2 = Trainer(net, make_algo("bp"), data, TrainConfig(epochs=1, batch_size=32, progress=False), loggers=[bad])
    with pytest.raises(RuntimeError):
        tr2.run()
    assert bad.closed == [False]
