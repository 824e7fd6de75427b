"""Reading a checkpoint written by ``Trainer.save``: its contents, or its weights loaded into a net."""
from __future__ import annotations

import torch

from .errors import CheckpointError
from .nets import Net


def read_checkpoint(path: str) -> dict:
    """A checkpoint's contents (``Trainer.save``), or one CheckpointError line: missing, unreadable, not ours."""
    try:
        ck = torch.load(path, map_location="cpu", weights_only=False)
    except (FileNotFoundError, IsADirectoryError):
        raise CheckpointError(f"no checkpoint at {path}") from None
    except Exception as err:  # corrupt or foreign file
        raise CheckpointError(f"cannot read checkpoint {path}: {type(err).__name__}: {err}".splitlines()[0]) from None
    if not isinstance(ck, dict) or "net" not in ck or "state" not in ck:
        raise CheckpointError(f"{path} is not a mulocal checkpoint")
    return ck


def load_checkpoint(path: str, net: Net) -> dict:
    """Load a checkpoint's weights into ``net``; refuse one written for another architecture."""
    ck = read_checkpoint(path)
    mine = net.config()
    diff = {k: (ck["net"].get(k), v) for k, v in mine.items() if ck["net"].get(k) != v}
    if diff:
        desc = ", ".join(f"{k}: checkpoint {a!r} vs model {b!r}" for k, (a, b) in diff.items())
        raise CheckpointError(f"checkpoint {path} does not match the model ({desc})")
    net.load_state(ck["state"])
    return ck


