"""Your own model: a factory ``make(width) -> nn.Module`` run under every mulocal rule (docs/api.md).

    read.py     how the model is read: units, each parameter's role from two widths, residual blocks, refusals
    layers.py   the layers it runs as: a general convolution, any module (local autograd inside it)
    net.py      ``ModuleNet``: the model as a mulocal net (K replicas, the Parameterization's rules)
    blocks.py   ``Residual``: a residual block whose branch mulocal can see
"""
from __future__ import annotations

import functools
import importlib
import os
import sys

from ..errors import ConfigError
from .blocks import Residual
from .net import ModuleNet
from . import read as _reader  # the module (not its function: mulocal.adapter.read stays the module)


def load_factory(spec: str):
    """The factory named by ``package.module:name`` (importable from the working directory or the path)."""
    if not isinstance(spec, str) or spec.count(":") != 1:
        raise ConfigError(f"--model must be package.module:factory, got {spec!r}")
    mod_name, attr = spec.split(":")
    if os.getcwd() not in sys.path and "" not in sys.path:
        sys.path.insert(0, os.getcwd())
    try:
        mod = importlib.import_module(mod_name)
    except Exception as err:  # noqa: BLE001 - the user's module: one line
        raise ConfigError(f"cannot import the model module '{mod_name}': {type(err).__name__}: {err}") from None
    make = getattr(mod, attr, None)
    if make is None or not callable(make):
        raise ConfigError(f"module '{mod_name}' has no factory '{attr}'")
    return make


def spec_of(make) -> str | None:
    """``package.module:name`` of a factory defined at a module's top level (what a stored cell records), else None."""
    mod, name = getattr(make, "__module__", None), getattr(make, "__qualname__", "")
    if not mod or not name or "<" in name or "." in name or mod == "__main__":
        return None
    return f"{mod}:{name}"


__all__ = ["ModuleNet", "Residual", "load_factory", "spec_of", "structure"]


@functools.lru_cache(maxsize=32)
def structure(spec: str, input_shape: tuple, base_width: int, depth: int | None = None) -> tuple[bool, int, bool]:
    """(has residual units, number of units, has a conv unit above the first: TP's feedback of it is a conv) of the
    model ``spec`` names, built at the base width: what a cell records about its net before any net exists."""
    from torch import nn
    _, units, _ = _reader.read(load_factory(spec), base_width, tuple(input_shape), base_width, depth)
    conv = any(isinstance(u.core, nn.Conv2d) for u in units[1:])
    return any(u.residual for u in units), len(units), conv
