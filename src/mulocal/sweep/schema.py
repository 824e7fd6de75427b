"""The sweep store's file: its SQLite schema, and opening a path as a store (``store.Store`` opens it this way).

A new store is created with the schema and its ``meta`` rows (format, schema version, when, by which mulocal); an
existing file must be a mulocal sweep store of the schema this version reads, and pass SQLite's quick_check. A
store that is written is in WAL mode; one that is only read (``report``, ``plot``) opens even in a folder this
process cannot write to. Every refusal is one :class:`StoreError` line.

Two tables: ``cells``, a row per cell (``COLUMNS``: the cell's configuration and hashes, its status, metrics and
history, and how, when and where it was trained), and ``meta``, the store's own keys (and ``Store.put_result``'s).
"""
from __future__ import annotations

import os
import sqlite3
import time
from pathlib import Path

from ..errors import MulocalError

FORMAT = "mulocal-sweep-store"
SCHEMA_VERSION = 1
STATUSES = ("pending", "running", "done", "diverged", "failed")

_SCHEMA = """
CREATE TABLE IF NOT EXISTS meta (key TEXT PRIMARY KEY, value TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS cells (
    hash          TEXT PRIMARY KEY,
    group_hash    TEXT NOT NULL,
    family_hash   TEXT NOT NULL,
    config        TEXT NOT NULL,
    width         INTEGER NOT NULL,
    lr            REAL NOT NULL,
    seed          INTEGER NOT NULL,
    status        TEXT NOT NULL CHECK (status IN ('pending', 'running', 'done', 'diverged', 'failed')),
    train_loss    REAL,
    test_loss     REAL,
    test_accuracy REAL,
    epochs_run    INTEGER,
    history       TEXT,
    seconds       REAL,
    replicas      INTEGER,
    attempts      INTEGER NOT NULL DEFAULT 0,
    owner         TEXT,
    host          TEXT,
    version       TEXT,
    error         TEXT,
    created       REAL NOT NULL,
    started       REAL,
    finished      REAL
);
CREATE INDEX IF NOT EXISTS cells_status ON cells (status);
CREATE INDEX IF NOT EXISTS cells_group ON cells (group_hash);
"""

COLUMNS = ("hash", "group_hash", "family_hash", "config", "width", "lr", "seed", "status", "train_loss",
           "test_loss", "test_accuracy", "epochs_run", "history", "seconds", "replicas", "attempts", "owner",
           "host", "version", "error", "created", "started", "finished")


class StoreError(MulocalError):
    """The store file is missing, corrupt, foreign, or from a newer mulocal."""


def connect(path: Path, create: bool = True, readonly: bool = False) -> sqlite3.Connection:
    """The open store at ``path``: created if it is missing (unless ``create=False`` or ``readonly``), else checked
    (format, schema version, quick_check); ``readonly`` opens it for reading only."""
    if path.is_dir():
        raise StoreError(f"{path} is a directory, not a sweep store")
    exists = path.exists() and path.stat().st_size > 0
    if not exists and (not create or readonly):
        raise StoreError(f"no sweep store at {path}")
    if not exists:
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
        except OSError as e:
            raise StoreError(f"cannot create the folder of {path}: {e}") from None
    folder = path.resolve().parent
    folder_ro = not os.access(folder, os.W_OK)
    if folder_ro and not readonly:
        raise StoreError(f"cannot write the sweep store {path}: its folder {folder} is read-only")
    try:
        if readonly:  # a WAL database in a read-only folder can only be opened as immutable
            uri = f"{path.resolve().as_uri()}?{'immutable=1' if folder_ro else 'mode=ro'}"
            db = sqlite3.connect(uri, uri=True, timeout=60.0, isolation_level=None)
        else:
            db = sqlite3.connect(str(path), timeout=60.0, isolation_level=None)
    except sqlite3.Error as e:
        raise StoreError(f"cannot open sweep store {path}: {e}") from None
    try:
        _check_and_init(db, path, exists, readonly)
    except sqlite3.DatabaseError as e:
        db.close()
        raise StoreError(f"{path} is not a readable SQLite database ({e}); it may be corrupt or "
                         f"another kind of file: give another --store path") from None
    except StoreError:
        db.close()
        raise
    return db


def _check_and_init(db: sqlite3.Connection, path: Path, exists: bool, readonly: bool) -> None:
    """Check an existing store (or an empty file that another sweep is creating: create it too); create a new one."""
    db.execute("PRAGMA busy_timeout = 60000")
    tables = {r[0] for r in db.execute("SELECT name FROM sqlite_master WHERE type = 'table'")}
    if exists and not tables and not readonly:
        exists = False  # an empty database: another sweep is creating this store right now; create it too
    if exists:
        if "meta" not in tables:
            found = ", ".join(sorted(tables)) or "no tables"
            raise StoreError(f"{path} is a SQLite database but not a mulocal sweep store ({found})")
        meta = dict(db.execute("SELECT key, value FROM meta").fetchall())
        if meta.get("format") != FORMAT:
            raise StoreError(f"{path} is a SQLite database but not a mulocal sweep store "
                             f"(format {meta.get('format')!r})")
        try:
            version = int(meta.get("schema_version", "0"))
        except ValueError:
            version = -1
        if version > SCHEMA_VERSION:
            raise StoreError(f"{path} was written by a newer mulocal (store schema {version}, this one "
                             f"reads {SCHEMA_VERSION}): upgrade mulocal")
        if version != SCHEMA_VERSION or "cells" not in tables:
            raise StoreError(f"{path} has an unknown store layout (schema {meta.get('schema_version')!r})")
        check = db.execute("PRAGMA quick_check").fetchone()[0]
        if check != "ok":
            raise StoreError(f"{path} is corrupt (SQLite quick_check: {check})")
    elif tables:
        raise StoreError(f"{path} is a SQLite database but not a mulocal sweep store")
    if readonly:
        return
    db.execute("PRAGMA journal_mode = WAL")
    db.execute("PRAGMA synchronous = NORMAL")
    if not exists:
        from .. import __version__
        with Transaction(db):
            for stmt in _SCHEMA.strip().split(";"):
                if stmt.strip():
                    db.execute(stmt)
            db.executemany("INSERT OR IGNORE INTO meta (key, value) VALUES (?, ?)",
                           [("format", FORMAT), ("schema_version", str(SCHEMA_VERSION)),
                            ("created", repr(time.time())), ("created_by", __version__)])


class Transaction:
    """``with Transaction(db) as db:`` one ``BEGIN IMMEDIATE`` transaction: committed, or rolled back on an error."""

    def __init__(self, db: sqlite3.Connection):
        self.db = db

    def __enter__(self):
        self.db.execute("BEGIN IMMEDIATE")
        return self.db

    def __exit__(self, et, ev, tb):
        self.db.execute("COMMIT" if et is None else "ROLLBACK")
        return False
