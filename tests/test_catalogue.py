"""The mutation catalogue stays in step with the code (``./run.sh mutants`` would otherwise stop on a stale entry,
or a find text occurring twice would plant the bug in the wrong place)."""
from pathlib import Path

try:
    import tomllib
except ModuleNotFoundError:  # Python 3.10: the tomli backport (a dependency there)
    import tomli as tomllib

ROOT = Path(__file__).resolve().parents[1]


def test_every_planted_bug_fits_the_code_once():
    mutants = tomllib.loads((ROOT / "tests" / "mutants" / "catalogue.toml").read_text())["mutant"]
    ids = [m["id"] for m in mutants]
    assert len(ids) == len(set(ids)), "duplicate mutant ids"
    for m in mutants:
        text = (ROOT / m["file"]).read_text()
        assert text.count(m["find"]) == 1, f"{m['id']}: its find text occurs {text.count(m['find'])} times"
        assert m["replace"] != m["find"], m["id"]
        for focus in m.get("focus", []):
            assert (ROOT / focus.split("::")[0]).exists(), f"{m['id']}: focus {focus} does not exist"
