"""Running a sweep: add the spec's cells to the store, plan the unfinished ones into tasks, run them on an
executor, write each finished task in one transaction. Killing it at any moment and starting it again runs
only what is missing (``store.py``).

How to run (not what) is one :class:`SweepOptions`; ``run_sweep(spec, store, **options)`` takes its fields
as keywords too.
"""
from __future__ import annotations

import dataclasses
import os
import sys
import time
from dataclasses import dataclass
from pathlib import Path

from ..config import check_device, config_hash, group_of, load_data, validate
from ..errors import ConfigError, MulocalError, check_choice
from ..train_compile import check_compile
from .executors import EXECUTORS, check_reachable, make_executor
from .plan import data_key, device_budget, gpu_count, plan
from .spec import expand
from .store import Store, owner_token


@dataclass
class SweepOptions:
    """How a sweep runs: executor and parallelism, batching, device and data location, output."""

    executor: str = "local"  # local (process pool) or ray
    workers: int | None = None  # parallel tasks (None: one per core; 0: in this process)
    ray_address: str | None = None
    threads: int | None = None  # torch threads per task (None: cores // workers; inline: unchanged)
    max_replicas: int = 64  # most cells trained as one batched model
    memory_budget_mb: float | None = None  # memory per task used to size replica chunks
    device: str = "cpu"
    compile: str = "off"  # TrainConfig.compile for every task (each task compiles its own step once)
    data_dir: str | None = None
    download: bool = True
    eval_batch_size: int = 2000
    progress: bool = True
    reset_running: bool = False  # also take over cells marked running by another (crashed) sweep
    dry_run: bool = False  # only add the cells and show the plan
    label: str = "sweep"  # the progress bar's name (e.g. the experiment of reproduce)

    def check(self) -> "SweepOptions":
        mr = self.max_replicas
        if isinstance(mr, bool) or not isinstance(mr, int) or mr < 1:
            raise ConfigError(f"max replicas must be a positive integer, got {mr!r}")
        check_choice("executor", self.executor, EXECUTORS)
        for name, v, lo in (("workers", self.workers, 0), ("threads", self.threads, 1)):
            if v is not None and (isinstance(v, bool) or not isinstance(v, int) or v < lo):
                raise ConfigError(f"{name} must be an integer >= {lo}, got {v!r}")
        if self.executor == "ray":
            try:
                import ray  # noqa: F401
            except ImportError:
                raise ConfigError("the Ray executor needs Ray: pip install 'mulocal[ray]'") from None
            if self.ray_address:
                check_reachable(self.ray_address)
        check_device(self.device)
        check_compile(self.compile)
        return self

    @property
    def on_gpu(self) -> bool:
        return str(self.device).startswith("cuda")

    @property
    def budget(self) -> int | None:
        if self.memory_budget_mb:
            return int(self.memory_budget_mb * 2 ** 20)
        return device_budget(self.device, self.capacity())  # None off the GPU

    def capacity(self) -> int:
        """Tasks at once: ``workers``; by default one per core, or one per GPU on a GPU."""
        if self.executor == "local" and self.workers == 0:
            return 1
        return self.workers or (gpu_count() if self.on_gpu else (os.cpu_count() or 1))


def run_sweep(spec: dict, store, options: SweepOptions | None = None, **kw) -> dict:
    """Add the spec's cells to ``store`` (a path or a Store) and run every one not finished yet.

    ``options`` (or its fields as keywords) say how. Returns a summary: counts of cells (in the spec, new,
    finished before, run now by status), tasks, seconds and cells per minute. Failed cells (an error in the
    worker) are run again by the next sweep.
    """
    t_start = time.perf_counter()
    try:
        opts = dataclasses.replace(options or SweepOptions(), **kw)
    except TypeError as e:
        raise ConfigError(f"unknown sweep option: {e}") from None
    own = isinstance(store, (str, os.PathLike))
    # an existing store is checked first (a corrupt or foreign file fails fast); a new one is created only for a
    # spec that validates
    st = Store(store) if own and Path(store).exists() else (None if own else store)
    try:
        cells = expand(spec)
        opts.check()
        groups = {config_hash(group_of(c)): group_of(c) for c in cells}
        for g in groups.values():
            validate(g)
        shapes = {}
        for g in groups.values():
            key = data_key(g)
            if key not in shapes:
                d = load_data(g, opts.data_dir, opts.download)
                shapes[key] = (d.input_shape, d.n_classes, len(d.x_train))
        if st is None:
            with Store(store) as new:
                return _run(new, cells, shapes, opts, t_start, len(groups))
        return _run(st, cells, shapes, opts, t_start, len(groups))
    finally:
        if own and st is not None:
            st.close()


def _run(st, cells, shapes, opts: SweepOptions, t_start, n_groups) -> dict:
    hashes = [config_hash(c) for c in cells]
    n_new = st.add_cells(cells)
    n_reset = st.reset_stale(force=opts.reset_running)
    status = {r["hash"]: r["status"] for r in st.rows(hashes=hashes, columns=("hash", "status"))}
    todo = [c for c, h in zip(cells, hashes) if status[h] in ("pending", "failed")]
    finished_before = sum(1 for h in hashes if status[h] in ("done", "diverged"))
    busy_elsewhere = sum(1 for h in hashes if status[h] == "running")
    summary = {"store": str(st.path), "cells": len(cells), "groups": n_groups, "new": n_new,
               "finished_before": finished_before, "reset_running": n_reset, "to_run": len(todo)}
    if opts.dry_run:
        tasks = plan(todo, shapes, opts.max_replicas, opts.budget, opts.capacity(), opts.eval_batch_size)
        summary.update(dry_run=True, tasks=len(tasks), replicas_per_task=[len(t["cells"]) for t in tasks])
        return summary
    cores = os.cpu_count() or 1
    tasks = plan(todo, shapes, opts.max_replicas, opts.budget, opts.capacity(), opts.eval_batch_size)
    executor, workers, threads = opts.executor, opts.workers, opts.threads
    if executor == "local" and workers != 0 and tasks:  # no more processes than tasks
        workers = min(workers or opts.capacity(), len(tasks))
        threads = threads or max(1, cores // workers)
    counts = {"done": 0, "diverged": 0, "failed": 0, "skipped": 0}
    errors: list[str] = []
    owner = owner_token()
    bar = _Bar(opts.label, tasks, finished_before, len(cells)) if opts.progress and todo else None
    ex = make_executor(executor, workers, opts.ray_address, threads,
                       on_progress=bar.progress if bar is not None else None) if tasks else None
    t_run = time.perf_counter()
    queue, inflight, claimed, next_id = list(tasks), {}, set(), 0
    extra = {"device": opts.device, "compile": opts.compile, "data_dir": None if opts.data_dir is None else str(opts.data_dir),
             "download": opts.download, "eval_batch_size": opts.eval_batch_size}
    try:
        while queue or inflight:
            while queue and len(inflight) < ex.capacity:
                t = queue.pop(0)
                got = set(st.claim([c["hash"] for c in t["cells"]], owner))
                counts["skipped"] += len(t["cells"]) - len(got)
                if not got:
                    continue
                t = {**t, "cells": [c for c in t["cells"] if c["hash"] in got], **extra, "id": next_id}
                next_id += 1
                claimed |= got
                if bar is not None:
                    bar.started(t)
                inflight[ex.submit(t)] = t
            if not inflight:
                continue
            for h, res in ex.wait(list(inflight), timeout=None):
                t = inflight.pop(h)
                mine = [c["hash"] for c in t["cells"]]
                if res.get("ok"):
                    st.finish(res["results"], seconds=res["seconds"], replicas=res["replicas"], host=res.get("host"))
                    for r in res["results"]:
                        counts[r["status"]] += 1
                else:
                    st.fail(mine, res["error"])
                    counts["failed"] += len(mine)
                    if res["error"] not in errors:
                        errors.append(res["error"])
                claimed -= set(mine)
                if bar is not None:
                    bar.finished(t, counts)
    except BaseException:
        if claimed:
            try:
                st.release(claimed)
            except MulocalError:
                pass
        if ex is not None:
            ex.close(cancel=True)
        if bar is not None:
            bar.close()
        raise
    if ex is not None:
        ex.close()
    if bar is not None:
        bar.close()
    ran = counts["done"] + counts["diverged"] + counts["failed"]
    run_s = time.perf_counter() - t_run
    after = st.counts(hashes)
    summary.update(
        executor=(ex.name if ex else executor), workers=(ex.capacity if ex else 0), tasks=len(tasks), ran=ran,
        done=counts["done"], diverged=counts["diverged"], failed=counts["failed"],
        skipped_claimed_elsewhere=counts["skipped"] + busy_elsewhere, errors=errors[:5],
        seconds=time.perf_counter() - t_start, run_seconds=run_s,
        cells_per_minute=(60.0 * ran / run_s) if ran and run_s > 0 else None,
        store_counts=after, complete=(after["done"] + after["diverged"] == len(cells)))
    return summary


class _Bar:
    """The sweep's progress bar on stderr: its label and the cells finished, the share of the planned work done
    (task costs: tasks run costliest first, and a count of cells would predict the whole sweep from the slowest
    ones) with the tasks in flight counted by the fraction of their steps they report, and the ETA: the remaining
    work at the average rate so far."""

    def __init__(self, label: str, tasks: list, finished_before: int, n_cells: int):
        import threading

        from tqdm.auto import tqdm
        self.label, self.n_cells, self.n_fin = label, n_cells, finished_before
        self.done, self.partial, self.costs, self.lock = 0.0, {}, {}, threading.Lock()
        self.bar = tqdm(total=sum(t["cost"] for t in tasks) or 1.0, desc=self._desc(""), file=sys.stderr,
                        dynamic_ncols=True, smoothing=0,
                        bar_format="{desc} |{bar}| {percentage:3.0f}% of the work [{elapsed}<{remaining}]")

    def _desc(self, extra: str) -> str:
        return f"{self.label}: {self.n_fin}/{self.n_cells} cells{extra}"

    def _show(self) -> None:  # under the lock
        self.bar.n = min(self.bar.total, self.done + sum(f * self.costs[i] for i, f in self.partial.items()))
        self.bar.refresh()

    def started(self, task: dict) -> None:
        with self.lock:
            self.costs[task["id"]], self.partial[task["id"]] = task.get("cost", 0.0), 0.0

    def progress(self, task_id, frac: float) -> None:
        with self.lock:
            if task_id in self.partial:  # a late report of a finished task changes nothing
                self.partial[task_id] = max(self.partial[task_id], min(1.0, float(frac)))
                self._show()

    def finished(self, task: dict, counts: dict) -> None:
        with self.lock:
            self.partial.pop(task["id"], None)
            self.done += self.costs.pop(task["id"], task.get("cost", 0.0))
            self.n_fin += len(task["cells"])
            self.bar.set_description_str(self._desc("".join(f", {counts[k]} {k}" for k in ("diverged", "failed")
                                                            if counts[k])), refresh=False)
            self._show()

    def close(self) -> None:
        self.bar.close()


def format_summary(s: dict) -> str:
    if s.get("dry_run"):
        return (f"sweep (dry run): {s['cells']} cells in {s['groups']} groups, {s['new']} not yet in {s['store']}, "
                f"{s['to_run']} to run as {s['tasks']} tasks (replicas per task: {s['replicas_per_task']})")
    lines = [f"sweep: {s['cells']} cells in {s['groups']} groups; {s['finished_before']} already finished in "
             f"{s['store']}, {s['ran']} run now in {s['tasks']} tasks ({s['executor']}, {s['workers']} at a time)"]
    if s["ran"]:
        lines.append(f"  {s['done']} done, {s['diverged']} diverged, {s['failed']} failed in {s['run_seconds']:.1f} s "
                     f"({s['cells_per_minute']:.1f} cells/min)")
    if s["skipped_claimed_elsewhere"]:
        lines.append(f"  {s['skipped_claimed_elsewhere']} cells are being run by another sweep process "
                     f"(if none is running, start again with --reset-running)")
    for e in s["errors"]:
        lines.append(f"  error: {e}")
    if s["failed"]:
        lines.append("  failed cells are run again by the next `mulocal sweep` with the same spec")
    c = s["store_counts"]
    lines.append(f"  store: {c['done']} done, {c['diverged']} diverged, {c['failed']} failed, {c['pending']} pending, "
                 f"{c['running']} running" + ("  (complete)" if s["complete"] else ""))
    return "\n".join(lines)



__all__ = ["SweepOptions", "format_summary", "run_sweep"]
