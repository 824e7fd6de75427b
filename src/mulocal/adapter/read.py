"""How a user's model is read: its units, each parameter's role, the residual blocks (docs/api.md, "Your own model").

A model is a factory ``make(width) -> nn.Module`` whose top level is a sequence (``nn.Sequential``, nested
``nn.Sequential`` containers flattened, or a list of modules). The sequence is cut into *units*: every module with
parameters is a unit (one layer of the learning rules: its output is a node u_l); the parameter-free modules after
it are its ``post`` (u_l -> a_l, the activity the next unit reads); those before the first unit are the input's
``post``. A unit is

* ``affine``: an ``nn.Linear``, or an ``nn.Conv2d`` with one group and zero padding (the native nets' own layer maps:
  explicit forward, W^T delta and delta a^T, no autograd);
* ``module``: any other module with parameters (a norm, a block with several weights): its forward by
  ``torch.func.functional_call`` and its W^T delta / weight gradient by local autograd inside the block;
* residual (either kind): a module whose output is its input plus a branch. Detected by probing, not by name: with
  every parameter of the module set to zero its output equals its input exactly (a residual block's branch then
  vanishes) -- and it does not with its parameters as built. ``adapter.Residual(*modules)`` is such a module whose
  branch is known (``.branch``); a branch made of parameter-free modules and one Linear / Conv2d becomes the native
  residual layer (``layers.Branch`` / ``ConvBranch``), its parameter-free prefix the ``post`` of the unit below.

Roles, from two builds of the factory (widths ``w1`` < ``w2``): a dimension is infinite when its size differs
between them (it must grow exactly like the width: ``size(w2) / size(w1) = w2 / w1``). A parameter with two or
more dimensions is matrix-like with torch's layout (dim 0 fan-out, dim 1 fan-in, the rest a kernel):
fan-in = shape[1] * prod(shape[2:]) (kernel area included) and

    fan-in finite, fan-out infinite  -> input,   both infinite -> hidden,   fan-in infinite, fan-out finite -> output

(the same reading as microsoft/mup's ``infshape``). One-dimensional parameters are vector-like: a bias or a norm
gain; infinite -> the hidden / input-layer bias rule (``c_bias[0]``), finite -> the output-bias rule
(``c_bias[1]``). The rules themselves (init std, multiplier, learning rates) come from ``Parameterization.rule``
with the role and the fan-in read here: nothing is scaled in this package.

Refused with one line naming the module: parameters shared between modules; a matrix with no infinite dimension;
a dimension that does not grow like the width; ``nn.MultiheadAttention`` (its head count and fused in-projection
are not width-read here); batch norm (its batch statistics and running buffers couple samples and change inside
every inference step); dropout (a local rule evaluates a unit many times per step); a unit whose matrices have
different roles (split it); a residual unit whose weights are not hidden; parameter-free modules between a unit
and the residual unit above it (they would act on the residual stream: move them into the block).
"""
from __future__ import annotations

import inspect
import math
from dataclasses import dataclass, field

import torch
from torch import nn

from ..errors import ConfigError
from .blocks import Residual

REFUSED = {
    nn.MultiheadAttention: "attention's head count and fused in-projection are not read by width here",
    nn.BatchNorm1d: "batch norm's batch statistics couple samples and its running buffers change inside every "
                    "inference step; use LayerNorm or GroupNorm",
    nn.BatchNorm2d: "batch norm's batch statistics couple samples and its running buffers change inside every "
                    "inference step; use LayerNorm or GroupNorm",
    nn.Dropout: "a local rule evaluates each unit many times per step, each with a new dropout mask; remove it",
    nn.Dropout2d: "a local rule evaluates each unit many times per step, each with a new dropout mask; remove it",
}


@dataclass
class ParamSpec:
    """One parameter of a unit: its name inside the unit, shape (at the build width), role and fan-in."""

    name: str
    shape: tuple
    role: str  # input | hidden | output (matrices), vector | vector-out (one-dimensional)
    fan_in: int
    bias: bool  # a bias (starts at zero), not a gain (keeps the module's own start value)

    @property
    def matrix(self) -> bool:
        return self.role in ("input", "hidden", "output")


@dataclass
class Unit:
    """One layer of the learning rules: a module with parameters, what follows it, and how it was read."""

    module: nn.Module  # the module at the build width (a residual unit: the whole block)
    name: str  # its path in the model, for messages
    kind: str  # affine | module
    residual: bool
    params: list  # ParamSpec, in the module's named_parameters order
    post: list = field(default_factory=list)  # parameter-free modules after it
    prefix: list = field(default_factory=list)  # residual affine unit: the branch's parameter-free prefix
    core: nn.Module | None = None  # affine unit: the Linear / Conv2d (a residual one: inside the branch)
    branch: nn.Module | None = None  # residual module unit with a known branch (adapter.Residual)
    in_shape: tuple = ()  # per-sample input shape of the unit (its a_{l-1})

    @property
    def role(self) -> str:
        roles = {p.role for p in self.params if p.matrix}
        return roles.pop() if roles else "hidden"


def flatten(model) -> list[tuple[str, nn.Module]]:
    """The model's top-level sequence as (path, module), nested plain ``nn.Sequential`` containers flattened."""
    if isinstance(model, (list, tuple)):
        items = [(str(i), m) for i, m in enumerate(model)]
    elif type(model) is nn.Sequential or type(model) is nn.ModuleList:
        items = list(model._modules.items())  # not named_children(): it hides a module used twice
    else:
        raise ConfigError(f"a model for mulocal must be an nn.Sequential or a list of modules (its top level is a "
                          f"sequence of blocks), got {type(model).__name__}")
    out = []
    for name, m in items:
        if not isinstance(m, nn.Module):
            raise ConfigError(f"model entry {name} is a {type(m).__name__}, not an nn.Module")
        if type(m) is nn.Sequential:
            out += [(f"{name}.{n}", c) for n, c in flatten(m)]
        else:
            out.append((name, m))
    return out


def _has_params(m: nn.Module) -> bool:
    return any(True for _ in m.parameters())


def _check_module(name: str, m: nn.Module) -> None:
    for sub_name, sub in m.named_modules():
        for kind, why in REFUSED.items():
            if isinstance(sub, kind):
                where = f"{name}.{sub_name}" if sub_name else name
                raise ConfigError(f"model layer {where} ({type(sub).__name__}) is not supported: {why}")


def _check_shared(model_items) -> None:
    seen: dict[int, str] = {}
    mods: dict[int, str] = {}
    for name, m in model_items:
        if _has_params(m) and id(m) in mods:
            raise ConfigError(f"model layer {name} is the same module as layer {mods[id(m)]}: shared parameters are "
                              f"not supported (each unit's weights are its own)")
        mods[id(m)] = name
        for pname, p in m.named_parameters(remove_duplicate=False):
            where = f"{name}.{pname}"
            if id(p) in seen:
                raise ConfigError(f"model parameter {where} is the same tensor as {seen[id(p)]}: shared parameters "
                                  f"are not supported (each unit's weights are its own)")
            seen[id(p)] = where


def _affine(m: nn.Module) -> bool:
    if type(m) is nn.Linear:
        return True
    return (type(m) is nn.Conv2d and m.groups == 1 and m.padding_mode == "zeros"
            and not isinstance(m.padding, str))


def param_role(where: str, s1: tuple, s2: tuple, w1: int, w2: int) -> tuple[str, int]:
    """(role, fan-in at the second build) of a parameter of shape ``s1`` at width ``w1`` and ``s2`` at ``w2``."""
    if len(s1) != len(s2):
        raise ConfigError(f"model parameter {where} changes its number of dimensions with the width")
    inf = []
    for d1, d2 in zip(s1, s2):
        if d1 != d2 and d2 * w1 != d1 * w2:
            raise ConfigError(f"model parameter {where}: a dimension goes from {d1} to {d2} when the width goes from "
                              f"{w1} to {w2}; mulocal needs every width-dependent dimension proportional to the width")
        inf.append(d1 != d2)
    if len(s2) == 0:
        raise ConfigError(f"model parameter {where} is a scalar: scalar parameters are not supported")
    if len(s2) == 1:
        return ("vector" if inf[0] else "vector-out"), 1
    fan_in = s2[1] * math.prod(s2[2:])
    out_inf, in_inf = inf[0], inf[1]
    if out_inf and in_inf:
        return "hidden", fan_in
    if out_inf:
        return "input", fan_in
    if in_inf:
        return "output", fan_in
    raise ConfigError(f"model parameter {where} (shape {tuple(s2)}) has no width-dependent fan-in or fan-out: "
                      f"mulocal cannot tell its role")


def is_residual(m: nn.Module, x: torch.Tensor) -> bool:
    """Whether ``m`` adds its input to a branch: with its parameters at zero its output is its input (exactly),
    while with its parameters as built it is not."""
    with torch.no_grad():
        params = {n: torch.zeros_like(p) for n, p in m.named_parameters()}
        try:
            y0 = torch.func.functional_call(m, params, (x,))
        except Exception:  # noqa: BLE001 - a module that cannot run with zero weights is not a residual block
            return False
        if y0.shape != x.shape or not torch.equal(y0, x):
            return False
        y = m(x)
        return not torch.equal(y, x)


def _factory_call(make, width: int, depth: int | None):
    try:
        takes_depth = "depth" in inspect.signature(make).parameters
    except (TypeError, ValueError):
        takes_depth = False
    if depth is not None and takes_depth:
        return make(width, depth=depth)
    return make(width)


def read(make, width: int, input_shape, base_width: int, depth: int | None = None) -> tuple[list, list, tuple]:
    """Build the model at ``width`` (and at two reading widths for the roles) and return (input post modules,
    units, output shape). ``depth`` is passed to a factory that takes it (``make(width, depth=...)``)."""
    w1 = int(base_width)
    w2 = 2 * w1
    try:
        m1, m2, model = (_factory_call(make, w, depth) for w in (w1, w2, width))
    except ConfigError:
        raise
    except Exception as err:  # noqa: BLE001 - the user's factory: one line, not a traceback
        raise ConfigError(f"the model factory failed: {type(err).__name__}: {err}") from None
    items1, items2, items = flatten(m1), flatten(m2), flatten(model)
    if not (len(items1) == len(items2) == len(items)) or any(
            type(a[1]) is not type(b[1]) for a, b in zip(items1, items)):
        raise ConfigError("the model factory builds a different sequence of modules at different widths")
    _check_shared(items)
    for name, m in items:
        _check_module(name, m)
    x = torch.zeros(2, *input_shape)
    with torch.no_grad():
        x.normal_(generator=torch.Generator().manual_seed(0))
    prefix: list = []
    units: list[Unit] = []
    cur = x
    for (name, m), (_, m_1), (_, m_2) in zip(items, items1, items2):
        if not _has_params(m):
            (units[-1].post if units else prefix).append(m)
            with torch.no_grad():
                cur = m(cur)
            continue
        p1 = dict(m_1.named_parameters())
        p2 = dict(m_2.named_parameters())
        specs = []
        for pname, p in m.named_parameters():
            if pname not in p1 or pname not in p2:
                raise ConfigError(f"model layer {name}: parameter {pname} exists at some widths only")
            role, _ = param_role(f"{name}.{pname}", tuple(p1[pname].shape), tuple(p2[pname].shape), w1, w2)
            fan_in = p.shape[1] * math.prod(p.shape[2:]) if p.dim() >= 2 else 1
            specs.append(ParamSpec(pname, tuple(p.shape), role, int(fan_in), pname.split(".")[-1] == "bias"))
        roles = {s.role for s in specs if s.matrix}
        if len(roles) > 1:
            raise ConfigError(f"model layer {name} mixes {' and '.join(sorted(roles))} weights: make each a unit of "
                              f"its own (a top-level module)")
        res = is_residual(m, cur)
        unit = Unit(m, name, "module", res, specs, in_shape=tuple(cur.shape[1:]))
        if res:
            if units and units[-1].post:
                raise ConfigError(f"parameter-free modules ({', '.join(type(p).__name__ for p in units[-1].post)}) "
                                  f"sit between model layer {units[-1].name} and the residual block {name}: they "
                                  f"would act on the residual stream; move them into the block")
            if roles and roles != {"hidden"}:
                raise ConfigError(f"residual block {name} has {roles.pop()} weights: a residual block maps the "
                                  f"width to itself (hidden weights only)")
            if isinstance(m, Residual):
                unit.branch = m.branch
                mods = flatten(m.branch)
                with_params = [c for _, c in mods if _has_params(c)]
                if len(with_params) == 1 and _affine(with_params[0]) and _has_params(mods[-1][1]):
                    unit.kind, unit.core = "affine", with_params[0]
                    unit.prefix = [c for _, c in mods[:-1]]
        elif _affine(m):
            unit.kind, unit.core = "affine", m
        units.append(unit)
        with torch.no_grad():
            cur = m(cur)
    if not units:
        raise ConfigError("the model has no parameters")
    if len(units) < 2:
        raise ConfigError("the model needs at least two units with parameters (an input and an output layer)")
    for u, want in ((units[0], "input"), (units[-1], "output")):
        if u.residual or u.role != want:
            raise ConfigError(f"model layer {u.name} reads as a{'' if want == 'output' else 'n'} "
                              f"{'residual block' if u.residual else u.role + ' layer'}; the first unit must be an "
                              f"input layer (finite fan-in) and the last an output layer (finite fan-out)")
    for u in units[1:-1]:
        if u.role != "hidden":
            raise ConfigError(f"model layer {u.name} reads as an {u.role} layer between the input and output layers")
    return prefix, units, tuple(cur.shape[1:])
