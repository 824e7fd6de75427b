"""The sweep worker: one task = one chunk of a group, trained as K batched replicas (``config.assemble``)."""
from __future__ import annotations

import os
import socket
import time

from ..config import assemble, load_data
from ..errors import MulocalError


def run_task(task: dict) -> dict:
    """Train one chunk of a group (K cells as K replicas). Never raises: failures come back as ``error``."""
    try:
        g, cells = task["config"], task["cells"]
        data = load_data(g, task.get("data_dir"), task.get("download", True))
        lrs, seeds = [c["lr"] for c in cells], [c["seed"] for c in cells]
        t0 = time.perf_counter()
        run = assemble(g, lrs, seeds, device=task.get("device", "cpu"), compile=task.get("compile", "off"), data=data,
                       eval_batch_size=task.get("eval_batch_size", 2000))
        res = run.trainer().run()
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


def init_worker(threads: int, parent: int) -> None:
    import threading

    import torch
    torch.set_num_threads(max(1, int(threads)))

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
