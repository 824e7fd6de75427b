"""Using a trained model: rebuild a checkpoint's net, evaluate it, and export one replica as plain PyTorch.

An exported replica k is a ``torch.nn.Sequential`` of ``torch.nn`` modules (``Flatten``, ``Linear``, ``Conv2d``,
``Tanh`` / ``ReLU`` / ``Identity``, ``MaxPool2d`` / ``AvgPool2d``) with the muP multipliers folded into its
weights: a layer computing ``u = mult * W a + b`` becomes ``Linear`` / ``Conv2d`` with weight ``mult * W`` and bias
``b``; a residual block ``h + a_l (mult W phi(h) + b)`` (``layers.Branch``: ``mult`` already carries a_l) becomes
``Residual(Sequential(phi, Linear))`` with weight ``mult * W`` and bias ``a_l b``, where ``Residual`` is the
four-line module ``x + inner(x)`` (its source is in :func:`module_source`, which builds the whole model with
``torch.nn`` alone). Two formats:

    state-dict   ``torch.save(module.state_dict())``: load it into the model that :func:`module_source` builds
    program      ``torch.export`` of the module (batch size free): ``torch.export.load(path).module()(x)``, no
                 model code needed at all

Neither needs mulocal to load. Inputs are the dataset's (B, C, H, W) images or (B, features) vectors in the
checkpoint's dtype; outputs are the logits f of replica k.
"""
from __future__ import annotations

import torch
from torch import nn

from .checkpoint import read_checkpoint
from .errors import CheckpointError, ConfigError, check_choice
from .nets import CNN, MLP, Net, ResCNN, ResMLP
from .param import Parameterization
from .train import evaluate
from .util import EXPORT_FORMATS

FORMATS = EXPORT_FORMATS


class Residual(nn.Module):
    """``x + inner(x)``: a residual block (the one module of an export that is not in ``torch.nn``)."""

    def __init__(self, inner: nn.Module):
        super().__init__()
        self.inner = inner

    def forward(self, x):
        return x + self.inner(x)


RESIDUAL_SOURCE = '''class Residual(nn.Module):
    def __init__(self, inner):
        super().__init__()
        self.inner = inner

    def forward(self, x):
        return x + self.inner(x)
'''


# ------------------------------------------------------------------------------------------ the net
def net_from_checkpoint(ck: dict, device: str = "cpu") -> Net:
    """The net a checkpoint was written for (its architecture, parameterization and dtype), with its weights."""
    c = ck["net"]
    try:
        param = Parameterization(**ck["param"])
        common = dict(param=param, activation=c["activation"], bias=c["bias"], K=c["K"], dtype=ck["state"][0].dtype,
                      device=device)
        shape, width, out, depth = tuple(c["in_shape"]), c["width"], c["out_dim"], c["depth"]
        kind = c["kind"]
        if kind in ("mlp", "resmlp"):
            net = (MLP if kind == "mlp" else ResMLP)(shape, width, out, depth, **common)
        elif kind == "cnn":
            net = CNN(shape, width, out, depth, kernel=c["kernel"], pool=c["pool"], **common)
        elif kind == "rescnn":
            net = ResCNN(shape, width, out, depth, kernel=c["kernel"], pool=c["pool"], in_pool=c["in_pool"], **common)
        else:
            raise CheckpointError(f"unknown architecture '{kind}' in the checkpoint")
    except (KeyError, TypeError, IndexError) as err:
        raise CheckpointError(f"the checkpoint does not describe its net ({type(err).__name__}: {err})") from None
    net.load_state(ck["state"])
    return net


def load_net(path: str, device: str = "cpu") -> tuple[Net, dict]:
    """(the net of the checkpoint at ``path``, the checkpoint's contents)."""
    ck = read_checkpoint(path)
    return net_from_checkpoint(ck, device), ck


def check_replica(ck: dict, replica: int) -> int:
    """``replica`` if the checkpoint has it and it did not diverge (a diverged replica's weights are zeroed)."""
    K = ck["net"]["K"]
    if isinstance(replica, bool) or not isinstance(replica, int) or not 0 <= replica < K:
        raise ConfigError(f"replica {replica} is out of range: the checkpoint has {K} replica(s), 0..{K - 1}")
    status = (ck.get("status") or ["?"] * K)[replica]
    if status == "diverged":
        raise ConfigError(f"replica {replica} diverged during training (its weights were zeroed): export another")
    return replica


# ------------------------------------------------------------------------------------------ plain torch
def _act(name: str) -> nn.Module:
    return {"tanh": nn.Tanh, "relu": nn.ReLU, "linear": nn.Identity}[name]()


def _pool(kind: str, size: int) -> nn.Module:
    return nn.MaxPool2d(size) if kind == "max" else nn.AvgPool2d(size)


def _folded(layer, k: int) -> nn.Module:
    """Replica k of a ``nets`` layer as ``nn.Linear`` / ``nn.Conv2d``: weight mult * W, bias (a_l) b."""
    w = layer.weight[k].detach().cpu() * layer.mult
    b = None if layer.bias is None else layer.bias[k].detach().cpu() * getattr(layer, "branch", 1.0)
    if w.dim() == 2:
        m = nn.Linear(w.shape[1], w.shape[0], bias=b is not None, dtype=w.dtype)
    else:
        m = nn.Conv2d(w.shape[1], w.shape[0], w.shape[-1], padding=w.shape[-1] // 2, bias=b is not None,
                      dtype=w.dtype)
    with torch.no_grad():
        m.weight.copy_(w)
        if b is not None:
            m.bias.copy_(b)
    return m


def plain_module(net: Net, k: int) -> nn.Sequential:
    """Replica ``k`` of ``net`` as an ``nn.Sequential`` of ``torch.nn`` modules (and ``Residual``), the muP
    multipliers folded into its weights; its output equals ``net(x)[k]`` up to float rounding."""
    if not 0 <= k < net.K:
        raise ConfigError(f"replica {k} is out of range: the net has {net.K} replica(s)")
    mods: list[nn.Module] = []
    L = net.depth
    if net.kind == "rescnn" and net.in_pool > 1:
        mods.append(nn.AvgPool2d(net.in_pool))
    if net.kind in ("mlp", "resmlp"):
        mods.append(nn.Flatten())
    for l, layer in enumerate(net.layers, start=1):
        if net.residual(l):
            mods.append(Residual(nn.Sequential(_act(net.activation), _folded(layer, k))))
            continue
        if l > 1:  # the activity a_{l-1} = post(l - 1, u_{l-1}) this layer reads: phi (CNNs: pooled, flattened)
            mods.append(_act(net.activation))
            if net.kind in ("cnn", "rescnn"):
                mods.append(_pool(net.pool, 2))
                if l == L:
                    mods.append(nn.Flatten())
        mods.append(_folded(layer, k))
    return nn.Sequential(*mods).eval()


def module_source(module: nn.Sequential) -> str:
    """Python source that builds ``module``'s structure with ``torch`` alone (``model = ...``), for loading its
    state dict without mulocal."""
    def line(m: nn.Module) -> str:
        if isinstance(m, Residual):
            return f"Residual(nn.Sequential({', '.join(line(c) for c in m.inner)}))"
        if isinstance(m, nn.Linear):
            return f"nn.Linear({m.in_features}, {m.out_features}, bias={m.bias is not None})"
        if isinstance(m, nn.Conv2d):
            return (f"nn.Conv2d({m.in_channels}, {m.out_channels}, {m.kernel_size[0]}, padding={m.padding[0]}, "
                    f"bias={m.bias is not None})")
        if isinstance(m, (nn.MaxPool2d, nn.AvgPool2d)):
            return f"nn.{type(m).__name__}({m.kernel_size})"
        return f"nn.{type(m).__name__}()"
    dtype = str(next(module.parameters()).dtype)
    body = ",\n    ".join(line(m) for m in module)
    residual = RESIDUAL_SOURCE + "\n\n" if any(isinstance(m, Residual) for m in module) else ""
    return f"import torch\nfrom torch import nn\n\n{residual}model = nn.Sequential(\n    {body},\n).to({dtype})\n"


def export(net: Net, k: int, path: str, fmt: str = "state-dict") -> nn.Sequential:
    """Write replica ``k`` of ``net`` to ``path`` in ``fmt`` (FORMATS); returns the plain module."""
    check_choice("export format", fmt, FORMATS)
    module = plain_module(net, k)
    if fmt == "state-dict":
        torch.save(module.state_dict(), path)
    else:
        x = torch.zeros(2, *net.input_shape, dtype=net.dtype)
        batch = torch.export.Dim("batch")
        program = torch.export.export(module, (x,), dynamic_shapes=({0: batch},))
        torch.export.save(program, path)
    return module


# ------------------------------------------------------------------------------------------ evaluation
def evaluate_checkpoint(net: Net, ck: dict, data, loss: str = "ce", batch_size: int = 2000) -> list[dict]:
    """Test loss and accuracy of every replica of a checkpoint's net on ``data``'s test set (status: "trained",
    or "diverged": its weights were zeroed when it diverged)."""
    if tuple(data.input_shape) != tuple(net.input_shape) or data.n_classes != net.out_dim:
        raise ConfigError(f"the dataset '{data.name}' has inputs {tuple(data.input_shape)} and {data.n_classes} "
                          f"classes, the checkpoint's net takes {tuple(net.input_shape)} and has {net.out_dim}")
    res = evaluate(net, data.x_test, data.y_test, loss, batch_size)
    seeds = ck.get("seeds") or [None] * net.K
    lrs = ck.get("lrs") or [None] * net.K
    status = ["diverged" if s == "diverged" else "trained" for s in ck.get("status") or ["?"] * net.K]
    return [{"replica": k, "seed": seeds[k], "lr": lrs[k], "status": status[k], "test_loss": res["loss"][k],
             "test_accuracy": res["accuracy"][k]} for k in range(net.K)]


__all__ = ["FORMATS", "Residual", "check_replica", "evaluate_checkpoint", "export", "load_net", "module_source",
           "net_from_checkpoint", "plain_module"]
