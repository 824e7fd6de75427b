"""Output paths of the command line: checked when the flags are parsed, and their folders created (or refused,
one error line) before any work starts, so that a run is never lost to a path it cannot write at its end.

Imports nothing heavy: ``mulocal --help`` and ``--version`` answer without loading torch.
"""
from __future__ import annotations

import argparse
import os
import tempfile
from pathlib import Path

from ..errors import ConfigError


class OutFile(str):
    """An output file named on the command line (its folder is created before the work starts)."""


class OutDir(str):
    """An output folder named on the command line (created before the work starts)."""


def _writable_folder(folder: Path, what: str) -> None:
    """The folder (or, if missing, its nearest existing ancestor, where it would be created) is writable."""
    probe = folder
    while not probe.exists():
        if probe.parent == probe:
            break
        probe = probe.parent
    if not probe.is_dir():
        raise argparse.ArgumentTypeError(f"cannot write {what}: {probe} is not a folder")
    if not os.access(probe, os.W_OK | os.X_OK):
        raise argparse.ArgumentTypeError(f"cannot write {what}: the folder {probe} is read-only")


def out_file(text: str) -> str:
    """argparse type of an output file: checked before any compute (its folder writable, not a folder)."""
    p = Path(text).expanduser()
    if p.is_dir():
        raise argparse.ArgumentTypeError(f"{text} is a folder, not a file")
    if p.exists() and not os.access(p, os.W_OK):
        raise argparse.ArgumentTypeError(f"cannot write {text}: the file is read-only")
    _writable_folder(p.resolve().parent, text)
    return OutFile(text)


def out_dir(text: str) -> str:
    """argparse type of an output folder: checked before any compute."""
    p = Path(text).expanduser()
    if p.exists() and not p.is_dir():
        raise argparse.ArgumentTypeError(f"{text} is a file, not a folder")
    _writable_folder(p.resolve(), text)
    return OutDir(text)


def make_folder(folder, what: str) -> None:
    """Create ``folder`` (and its parents) if missing and write a probe file in it: a ConfigError naming it when
    either fails (a folder that cannot be created, a read-only file system), before any work is done."""
    folder = Path(folder).expanduser()
    try:
        folder.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryFile(dir=folder, prefix=".mulocal-probe-"):
            pass
    except OSError as e:
        where = e.filename or folder
        raise ConfigError(f"cannot write {what}: {e.strerror or e}: {where}") from None


def _outputs(value):
    """The output paths in a parsed flag's value: itself, the items of a list (a repeatable flag), or the
    ``output`` of a parsed value that writes somewhere (``--log``)."""
    if isinstance(value, (list, tuple)):
        for v in value:
            yield from _outputs(v)
    elif isinstance(value, (OutFile, OutDir)):
        yield value
    elif isinstance(getattr(value, "output", None), (OutFile, OutDir)):
        yield value.output


def prepare_outputs(args) -> None:
    """Every output path among the parsed flags (``out_file``, ``out_dir``, also in lists and ``--log``): its
    folder created and written to once, before the command runs."""
    for value in vars(args).values():
        for path in _outputs(value):
            if isinstance(path, OutFile):
                make_folder(Path(path).expanduser().parent, path)
            else:
                make_folder(path, path)


def checked_dir(text: str, create: bool = True) -> str:
    """``out_dir`` for a default folder (a ConfigError instead of an argparse error), created unless ``create`` is
    False (the command then makes it once its own checks pass)."""
    try:
        path = out_dir(text)
    except argparse.ArgumentTypeError as e:
        raise ConfigError(str(e)) from None
    if create:
        make_folder(path, path)
    return str(path)


__all__ = ["OutDir", "OutFile", "checked_dir", "make_folder", "out_dir", "out_file", "prepare_outputs"]
