"""The sweep worker: one task = one chunk of a group, trained as K batched replicas (``config.assemble``)."""
from __future__ import annotations

import contextlib
import math
import os
import socket
import threading
import time

from ..config import assemble, load_data
from ..errors import MulocalError

_QUEUE = None  # in a worker process of the local pool: where the progress of its tasks goes (init_worker)
REPORT_EVERY = 1.0  # seconds between two progress reports of a task


@contextlib.contextmanager
def _watch(trainer, task: dict, n_train: int, report):
    """While the task trains: ``report(task id, fraction of its steps done)`` every ``REPORT_EVERY`` seconds when
    it changed, read from a thread off the optimizer's Python step count (no device read; a compiled or captured
    step keeps its count on the device, so its task reports only when it ends)."""
    if report is None or task.get("id") is None:
        yield
        return
    g = task["config"]
    steps = math.ceil(n_train / g["batch_size"])
    total = max(1, g["epochs"] * (min(steps, g["max_steps"]) if g.get("max_steps") else steps))
    stop = threading.Event()

    def loop():
        last = 0.0
        while not stop.wait(REPORT_EVERY):
            frac = min(1.0, getattr(trainer.opt, "t", 0) / total)
            if frac > last:
                last = frac
                try:
                    report(task["id"], frac)
                except Exception:  # progress never fails a task
                    return
    t = threading.Thread(target=loop, daemon=True)
    t.start()
    try:
        yield
    finally:
        stop.set()
        t.join()


def _to_queue(task_id, frac) -> None:
    _QUEUE.put((task_id, frac))


def run_task(task: dict, report=None) -> dict:
    """Train one chunk of a group (K cells as K replicas). Never raises: failures come back as ``error``.
    ``report(task id, fraction)``: its progress while it trains (in a worker of the local pool: to its queue)."""
    if report is None and _QUEUE is not None:
        report = _to_queue
    try:
        g, cells = task["config"], task["cells"]
        data = load_data(g, task.get("data_dir"), task.get("download", True))
        lrs, seeds = [c["lr"] for c in cells], [c["seed"] for c in cells]
        t0 = time.perf_counter()
        run = assemble(g, lrs, seeds, device=task.get("device", "cpu"), compile=task.get("compile", "off"), data=data,
                       eval_batch_size=task.get("eval_batch_size", 2000))
        trainer = run.trainer()
        with _watch(trainer, task, len(data.x_train), report):
            res = trainer.run()
        seconds = time.perf_counter() - t0
        out = []
        for c, r in zip(cells, res["replicas"]):
            hist = []
            for h in r["history"]:  # up to the epoch it diverged in: the same whichever cells it was batched with
                hist.append({k: v for k, v in h.items() if k != "replica"})
                if h.get("status") == "diverged" and "event" not in h:
                    break
            out.append({"hash": c["hash"], "status": "diverged" if r["status"] == "diverged" else "done",
                        "train_loss": r["train_loss"], "test_loss": r["test_loss"],
                        "test_accuracy": r["test_accuracy"], "history": hist})
        return {"ok": True, "results": out, "seconds": seconds, "replicas": len(cells), "host": socket.gethostname()}
    except MulocalError as e:
        return {"ok": False, "error": str(e)}
    except Exception as e:  # out of memory, a bug in a learning rule, ...
        return {"ok": False, "error": f"{type(e).__name__}: {e}".splitlines()[0]}


def init_worker(threads: int, parent: int, queue=None) -> None:
    global _QUEUE
    import torch
    torch.set_num_threads(max(1, int(threads)))
    _QUEUE = queue

    def watchdog():  # exit when the sweep process is gone (e.g. kill -9): nobody would read our results
        while True:
            time.sleep(1.0)
            if os.getppid() != parent:
                os._exit(3)
    threading.Thread(target=watchdog, daemon=True).start()


def ray_task(task: dict, threads: int) -> dict:
    import torch
    torch.set_num_threads(max(1, int(threads)))
    return run_task(task)




__all__ = ["init_worker", "ray_task", "run_task"]
