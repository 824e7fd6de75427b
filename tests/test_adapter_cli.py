"""``--model package.module:factory`` on the command line: a user's model through train, describe, coord, sweep
(stored in the cell: a second run resumes with nothing rerun) and report; bad factories answered in one line, exit 2.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap

import pytest

from mulocal.config import INPUT_SHAPES, default_cell, resolved_algo

USER = textwrap.dedent("""
    from torch import nn

    def mlp(width):
        return nn.Sequential(nn.Linear(32, width), nn.Tanh(), nn.Linear(width, width), nn.Tanh(), nn.Linear(width, 10))

    class Block(nn.Module):
        def __init__(self, w):
            super().__init__()
            self.lin = nn.Linear(w, w)

        def forward(self, x):
            return x + self.lin(x.tanh())

    def resmlp(width, depth=4):
        return nn.Sequential(nn.Linear(32, width), *[Block(width) for _ in range(depth - 2)], nn.Tanh(),
                             nn.Linear(width, 10))
""")


def _cli(tmp_path, *args):
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(tmp_path), os.environ.get("PYTHONPATH", "")])}
    return subprocess.run([sys.executable, "-m", "mulocal.cli", *args], capture_output=True, text=True, timeout=600,
                          cwd=tmp_path, env=env)


@pytest.fixture
def user(tmp_path):
    (tmp_path / "usermodels.py").write_text(USER)
    return tmp_path


def test_train_describe_and_a_resumed_sweep_take_a_users_model(user):
    common = ["--model", "usermodels:mlp", "--dataset", "synthetic", "--epochs", "1", "--max-steps", "3"]
    p = _cli(user, "train", "--algo", "pc", "--width", "32", "--json", *common)
    assert p.returncode == 0, p.stderr
    out = json.loads(p.stdout)
    assert out["model"] == "usermodels:mlp" and out["status"] == "done"
    p = _cli(user, "describe", "--model", "usermodels:mlp", "--dataset", "synthetic", "--width", "128", "--json")
    assert p.returncode == 0, p.stderr
    rows = json.loads(p.stdout)["tensors"]
    assert [r["role"] for r in rows if r["tensor"] == "weight"] == ["input", "hidden", "output"]
    assert [r["fan_in"] for r in rows if r["tensor"] == "weight"] == [32, 128, 128]
    sweep = ["sweep", "--store", "st", "--widths", "32,64", "--lrs", "0.1", "--algo", "bp,pc", *common]
    p = _cli(user, *sweep)
    assert p.returncode == 0, p.stderr
    p = _cli(user, *sweep, "--json")
    assert p.returncode == 0, p.stderr
    assert json.loads(p.stdout)["ran"] == 0  # every cell found in the store: the model is part of the cell
    p = _cli(user, "report", "--store", "st", "--json")
    assert p.returncode == 0, p.stderr


def test_coord_takes_a_users_model(user):
    p = _cli(user, "coord", "--model", "usermodels:resmlp", "--dataset", "synthetic", "--widths", "32,64",
             "--algo", "pc", "--steps", "1", "--json")
    assert p.returncode == 0, p.stderr
    assert "max_abs_slope" in json.dumps(json.loads(p.stdout))


@pytest.mark.parametrize("spec,msg", [
    ("usermodels", "package.module:factory"),
    ("nomodule:f", "cannot import the model module 'nomodule'"),
    ("usermodels:nothing", "has no factory 'nothing'"),
])
def test_a_bad_model_is_one_line_and_exit_2(user, spec, msg):
    p = _cli(user, "train", "--model", spec, "--dataset", "synthetic", "--width", "32", "--epochs", "1")
    assert p.returncode == 2 and msg in p.stderr and "Traceback" not in p.stderr
    assert len(p.stderr.strip().splitlines()) == 1


def test_a_cell_records_what_pc_resolves_to_on_a_users_model(user, monkeypatch):
    """auto -> error on a model with residual units (the user's Block, found by probing), with the depth rule of
    its energy weights; sequential on a plain one."""
    monkeypatch.syspath_prepend(str(user))
    res = resolved_algo(default_cell(algo="pc", model="usermodels:resmlp", dataset="synthetic", depth=6))
    assert res["inference"] == "error" and res["gammas"] == "d^1"
    plain = resolved_algo(default_cell(algo="pc", model="usermodels:mlp", dataset="synthetic"))
    assert plain["inference"] == "sequential"


def test_input_shapes_are_the_datasets():
    from mulocal.data import load_dataset
    assert load_dataset("synthetic", None).input_shape == INPUT_SHAPES["synthetic"]
    assert set(INPUT_SHAPES) >= {"fashion-mnist", "mnist", "cifar10", "synthetic"}


def test_trained_conv_feedback_cells_of_a_users_model_record_the_position_mean(tmp_path, monkeypatch):
    """A user's conv model under DTP (trained feedback) records conv_fb_loss = position_mean, as the native CNN's
    cells do (tests/test_tp_conv_feedback.py); a user's MLP does not (its hash is as before the marker)."""
    (tmp_path / "userconv.py").write_text(textwrap.dedent("""
        from torch import nn

        def cnn(width):
            return nn.Sequential(nn.Conv2d(1, width, 3, padding=1), nn.Tanh(), nn.MaxPool2d(2),
                                 nn.Conv2d(width, width, 3, padding=1), nn.Tanh(), nn.MaxPool2d(2), nn.Flatten(),
                                 nn.Linear(width * 49, 10))

        def mlp(width):
            return nn.Sequential(nn.Flatten(), nn.Linear(784, width), nn.Tanh(), nn.Linear(width, 10))
    """))
    monkeypatch.syspath_prepend(str(tmp_path))
    conv = resolved_algo(default_cell(algo="dtp", model="userconv:cnn", dataset="fashion-mnist"))
    assert conv["conv_fb_loss"] == "position_mean"
    assert "conv_fb_loss" not in resolved_algo(default_cell(algo="dtp", model="userconv:mlp", dataset="fashion-mnist"))


def test_the_readmes_own_model_example_runs(tmp_path):
    """The README's "Your own model" example, as written (the model file and every command), on a small budget: the
    same commands with fewer widths, learning rates, samples and steps."""
    import re
    from pathlib import Path
    text = (Path(__file__).resolve().parents[1] / "README.md").read_text()
    section = text[text.index("### Your own model"):text.index("### Logging and using a trained model")]
    code = re.search(r"```python\n# mycnn.py\n(.*?)```", section, re.S).group(1)
    (tmp_path / "mycnn.py").write_text(code)
    bash = re.search(r"```bash\n(.*?)```", section, re.S).group(1).replace("\\\n", " ")
    small = {"--base-width 16 --widths 16,32,64": "--base-width 4 --widths 4,8", "--log2-lrs=-7:-2": "--log2-lrs=-3:-2",
             "--train-subset 4096": "--train-subset 256 --test-subset 256", "--width 256": "--width 16",
             "--width 128 --epochs 1": "--width 8 --epochs 1 --max-steps 3 --train-subset 256 --test-subset 256"}
    for line in bash.strip().splitlines():
        cmd = line.split("#")[0].split()
        assert cmd[0] == "mulocal"
        args = " ".join(cmd[1:])
        for a, b in small.items():
            args = args.replace(a, b)
        p = _cli(tmp_path, *args.split())
        assert p.returncode == 0, (args, p.stderr[-2000:])
    assert (tmp_path / "runs" / "mycnn" / "transfer.png").exists()


@pytest.mark.parametrize("arch", ["vgg5", "vgg7"])
def test_a_zoo_cell_records_its_own_net(arch):
    """A zoo net's cell records what its run takes: mupc's T = the model's number of weight layers (counted on the
    nn.Module), and TP's conv feedback loss (its units above the first are convs)."""
    from torch import nn
    from mulocal import zoo
    make = zoo.factory(arch, INPUT_SHAPES["fashion-mnist"], "relu", 10)
    layers = sum(isinstance(m, (nn.Conv2d, nn.Linear)) for m in make(8).modules())
    pc = resolved_algo(default_cell(algo="pc", arch=arch, dataset="fashion-mnist", algo_options={"inference": "mupc"}))
    assert pc["T"] == layers
    assert resolved_algo(default_cell(algo="dtp", arch=arch, dataset="fashion-mnist"))["conv_fb_loss"] == "position_mean"
