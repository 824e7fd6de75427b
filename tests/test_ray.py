"""The distributed path as users run it: a Ray head started with `ray start --head` on loopback, sweeps sent
to its address by two clients at once sharing one store, a Ray worker killed mid-sweep; every cell finishes
exactly once, with the numbers of the local executor. (CI installs Ray; without it the test skips.)"""
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest

ray = pytest.importorskip("ray")

from mulocal.sweep import run_sweep  # noqa: E402
from mulocal.sweep.store import Store  # noqa: E402

AXES = dict(widths=[16, 32], lrs=[0.1, 0.4], seeds=[0, 1], dataset="synthetic", train_subset=2048,
            test_subset=128, epochs=2, batch_size=32)
FLAGS = ["--widths", "16,32", "--lrs", "0.1,0.4", "--seeds", "0,1", "--dataset", "synthetic",
         "--train-subset", "2048", "--test-subset", "128", "--epochs", "2", "--batch-size", "32"]
N = 8


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def ray_head():
    ray_bin = shutil.which("ray", path=os.path.dirname(sys.executable)) or shutil.which("ray")
    if ray_bin is None:
        pytest.skip("the ray command is not installed")
    port = _free_port()
    tmp = tempfile.mkdtemp(prefix="ray", dir="/tmp")  # Ray's socket paths must stay short
    # a loopback test cluster: Ray's token authentication off (head and clients read this variable)
    saved = {k: os.environ.get(k) for k in ("RAY_AUTH_MODE", "RAY_USAGE_STATS_ENABLED")}
    os.environ.update(RAY_AUTH_MODE="disabled", RAY_USAGE_STATS_ENABLED="0")
    env = dict(os.environ)
    start = subprocess.run([ray_bin, "start", "--head", "--node-ip-address=127.0.0.1", f"--port={port}",
                            "--num-cpus=2", "--include-dashboard=false", "--disable-usage-stats",
                            f"--temp-dir={tmp}"], capture_output=True, text=True, env=env, timeout=180)
    if start.returncode != 0:
        pytest.fail("ray start failed: " + (start.stderr or start.stdout)[-2000:])
    try:
        yield f"127.0.0.1:{port}"
    finally:
        subprocess.run([ray_bin, "stop", "--force"], capture_output=True, timeout=120, env=env)
        shutil.rmtree(tmp, ignore_errors=True)
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


class _Sweep:
    """A `mulocal sweep` client in its own process (output to files: Ray's log lines must not fill a pipe)."""

    def __init__(self, store, address, tag):
        self.out, self.err = (Path(f"{store}.{tag}.{k}") for k in ("out", "err"))
        with open(self.out, "w") as o, open(self.err, "w") as e:
            self.proc = subprocess.Popen([sys.executable, "-m", "mulocal", "sweep", *FLAGS, "--store", str(store),
                                          "--executor", "ray", "--ray-address", address, "--threads", "1",
                                          "--max-replicas", "1", "--no-progress", "--json"], stdout=o, stderr=e)

    def poll(self):
        return self.proc.poll()

    def result(self, timeout=240) -> tuple[int, dict, str]:
        rc = self.proc.wait(timeout=timeout)
        err = self.err.read_text()
        out = self.out.read_text()
        return rc, (json.loads(out) if out.strip() else {}), err[-3000:]


def _ray_task_pids() -> list[int]:
    out = subprocess.run(["pgrep", "-f", "ray::ray_task"], capture_output=True, text=True).stdout
    return [int(p) for p in out.split()]


def test_cluster_sweep_two_clients_and_a_killed_worker(ray_head, tmp_path):
    store, ref = tmp_path / "cluster.sqlite", tmp_path / "local.sqlite"
    a, b = _Sweep(store, ray_head, "a"), _Sweep(store, ray_head, "b")  # two clients, one store
    killed = None
    deadline = time.time() + 240
    while time.time() < deadline and (a.poll() is None or b.poll() is None):
        pids = _ray_task_pids()
        if pids and killed is None:
            killed = pids[0]
            os.kill(killed, signal.SIGKILL)  # a Ray worker lost mid-task
        time.sleep(0.05)
    outs = []
    for p in (a, b):
        rc, out, err = p.result()
        assert rc in (0, 1), err  # 1: a cell failed (its worker was killed)
        outs.append(out)
    assert killed is not None
    # no cell was claimed by both clients: every cell finished at most once
    assert sum(s["done"] + s["diverged"] for s in outs) <= N
    assert sum(s["failed"] for s in outs) >= 1 or all(s["complete"] for s in outs)
    # resuming reruns exactly what did not finish
    rc, s, err = _Sweep(store, ray_head, "again").result()
    assert rc == 0, err
    assert s["complete"] and s["ran"] == N - s["finished_before"]
    with Store(store, create=False) as st:
        rows = st.rows()
    assert len(rows) == N and all(r["status"] == "done" for r in rows)
    finished = [r for r in rows if r["attempts"] == 1]
    assert len(finished) >= N - sum(s["failed"] for s in outs)  # only the killed worker's cells ran twice
    run_sweep(AXES, ref, workers=0, threads=1, max_replicas=1, progress=False)  # as the clients: one cell a task
    with Store(ref, create=False) as st:
        local = {r["hash"]: r for r in st.rows()}
    for r in rows:  # the cluster's numbers are the local executor's (same shapes, one torch thread each: bitwise)
        for k in ("train_loss", "test_loss", "test_accuracy"):
            assert r[k] == local[r["hash"]][k], (k, r["config"]["width"], r["lr"], r["seed"])
    assert Path(store).exists()
