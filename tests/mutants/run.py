"""The mutation check: every planted bug of catalogue.toml must make the non-slow suite fail.

    python tests/mutants/run.py [--only ID[,ID...]] [--list] [--baseline] [--jobs N] [--catalogue PATH]

For each mutant: copy src/, tests/, docs/, README.md and pyproject.toml into a fresh temporary folder, replace
the mutant's ``find`` text (it must occur exactly once: the catalogue is kept in step with the code) by its
``replace`` text, check that the mutated package is the one imported, then run pytest there (the mutant's
``focus`` tests first, then the rest of the non-slow suite, each with -x). A mutant is caught when pytest
fails (a mutant that does not import, or breaks collection, is "caught (collection)"). Prints a table (mutant,
caught by, seconds, why) and ``caught N/M``; exits 1 if any survives, 2 when the check itself is broken: a
catalogue that does not match the code, a focus test that does not exist, or the mutated module imported from
outside the copy (then every mutant would look caught or survive for the wrong reason).
"""
from __future__ import annotations

import argparse
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
try:
    import tomllib
except ModuleNotFoundError:  # Python 3.10: the tomli backport (a dependency there)
    import tomli as tomllib
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
COPY = ("src", "tests", "docs", "README.md", "pyproject.toml")
PYTEST = ["-q", "-x", "-p", "no:cacheprovider", "-m", "not slow", "-rf"]


def load(path: Path) -> list[dict]:
    mutants = tomllib.loads(path.read_text())["mutant"]
    ids = [m["id"] for m in mutants]
    dup = {i for i in ids if ids.count(i) > 1}
    if dup:
        sys.exit(f"mutants: duplicate ids {sorted(dup)}")
    return mutants


def prepare(m: dict, where: Path) -> None:
    for name in COPY:
        src = ROOT / name
        if src.is_dir():
            shutil.copytree(src, where / name, ignore=shutil.ignore_patterns("__pycache__", "*.egg-info"))
        elif src.exists():
            shutil.copy2(src, where / name)
    target = where / m["file"]
    text = target.read_text()
    n = text.count(m["find"])
    if n != 1:
        raise LookupError(f"mutant {m['id']}: its find text occurs {n} times in {m['file']} (must be once): "
                          "update the catalogue")
    target.write_text(text.replace(m["find"], m["replace"]))


def pytest(where: Path, args: list[str], env: dict) -> tuple[int, str]:
    p = subprocess.run([sys.executable, "-m", "pytest", *PYTEST, *args], cwd=where, env=env, capture_output=True,
                       text=True)
    return p.returncode, p.stdout + p.stderr


def caught_by(out: str) -> str:
    m = re.search(r"^(?:FAILED|ERROR) (\S+)", out, re.M)
    return m.group(1) if m else "collection / import error"


class SetupError(Exception):
    """The check itself is broken (not the mutant): abort rather than count a mutant as caught."""


def module_of(path: str) -> str | None:
    parts = Path(path).with_suffix("").parts
    if parts[:1] != ("src",) or path[-3:] != ".py":
        return None
    return ".".join(p for p in parts[1:] if p != "__init__")


def run_one(m: dict) -> tuple[str, float]:
    """(what caught it, or "SURVIVED"; seconds)."""
    t0 = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="mutant-") as tmp:
        where = Path(tmp)
        prepare(m, where)
        env = {**os.environ, "PYTHONPATH": str(where / "src"), "PYTHONDONTWRITEBYTECODE": "1"}
        # the mutated module itself must be imported from the copy (the venv's editable install points elsewhere)
        mod = module_of(m["file"]) or "mulocal"
        probe = subprocess.run([sys.executable, "-c", f"import {mod} as m; print(m.__file__)"], cwd=where,
                               env=env, capture_output=True, text=True)
        if probe.returncode != 0:  # the mutant does not even import: a collection error of every test
            last = probe.stderr.strip().splitlines()[-1:] or ["?"]
            return f"caught (collection: {last[0][:60]})", time.perf_counter() - t0
        if not Path(probe.stdout.strip()).resolve().is_relative_to(where.resolve()):
            raise SetupError(f"mutant {m['id']}: {mod} is imported from {probe.stdout.strip()}, not from the copy "
                             f"{where}: the check would test the unmutated code")
        focus = list(m.get("focus", []))
        runs = ([focus] if focus else []) + [[*(f"--deselect={f}" for f in focus), "tests"]]
        for args in runs:  # the likely catchers first (fast), then everything else
            rc, out = pytest(where, args, env)
            if rc == 1:
                return caught_by(out), time.perf_counter() - t0
            if rc in (2, 3):  # interrupted by a collection error / internal error
                return f"caught (collection: {caught_by(out)})", time.perf_counter() - t0
            if rc != 0:  # 4: usage error (a focus test that does not exist), 5: nothing collected
                raise SetupError(f"mutant {m['id']}: pytest {' '.join(args)} exited {rc} (not a test failure): "
                                 f"update its focus\n{out[-1500:]}")
    return "SURVIVED", time.perf_counter() - t0


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--catalogue", default=str(Path(__file__).with_name("catalogue.toml")))
    ap.add_argument("--only", default=None, help="comma-separated mutant ids")
    ap.add_argument("--list", action="store_true", help="list the catalogue and exit")
    ap.add_argument("--baseline", action="store_true", help="first check that the unmutated suite passes")
    ap.add_argument("--jobs", type=int, default=1, help="mutants checked at once (default 1: the suite uses the cores)")
    args = ap.parse_args(argv)
    mutants = load(Path(args.catalogue))
    if args.list:
        for m in mutants:
            print(f"{m['id']:<28} {m['file']:<34} {m['why']}")
        return 0
    if args.only:
        want = args.only.split(",")
        unknown = set(want) - {m["id"] for m in mutants}
        if unknown:
            print(f"mutants: unknown id(s) {sorted(unknown)}", file=sys.stderr)
            return 2
        mutants = [m for m in mutants if m["id"] in want]
    if args.baseline:
        rc, out = pytest(ROOT, ["tests"], {**os.environ, "PYTHONPATH": str(ROOT / "src")})
        if rc != 0:
            print("mutants: the unmutated suite fails; fix it first\n" + out[-2000:], file=sys.stderr)
            return 2
    for m in mutants:  # a stale catalogue fails now, not after an hour
        text = (ROOT / m["file"]).read_text() if (ROOT / m["file"]).exists() else ""
        if text.count(m["find"]) != 1:
            print(f"mutants: mutant {m['id']}: its find text occurs {text.count(m['find'])} times in {m['file']} "
                  "(must be once): update the catalogue", file=sys.stderr)
            return 2
    print(f"{'mutant':<28} {'caught by':<70} {'seconds':>7}  why", flush=True)
    rows = {}

    def one(m):
        by, sec = run_one(m)
        rows[m["id"]] = (by, sec)
        if args.jobs <= 1:
            print(f"{m['id']:<28} {by:<70} {sec:6.1f}s  {m['why']}", flush=True)

    try:
        if args.jobs <= 1:
            for m in mutants:
                one(m)
        else:
            from concurrent.futures import ThreadPoolExecutor
            with ThreadPoolExecutor(args.jobs) as pool:
                list(pool.map(one, mutants))
            for m in mutants:
                print(f"{m['id']:<28} {rows[m['id']][0]:<70} {rows[m['id']][1]:6.1f}s  {m['why']}")
    except (LookupError, SetupError) as e:
        print(f"mutants: {e}", file=sys.stderr)
        return 2
    survived = [i for i, (by, _) in rows.items() if by == "SURVIVED"]
    print(f"caught {len(rows) - len(survived)}/{len(rows)}" + (f"; survived: {', '.join(survived)}" if survived else ""))
    return 1 if survived else 0


if __name__ == "__main__":
    sys.exit(main())
