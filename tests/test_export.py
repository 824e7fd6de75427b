"""Using a trained model: `mulocal export` (replica k as plain PyTorch, the muP multipliers folded in) and
`mulocal eval` (a checkpoint on a dataset, per replica).

The exported files are loaded in a subprocess where importing mulocal fails, and their logits compared with
mulocal's own forward pass of that replica."""
import json
import subprocess
import sys

import pytest
import torch

from mulocal.algos import make_algo
from mulocal.cli import main
from mulocal.data import Dataset
from mulocal.nets import build
from mulocal.param import preset
from mulocal.train import Trainer, TrainConfig
from tolerances import chain_rtol

ARCHS = {"mlp": 3, "cnn": 3, "resmlp": 6, "rescnn": 5}  # depth; the residual ones with a branch multiplier != 1
K, REPLICA, WIDTH = 3, 1, 16


def _images(seed=0, n=48):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, 1, 8, 8, generator=g, dtype=torch.float64)
    y = torch.randint(0, 10, (n,), generator=g)
    return Dataset("images", x[:32], y[:32], x[32:], y[32:], 10)


def _trained(arch, dtype, path):
    """A net of ``arch`` whose every layer has a forward multiplier != 1 (a = (0.5, 0.25, 0.5) at m = 1/4) and whose
    biases are not zero (two training steps), checkpointed at ``path``."""
    param = preset("mup").with_(a=(0.5, 0.25, 0.5))
    data = _images()
    net = build(arch, data.input_shape, 10, WIDTH, param, depth=ARCHS[arch], K=K, seeds=[3, 4, 5], dtype=dtype)
    assert all(layer.mult != 1 for layer in net.layers)
    Trainer(net, make_algo("bp"), data, TrainConfig(epochs=1, batch_size=16, max_steps=2, lr=[0.05, 0.1, 0.2],
                                                    checkpoint_path=str(path), progress=False), seeds=[3, 4, 5]).run()
    assert all(layer.bias[REPLICA].abs().max() > 0 for layer in net.layers)
    return net, data


LOADER = r"""
import importlib.abc, json, sys
class NoMulocal(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path=None, target=None):
        if name.split(".")[0] == "mulocal":
            raise ImportError("mulocal must not be needed to load an export")
sys.meta_path.insert(0, NoMulocal())
import torch
jobs = json.load(open(sys.argv[1]))
out = {}
for name, job in jobs.items():
    x = torch.load(job["x"], weights_only=True)
    if job["format"] == "state-dict":
        scope = {}
        exec(job["source"], scope)
        model = scope["model"]
        model.load_state_dict(torch.load(job["out"], weights_only=True))
    else:
        model = torch.export.load(job["out"]).module()
    with torch.no_grad():
        out[name] = model(x)
assert "mulocal" not in sys.modules
torch.save(out, sys.argv[2])
"""


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    """Every arch in float64 (both formats) and float32 (state dict): mulocal's logits of the replica, and the
    exported files' logits computed without mulocal."""
    tmp = tmp_path_factory.mktemp("export")
    jobs, want, depth = {}, {}, {}
    for arch in ARCHS:
        for dtype, formats in ((torch.float64, ("state-dict", "program")), (torch.float32, ("state-dict",))):
            name = f"{arch}-{str(dtype)[6:]}"
            net, data = _trained(arch, dtype, tmp / f"{name}.pt")
            x = data.x_test.to(dtype)
            torch.save(x, tmp / f"{name}-x.pt")
            with torch.no_grad():
                want[name] = net(x)[REPLICA]
            depth[name] = net.depth * (max(layer.fan_in for layer in net.layers) + 4)  # the forward's chain
            for fmt in formats:
                out = tmp / f"{name}-{fmt}.bin"
                res = _main_json(["export", "--checkpoint", str(tmp / f"{name}.pt"), "--replica", str(REPLICA),
                                  "--out", str(out), "--format", fmt, "--json"])
                assert res["replica"] == REPLICA and res["format"] == fmt and res["dtype"] == str(dtype)[6:]
                jobs[f"{name}/{fmt}"] = {"x": str(tmp / f"{name}-x.pt"), "format": fmt, "out": str(out),
                                         "source": res.get("source")}
    (tmp / "jobs.json").write_text(json.dumps(jobs))
    p = subprocess.run([sys.executable, "-c", LOADER, str(tmp / "jobs.json"), str(tmp / "got.pt")],
                       capture_output=True, text=True, timeout=300)
    assert p.returncode == 0, p.stderr
    return want, torch.load(tmp / "got.pt", weights_only=True), depth


def _main_json(argv):
    import contextlib
    import io
    buf = io.StringIO()
    with contextlib.redirect_stdout(buf):
        rc = main(argv)
    assert rc == 0
    return json.loads(buf.getvalue())


@pytest.mark.parametrize("arch", list(ARCHS))
@pytest.mark.parametrize("fmt", ["state-dict", "program"])
def test_exported_float64_logits_equal_mulocals(exported, arch, fmt):
    """Folding mult into W (one rounding of W) and torch.nn's kernels instead of mulocal's batched ones: the
    forward pass's chain of roundings, a dot product of the widest fan-in per layer (tests/tolerances.py), relative
    to the logits' scale; well under 1e-10. Another replica's weights or a multiplier left out moves them by O(1)."""
    want, got, chain = exported
    f, g = want[f"{arch}-float64"], got[f"{arch}-float64/{fmt}"]
    assert g.dtype == torch.float64 and g.shape == f.shape
    assert (g - f).abs().max() <= min(1e-10, chain_rtol(torch.float64, chain[f"{arch}-float64"])) * f.abs().max()


@pytest.mark.parametrize("arch", list(ARCHS))
def test_exported_float32_logits_equal_mulocals_to_rounding(exported, arch):
    """The same in float32: the same chain of roundings, float32's unit roundoff."""
    want, got, chain = exported
    f, g = want[f"{arch}-float32"], got[f"{arch}-float32/state-dict"]
    assert g.dtype == torch.float32 and g.shape == f.shape
    assert (g - f).abs().max() <= chain_rtol(torch.float32, chain[f"{arch}-float32"]) * f.abs().max()


def test_eval_equals_the_last_epoch_of_training_and_the_exported_replica(tmp_path, capsys):
    """`mulocal eval` reads the dataset from the checkpoint and reports each replica's test loss and accuracy: those
    of training's last epoch; the exported replica's plain-torch predictions give the same accuracy."""
    from mulocal.data import load_dataset
    ck = tmp_path / "c.pt"
    args = ["train", "--dataset", "synthetic", "--width", "16", "--lrs", "0.05,0.2", "--seeds", "1,2", "--epochs", "2",
            "--train-subset", "256", "--test-subset", "100", "--checkpoint", str(ck), "--json", "--no-progress"]
    trained = _main_json(args)
    ev = _main_json(["eval", "--checkpoint", str(ck), "--json"])
    assert ev["dataset"] == "synthetic" and ev["test_samples"] == 100 and ev["epoch"] == 2
    for r, t in zip(ev["replicas"], trained["replicas"]):
        assert (r["replica"], r["seed"], r["lr"], r["status"]) == (t["replica"], t["seed"], t["lr"], "trained")
        assert r["test_loss"] == t["test_loss"] and r["test_accuracy"] == t["test_accuracy"]
    _main_json(["export", "--checkpoint", str(ck), "--replica", "1", "--out", str(tmp_path / "m.pt"), "--json"])
    data = load_dataset("synthetic", train_subset=256, test_subset=100, seed=0)
    model = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(32, 16), torch.nn.Tanh(), torch.nn.Linear(16, 16),
                                torch.nn.Tanh(), torch.nn.Linear(16, 10))
    model.load_state_dict(torch.load(tmp_path / "m.pt", weights_only=True))
    with torch.no_grad():
        acc = (model(data.x_test).argmax(-1) == data.y_test).double().mean().item()
    assert acc == ev["replicas"][1]["test_accuracy"]
    # a checkpoint that does not say its dataset (written before it was kept) needs --dataset
    old = torch.load(ck, weights_only=False)
    del old["cell"]
    torch.save(old, tmp_path / "old.pt")
    assert main(["eval", "--checkpoint", str(tmp_path / "old.pt")]) == 2
    assert "give --dataset" in capsys.readouterr().err
    ev2 = _main_json(["eval", "--checkpoint", str(tmp_path / "old.pt"), "--dataset", "synthetic", "--test-subset",
                      "100", "--json"])
    assert [r["test_accuracy"] for r in ev2["replicas"]] == [r["test_accuracy"] for r in ev["replicas"]]


def _one_line(argv, capsys) -> str:
    try:
        rc = main(argv)
    except SystemExit as e:  # argparse's own refusals
        rc = e.code
    err = [line for line in capsys.readouterr().err.splitlines() if line.strip()]
    assert rc == 2 and len(err) == 1, err
    return err[0]


def test_bad_input_is_one_line_and_status_2(tmp_path, capsys):
    ck = tmp_path / "c.pt"
    assert main(["train", "--dataset", "synthetic", "--width", "8", "--lrs", "0.1,1e4", "--seeds", "0,1",
                 "--train-subset", "128", "--batch-size", "16", "--test-subset", "32", "--checkpoint", str(ck),
                 "--json", "--no-progress"]) == 0
    capsys.readouterr()
    assert "no checkpoint at" in _one_line(["eval", "--checkpoint", str(tmp_path / "none.pt")], capsys)
    assert "no checkpoint at" in _one_line(["export", "--checkpoint", str(tmp_path / "none.pt"), "--out",
                                            str(tmp_path / "m.pt")], capsys)
    assert "out of range" in _one_line(["export", "--checkpoint", str(ck), "--replica", "2", "--out",
                                        str(tmp_path / "m.pt")], capsys)
    assert "diverged" in _one_line(["export", "--checkpoint", str(ck), "--replica", "1", "--out",
                                    str(tmp_path / "m.pt")], capsys)
    assert "invalid choice" in _one_line(["export", "--checkpoint", str(ck), "--out", str(tmp_path / "m.pt"),
                                          "--format", "onnx"], capsys)
    assert "is a folder" in _one_line(["export", "--checkpoint", str(ck), "--out", str(tmp_path)], capsys)
    assert "has inputs" in _one_line(["eval", "--checkpoint", str(ck), "--dataset", "fashion-mnist",
                                      "--no-download"], capsys)
    (tmp_path / "junk.pt").write_bytes(b"junk")
    assert "cannot read checkpoint" in _one_line(["eval", "--checkpoint", str(tmp_path / "junk.pt")], capsys)
    assert not (tmp_path / "m.pt").exists()
