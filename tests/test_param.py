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


def test_gamma_L():
    p = preset("mup", "sgd").with_(gamma_bar_L=1.0, gamma_L_prime=2.0)
    assert p.gamma_L(256) == pytest.approx(2.0 / 4)
