"""The noise of feedback training: its levels sigma_l, and the generator it is drawn with (option ``noise_rng``).

"host" draws it replica by replica from CPU generators (stream ``feedback_noise``) and copies it to the device;
"counter" draws it for all replicas at once on the net's device with ``streams.counter_normal`` (stream
``feedback_noise_counter``, one counter per draw, kept on the device); "auto": counter on a CUDA net, host elsewhere.
"""
from __future__ import annotations

import torch

from ...errors import ConfigError
from ...nets import Net
from ...streams import counter_keys, counter_normal, generators


def resolve_noise_rng(noise_rng: str, device) -> str:
    """The generator that option ``noise_rng`` draws the feedback noise with on ``device``: "host" or
    "counter" as named; "auto" is "counter" on a CUDA device (one draw for all replicas, no host copy: the
    host generators' replica loop and copy are what kept DTP from batching on a GPU) and "host" elsewhere
    (the numbers of every result drawn on a CPU, bitwise)."""
    if noise_rng != "auto":
        return noise_rng
    return "counter" if torch.device(device).type == "cuda" else "host"


class FeedbackNoise:
    """The noise part of ``TP``: needs ``sigma``, ``noise_rng``, ``_source``, ``_net_ref``, ``_counter``, ``trainable``,
    ``fb_iters`` and ``pretrain_epochs`` (set by ``TP.__init__``)."""

    def _sigmas(self, L: int) -> list[float]:
        if isinstance(self.sigma, (int, float)):
            return [float(self.sigma)] * (L + 1)
        s = [float(v) for v in self.sigma]
        if len(s) != L - 1:
            raise ConfigError(f"need {L - 1} feedback noise levels sigma (layers 1..L-1), got {len(s)}")
        return [0.0] + s + [0.0]

    def _start_noise(self, net: Net) -> None:
        """The noise streams of ``net``'s replicas, from their seeds, and the generator ``noise_rng`` resolves to."""
        seeds = list(getattr(net, "seeds", range(net.K)))
        self.noise_gens = generators("feedback_noise", seeds)  # noise_rng="host"
        self.noise_keys = counter_keys("feedback_noise_counter", seeds, device=net.device)  # noise_rng="counter"
        self._counter = torch.zeros((), dtype=torch.int64, device=net.device)  # noise_counter, on the device
        self._source = resolve_noise_rng(self.noise_rng, net.device)

    def _source_on(self, net: Net) -> str:
        """The generator this rule draws with on ``net`` (resolved by ``setup``; a checkpoint may have set it)."""
        if self._source is not None and self._net_ref is not None and self._net_ref() is net:
            return self._source
        return resolve_noise_rng(self.noise_rng, net.device)

    @property
    def noise_source(self) -> str:
        """The generator the noise is drawn with ("host" or "counter"): ``noise_rng`` resolved on the net."""
        return self._source or resolve_noise_rng(self.noise_rng, "cpu")

    def _noise_facts(self) -> dict:
        """{"noise_rng": the generator the feedback noise was drawn with}, where there is noise (else {})."""
        return {"noise_rng": self.noise_source} if self.trainable and (self.fb_iters or self.pretrain_epochs) else {}

    def _noise(self, like: torch.Tensor, sigma: float) -> torch.Tensor:
        """sigma times standard normals shaped like ``like`` (K, ...): replica k's from its own stream."""
        if self.noise_source == "host":
            n = torch.stack([torch.randn(like.shape[1:], generator=g, dtype=like.dtype) for g in self.noise_gens])
            return n.to(like.device).mul_(sigma)
        n = counter_normal(self.noise_keys, self._counter, like.shape[1:], like.dtype, like.device)
        self._counter += 1  # in place, on the device: no host number per draw
        return n.mul_(sigma)

    @property
    def noise_counter(self) -> int:
        """counter_normal draws made so far (noise_rng="counter"; checkpointed). Kept on the device and
        advanced there; reading it here is a host read."""
        return int(self._counter)

    @noise_counter.setter
    def noise_counter(self, value: int) -> None:
        self._counter.fill_(int(value))
