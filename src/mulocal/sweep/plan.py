"""Planning: groups of cells (everything equal but ``lr`` and ``seed``) become tasks of K replicas each.

A group trains as the K replicas of one batched model, chunked so that K stays under ``max_replicas`` and
a memory budget per task; with several workers the costliest chunks are halved until every worker has a
task. Replica memory comes from the network's own sizes (``nets.sizes``). On a GPU (``device_budget``) the
budget is the GPU's free memory and the sweep runs one task per GPU at a time (``SweepOptions.capacity``), so
a group's LRs x seeds become one batched model instead of many small processes sharing the device.
"""
from __future__ import annotations

import math
import os
from typing import Sequence

from ..config import config_hash, group_of
from ..errors import ConfigError


def replica_bytes(g: dict, input_shape: Sequence[int], n_classes: int, eval_batch: int = 2000) -> int:
    """A rough upper estimate of the memory one replica of group ``g`` needs while training."""
    from ..nets import sizes  # (torch: the command line's parsers read this package without it)
    item = 8 if g["dtype"] == "float64" else 4
    try:
        params, acts = sizes(g["arch"], input_shape, n_classes, g["width"], g["depth"])
    except (ConfigError, ValueError):  # a model that cannot be built: its task fails in the worker, one line
        params, acts = sizes("mlp", input_shape, n_classes, g["width"], g["depth"])
    in_dim = math.prod(input_shape)
    buffers = 2 if g["optimizer"] == "adam" else (1 if g["momentum"] else 0)
    state = params * (2 + buffers)
    per_sample = (acts + in_dim) * (2 if g["algo"] == "bp" else 4)
    return item * (state + (g["batch_size"] + eval_batch) * per_sample)


def task_cost(g: dict, n_cells: int, n_train: int, input_shape, n_classes) -> float:
    steps = math.ceil(n_train / g["batch_size"])
    if g["max_steps"]:
        steps = min(steps, g["max_steps"])
    return float(n_cells) * g["epochs"] * steps * replica_bytes(g, input_shape, n_classes, 0)


def _default_budget(workers: int) -> int:
    try:
        phys = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (ValueError, OSError, AttributeError):
        phys = 8 << 30
    return int(min(4 << 30, phys / (2 * max(workers, 1))))


GPU_FRACTION = 0.8  # of a GPU's free memory that one sweep's tasks may plan for


def gpu_free_bytes(device: str = "cuda") -> int:
    """Free memory of the CUDA device (bytes)."""
    import torch
    return int(torch.cuda.mem_get_info(torch.device(device))[0])


def gpu_count() -> int:
    import torch
    return max(1, torch.cuda.device_count())


def device_budget(device: str, workers: int) -> int | None:
    """The memory budget per task on ``device``: on a GPU, ``GPU_FRACTION`` of its free memory shared by the
    tasks that run on it at once (so a width's LRs x seeds train as one batched model: the GPU is filled by
    replicas, not by processes); None on the CPU (``plan`` then uses host memory)."""
    if not str(device).startswith("cuda"):
        return None
    per_gpu = max(1, workers // gpu_count())
    return int(GPU_FRACTION * gpu_free_bytes(device) / per_gpu)


def plan(cells: Sequence[dict], shapes: dict, max_replicas: int = 64, memory_budget: int | None = None,
         capacity: int = 1, eval_batch: int = 2000) -> list[dict]:
    """Tasks: chunks of groups, each {"config", "cells": [{"hash", "lr", "seed"}], "cost"}, costliest first.

    ``shapes`` maps a group's data key to (input_shape, n_classes, n_train). Groups are split into the
    fewest chunks that fit ``max_replicas`` and the memory budget (per task); then, for ``capacity`` > 1
    parallel workers, the costliest chunks are halved until every worker has a task and no chunk costs
    more than a worker's share of the total.
    """
    budget = memory_budget or _default_budget(capacity)
    groups: dict[str, tuple[dict, list]] = {}
    for c in cells:
        g = group_of(c)
        groups.setdefault(config_hash(g), (g, []))[1].append(c)
    tasks = []
    for g, members in groups.values():
        in_shape, n_classes, n_train = shapes[data_key(g)]
        per = replica_bytes(g, in_shape, n_classes, eval_batch)
        kmax = max(1, min(int(max_replicas), budget // max(per, 1)))
        members = sorted(members, key=lambda c: (c["lr"], c["seed"]))
        n_chunks = math.ceil(len(members) / kmax)
        for part in _split(members, n_chunks):
            tasks.append({"config": g, "cells": [{"hash": config_hash(c), "lr": c["lr"], "seed": c["seed"]}
                                                 for c in part],
                          "cost": task_cost(g, len(part), n_train, in_shape, n_classes)})
    total = sum(t["cost"] for t in tasks)
    while tasks and capacity > 1:  # balance: no task bigger than a worker's share, and every worker busy
        big = max(tasks, key=lambda t: t["cost"])
        if len(big["cells"]) < 2 or (len(tasks) >= capacity and big["cost"] <= total / capacity):
            break
        tasks.remove(big)
        for part in _split(big["cells"], 2):
            tasks.append({"config": big["config"], "cells": part, "cost": big["cost"] * len(part) / len(big["cells"])})
    tasks.sort(key=lambda t: -t["cost"])
    return tasks


def _split(items: list, n: int) -> list[list]:
    n = max(1, min(n, len(items)))
    q, r = divmod(len(items), n)
    out, i = [], 0
    for j in range(n):
        size = q + (1 if j < r else 0)
        out.append(items[i:i + size])
        i += size
    return out


def data_key(g: dict) -> tuple:
    """What identifies a group's dataset (shapes are looked up by it)."""
    return (g["dataset"], g["train_subset"], g["test_subset"], g["data_seed"])



__all__ = ["data_key", "device_budget", "gpu_count", "gpu_free_bytes", "plan", "replica_bytes", "task_cost"]
