"""The sweep store: an embedded SQLite database with one row per cell.

A *cell* is one training run: a group configuration (everything but the learning rate and
the seed) plus ``lr`` and ``seed``. Its key is the SHA-256 of its canonical JSON, so adding the
same cell twice is a no-op and a sweep started again finds what is already there.

Status of a cell: ``pending`` -> ``running`` -> ``done`` | ``diverged`` | ``failed``. Only the
process that runs the sweep writes (workers return results), each finished task in one
transaction, in WAL mode: a runner killed at any moment (even ``kill -9``) leaves every cell
either finished or not; cells it had claimed (``running``, owned by a dead process) go back to
``pending`` when a sweep opens the store again. A diverged cell is a result; a failed one (an
exception in the worker) is run again by the next sweep.

Every row keeps the cell's configuration, its hash, the status, the final metrics, the
per-epoch history (JSON), the wall time and replica count of the batched run that trained it,
timestamps, the host and the library version; ``export_csv`` writes it all out. The file, its schema and the
checks when it is opened: ``schema.py``.
"""
from __future__ import annotations

import csv
import json
import math
import os
import socket
import sqlite3
import time
from pathlib import Path
from typing import Iterable, Sequence

from ..config import canonical_json, config_hash, family_of, group_of  # noqa: F401 (re-exported)
from .schema import COLUMNS, STATUSES, StoreError, Transaction, connect

FINISHED = ("done", "diverged")


def _finite_or_none(v):
    if v is None:
        return None
    v = float(v)
    return None if math.isnan(v) else v


def owner_token() -> str:
    return f"{socket.gethostname()}:{os.getpid()}"


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # exists, owned by someone else
        return True
    except OSError:
        return False
    return True


# ------------------------------------------------------------------------------------ the store
class Store:
    """One sweep database. ``Store(path)`` creates it if needed; ``create=False`` requires it; ``readonly=True``
    only reads it (``report``, ``plot``), which works in a folder this process cannot write to."""

    def __init__(self, path, create: bool = True, readonly: bool = False):
        self.path, self.readonly = Path(path), bool(readonly)
        self.db = connect(self.path, create, self.readonly)

    # ---------------------------------------------------------------- helpers
    def _tx(self):
        return Transaction(self.db)

    def _run(self, fn):
        """Run ``fn()`` and turn SQLite failures into one-line StoreErrors."""
        try:
            return fn()
        except sqlite3.DatabaseError as e:
            raise StoreError(f"sweep store {self.path}: {e}") from None

    def close(self) -> None:
        try:
            self.db.close()
        except sqlite3.Error:
            pass

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()
        return False

    # ---------------------------------------------------------------- writing
    def add_cells(self, cells: Sequence[dict]) -> int:
        """Insert cells (configuration dicts with ``width``, ``lr``, ``seed``) not already stored; return how many
        were new."""
        now = time.time()
        rows = []
        for c in cells:
            rows.append((config_hash(c), config_hash(group_of(c)), config_hash(family_of(c)), canonical_json(c),
                         int(c["width"]), float(c["lr"]), int(c["seed"]), now))

        def go():
            with self._tx() as db:
                before = db.execute("SELECT COUNT(*) FROM cells").fetchone()[0]
                db.executemany("INSERT OR IGNORE INTO cells (hash, group_hash, family_hash, config, width, lr, seed, "
                               "status, created) VALUES (?, ?, ?, ?, ?, ?, ?, 'pending', ?)", rows)
                return db.execute("SELECT COUNT(*) FROM cells").fetchone()[0] - before
        return self._run(go)

    def reset_stale(self, force: bool = False) -> int:
        """Put ``running`` cells whose runner is gone (same host, dead pid; or any, with ``force``) back to
        ``pending``. Return how many."""
        host, me = socket.gethostname(), os.getpid()

        def go():
            with self._tx() as db:
                stale = []
                for h, owner in db.execute("SELECT hash, owner FROM cells WHERE status = 'running'"):
                    o_host, _, o_pid = (owner or "").rpartition(":")
                    try:
                        pid = int(o_pid)
                    except ValueError:
                        pid = -1
                    if force or (o_host == host and (pid == me or not _pid_alive(pid))) or pid < 0:
                        stale.append((h,))
                db.executemany("UPDATE cells SET status = 'pending', owner = NULL WHERE hash = ? "
                               "AND status = 'running'", stale)
                return len(stale)
        return self._run(go)

    def claim(self, hashes: Sequence[str], owner: str | None = None) -> list[str]:
        """Atomically mark the given pending/failed cells ``running``; return those this call claimed."""
        owner = owner or owner_token()
        now = time.time()

        def go():
            got = []
            with self._tx() as db:
                for h in hashes:
                    cur = db.execute("UPDATE cells SET status = 'running', owner = ?, started = ?, "
                                     "attempts = attempts + 1, error = NULL "
                                     "WHERE hash = ? AND status IN ('pending', 'failed')", (owner, now, h))
                    if cur.rowcount:
                        got.append(h)
            return got
        return self._run(go)

    def release(self, hashes: Iterable[str]) -> None:
        """Give claimed cells back (``running`` -> ``pending``), e.g. on Ctrl-C."""
        hs = [(h,) for h in hashes]
        if not hs:
            return

        def go():
            with self._tx() as db:
                db.executemany("UPDATE cells SET status = 'pending', owner = NULL WHERE hash = ? "
                               "AND status = 'running'", hs)
        self._run(go)

    def finish(self, results: Sequence[dict], seconds: float | None = None, replicas: int | None = None,
               host: str | None = None) -> None:
        """Record finished cells in one transaction. Each result: ``hash``, ``status`` (done / diverged),
        ``train_loss``, ``test_loss``, ``test_accuracy``, ``history``."""
        from .. import __version__
        now = time.time()
        rows = []
        for r in results:
            if r["status"] not in FINISHED:
                raise StoreError(f"cannot record status {r['status']!r} as a result")
            hist = r.get("history") or []
            n_epochs = sum(1 for h in hist if "event" not in h)
            rows.append((r["status"], _finite_or_none(r.get("train_loss")), _finite_or_none(r.get("test_loss")),
                         _finite_or_none(r.get("test_accuracy")), n_epochs, json.dumps(hist, allow_nan=True),
                         seconds, replicas, host, __version__, now, r["hash"]))

        def go():
            with self._tx() as db:
                db.executemany("UPDATE cells SET status = ?, train_loss = ?, test_loss = ?, test_accuracy = ?, "
                               "epochs_run = ?, history = ?, seconds = ?, replicas = ?, host = ?, version = ?, "
                               "finished = ?, owner = NULL, error = NULL WHERE hash = ?", rows)
        self._run(go)

    def fail(self, hashes: Iterable[str], error: str) -> None:
        from .. import __version__
        now = time.time()
        rows = [(str(error)[:2000], __version__, now, h) for h in hashes]

        def go():
            with self._tx() as db:
                db.executemany("UPDATE cells SET status = 'failed', error = ?, version = ?, finished = ?, "
                               "owner = NULL WHERE hash = ?", rows)
        self._run(go)

    # ---------------------------------------------------------------- reading
    def counts(self, hashes: Sequence[str] | None = None) -> dict:
        """Number of cells per status (over ``hashes`` if given)."""
        out = {s: 0 for s in STATUSES}
        for r in self.rows(hashes=hashes, columns=("hash", "status")):
            out[r["status"]] += 1
        return out

    def rows(self, status: Sequence[str] | str | None = None, hashes: Sequence[str] | None = None,
             columns: Sequence[str] = COLUMNS, parse: bool = True) -> list[dict]:
        """Rows as dicts; ``config`` and ``history`` parsed from JSON when ``parse``."""
        cols = list(columns)
        if hashes is not None and "hash" not in cols:
            cols.insert(0, "hash")
        for c in cols:
            if c not in COLUMNS:
                raise StoreError(f"unknown store column {c!r}")
        where, args = [], []
        if status is not None:
            status = [status] if isinstance(status, str) else list(status)
            where.append(f"status IN ({', '.join('?' * len(status))})")
            args += status
        sql = f"SELECT {', '.join(cols)} FROM cells" + (f" WHERE {' AND '.join(where)}" if where else "")
        sql += " ORDER BY family_hash, width, lr, seed"

        def go():
            return self.db.execute(sql, args).fetchall()
        raw = self._run(go)
        want = set(hashes) if hashes is not None else None
        out = []
        for values in raw:
            row = dict(zip(cols, values))
            if want is not None and "hash" in row and row["hash"] not in want:
                continue
            if parse:
                try:
                    if row.get("config") is not None:
                        row["config"] = json.loads(row["config"])
                    if row.get("history") is not None:
                        row["history"] = json.loads(row["history"])
                except ValueError as e:
                    raise StoreError(f"sweep store {self.path}: a row's JSON is unreadable ({e})") from None
            if row.get("status") == "diverged":
                for k in ("train_loss", "test_loss"):
                    if k in row and row[k] is None:
                        row[k] = math.inf
            out.append(row)
        return out

    def meta(self) -> dict:
        return dict(self._run(lambda: self.db.execute("SELECT key, value FROM meta").fetchall()))

    def put_result(self, name: str, result: dict) -> None:
        """Keep a non-sweep result (an analysis experiment's numbers, as JSON) under ``result:NAME``."""
        text = json.dumps(result, allow_nan=False)
        with self._tx():
            self._run(lambda: self.db.execute("INSERT OR REPLACE INTO meta (key, value) VALUES (?, ?)",
                                              (f"result:{name}", text)))

    def results(self) -> dict:
        """The results kept with :meth:`put_result`, by name."""
        return {k[len("result:"):]: json.loads(v) for k, v in self.meta().items() if k.startswith("result:")}

    def export_csv(self, path) -> int:
        """Write every cell (configuration flattened into columns, history as JSON) to ``path``; return the
        number of rows."""
        rows = self.rows(parse=True)
        keys: list[str] = []
        for r in rows:
            for k in flatten(r["config"]):
                if k not in keys:
                    keys.append(k)
        cols = ["hash", "status"] + [k for k in keys if k not in ("width", "lr", "seed")] + \
               ["width", "lr", "seed", "train_loss", "test_loss", "test_accuracy", "epochs_run", "seconds", "replicas",
                "attempts", "host", "version", "error", "created", "started", "finished", "history"]
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        with open(path, "w", newline="") as fh:
            w = csv.writer(fh)
            w.writerow(cols)
            for r in rows:
                flat = flatten(r["config"])
                vals = []
                for c in cols:
                    if c == "history":
                        v = json.dumps(r.get("history"), allow_nan=True) if r.get("history") is not None else ""
                    elif c in r and c != "config":
                        v = r[c]
                    else:
                        v = flat.get(c)
                        v = json.dumps(v) if isinstance(v, (list, dict)) else v
                    vals.append("" if v is None else v)
                w.writerow(vals)
        return len(rows)


def flatten(cfg: dict, prefix: str = "") -> dict:
    """{"a": {"b": 1}} -> {"a.b": 1}."""
    out = {}
    for k, v in cfg.items():
        if isinstance(v, dict):
            out.update(flatten(v, f"{prefix}{k}."))
        else:
            out[prefix + k] = v
    return out


__all__ = ["Store", "canonical_json", "config_hash", "group_of", "family_of"]
