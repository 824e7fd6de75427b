"""One description of a run, built in one place.

A run is described by a *cell*: a flat dict of the fields below (grouped model / parameterization /
learning rule / data / training), the options of its learning rule (``algo_options``, declared by the
rule: ``algos.options_of``), overrides of its parameterization preset (``param_options``), a
``width``, and, in a sweep, one ``lr`` and one ``seed``. Everything that turns a cell into objects
lives here:

    normalize / validate   coerce(key, value, kind), validate(cell)
    identity               config_hash(cell) = sha256 of the canonical JSON; group_of, family_of
    resolution             param_of(cell) -> Parameterization, algo_of(cell) -> learning rule
    assembly               assemble(cell, lrs, seeds) -> Run(data, param, algo, net, train)

``mulocal train``, ``coord``, ``derive`` and the sweep worker all go through :func:`assemble`; the
command-line flags are generated from :data:`FIELDS` and the rules' options (``cli/flags.py``).
"""
from __future__ import annotations

import hashlib
import json
import math
from dataclasses import dataclass, field
from typing import Any, Sequence

from .algos import check_algo, defaults_of, make_algo, options_of
from .errors import ConfigError, check_choice
from .param import ADAMW_HINT, BASE_WIDTH, preset
from .util import COMPILE_MODES, DEFAULT_LR  # noqa: F401 (the command line reads them here)

DTYPES = ("float32", "float64", "tf32")  # tf32: float32 tensors, TensorFloat-32 products on a GPU (TrainConfig.tf32)
GROUPS = ("learning rule", "parameterization", "model", "data", "training")
ZOO_ARCHS = ("vgg5", "vgg7")  # zoo.py's nets (built through the adapter; kept here so config imports no torch)
INPUT_SHAPES = {"fashion-mnist": (1, 28, 28), "mnist": (1, 28, 28), "cifar10": (3, 32, 32), "synthetic": (32,)}


@dataclass(frozen=True)
class Field:
    """One field of a run: its kind (how a value is checked), default, help text and group."""

    name: str
    kind: str  # str | bool | int (>= 1) | int? (>= 1 or None) | int0 (>= 0) | float | lr (> 0)
    default: Any
    help: str
    group: str
    off: str = ""  # bool fields: the help of the --no-... flag
    # A field added after stores exist sets implicit=True: a cell leaves it out while it is at its default, so
    # every existing cell keeps its hash (old stores resume with nothing rerun) and only new values are new cells.
    implicit: bool = False

    @property
    def flag(self) -> str:
        return "--" + self.name.replace("_", "-")


# The order is the order in which a sweep iterates its axes; a cell's hash does not depend on it.
FIELDS: dict[str, Field] = {f.name: f for f in (
    Field("algo", "str", "bp", "learning rule: bp, pc, tp, dtp or gnt", "learning rule"),
    Field("param", "str", "mup", "parameterization preset: mup, sp, gnt, mup-bL1", "parameterization"),
    Field("optimizer", "str", "sgd", "sgd or adam (the preset's exponents are for it)", "parameterization"),
    Field("gamma_bar_L", "float", 0.0, "PC output energy weight gamma_L = gamma'_L m^-gbar_L (muP with SGD shifts "
          "its LR exponents by it; 0 = SGD-like, -1 = Gauss-Newton-like)", "parameterization"),
    Field("base_width", "int", BASE_WIDTH, "width at which every preset equals SP", "parameterization"),
    Field("arch", "str", "mlp", "mlp, cnn, resmlp, rescnn (residual MLP / CNN with depth-muP: docs/depth.md), vgg5 "
          "or vgg7 (PCX's VGG nets, channels = multiples of the width, 128 = full; their depth is fixed: --depth does "
          "not apply; docs/conv.md)", "model"),
    Field("depth", "int", 3, "number of weight layers", "model"),
    Field("model", "str?", None, "your own model: package.module:factory, a function make(width) -> nn.Sequential "
          "(make(width, depth=...) if it takes depth); replaces --arch (docs/api.md, \"Your own model\")", "model",
          implicit=True),
    Field("activation", "str", "tanh", "tanh, relu or linear", "model"),
    Field("bias", "bool", True, "layers with biases", "model", off="layers without biases"),
    Field("loss", "str", "ce", "ce or mse", "learning rule"),
    Field("dtype", "str", "float32", "float32, float64, or tf32 (float32 with TensorFloat-32 matrix products and "
          "convolutions on a GPU: faster, ~1e-3 relative rounding; the same as float32 on the CPU)", "model"),
    Field("dataset", "str", "fashion-mnist", "fashion-mnist, mnist, cifar10 or synthetic", "data"),
    Field("train_subset", "int?", None, "use only this many training samples (default: all)", "data"),
    Field("test_subset", "int?", None, "use only this many test samples (default: all)", "data"),
    Field("data_seed", "int0", 0, "seed of the subset selection (and of the synthetic task)", "data"),
    Field("epochs", "int", 1, "epochs", "training"),
    Field("batch_size", "int", 128, "batch size", "training"),
    Field("max_steps", "int?", None, "stop each epoch after this many steps", "training"),
    Field("momentum", "float", 0.0, "SGD momentum", "training"),
    Field("weight_decay", "float", 0.0, "weight decay wd (>= 0): L2, or decoupled with --weight-decay-mode",
          "training"),
    Field("weight_decay_mode", "str", "l2", "l2 (wd * theta added to the gradient, not width-scaled) or decoupled "
          "(AdamW with --optimizer adam, SGDW with sgd: theta <- theta - lr_l (update + wd_l theta), wd_l = wd * "
          "m^-w; unless --wd-exponents, independent: lr_l wd_l = lr wd at every width)", "training", implicit=True),
    Field("adam_eps", "float", 1e-8, "Adam's epsilon at the base width (layer l: eps * m^-e, --eps-exponents)",
          "training", implicit=True),
    Field("diverge_factor", "float", 10.0, "a replica diverges when its loss exceeds this times its first-step "
          "loss, or is not finite (0: only non-finite)", "training", implicit=True),
)}
OPTION_KEYS = ("algo_options", "param_options")


# ------------------------------------------------------------------------------------------ values
def coerce(key: str, value, kind: str, what: str | None = None):
    """One value of field ``key``, checked and converted to its canonical type."""
    what = what or f"sweep key '{key}'"
    if kind == "str?" and (value is None or (isinstance(value, str) and value.lower() in ("none", ""))):
        return None
    if kind in ("str", "str?"):
        if not isinstance(value, str) or not value:
            raise ConfigError(f"{what} must be a non-empty string, got {value!r}")
        return value
    if kind == "bool":
        if isinstance(value, bool):
            return value
        if isinstance(value, str) and value.lower() in ("true", "false", "yes", "no", "1", "0"):
            return value.lower() in ("true", "yes", "1")
        raise ConfigError(f"{what} must be true or false, got {value!r}")
    if kind in ("int", "int?", "int0"):
        if kind == "int?" and (value is None or (isinstance(value, str) and value.lower() in ("none", "all", ""))):
            return None
        try:
            if isinstance(value, bool):
                raise ValueError
            v = int(value) if not isinstance(value, float) else (int(value) if value.is_integer() else None)
            if v is None:
                raise ValueError
        except (TypeError, ValueError):
            raise ConfigError(f"{what} must be an integer, got {value!r}") from None
        if v < (0 if kind == "int0" else 1):
            raise ConfigError(f"{what} must be {'non-negative' if kind == 'int0' else 'positive'}, got {v}")
        return v
    if kind in ("float", "lr"):
        try:
            if isinstance(value, bool):
                raise ValueError
            v = float(value)
        except (TypeError, ValueError):
            raise ConfigError(f"{what} must be a number, got {value!r}") from None
        if not math.isfinite(v) or (kind == "lr" and v <= 0):
            raise ConfigError(f"{what} must be {'positive and ' if kind == 'lr' else ''}finite, got {value!r}")
        return v
    raise AssertionError(kind)


def jsonable(value):
    """An option value as plain JSON (tuples become lists); anything else is a ConfigError."""
    if isinstance(value, (tuple, list)):
        return [jsonable(v) for v in value]
    if isinstance(value, dict):
        return {str(k): jsonable(v) for k, v in value.items()}
    if isinstance(value, float) and not math.isfinite(value):
        raise ConfigError(f"option values must be finite, got {value!r}")
    if value is None or isinstance(value, (bool, int, float, str)):
        return value
    raise ConfigError(f"option value {value!r} is not a number, string, boolean or list")


def default_cell(**values) -> dict:
    """A cell with every field at its default, then ``values`` (fields, options, width, lr, seed) applied."""
    cell = {k: f.default for k, f in FIELDS.items()}
    cell.update(algo_options={}, param_options={})
    unknown = set(values) - set(cell) - {"width", "lr", "seed"}
    if unknown:
        raise ConfigError(f"unknown run field(s) {', '.join(sorted(unknown))} (known: {', '.join(cell)})")
    cell.update(values)
    return cell


# ------------------------------------------------------------------------------------------ identity
def canonical_json(obj) -> str:
    """Key-sorted, compact JSON: the same configuration always gives the same text."""
    return json.dumps(obj, sort_keys=True, separators=(",", ":"), allow_nan=False)


def config_hash(obj) -> str:
    """A cell's identity in a store: the SHA-256 of its canonical JSON."""
    return hashlib.sha256(canonical_json(obj).encode()).hexdigest()


def group_of(cell: dict) -> dict:
    """The group configuration of a cell: everything but ``lr`` and ``seed`` (trained as one batched model)."""
    return {k: v for k, v in cell.items() if k not in ("lr", "seed")}


def family_of(cell: dict, axis: str = "width") -> dict:
    """The family of a cell: everything but ``lr``, ``seed`` and the transfer axis (``width``, or ``depth``):
    one set of transfer curves."""
    return {k: v for k, v in cell.items() if k not in ("lr", "seed", axis)}


# ------------------------------------------------------------------------------------------ resolution
def _param_overrides(opts: dict) -> dict:
    return {k: tuple(v) if isinstance(v, list) else v for k, v in opts.items()}


def param_of(cell: dict):
    """The cell's Parameterization: its preset for (optimizer, gbar_L, algo), base width, then overrides."""
    try:
        return preset(cell["param"], cell["optimizer"], gamma_bar_L=cell["gamma_bar_L"], algo=cell["algo"],
                      base_width=cell["base_width"], **_param_overrides(cell.get("param_options") or {}))
    except TypeError as e:
        raise ConfigError(f"param_options {cell.get('param_options')}: {e}") from None


def algo_of(cell: dict):
    """The cell's learning rule with its options and loss."""
    try:
        return make_algo(cell["algo"], loss=cell["loss"], **(cell.get("algo_options") or {}))
    except TypeError as e:
        raise ConfigError(f"learning rule '{cell['algo']}' does not take option(s) {sorted(cell['algo_options'])}: "
                          f"{e}") from None


def resolved_param(cell: dict) -> dict:
    """What the cell's preset resolves to (recorded in the cell: a preset that changes meaning changes the hash)."""
    d = param_of(cell).to_dict()
    d.pop("note", None)
    d.pop("optimizer", None)  # the cell's own field; recorded here it would change every stored hash
    return jsonable(d)


def _net_facts(cell: dict) -> tuple[bool, int, str, int]:
    """(residual net, weight units, arch and depth for ``cell_facts``): a user's model, a zoo net or a native one."""
    if cell.get("model"):
        from .adapter import structure
        residual, units, conv = structure(cell["model"], INPUT_SHAPES[cell["dataset"]], param_of(cell).base_width,
                                          cell["depth"])
        return residual, units, "cnn" if conv else "mlp", 3
    if cell["arch"] in ZOO_ARCHS:
        from .zoo import weight_layers
        return False, weight_layers(cell["arch"]), "cnn", 3
    from .nets import RESIDUAL_ARCHS
    return cell["arch"] in RESIDUAL_ARCHS and cell["depth"] > 2, cell["depth"], cell["arch"], cell["depth"]


def resolved_algo(cell: dict) -> dict:
    """The learning rule's constructor defaults with the cell's options and loss applied (recorded likewise)."""
    given = cell.get("algo_options") or {}
    out = defaults_of(cell["algo"])
    out.update(given, loss=cell["loss"])
    resolve = getattr(check_algo(cell["algo"]), "resolve_options", None)  # what "auto" options become on this net
    facts = getattr(check_algo(cell["algo"]), "cell_facts", None)  # what the rule's numbers mean on this net
    if resolve is not None or facts is not None:
        residual, units, kind, depth = _net_facts(cell)
        if resolve is not None:
            out = resolve(out, residual, units, param_of(cell))
        if facts is not None:
            out.update(facts(out, kind, depth))
    keep = getattr(check_algo(cell["algo"]), "hash_defaults", lambda o: ())(out)  # the rule's say
    for name, o in options_of(cell["algo"]).items():  # implicit options at their default: as before they existed
        if o.implicit and name not in given and name not in keep:
            out.pop(name, None)
    safe = {}
    for k, v in out.items():
        try:
            safe[k] = jsonable(v)
        except ConfigError:
            safe[k] = repr(v)
    return safe


def validate(cell: dict) -> tuple:
    """Raise ConfigError for a configuration that cannot run, before anything trains; else return its
    (Parameterization, learning rule)."""
    from .datafiles import DATASETS
    from .losses import check_loss
    from .nets import ACTIVATIONS, ARCHS
    from .optim import OPTIMIZERS, check_hyper
    for key, allowed in (("arch", ARCHS), ("activation", ACTIVATIONS), ("dtype", DTYPES), ("dataset", DATASETS),
                         ("optimizer", OPTIMIZERS)):
        check_choice(key, cell[key], allowed, hint=ADAMW_HINT if cell[key] == "adamw" else "")
    check_hyper(*(cell.get(k, FIELDS[k].default) for k in ("adam_eps", "weight_decay", "weight_decay_mode")))
    check_algo(cell["algo"])
    check_loss(cell["loss"])
    if cell.get("model"):
        from .adapter import load_factory
        load_factory(cell["model"])
    if cell["depth"] < 2:
        raise ConfigError(f"depth must be at least 2, got {cell['depth']}")
    if not 0 <= cell["momentum"] < 1:
        raise ConfigError(f"momentum must be in [0, 1), got {cell['momentum']}")
    return param_of(cell), algo_of(cell)


def check_device(device: str) -> str:
    """A device torch can use here, or one clear ConfigError."""
    import torch
    name = str(device)
    kind = name.split(":")[0]
    if kind not in ("cpu", "cuda"):
        raise ConfigError(f"unknown device '{name}'; choose cpu or cuda")
    if kind == "cuda" and not torch.cuda.is_available():
        raise ConfigError(f"--device {name} asked for, but no CUDA device is available")
    return name


# ------------------------------------------------------------------------------------------ data
_DATA: dict[tuple, Any] = {}


def load_data(cell: dict, data_dir=None, download: bool = True, val_fraction: float = 0.0, cache: bool = True):
    """The cell's dataset (subsets and seed from the cell); loaded once per process when ``cache``."""
    from .data import load_dataset
    key = (cell["dataset"], None if data_dir is None else str(data_dir), cell["train_subset"], cell["test_subset"],
           cell["data_seed"], bool(download), float(val_fraction))
    if cache and key in _DATA:
        return _DATA[key]
    data = load_dataset(cell["dataset"], data_dir, train_subset=cell["train_subset"], test_subset=cell["test_subset"],
                        val_fraction=val_fraction, seed=cell["data_seed"], download=download)
    if cache:
        if len(_DATA) >= 4:
            _DATA.pop(next(iter(_DATA)))
        _DATA[key] = data
    return data


# ------------------------------------------------------------------------------------------ assembly
@dataclass
class Run:
    """Everything one run (K replicas: one learning rate and one seed each) is made of."""

    cell: dict
    data: Any
    param: Any
    algo: Any
    net: Any  # None when the cell has no width (coordinate checks build one per width: build_net)
    train: Any  # TrainConfig
    seeds: list[int] = field(default_factory=list)
    device: str = "cpu"
    loggers: list = field(default_factory=list)  # loggers.Logger sinks the trainer reports to

    def build_net(self, width: int, param=None, bias: bool | None = None, K: int | None = None,
                  seeds: Sequence[int] | None = None, depth: int | None = None):
        """The cell's model at ``width`` (``param`` / ``bias`` / ``depth`` override the cell's, e.g. for the
        exponent fitter and the depth checks)."""
        from .nets import build
        c = self.cell
        seeds = list(self.seeds if seeds is None else seeds)
        if c["arch"] in ZOO_ARCHS and not c.get("model"):  # zoo.py's nets, run through the adapter
            from . import zoo
            from .adapter import ModuleNet
            fixed = zoo.weight_layers(c["arch"])
            for d in (c["depth"], depth):
                if d is not None and d not in (FIELDS["depth"].default, fixed):
                    raise ConfigError(f"--depth does not apply to {c['arch']} (its {fixed} weight layers are fixed), "
                                      f"got depth {d}: leave it at its default")
            make = zoo.factory(c["arch"], self.data.input_shape, c["activation"], self.data.n_classes,
                               c["bias"] if bias is None else bias)
            return ModuleNet(make, self.data.input_shape, width, param or self.param, K=K or len(seeds), seeds=seeds,
                             dtype=torch_dtype(c["dtype"]), device=self.device, spec=f"mulocal.zoo:{c['arch']}")
        if c.get("model"):
            from .adapter import ModuleNet, load_factory
            return ModuleNet(load_factory(c["model"]), self.data.input_shape, width, param or self.param,
                             K=K or len(seeds), seeds=seeds, dtype=torch_dtype(c["dtype"]), device=self.device,
                             depth=c["depth"] if depth is None else depth, spec=c["model"])
        return build(c["arch"], self.data.input_shape, self.data.n_classes, width, param or self.param,
                     depth=c["depth"] if depth is None else depth, activation=c["activation"],
                     bias=c["bias"] if bias is None else bias,
                     K=K or len(seeds), seeds=seeds, dtype=torch_dtype(c["dtype"]), device=self.device)

    def trainer(self):
        from .train import Trainer
        return Trainer(self.net, self.algo, self.data, self.train, seeds=self.seeds, loggers=self.loggers,
                       cell=self.cell)


def torch_dtype(name: str):
    """The tensor dtype of a ``dtype`` field value (tf32 tensors are float32)."""
    import torch
    return torch.float32 if name == "tf32" else getattr(torch, name)


def assemble(cell: dict, lrs: Sequence[float], seeds: Sequence[int], *, device: str = "cpu", data=None,
             data_dir=None, download: bool = True, val_fraction: float = 0.0, eval_batch_size: int = 2000,
             progress: bool = False, metrics_path: str | None = None, checkpoint_path: str | None = None,
             resume: bool = False, compile: str = "off", loggers=()) -> Run:
    """Build a run from a cell: data -> parameterization -> learning rule -> net (at ``cell["width"]``, K =
    len(seeds) replicas, replica k with learning rate ``lrs[k]`` and seed ``seeds[k]``) -> training config.

    ``data`` skips loading (the sweep worker caches datasets); the other keywords are how to run, not what
    (``loggers``: ``loggers.Logger`` sinks of the trainer: TensorBoard, MLflow, W&B).
    """
    from .train import TrainConfig
    cell = default_cell(**{k: v for k, v in cell.items() if k not in ("param_resolved", "algo_resolved")})
    seeds, lrs = [int(s) for s in seeds], [float(v) for v in lrs]
    if len(lrs) != len(seeds):
        raise ConfigError(f"need one learning rate per replica: got {len(lrs)} learning rates for {len(seeds)} seeds")
    param, algo = validate(cell)
    device = check_device(device)
    if data is None:
        data = load_data(cell, data_dir, download, val_fraction)
    train = TrainConfig(epochs=cell["epochs"], batch_size=cell["batch_size"], lr=lrs, optimizer=cell["optimizer"],
                        momentum=cell["momentum"], weight_decay=cell["weight_decay"],
                        weight_decay_mode=cell["weight_decay_mode"], adam_eps=cell["adam_eps"],
                        max_steps=cell["max_steps"],
                        diverge_factor=cell["diverge_factor"] or None,
                        eval_batch_size=eval_batch_size, progress=progress, metrics_path=metrics_path,
                        checkpoint_path=checkpoint_path, resume=resume, compile=compile, tf32=cell["dtype"] == "tf32")
    run = Run(cell, data, param, algo, None, train, seeds, device, list(loggers))
    if cell.get("width") is not None:
        run.net = run.build_net(cell["width"])
    return run


__all__ = ["DEFAULT_LR", "DTYPES", "FIELDS", "Field", "GROUPS", "OPTION_KEYS", "Run", "assemble", "canonical_json",
           "check_device", "coerce", "config_hash", "default_cell", "family_of", "group_of", "jsonable", "load_data",
           "param_of", "algo_of", "resolved_param", "resolved_algo", "validate"]
