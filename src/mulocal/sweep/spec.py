"""Sweep specs: keys -> a value or a list of values; the sweep is the cross product of all lists.

``widths``, ``lrs`` and ``seeds`` are lists; every other key is a field of a run (``config.FIELDS``:
``algo``, ``param``, ``optimizer``, ``epochs``, ...) and may be either. ``algo_options`` (options of the
learning rule, optionally scoped per algorithm: ``{"T": [1, 4]}`` or ``{"pc": {"T": [1, 4]}}``) and
``param_options`` (field overrides of the parameterization preset) are swept the same way; a list value
is an axis, so a literal list option is written as a list of one list (``kappa = [[0.5, 0.5]]``).

A spec file (TOML; flags given on the command line override its values)::

    [sweep]
    algo = ["bp", "pc"]
    param = ["mup", "sp"]
    widths = [64, 128, 256, 512]
    lrs = [0.0625, 0.125, 0.25, 0.5, 1.0]
    seeds = [0, 1]
    dataset = "fashion-mnist"
    train_subset = 10000

    [sweep.algo_options.pc]     # PC only: two values of T, i.e. two PC families
    T = [1, 4]

    [run]                       # optional: store, executor, workers, threads, max_replicas, ...
    store = "runs/transfer.sqlite"
"""
from __future__ import annotations

import itertools
from pathlib import Path
from typing import Any

from ..config import FIELDS, OPTION_KEYS, coerce, config_hash, jsonable, resolved_algo, resolved_param
from ..errors import ConfigError

EXECUTORS = ("local", "ray")  # where a sweep's tasks run (executors.py)

LISTS = {"widths": "int", "lrs": "lr", "seeds": "int0"}
ALIASES = {"width": "widths", "lr": "lrs", "seed": "seeds", "algorithm": "algo", "parameterization": "param"}
RUN_KEYS = ("store", "executor", "workers", "threads", "ray_address", "max_replicas", "memory_budget_mb", "device",
            "data_dir", "eval_batch_size", "compile")


def _as_list(value) -> list:
    if isinstance(value, tuple):
        value = list(value)
    return value if isinstance(value, list) else [value]



def _known_algos() -> tuple[str, ...]:
    from ..algos import ALGOS
    return tuple(ALGOS)


def _norm_options(key: str, value, scoped: bool) -> dict[str, dict[str, list]]:
    """{scope: {option: [values]}}; scope '*' applies to every algorithm."""
    if value is None:
        return {"*": {}}
    if not isinstance(value, dict):
        raise ConfigError(f"sweep key '{key}' must be a table of options, got {value!r}")
    out: dict[str, dict[str, list]] = {"*": {}}
    for k, v in value.items():
        if k == "*" and isinstance(v, dict):  # already normalized
            out["*"].update({str(ok): [jsonable(x) for x in _as_list(ov)] for ok, ov in v.items()})
        elif scoped and isinstance(v, dict):
            if k not in _known_algos():
                raise ConfigError(f"{key}: '{k}' is not a learning rule (known: {', '.join(_known_algos())})")
            out.setdefault(k, {}).update({str(ok): [jsonable(x) for x in _as_list(ov)] for ok, ov in v.items()})
        else:
            vals = _as_list(v)
            if not vals:
                raise ConfigError(f"{key}: option '{k}' has an empty list of values")
            out["*"][str(k)] = [jsonable(x) for x in vals]
    return out


def normalize_spec(raw: dict) -> dict:
    """Check a spec's keys and values; every axis becomes a list of canonical values."""
    if not isinstance(raw, dict):
        raise ConfigError(f"a sweep spec must be a table of keys, got {type(raw).__name__}")
    spec: dict[str, Any] = {}
    for key, value in raw.items():
        k = str(key).replace("-", "_")
        k = ALIASES.get(k, k)
        if k in spec:
            raise ConfigError(f"sweep key '{key}' is given twice")
        if k in OPTION_KEYS:
            spec[k] = _norm_options(k, value, scoped=(k == "algo_options"))
            continue
        if k not in FIELDS and k not in LISTS:
            known = ", ".join(list(LISTS) + list(FIELDS) + list(OPTION_KEYS))
            raise ConfigError(f"unknown sweep key '{key}' (known: {known})")
        kind = LISTS.get(k) or FIELDS[k].kind
        vals = _as_list(value)
        if not vals:
            raise ConfigError(f"sweep key '{key}' has an empty list")
        vals = [coerce(k, v, kind) for v in vals]
        spec[k] = list(dict.fromkeys(vals))  # drop repeats, keep order
    for k in ("widths", "lrs"):
        if k not in spec:
            flag = "--" + k
            raise ConfigError(f"the sweep needs {k} ({flag} ... on the command line, or {k} = [...] in the spec)")
    spec.setdefault("seeds", [0])
    for k, f in FIELDS.items():
        spec.setdefault(k, [f.default])
    for k in OPTION_KEYS:
        spec.setdefault(k, {"*": {}})
    return spec


def _grid(options: dict[str, list]) -> list[dict]:
    keys = sorted(options)
    return [dict(zip(keys, combo)) for combo in itertools.product(*(options[k] for k in keys))]


def expand(spec: dict) -> list[dict]:
    """All cells of a spec (configuration dicts with ``width``, ``lr``, ``seed``), without repeats.

    Each cell also records what its preset and learning rule resolve to (``param_resolved``: the
    parameterization's fields; ``algo_resolved``: the rule's options with their defaults), so a cell's hash
    changes when the library changes what a preset name or a default means, and old results are not reused.
    """
    s = normalize_spec(spec)
    keys = list(FIELDS)
    cells, seen = [], set()
    for combo in itertools.product(*(s[k] for k in keys)):
        base = {k: v for k, v in zip(keys, combo) if not (FIELDS[k].implicit and v == FIELDS[k].default)}
        ao_all = s["algo_options"]
        ao = {**ao_all.get("*", {}), **ao_all.get(base["algo"], {})}
        for algo_opts in _grid(ao):
            for param_opts in _grid(s["param_options"].get("*", {})):
                g = {**base, "algo_options": algo_opts, "param_options": param_opts}
                g.update(param_resolved=resolved_param(g), algo_resolved=resolved_algo(g))
                for w, lr, seed in itertools.product(s["widths"], s["lrs"], s["seeds"]):
                    cell = {**g, "width": w, "lr": lr, "seed": seed}
                    h = config_hash(cell)
                    if h not in seen:
                        seen.add(h)
                        cells.append(cell)
    return cells


def load_spec_file(path) -> tuple[dict, dict]:
    """Read a TOML spec: its ``[sweep]`` table (the axes) and optional ``[run]`` table (store, executor, ...)."""
    p = Path(path)
    try:
        text = p.read_text()
    except OSError as e:
        raise ConfigError(f"cannot read sweep spec {p}: {e.strerror or e}") from None
    try:
        import tomllib
    except ImportError:  # Python 3.10
        try:
            import tomli as tomllib
        except ImportError:
            raise ConfigError("reading a TOML spec needs Python >= 3.11 or `pip install tomli`") from None
    try:
        doc = tomllib.loads(text)
    except Exception as e:  # tomllib.TOMLDecodeError
        raise ConfigError(f"{p} is not valid TOML: {e}") from None
    extra = set(doc) - {"sweep", "run"}
    if extra:
        raise ConfigError(f"{p}: unknown top-level key(s) {', '.join(sorted(extra))}: put the axes in a [sweep] "
                          f"table and run options in a [run] table")
    if "sweep" not in doc or not isinstance(doc["sweep"], dict):
        raise ConfigError(f"{p} has no [sweep] table")
    run = doc.get("run", {})
    if not isinstance(run, dict):
        raise ConfigError(f"{p}: [run] must be a table")
    bad = set(run) - set(RUN_KEYS)
    if bad:
        raise ConfigError(f"{p}: unknown [run] key(s) {', '.join(sorted(bad))} (known: {', '.join(RUN_KEYS)})")
    return doc["sweep"], run




__all__ = ["ALIASES", "LISTS", "RUN_KEYS", "expand", "load_spec_file", "normalize_spec"]
