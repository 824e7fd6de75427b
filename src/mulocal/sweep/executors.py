"""Executors: where a sweep's tasks run. ``--workers 0`` in this process (inline); ``local`` a pool of
spawned processes (one per core by default, each with ``cores // workers`` torch threads); ``ray`` Ray tasks
on a local instance or on ``--ray-address``. Every executor runs ``worker.run_task``; only the sweep
process writes to the store.
"""
from __future__ import annotations

import os
import socket

from ..errors import ConfigError, check_choice
from .spec import EXECUTORS  # noqa: F401 (the executors' names live with the spec: no torch to read them)
from .worker import init_worker, ray_task, run_task


class _Ready:
    def __init__(self, value):
        self.value = value


class InlineExecutor:
    """Runs each task in this process when it is submitted (with ``threads`` torch threads, if given).
    ``on_progress(task id, fraction)``: called while a task trains (from a thread)."""

    name = "inline"
    capacity = 1

    def __init__(self, threads: int | None = None, on_progress=None):
        self.threads, self.on_progress = threads, on_progress

    def submit(self, task):
        if not self.threads:
            return _Ready(run_task(task, self.on_progress))
        import torch
        before = torch.get_num_threads()
        torch.set_num_threads(self.threads)
        try:
            return _Ready(run_task(task, self.on_progress))
        finally:
            torch.set_num_threads(before)

    def wait(self, handles, timeout=None):
        return [(h, h.value) for h in handles]

    def close(self, cancel=False):
        pass


class LocalExecutor:
    """A pool of spawned worker processes. ``on_progress(task id, fraction)``: called (from a thread of this
    process) with the progress the workers report while their tasks train."""

    name = "local"

    def __init__(self, workers: int, threads: int, on_progress=None):
        import multiprocessing
        from concurrent.futures import ProcessPoolExecutor
        ctx = multiprocessing.get_context("spawn")
        self.capacity, self.threads = workers, threads
        self.queue = ctx.Queue() if on_progress else None
        self._new = lambda: ProcessPoolExecutor(max_workers=workers, mp_context=ctx, initializer=init_worker,
                                                initargs=(threads, os.getpid(), self.queue))
        self.pool = self._new()
        self._reader = None
        if on_progress:
            import threading

            def read():
                for item in iter(self.queue.get, None):
                    on_progress(*item)
            self._reader = threading.Thread(target=read, daemon=True)
            self._reader.start()

    def submit(self, task):
        from concurrent.futures.process import BrokenProcessPool
        try:
            return self.pool.submit(run_task, task)
        except BrokenProcessPool:  # a worker died (its tasks come back failed): go on with a fresh pool
            self.pool.shutdown(wait=False, cancel_futures=True)
            self.pool = self._new()
            return self.pool.submit(run_task, task)

    def wait(self, handles, timeout=None):
        from concurrent.futures import FIRST_COMPLETED, wait
        done, _ = wait(list(handles), timeout=timeout, return_when=FIRST_COMPLETED)
        out = []
        for f in done:
            try:
                out.append((f, f.result()))
            except Exception as e:  # BrokenProcessPool: a worker died (out of memory, killed)
                out.append((f, {"ok": False, "error": f"worker process failed: {type(e).__name__}: {e}"}))
        return out

    def close(self, cancel=False):
        self.pool.shutdown(wait=not cancel, cancel_futures=True)
        if self._reader is not None:
            self.queue.put(None)
            self._reader.join(timeout=5)
            self._reader = None


class RayExecutor:
    """Ray tasks, on a local instance (started here) or an existing cluster (``address``)."""

    name = "ray"

    def __init__(self, address: str | None, workers: int | None, threads: int):
        try:
            import ray
        except ImportError:
            raise ConfigError("the Ray executor needs Ray: pip install 'mulocal[ray]'") from None
        self.ray, self.threads, self.started = ray, threads, False
        if address:
            check_reachable(address)
        if not ray.is_initialized():
            kw = dict(include_dashboard=False, logging_level="ERROR", log_to_driver=False)
            try:
                if address:
                    ray.init(address=address, **kw)
                else:
                    ray.init(num_cpus=(workers or os.cpu_count() or 1) * threads, **kw)
            except Exception as e:
                where = f"the Ray cluster at {address}" if address else "a local Ray instance"
                raise ConfigError(f"cannot start or reach {where}: {type(e).__name__}: {e}".splitlines()[0]) from None
            self.started = True
        self.remote = ray.remote(num_cpus=threads, max_retries=0)(ray_task)
        cpus = int(ray.cluster_resources().get("CPU", 1))
        self.capacity = max(1, workers or cpus // threads)

    def submit(self, task):
        return self.remote.remote(task, self.threads)

    def wait(self, handles, timeout=None):
        ready, _ = self.ray.wait(list(handles), num_returns=1, timeout=timeout)
        out = []
        for r in ready:
            try:
                out.append((r, self.ray.get(r)))
            except Exception as e:  # a worker died
                out.append((r, {"ok": False, "error": f"Ray task failed: {type(e).__name__}: {e}".splitlines()[0]}))
        return out

    def close(self, cancel=False):
        if self.started:
            self.ray.shutdown()


def check_reachable(address: str, timeout: float = 5.0) -> None:
    """Fail fast (one line) when a 'host:port' or 'ray://host:port' Ray address does not answer: ray.init would
    retry for minutes."""
    rest = address.split("://", 1)[-1]
    host, _, port = rest.rpartition(":")
    if not host or not port.isdigit():
        return  # "auto" or another form Ray resolves itself
    try:
        socket.create_connection((host.strip("[]"), int(port)), timeout=timeout).close()
    except OSError as e:
        raise ConfigError(f"cannot reach the Ray cluster at {address}: {e.strerror or e}") from None


def make_executor(executor: str, workers: int | None, ray_address: str | None = None, threads: int | None = None,
                  on_progress=None):
    """``workers``: parallel tasks (None: one per core; 0: this process). ``threads``: torch threads per task
    (None: cores // workers; in this process: unchanged). ``on_progress(task id, fraction)``: the progress of the
    tasks while they train (in this process and the local pool; Ray tasks report only when they end)."""
    cores = os.cpu_count() or 1
    check_choice("executor", executor, EXECUTORS)
    if workers is not None and workers < 0:
        raise ConfigError(f"--workers must be >= 0, got {workers}")
    if threads is not None and threads < 1:
        raise ConfigError(f"--threads must be >= 1, got {threads}")
    if executor == "ray":
        return RayExecutor(ray_address, workers or None, threads or (max(1, cores // workers) if workers else 1))
    if workers == 0:
        return InlineExecutor(threads, on_progress)
    workers = workers or cores
    return LocalExecutor(workers, threads or max(1, cores // workers), on_progress)



__all__ = ["EXECUTORS", "InlineExecutor", "LocalExecutor", "RayExecutor", "check_reachable", "make_executor"]
