"""The run description: one assemble() for every command, rule options declared once, generated flags, the
import graph without circles, ``python -m mulocal``."""
import ast
import json
import subprocess
import sys
from pathlib import Path

import pytest
import mulocal
import torch

from mulocal.algos import ALGOS, defaults_of, options_of
from mulocal.config import FIELDS, assemble, config_hash, default_cell
from mulocal.errors import ConfigError
from mulocal.nets import build
from mulocal.param import preset

SRC = Path(mulocal.__file__).resolve().parent  # the package under test (a mutated copy in the mutation check)


def test_declared_options_are_the_constructor_defaults():
    """A rule's OPTIONS (flags, sweep checks) and its constructor agree on names and defaults."""
    for name in ALGOS:
        declared, ctor = options_of(name), defaults_of(name)
        assert set(declared) <= set(ctor), name
        assert set(ctor) - set(declared) <= {"loss", "record", "seed"}, name
        for k, o in declared.items():
            assert o.default == ctor[k], (name, k)


def test_assemble_builds_what_the_parts_build(synth):
    cell = default_cell(algo="pc", param="mup", optimizer="adam", gamma_bar_L=1.0, base_width=8, width=32,
                        dataset="synthetic", dtype="float64", epochs=2, batch_size=32,
                        algo_options={"T": 3, "inference": "parallel"}, param_options={"gamma_L_prime": 2.0})
    run = assemble(cell, [0.1, 0.2], [4, 5], data=synth)
    p = preset("mup", "adam", gamma_bar_L=1.0, algo="pc", base_width=8, gamma_L_prime=2.0)
    assert run.param == p
    assert (run.algo.T, run.algo.inference, run.algo.loss) == (3, "parallel", "ce")
    net = build("mlp", synth.input_shape, synth.n_classes, 32, p, K=2, seeds=[4, 5], dtype=torch.float64)
    assert all(torch.equal(a, b) for a, b in zip(run.net.params(), net.params()))
    assert (run.train.epochs, run.train.batch_size, run.train.optimizer, list(run.train.lr)) == (2, 32, "adam",
                                                                                                 [0.1, 0.2])
    with pytest.raises(ConfigError, match="does not take option"):
        assemble({**cell, "algo": "bp"}, [0.1], [0], data=synth)
    with pytest.raises(ConfigError, match="unknown run field"):
        assemble({**cell, "widht": 3}, [0.1], [0], data=synth)
    with pytest.raises(ConfigError, match="one learning rate per replica"):
        assemble(cell, [0.1], [0, 1], data=synth)
    with pytest.raises(ConfigError, match="unknown device 'tpu'"):
        assemble(cell, [0.1], [0], data=synth, device="tpu")


def _parse(argv):
    from mulocal.cli import build_parser
    return build_parser().parse_args(argv)


def test_every_field_and_option_has_its_flag_in_train_and_sweep():
    helps = {c: subprocess.run([sys.executable, "-m", "mulocal", c, "--help"], capture_output=True, text=True,
                               env={"COLUMNS": "200", "PATH": ""}).stdout for c in ("train", "sweep", "coord")}
    for f in FIELDS.values():
        flag = ("--no-" + f.name.replace("_", "-")) if f.kind == "bool" else f.flag
        assert flag in helps["train"] and flag in helps["sweep"], flag
    for name in ALGOS:
        for o in options_of(name).values():
            assert all(o.cli in h for h in helps.values()), o.cli


def test_sweep_rule_option_flags_equal_algo_opt():
    """`sweep --T 1,2` sweeps PC's T (the same cells as --algo-opt pc.T=1,2); a flag of a rule not swept is an
    error."""
    from mulocal.cli.sweeps import spec_from_args
    from mulocal.sweep import expand
    base = ["sweep", "--dataset", "synthetic", "--widths", "8", "--lrs", "0.1", "--algo", "bp,pc"]
    a = spec_from_args(_parse(base + ["--T", "1,2", "--fpa"]))[0]
    b = spec_from_args(_parse(base + ["--algo-opt", "pc.T=1,2", "--algo-opt", "pc.fpa=true"]))[0]
    assert sorted(config_hash(c) for c in expand(a)) == sorted(config_hash(c) for c in expand(b))
    assert len(expand(a)) == 1 + 2
    with pytest.raises(Exception, match="applies to --algo"):
        spec_from_args(_parse(base + ["--feedback", "ridge"]))


def test_python_dash_m_mulocal_and_version():
    from mulocal import __version__
    p = subprocess.run([sys.executable, "-m", "mulocal", "--version"], capture_output=True, text=True)
    assert p.returncode == 0 and p.stdout.strip() == f"mulocal {__version__}"
    p = subprocess.run([sys.executable, "-m", "mulocal", "describe", "--width", "128", "--json"], capture_output=True,
                       text=True)
    assert p.returncode == 0 and json.loads(p.stdout)["width"] == 128


def _imports(path: Path) -> set[str]:
    """Modules of mulocal imported anywhere in a file (module level or inside functions)."""
    parts = path.relative_to(SRC.parent).with_suffix("").parts
    if path.name == "__init__.py":
        mod = pkg = ".".join(parts[:-1])
    else:
        mod, pkg = ".".join(parts), ".".join(parts[:-1])
    out = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom):
            if node.level:
                base = pkg.split(".")
                base = base[:len(base) - node.level + 1]
                target = ".".join(base + ([node.module] if node.module else []))
            else:
                target = node.module or ""
            names = [target] + [f"{target}.{a.name}" for a in node.names]
        elif isinstance(node, ast.Import):
            names = [a.name for a in node.names]
        else:
            continue
        out |= {n for n in names if n.startswith("mulocal")}
    return {n for n in out if n != mod}


def test_no_import_circle():
    files = {}
    for f in SRC.rglob("*.py"):
        if f.name == "__main__.py":
            continue
        mod = ".".join(f.relative_to(SRC.parent).with_suffix("").parts)
        files[mod[:-len(".__init__")] if mod.endswith(".__init__") else mod] = f
    graph = {m: {t for t in _imports(f) if t in files} for m, f in files.items()}
    state, stack = {}, []

    def visit(m):
        state[m] = 1
        stack.append(m)
        for t in graph[m]:
            if state.get(t) == 1:
                raise AssertionError("import circle: " + " -> ".join(stack[stack.index(t):] + [t]))
            if t not in state:
                visit(t)
        stack.pop()
        state[m] = 2
    for m in graph:
        if m not in state:
            visit(m)
