"""Parameterization: presets, validation and the readable description."""
import pytest

from mulocal.errors import ConfigError
from mulocal.param import Parameterization, preset


def test_presets_tables():
    assert preset("mup", "sgd").c == (-1, 0, 1) and preset("mup", "sgd").b == (0, 0.5, 1)
    assert preset("mup", "adam").c == (0, 1, 1)
    assert preset("sp").b == (0, 0.5, 0.5) and preset("sp").c == (0, 0, 0)
    assert preset("mup-adam").name == "mup-adam"


@pytest.mark.parametrize("bad", [dict(b=(0, 0.5)), dict(c=(0, float("nan"), 1)), dict(base_width=0),
                                 dict(base_width=-3), dict(sigma=0.0), dict(a="abc")])
def test_invalid_fields(bad):
    with pytest.raises(ConfigError):
        Parameterization(**bad)


def test_invalid_names_and_widths():
    with pytest.raises(ConfigError, match="unknown parameterization preset 'nope'"):
        preset("nope")
    with pytest.raises(ConfigError, match="optimizer"):
        preset("mup", "rmsprop")
    with pytest.raises(ConfigError, match="width"):
        preset("mup").rule("hidden", 10, 0)
    with pytest.raises(ConfigError, match="width"):
        preset("mup").width_mult(-5)
    with pytest.raises(ConfigError, match="invalid parameterization field"):
        preset("mup", bogus=1)


def test_describe_lists_resolved_numbers():
    text = preset("mup", "sgd").describe(256, lr=0.1)
    assert "m = 4" in text
    lines = [line.split() for line in text.splitlines() if line.strip().startswith(("1 ", "2 ", "3 "))]
    assert [float(x[5]) for x in lines] == pytest.approx([0.4, 0.1, 0.025])  # lr * m^-c


def test_describe_states_the_residual_blocks_depth_factors():
    """At depth H > 3 the table adds a residual block's branch multiplier d^-alpha and branch LR (d = (H - 2) /
    (H_0 - 2) = 16 at H = 18): 16^-1/2 = 0.25, the width LR unchanged under SGD (c_H = 0), / 4 under Adam (c_H = 1/2)."""
    sgd = preset("mup", "sgd").describe(256, depth=18, lr=0.1)
    assert "d = 16 blocks" in sgd and "a = d^-0.5 = 0.25," in sgd and "its LR 0.1 (x d^-0)" in sgd
    adam = preset("mup", "adam").describe(256, depth=18, lr=0.1)
    assert "its LR 0.00625 (x d^-0.5)" in adam  # 0.1 x m^-1 (hidden c = 1, m = 4) x 16^-1/2
    assert "residual net" not in preset("mup", "sgd").describe(256, lr=0.1)


def test_gamma_L():
    p = preset("mup", "sgd").with_(gamma_bar_L=1.0, gamma_L_prime=2.0)
    assert p.gamma_L(256) == pytest.approx(2.0 / 4)


# ----------------------------------------------------------------------------- the README's preset table
# (preset, optimizer, algo, gbar) -> (b, c, c_bias, gbar_L), written from the table by hand.
H = 0.5
PRESET_ROWS = [
    ("sp", "sgd", "bp", 0.0, (0, H, H), (0, 0, 0), (0, 0), 0.0),
    ("sp", "adam", "pc", 0.0, (0, H, H), (0, 0, 0), (0, 0), 0.0),
    ("mup", "sgd", "bp", 0.0, (0, H, 1), (-1, 0, 1), (-1, 0), 0.0),
    ("mup", "sgd", "pc", -1.0, (0, H, 1), (0, 1, 2), (0, 1), -1.0),
    ("mup", "sgd", "pc", 0.0, (0, H, 1), (-1, 0, 1), (-1, 0), 0.0),
    ("mup", "sgd", "pc", 1.0, (0, H, 1), (-2, -1, 0), (-2, -1), 1.0),
    ("mup", "adam", "bp", 0.0, (0, H, 1), (0, 1, 1), (0, 0), 0.0),
    ("mup", "adam", "pc", -1.0, (0, H, 1), (0, 1, 1), (0, 0), -1.0),
    ("mup", "adam", "pc", 1.0, (0, H, 1), (0, 1, 1), (0, 0), 1.0),
    ("gnt", "sgd", "pc", 0.0, (0, H, 1), (0, 1, 2), (0, 1), -1.0),
    ("gnt", "adam", "pc", 0.0, (0, H, 1), (0, 1, 1), (0, 0), -1.0),
    ("mup", "sgd", "tp", 0.0, (0, H, H), (0, 1, 1), (0, 0), 0.0),
    ("mup", "adam", "tp", 0.0, (0, H, H), (0, 1, 1), (0, 0), 0.0),
    ("mup", "sgd", "dtp", 0.0, (0, H, H), (0, 1, 1), (0, 0), 0.0),
    ("mup", "adam", "dtp", 0.0, (0, H, H), (0, 1, 1), (0, 0), 0.0),
    ("mup", "sgd", "gnt", 0.0, (0, H, H), (0, 1, 1), (0, 0), 0.0),
    ("mup-bL1", "sgd", "dtp", 0.0, (0, H, 1), (0, 1, 1), (0, 0), 0.0),
    ("mup-bL1", "adam", "tp", 0.0, (0, H, 1), (0, 1, 1), (0, 0), 0.0),
]


@pytest.mark.parametrize("name,opt,algo,gbar,b,c,cb,gbar_L", PRESET_ROWS,
                         ids=[f"{r[0]}-{r[1]}-{r[2]}-g{r[3]:g}" for r in PRESET_ROWS])
def test_every_preset_row(name, opt, algo, gbar, b, c, cb, gbar_L):
    """b, c, c_bias and gamma_L of each preset, and what they resolve to at m = 4 (width 256, base 64):
    init std fan_in^-1/2 m^-(b - b_SP), learning-rate scale m^-c, gamma_L = m^-gbar_L."""
    p = preset(name, opt, gamma_bar_L=gbar, algo=algo)
    assert p.b == pytest.approx(b) and p.c == pytest.approx(c) and p.c_bias == pytest.approx(cb)
    assert p.gamma_bar_L == gbar_L and p.gamma_L(256) == pytest.approx(4.0 ** -gbar_L)
    assert p.base_width == 64 and p.a == (0, 0, 0)
    b_sp = (0, H, H)
    for r, (role, fan_in) in enumerate((("input", 784), ("hidden", 256), ("output", 256))):
        rule = p.rule(role, fan_in, 256)
        assert rule.init_std == pytest.approx(fan_in ** -0.5 * 4.0 ** -(b[r] - b_sp[r]))
        assert rule.lr_scale == pytest.approx(4.0 ** -c[r])
        assert rule.bias_lr_scale == pytest.approx(4.0 ** -cb[1 if role == "output" else 0])
        assert rule.multiplier == 1.0
    if algo in ("tp", "dtp", "gnt") and name == "mup":  # feedback: g_L b = 0, c = 0; hidden g_l b = 1/2, c = 1
        assert p.feedback_b == (0, H, H) and p.feedback_c == (0, 1, 1)
        assert p.feedback_rule("input", 10, 256).lr_scale == 1.0
        assert p.feedback_rule("hidden", 256, 256).lr_scale == pytest.approx(0.25)
        assert p.feedback_rule("hidden", 256, 256).init_std == pytest.approx(256 ** -0.5)


def _readme_table():
    """The README's preset table, its expressions in g evaluated (g = PC's gbar_L)."""
    from pathlib import Path
    text = (Path(__file__).resolve().parents[1] / "README.md").read_text()
    rows = [line for line in text.splitlines() if line.startswith("| `")]
    out = {}
    for line in rows:
        cells = [c.strip() for c in line.strip("|").split("|")]
        if len(cells) == 4 and cells[1].startswith("("):
            out[cells[0]] = tuple(cells[1:])
    return out


def _eval(cell: str, g: float) -> tuple:
    parts = cell.replace("*", "").strip()[1:-1].split(",")
    return tuple(float(eval(part.replace("g", f"({g})"), {})) for part in parts)  # numbers, g and +-/ only


def test_readme_preset_table_matches_presets():
    table = _readme_table()
    assert len(table) == 6, table
    for key, row in table.items():
        if key.startswith("`sp`"):
            cases = [preset("sp", "sgd")]
        elif "--algo tp" in key:
            cases = [preset("mup", o, algo=a) for o in ("sgd", "adam") for a in ("tp", "dtp", "gnt")]
        elif key.startswith("`mup-bL1`"):
            cases = [preset("mup-bL1", o, algo="dtp") for o in ("sgd", "adam")]
        elif key.startswith("`gnt`"):
            cases = [preset("gnt", "sgd")]
        elif "adam" in key:
            cases = [preset("mup", "adam", gamma_bar_L=g) for g in (-1.0, 0.0, 1.0)]
        else:
            cases = [preset("mup", "sgd", gamma_bar_L=g) for g in (-1.0, 0.0, 1.0)]
        for p in cases:
            g = p.gamma_bar_L
            assert (p.b, p.c, p.c_bias) == (_eval(row[0], g), _eval(row[1], g), _eval(row[2], g)), (key, p)
