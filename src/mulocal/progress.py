"""Progress of the commands that measure several nets in turn (coord, derive, analyze): one labelled bar on
stderr (tqdm; stdout keeps the tables, and with ``--json`` its one object), in units of estimated work, so that
its ETA is the remaining work at the average rate so far.
"""
from __future__ import annotations

import sys


def net_cost(width: int, depth: int = 3, d_in: int = 784, d_out: int = 10) -> float:
    """A net's multiply-adds per sample, about (an MLP of ``depth`` weight layers): the relative cost of measuring
    it, which grows as width^2 (and as depth)."""
    return float(width * (d_in + d_out + max(depth - 2, 0) * width))


class Work:
    """A bar over units of work of known relative ``costs``: ``start(cost, what)`` begins a unit (the previous one
    is then done) and names it on the bar; leaving the ``with`` block finishes the last one. ``enabled=False``: no
    bar. ``write`` prints a line to stdout without tearing the bar."""

    def __init__(self, label: str, costs, enabled: bool = True):
        self.label, self.open, self.bar = label, 0.0, None
        total = float(sum(costs))
        if enabled and total > 0:
            from tqdm.auto import tqdm
            self._tqdm = tqdm
            self.bar = tqdm(total=total, desc=label, file=sys.stderr, smoothing=0, leave=False, dynamic_ncols=True,
                            bar_format="{desc} |{bar}| {percentage:3.0f}% [{elapsed}<{remaining}]")

    def start(self, cost: float, what: str) -> None:
        self._done()
        self.open = float(cost)
        if self.bar is not None:
            self.bar.set_description_str(f"{self.label}: {what}")

    def _done(self) -> None:
        if self.bar is not None and self.open:
            self.bar.update(min(self.open, self.bar.total - self.bar.n))
        self.open = 0.0

    def write(self, text: str) -> None:
        if self.bar is not None:
            self._tqdm.write(text, file=sys.stdout)
        else:
            print(text)

    def __enter__(self) -> "Work":
        return self

    def __exit__(self, *exc) -> None:
        self._done()
        if self.bar is not None:
            self.bar.refresh()  # the last frame (update() may skip it within tqdm's mininterval)
            self.bar.close()


__all__ = ["Work", "net_cost"]
