"""Models written as a user would write them (plain torch.nn), for the adapter's tests (tests/test_adapter.py).

``mlp``, ``cnn``, ``resmlp``, ``rescnn``: the native nets (nets.MLP / CNN / ResMLP / ResCNN) rewritten as
``nn.Sequential``. ``vgg``: a VGG-style conv net with max pooling and a strided conv; ``resnet``: a residual conv
net whose blocks hold two convolutions (``Block``: a user's own class, read as residual by probing). ``readout``
is the readout class (microsoft/mup needs its ``MuReadout`` there).
"""
from __future__ import annotations

import torch
from torch import nn

from mulocal.adapter import Residual


def mlp(width, depth=3, act=nn.Tanh):
    hidden = [m for _ in range(depth - 2) for m in (nn.Linear(width, width), act())]
    return nn.Sequential(nn.Flatten(), nn.Linear(784, width), act(), *hidden, nn.Linear(width, 10))


def resmlp(width, depth=5, act=nn.Tanh):
    blocks = [Residual(act(), nn.Linear(width, width)) for _ in range(depth - 2)]
    return nn.Sequential(nn.Flatten(), nn.Linear(784, width), *blocks, act(), nn.Linear(width, 10))


def cnn(width, depth=3, act=nn.Tanh):
    convs, c = [], 1
    for _ in range(depth - 1):
        convs += [nn.Conv2d(c, width, 3, padding=1), act(), nn.MaxPool2d(2)]
        c = width
    side = 28 // 2 ** (depth - 1)
    return nn.Sequential(*convs, nn.Flatten(), nn.Linear(width * side * side, 10))


def rescnn(width, depth=4, act=nn.Tanh):
    blocks = [Residual(act(), nn.Conv2d(width, width, 3, padding=1)) for _ in range(depth - 2)]
    return nn.Sequential(nn.AvgPool2d(2), nn.Conv2d(1, width, 3, padding=1), *blocks, act(), nn.MaxPool2d(2),
                         nn.Flatten(), nn.Linear(width * 49, 10))


def vgg(width, readout=nn.Linear, side=28):
    """conv(w) pool conv(2w) conv(2w, stride 2) pool -> linear(w) -> readout (side x side grey images; the strided
    conv reads an even map, so its adjoint needs an output padding)."""
    s = ((side // 2 + 1) // 2) // 2
    return nn.Sequential(
        nn.Conv2d(1, width, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
        nn.Conv2d(width, 2 * width, 3, padding=1), nn.ReLU(),
        nn.Conv2d(2 * width, 2 * width, 3, padding=1, stride=2), nn.ReLU(), nn.MaxPool2d(2), nn.Flatten(),
        nn.Linear(2 * width * s * s, width), nn.ReLU(), readout(width, 10))


class Block(nn.Module):
    """A user's residual block: x + conv2(relu(conv1(relu(x))))."""

    def __init__(self, width):
        super().__init__()
        self.conv1 = nn.Conv2d(width, width, 3, padding=1)
        self.conv2 = nn.Conv2d(width, width, 3, padding=1)

    def forward(self, x):
        return x + self.conv2(torch.relu(self.conv1(torch.relu(x))))


def resnet(width, readout=nn.Linear, blocks=2, side=28):
    s = side // 4
    return nn.Sequential(nn.AvgPool2d(2), nn.Conv2d(1, width, 3, padding=1), *[Block(width) for _ in range(blocks)],
                         nn.ReLU(), nn.MaxPool2d(2), nn.Flatten(), readout(width * s * s, 10))
