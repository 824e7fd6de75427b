"""Named models written as plain ``nn.Sequential`` factories, run through the adapter (``adapter.ModuleNet``).

    vgg5(width, in_shape)   4 convs (3 x 3, channels w, 2w, 4w, 4w), each followed by the activation and 2 x 2 max
                            pooling, then a linear readout: PCX's VGG-5 at width 128 (128, 256, 512, 512)
    vgg7(width, in_shape)   6 convs (w, w, 2w, 2w, 4w, 4w), pooling after the 1st, 3rd and 5th, the 4th and 6th
                            unpadded; then a linear readout: PCX's VGG-7 at width 128

The definitions are those of PCX's benchmark (Pinchetti et al., ICLR 2025, "Benchmarking predictive coding
networks -- made simple"), read from its example scripts (``examples/discriminative_experiments/VGG5`` and ``VGG7``
of the PCX repository: ``ConvNet``): every block is conv -> activation -> pool (pooling after the activation), no
batch norm, no dropout, biases on. Channels are multiples of ``width``: ``width = 128`` is the full net,
``width = 32`` the quarter-channel one (docs/conv.md). ``mulocal train --arch vgg5`` builds ``vgg5`` for the
dataset's input shape with the cell's activation and bias (``config.Run.build_net``); the cell's ``depth`` does not
apply (the depth is fixed).

Inputs: 3 x 32 x 32 (CIFAR-10) gives PCX's nets exactly (VGG-5 readout fan-in 4w x 2 x 2, VGG-7 4w x 1 x 1).
1 x 28 x 28 (FashionMNIST): VGG-5 as written (maps 28 -> 14 -> 7 -> 3 -> 1, readout fan-in 4w); VGG-7's two
unpadded convs would shrink a 28 x 28 image to nothing (7 -> 5 -> pool 2 -> a 3 x 3 valid conv on 2 x 2), so where
that happens the first of them (the 4th conv) is padded: maps 28 -> 14 -> 14 -> 7 -> 7 -> 3 -> 1, readout fan-in
4w x 1 x 1 as on CIFAR-10. Any other (C, H, W) is accepted when its maps do not vanish (else one ConfigError line).
"""
from __future__ import annotations

from typing import Sequence

from torch import nn

from .errors import ConfigError, check_choice

# (channel multiple of width, 2 x 2 max pooling after the activation, padding of the 3 x 3 conv): PCX's blocks
VGG_BLOCKS = {
    "vgg5": ((1, True, 1), (2, True, 1), (4, True, 1), (4, True, 1)),
    "vgg7": ((1, True, 1), (1, False, 1), (2, True, 1), (2, False, 0), (4, True, 1), (4, False, 0)),
}
ZOO = tuple(VGG_BLOCKS)  # the architectures ``--arch`` builds through the adapter
KERNEL = 3
ACTIVATION_MODULES = {"tanh": nn.Tanh, "relu": nn.ReLU, "linear": nn.Identity, "gelu": nn.GELU,
                      "hardtanh": nn.Hardtanh}


def _activation(name: str) -> nn.Module:
    return ACTIVATION_MODULES[check_choice("activation", name, ACTIVATION_MODULES, where="for a zoo net")]()


def _check_shape(arch: str, in_shape) -> tuple[int, int, int]:
    try:
        shape = tuple(int(s) for s in in_shape)
    except (TypeError, ValueError):
        raise ConfigError(f"{arch} needs an image input shape (C, H, W), got {in_shape!r}") from None
    if len(shape) != 3 or min(shape) < 1:
        raise ConfigError(f"{arch} needs image inputs (C, H, W), got shape {tuple(in_shape)}")
    return shape


def _out_side(n: int, pad: int, pool: bool) -> int:
    n = n + 2 * pad - KERNEL + 1
    return n // 2 if pool else n


def vgg_plan(arch: str, in_shape: Sequence[int]) -> tuple[list[tuple[int, bool, int]], tuple[int, int]]:
    """The blocks of ``arch`` for ``in_shape`` as (channel multiple, pool, padding), with the padding of PCX's
    unpadded convs raised to 1 where the maps would vanish (the first such conv first), and the spatial size of
    the last map (h, w)."""
    check_choice("zoo architecture", arch, ZOO)
    _, h, w = _check_shape(arch, in_shape)
    blocks = [list(b) for b in VGG_BLOCKS[arch]]
    unpadded = [i for i, b in enumerate(blocks) if b[2] == 0]
    while True:
        hh, ww = h, w
        ok = True
        for _, pool, pad in blocks:
            if hh + 2 * pad < KERNEL or ww + 2 * pad < KERNEL:
                ok = False
                break
            hh, ww = _out_side(hh, pad, pool), _out_side(ww, pad, pool)
            if hh < 1 or ww < 1:
                ok = False
                break
        if ok:
            return [tuple(b) for b in blocks], (hh, ww)
        if not unpadded:
            raise ConfigError(f"{arch} pools a {tuple(in_shape)} image to nothing: it needs larger inputs "
                              f"(28 x 28 or 32 x 32 work)")
        blocks[unpadded.pop(0)][2] = 1


def vgg(arch: str, width: int, in_shape: Sequence[int] = (1, 28, 28), activation: str = "relu",
        n_classes: int = 10, bias: bool = True) -> nn.Sequential:
    """PCX's VGG-5 / VGG-7 (module docstring) as a plain ``nn.Sequential``: conv(3 x 3) -> activation [-> 2 x 2
    max pool] per block, flatten, a linear readout; channels ``multiple * width``."""
    if isinstance(width, bool) or not isinstance(width, int) or width < 1:
        raise ConfigError(f"the width of {arch} must be a positive integer (channels are multiples of it), "
                          f"got {width!r}")
    blocks, (h, w) = vgg_plan(arch, in_shape)
    c = int(in_shape[0])
    mods: list[nn.Module] = []
    for mult, pool, pad in blocks:
        mods += [nn.Conv2d(c, mult * width, KERNEL, padding=pad, bias=bias), _activation(activation)]
        if pool:
            mods.append(nn.MaxPool2d(2))
        c = mult * width
    mods += [nn.Flatten(), nn.Linear(c * h * w, int(n_classes), bias=bias)]
    return nn.Sequential(*mods)


def vgg5(width: int, in_shape: Sequence[int] = (1, 28, 28), activation: str = "relu", n_classes: int = 10,
         bias: bool = True) -> nn.Sequential:
    """PCX's VGG-5: conv(w) conv(2w) conv(4w) conv(4w), each -> activation -> 2 x 2 max pool; flatten; linear."""
    return vgg("vgg5", width, in_shape, activation, n_classes, bias)


def vgg7(width: int, in_shape: Sequence[int] = (1, 28, 28), activation: str = "relu", n_classes: int = 10,
         bias: bool = True) -> nn.Sequential:
    """PCX's VGG-7: conv(w) pool, conv(w), conv(2w) pool, conv(2w) unpadded, conv(4w) pool, conv(4w) unpadded
    (each conv -> activation [-> pool]); flatten; linear."""
    return vgg("vgg7", width, in_shape, activation, n_classes, bias)


def factory(arch: str, in_shape: Sequence[int], activation: str = "relu", n_classes: int = 10, bias: bool = True):
    """``make(width) -> nn.Sequential`` of a zoo architecture for one input shape (what ``ModuleNet`` takes)."""
    check_choice("zoo architecture", arch, ZOO)
    _activation(activation)
    vgg_plan(arch, in_shape)  # a ConfigError now, not inside the adapter's reading
    shape = tuple(int(s) for s in in_shape)

    def make(width: int) -> nn.Sequential:
        return vgg(arch, width, shape, activation, n_classes, bias)

    make.__name__ = make.__qualname__ = arch
    return make


def weight_layers(arch: str) -> int:
    """Number of weight layers of ``arch`` (convs + the readout): 5 for vgg5, 7 for vgg7."""
    check_choice("zoo architecture", arch, ZOO)
    return len(VGG_BLOCKS[arch]) + 1


def sizes(arch: str, in_shape: Sequence[int], out_dim: int, width: int, bias: bool = True) -> tuple[int, int]:
    """(parameters, activations per sample) of one replica of ``arch`` (memory planning; ``nets.sizes``):
    the values are the conv outputs (before pooling) and the readout's."""
    blocks, (h, w) = vgg_plan(arch, in_shape)
    c, hh, ww = (int(s) for s in in_shape)
    params = acts = 0
    for mult, pool, pad in blocks:
        out = mult * width
        params += c * KERNEL * KERNEL * out + out * bias
        hh, ww = hh + 2 * pad - KERNEL + 1, ww + 2 * pad - KERNEL + 1
        acts += out * hh * ww
        if pool:
            hh, ww = hh // 2, ww // 2
        c = out
    fan = c * h * w
    return params + fan * out_dim + out_dim * bias, acts + out_dim


__all__ = ["ACTIVATION_MODULES", "VGG_BLOCKS", "ZOO", "factory", "sizes", "vgg", "vgg5", "vgg7", "vgg_plan",
           "weight_layers"]
