"""Target propagation (TP), difference target propagation (DTP) and their feedback learning.

Every layer gets a target and minimises its own local loss 1/2 ||t_l - h_l||^2 in W_l only:

    t_L     = f - beta dloss/df                              (output target)
    TP:  t_{l-1} = g_l(t_l)         DTP:  t_{l-1} = h_{l-1} + g_l(t_l) - g_l(h_l)      (h_L = f)
    grad W_l = -mean_batch((J_l^T (t_l - h_l)) a_{l-1}^T)     J_l = d h_l / d u_l  (phi', pooling)
    grad W_L = -mean_batch((t_L - f) a_{L-1}^T)

Feedback g_l (layer l -> layer l-1), ``feedback=``:

* ``"ridge"``   - the paper's theory: linear feedback at its ridge optimum for the batch,
  Q_l = H_{l-1} (H_l^T H_l + mu_l I)^{-1} H_l^T (columns are samples), mu_l = ridge * n_l, so the
  ridge grows like the width for hidden layers and stays Theta(1) at the output.
  Applied through the B x B Gram matrix (Cholesky); Q is never formed.
* ``"linear"`` / ``"trainable"`` - trainable g_l(a) = V_l a + c_l, or phi(V_l a + c_l), learned
  every batch (``fb_iters`` steps, noise ``sigma``) before the targets are computed, with
  ``fb_loss``: ``"rec"`` (DTP, Lee et al. 2015) ||g(f(h + xi)) - (h + xi)||^2 / 2,
  ``"drl"`` (difference reconstruction, Meulemans et al. 2020)
  ||g(f(h + xi)) - g(f(h)) - xi||^2 / 2, or ``"ldrl"`` (local DRL, Ernoult et al. 2022)
  -xi . (g(f(h + xi)) - g(f(h))) + ||g(f(h) + eta) - g(f(h))||^2 / 2.
  Explicit gradients; feedback weights have their own exponents (Parameterization.feedback_b/_c;
  g_L reads the fixed-size output: role "input", hidden g_l: role "hidden").
  Each loss is a batch mean of per-sample losses; a convolutional g_l (the CNN's ``UpConvFeedback``, a residual
  CNN block's ``ConvFeedbackBranch``) takes the per-sample loss as a mean over the P_l positions (pixels) of its
  output map, the channels summed at each: (1/B) sum_b (1/P_l) sum_p 1/2 ||r_{b,:,p}||^2 for rec (r the residual
  above). A conv weight is shared by all P_l positions, so the summed loss's gradient grows like P_l (196 on
  14 x 14 maps) and the feedback LR would mean another thing than on an MLP; dense feedback (P_l = 1, including
  the residual CNN's g_L onto the flattened stream) keeps the sum over its coordinates. Cells with trained conv
  feedback record it (``TP.cell_facts``: ``conv_fb_loss``), so stores written with the summed loss are not reused.
  The noise xi (and eta) comes from ``noise_rng``: ``"host"`` draws it replica by replica from
  CPU generators (stream ``feedback_noise``) and copies it to the device (every result drawn on a CPU);
  ``"counter"`` draws it for all replicas at once on the net's device with
  ``streams.counter_normal`` (stream ``feedback_noise_counter``, one counter per draw): no per-replica
  loop and no host copy, for GPUs. ``"auto"`` (default, :func:`resolve_noise_rng`): counter on a CUDA net,
  host elsewhere; the generator a run used is in its history rows (``noise_rng``).
* ``"inverse"`` - the exact (pseudo-)inverse of W_l, for linear networks: the oracle that makes
  DTP equal Gauss-Newton targets.

Residual nets (``Net.residual_net``: ``ResMLP``, ``ResCNN``; docs/depth.md). Targets live on the residual stream
h_l = u_l (l = 1..L-1; u_l = u_{l-1} + a_l (W_l phi(u_{l-1}) + b_l) for a block), so a layer's local loss
1/2 ||t_l - u_l||^2 has grad W_l = -mean_batch((t_l - u_l) a_{l-1}^T) (times the layer's multipliers, a_l
included: no phi'). The feedback of a block mirrors it, an identity path plus a branch with the block's
depth factors (``Parameterization.feedback_rule(..., residual=True)``):

    g_l(t) = t + a_l (V_l phi(t) + c_l)    ("trainable")      g_l(t) = t + a_l (V_l t + c_l)   ("linear")

so DTP's difference t_{l-1} - h_{l-1} = (t_l - h_l) + a_l (V_l phi(t_l) - V_l phi(h_l)) passes the output
signal down the identity path, as backprop does; g_L(f) = V_L f + c_L (linear: the stream is unbounded),
reshaped to the stream. The feedback losses are unchanged with f_l(h) = h + a_l (W_l phi(h) + b_l). Ridge: a
block regresses the branch, Q_l r = r + (H_{l-1} - H_l)^T-fit r (the identity is not shrunk); inverse (linear
nets): (I + a_l m_l W_l)^{-1}.

The GNT rule (gnt.py) shares the local-loss machinery and replaces the targets.
"""
from __future__ import annotations

import math
import weakref
from typing import Sequence

import torch

from ..errors import CheckpointError, ConfigError
from ..losses import check_loss, loss_and_grad
from ..nets import Branch, Conv, ConvBranch, Dense, Net
from ..optim import LayerwiseOptimizer
from ..streams import counter_keys, counter_normal, generator, generators
from .declared import FB_LOSSES, FEEDBACK, NOISE_RNGS, TARGET_OPTIONS, TP_OPTIONS, family
from .bp import backprop



def resolve_noise_rng(noise_rng: str, device) -> str:
    """The generator that option ``noise_rng`` draws the feedback noise with on ``device``: "host" or
    "counter" as named; "auto" is "counter" on a CUDA device (one draw for all replicas, no host copy: the
    host generators' replica loop and copy are what kept DTP from batching on a GPU) and "host" elsewhere
    (the numbers of every result drawn on a CPU, bitwise)."""
    if noise_rng != "auto":
        return noise_rng
    return "counter" if torch.device(device).type == "cuda" else "host"


def _flat(t: torch.Tensor) -> torch.Tensor:
    return t if t.dim() == 3 else t.flatten(2)


def _cos(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    a, b = a.flatten(1).double(), b.flatten(1).double()
    return (a * b).sum(1) / (a.norm(dim=1) * b.norm(dim=1)).clamp_min(1e-300)


CONV_FB_LOSS = "position_mean"  # what cells with trained conv feedback record (``TP.cell_facts``)


def has_conv_feedback(arch: str, depth: int) -> bool:
    """Whether trainable feedback on this net has a convolutional g_l: the CNN's hidden conv layers (depth >= 3;
    its g_L is dense) and the residual CNN's blocks (depth >= 3)."""
    return arch in ("cnn", "rescnn") and depth >= 3


class UpConvFeedback:
    """CNN feedback from a conv layer's pooled output back to its input: nearest upsampling to the
    input's spatial size, then a same-padded convolution (a transposed convolution of stride 1).
    Its gradient is the mean over the P = H W output positions (``grads``)."""

    def __init__(self, conv_in_shape, out_shape, K, rule, kernel, dtype, device):
        self.in_shape, self.out_shape = tuple(conv_in_shape), tuple(out_shape)  # (C_l, h, w), (C_{l-1}, H, W)
        self.conv = Conv("hidden", self.in_shape[0], self.out_shape[0], kernel, K, True, rule, dtype, device)
        self.rule, self.mult = rule, self.conv.mult
        self.positions = math.prod(self.out_shape[1:])  # P: every weight is applied at each output position

    @property
    def weight(self):
        return self.conv.weight

    @property
    def bias(self):
        return self.conv.bias

    def _up(self, a):
        K, B = a.shape[:2]
        a = a.reshape(K * B, *self.in_shape)
        up = torch.nn.functional.interpolate(a, size=self.out_shape[1:], mode="nearest")
        return up.reshape(K, B, *up.shape[1:])

    def forward(self, a, weight=None, bias=None):
        return self.conv.forward(self._up(a), weight, bias)

    def grads(self, delta, a):
        """Gradient in (V, c) of sum(delta * g(a)) / (B P): batch mean and mean over the P output positions
        (``Conv.grads`` sums the positions: conv2d_weight and the bias's spatial sum)."""
        gw, gb = self.conv.grads(delta, self._up(a))
        return gw.div_(self.positions), gb.div_(self.positions)


class ConvFeedbackBranch(ConvBranch):
    """A residual CNN block's feedback branch a (n conv(V, x) + c) (``ConvBranch``), its gradient the mean over the
    P = h w positions of the stream (``grads``), as ``UpConvFeedback``'s."""

    def __init__(self, *args, positions: int, **kw):
        super().__init__(*args, **kw)
        self.positions = int(positions)

    def grads(self, delta, a):
        """Gradient in (V, c) of sum(delta * branch(a)) / (B P)."""
        gw, gb = super().grads(delta, a)
        return gw.div_(self.positions), gb.div_(self.positions)


class _Clock:
    """Accumulates wall time per phase into ``rule.timings`` (a dict of seconds)."""

    def __init__(self, rule):
        import time
        self.now, self.rule = time.perf_counter, rule
        self.t = self.now()
        if not hasattr(rule, "timings"):
            rule.timings = {}

    def lap(self, name: str) -> None:
        t = self.now()
        self.rule.timings[name] = self.rule.timings.get(name, 0.0) + t - self.t
        self.t = t


class TargetRule:
    """Shared machinery: forward pass, targets (subclass), local losses, diagnostics."""

    name = "targets"
    family = family("tp")
    OPTIONS = TARGET_OPTIONS

    def __init__(self, loss: str = "ce", beta: float = 1.0, record: bool = False):
        self.loss = check_loss(loss)
        if not (isinstance(beta, (int, float)) and math.isfinite(beta) and beta > 0):
            raise ConfigError(f"beta (output target step) must be a positive number, got {beta!r}")
        self.beta, self.record = float(beta), record
        self.stats: dict = {}

    def targets(self, net: Net, us, acts, f, dldf) -> list:
        """Targets t_1..t_L (index l; t[0] unused), each shaped like h_l (acts[l], or f)."""
        raise NotImplementedError

    def prepare(self, net: Net, us, acts, f) -> None:
        """Per-batch work before targets (feedback training)."""

    profile = False  # set True to accumulate seconds per phase in ``self.timings``

    def compile_blocker(self, net: Net) -> str | None:
        """Why this rule's step cannot run as one compiled graph (``TrainConfig.compile``), or None."""
        if self.profile:
            return "profile times each phase on the host"
        if self.record:
            return "record reads diagnostics back to the host at every step"
        if getattr(self, "trainable", False) and self.fb_iters and self._source_on(net) == "host":
            return f"{self.name.upper()}'s noise_rng='{self.noise_rng}' draws the feedback noise on host " \
                   f"generators here (noise_rng='counter' draws it on the device)"
        return None

    def run_facts(self) -> dict:
        """What a run's history rows record about how this rule ran, beyond its options ({}: nothing)."""
        return {}

    @staticmethod
    def space(net: Net, us, acts) -> list:
        """The activities targets are set for, h_0..h_{L-1}: a_l = post(u_l), or for a residual net the stream
        u_l (h_0 = a_0, the input, in both)."""
        return [acts[0]] + list(us[1:net.depth]) if net.residual_net else list(acts)

    @torch.no_grad()
    def step(self, net: Net, x: torch.Tensor, y: torch.Tensor, opt=None):
        clock = _Clock(self) if self.profile else None
        us, acts = net.forward(x)
        f = us[-1]
        loss, dldf = loss_and_grad(f, y, self.loss)
        clock and clock.lap("forward")
        self.prepare(net, us, acts, f)
        clock and clock.lap("feedback")
        t = self.targets(net, us, acts, f, dldf)
        clock and clock.lap("targets")
        grads = self.local_grads(net, us, acts, f, t)
        clock and clock.lap("local_grads")
        self._last = (self.space(net, us, acts), f, t)
        if self.record:
            self._record(net, us, acts, f, t, dldf, grads)
        return grads, loss

    @staticmethod
    def local_grads(net: Net, us, acts, f, t) -> list:
        L = net.depth
        grads: list = []
        for l in range(1, L + 1):
            if l == L:
                delta = f - t[L]
            elif net.residual_net:  # the target is on the stream u_l itself
                delta = us[l] - t[l]
            else:
                delta = net.linearize(l, us[l], acts[l])(acts[l] - t[l])
            grads += net.layers[l - 1].param_grads(delta, acts[l - 1])
        return grads

    def target_distances(self) -> dict[str, torch.Tensor]:
        """RMS of t_l - h_l per layer (K,) for the last batch."""
        acts, f, t = self._last
        L = len(t) - 1
        h = list(acts) + [f]
        return {f"tdist_{l}": (t[l] - h[l]).flatten(1).double().pow(2).mean(1).sqrt().cpu() for l in range(1, L + 1)}

    def _record(self, net, us, acts, f, t, dldf, grads) -> None:
        bp = backprop(net, us, acts, dldf)
        cos = {}
        for (i, what), g, b in zip(net.param_info(), grads, bp):
            if what == "weight":
                cos[f"bp_cos_{i + 1}"] = _cos(g, b).cpu()
        fb = {k: v.cpu() for k, v in getattr(self, "fb_stats", {}).items()}
        self.stats = {**self.target_distances(), **cos, **fb}

    def coord_observables(self, net, x, y) -> dict[str, torch.Tensor]:
        return self.target_distances()


class TP(TargetRule):
    """Target propagation; ``DTP`` is the difference variant."""

    name = "tp"
    difference = False
    OPTIONS = TP_OPTIONS

    def __init__(self, loss: str = "ce", beta: float = 1.0, feedback: str = "trainable", fb_loss: str = "rec",
                 sigma: float | Sequence[float] = 0.1, noise_rng: str = "auto", fb_iters: int = 1,
                 fb_lr: float = 0.01, fb_optimizer: str = "sgd", ridge: float = 1e-3, pretrain_epochs: int = 0,
                 record: bool = False):
        super().__init__(loss, beta, record)
        if feedback not in FEEDBACK:
            raise ConfigError(f"unknown feedback '{feedback}'; choose one of {', '.join(FEEDBACK)}")
        if fb_loss not in FB_LOSSES:
            raise ConfigError(f"unknown feedback loss '{fb_loss}'; choose one of {', '.join(FB_LOSSES)}")
        if noise_rng not in NOISE_RNGS:
            raise ConfigError(f"unknown noise_rng '{noise_rng}'; choose one of {', '.join(NOISE_RNGS)}")
        if isinstance(fb_iters, bool) or not isinstance(fb_iters, int) or fb_iters < 0:
            raise ConfigError(f"feedback iterations must be a non-negative integer, got {fb_iters!r}")
        if not ridge > 0:
            raise ConfigError(f"ridge constant must be positive, got {ridge}")
        self.feedback, self.fb_loss, self.sigma, self.fb_iters = feedback, fb_loss, sigma, fb_iters
        self.fb_lr, self.fb_optimizer, self.ridge = fb_lr, fb_optimizer, float(ridge)
        self.pretrain_epochs, self.noise_rng = int(pretrain_epochs), noise_rng
        self._source: str | None = None  # the generator noise_rng resolves to on the net (setup)
        self._counter = torch.zeros((), dtype=torch.int64)  # counter_normal draws so far (a device tensor)
        self.fb: dict[int, Dense] | None = None
        self.fb_opt: LayerwiseOptimizer | None = None
        self._net_ref = None
        self.fb_stats: dict = {}

    # ------------------------------------------------------------------ feedback set-up
    @property
    def trainable(self) -> bool:
        return self.feedback in ("trainable", "linear")

    def _sigmas(self, L: int) -> list[float]:
        if isinstance(self.sigma, (int, float)):
            return [float(self.sigma)] * (L + 1)
        s = [float(v) for v in self.sigma]
        if len(s) != L - 1:
            raise ConfigError(f"need {L - 1} feedback noise levels sigma (layers 1..L-1), got {len(s)}")
        return [0.0] + s + [0.0]

    def setup(self, net: Net, acts=None) -> None:
        """Create (once per net) the trainable feedback layers and their optimizer."""
        if self._net_ref is not None and self._net_ref() is net:
            return
        if acts is None:
            with torch.no_grad():
                acts = net.forward(torch.zeros(1, *net.input_shape, dtype=net.dtype))[1]
        # unflattened activity shapes (C, H, W) per layer, for the CNN's conv feedback
        self._shapes = {l: (tuple(a.shape[2:]) if a.dim() > 3 else None) for l, a in enumerate(acts)}
        if net.kind == "cnn" and net.depth >= 2:
            last = net.depth - 1
            self._shapes[last] = (net.width, *net.spatial)
        self._shapes.update(getattr(net, "unflattened_shapes", dict)())  # a user's model: a_l before its Flatten
        self._net_ref = weakref.ref(net)  # not id(net): a new net may reuse a freed one's id
        if net.activation != "linear" and self.feedback == "inverse":
            raise ConfigError("inverse feedback is exact only for linear networks: use --activation linear")
        blocker = getattr(net, "feedback_blocker", lambda kind: None)(self.feedback)  # a user's model
        if blocker and self.feedback != "ridge":
            raise ConfigError(f"{self.name.upper()} needs a feedback map per unit: {blocker}")
        if not self.trainable:
            return
        L = net.depth
        self.fb = {}
        if net.residual_net:  # the stream's shape: acts[1] = phi(u_1) has it (only the last activity is pooled)
            self._stream = tuple(acts[1].shape[2:])
        for l in range(2, L + 1):
            layer = net.layers[l - 1]
            role = "input" if l == L else "hidden"
            if net.residual_net and l == L:  # g_L: output -> stream, linear
                rule = net.param.feedback_rule(role, layer.fan_out, net.width)
                n = math.prod(self._stream)
                self.fb[l] = Dense(role, layer.fan_out, n, net.K, True, rule, net.dtype, net.device)
            elif net.residual(l):  # a block's feedback branch, with the block's depth factors
                # the stream's own map h -> h + a (V phi(h) + c) (whatever the block computes: a user's block
                # of several layers gets this one-layer feedback branch, read by its first conv's kernel)
                rule = net.param.feedback_rule(role, layer.fan_in, net.width, depth=net.rule_depth, residual=True)
                c = self._stream[0]
                if len(self._stream) == 1:
                    self.fb[l] = Branch(role, c, c, net.K, True, rule, net.dtype, net.device)
                else:
                    self.fb[l] = ConvFeedbackBranch(role, c, c, layer.k, net.K, True, rule,
                                                    net.dtype, net.device, positions=math.prod(self._stream[1:]))
            elif isinstance(layer, Dense):
                rule = net.param.feedback_rule(role, layer.fan_out, net.width)
                self.fb[l] = Dense(role, layer.fan_out, layer.fan_in, net.K, True, rule, net.dtype, net.device)
            else:  # conv layer of the CNN: feedback by upsampling + convolution
                k = layer.k
                rule = net.param.feedback_rule(role, layer.c_out * k * k, net.width)
                self.fb[l] = UpConvFeedback(self._shapes[l], self._shapes[l - 1], net.K, rule, k, net.dtype,
                                            net.device)
        for k, seed in enumerate(getattr(net, "seeds", range(net.K))):
            gen = generator("feedback_init", seed)
            for l in range(2, L + 1):
                w = torch.randn(self.fb[l].weight.shape[1:], generator=gen, dtype=torch.float64)
                self.fb[l].weight[k].copy_(w * self.fb[l].rule.init_std)
        seeds = list(getattr(net, "seeds", range(net.K)))
        self.noise_gens = generators("feedback_noise", seeds)  # noise_rng="host"
        self.noise_keys = counter_keys("feedback_noise_counter", seeds, device=net.device)  # noise_rng="counter"
        self._counter = torch.zeros((), dtype=torch.int64, device=net.device)  # noise_counter, on the device
        self._source = resolve_noise_rng(self.noise_rng, net.device)
        params, scales = [], []
        for l in range(2, L + 1):
            params += [self.fb[l].weight, self.fb[l].bias]
            scales += [self.fb[l].rule.lr_scale, self.fb[l].rule.bias_lr_scale]
        self.fb_opt = LayerwiseOptimizer(params, scales, self.fb_lr, self.fb_optimizer)

    def _g(self, l: int, a: torch.Tensor, net: Net):
        """Feedback g_l(a) and what its weight gradient needs: the pre-activation z (plain nets) or, in a residual
        net, the branch input (phi(a) or a) of a block and the input a of g_L."""
        if net.residual_net:
            if l == net.depth:
                return self.fb[l].forward(a).reshape(*a.shape[:2], *self._stream), a
            b = net.phi(a) if self.feedback == "trainable" else a
            return a + self.fb[l].forward(b), b
        z = self.fb[l].forward(a)
        return (net.phi(z) if self.feedback == "trainable" else z), z

    def _fb_grads(self, l: int, net: Net, r: torch.Tensor, z: torch.Tensor, a: torch.Tensor,
                  g: torch.Tensor | None = None):
        """Gradient in (V_l, c_l) of sum(r * g_l(a)) / (B P_l), with ``(g, z)`` from ``_g(l, a)`` (phi'(z) from
        g = phi(z) where the activation allows: tanh' = 1 - g^2, no second tanh); P_l the positions of a conv
        feedback's output (``_positions``), 1 for dense feedback."""
        if net.residual_net:
            return self.fb[l].grads(_flat(r) if l == net.depth else r, z)
        return self.fb[l].grads(r if self.feedback == "linear" else r * net._dphi(z, g), a)

    def _positions(self, l: int) -> int:
        """P_l: the positions g_l's feedback loss is averaged over (its output map's h w for conv feedback, else 1)."""
        return getattr(self.fb[l], "positions", 1)

    def _source_on(self, net: Net) -> str:
        """The generator this rule draws with on ``net`` (resolved by ``setup``; a checkpoint may have set it)."""
        if self._source is not None and self._net_ref is not None and self._net_ref() is net:
            return self._source
        return resolve_noise_rng(self.noise_rng, net.device)

    @property
    def noise_source(self) -> str:
        """The generator the noise is drawn with ("host" or "counter"): ``noise_rng`` resolved on the net."""
        return self._source or resolve_noise_rng(self.noise_rng, "cpu")

    def run_facts(self) -> dict:
        """The generator the feedback noise was drawn with, where there is noise ({"noise_rng": ...}), and where
        conv feedback is trained, its loss's position mean ({"conv_fb_loss": "position_mean"})."""
        facts = self._noise_facts()
        if facts and any(isinstance(fb, (UpConvFeedback, ConvFeedbackBranch)) for fb in (self.fb or {}).values()):
            facts["conv_fb_loss"] = CONV_FB_LOSS
        return facts

    def _noise_facts(self) -> dict:
        """{"noise_rng": the generator the feedback noise was drawn with}, where there is noise (else {})."""
        return {"noise_rng": self.noise_source} if self.trainable and (self.fb_iters or self.pretrain_epochs) else {}

    @staticmethod
    def cell_facts(options: dict, arch: str, depth: int) -> dict:
        """What a cell records about this rule beyond its options (``config.resolved_algo``: part of its hash):
        trained conv feedback (``has_conv_feedback``) averages its loss over positions ({"conv_fb_loss":
        "position_mean"}); cells of it stored before summed over them and hold other numbers. Every other cell
        (MLPs, ridge / inverse feedback, untrained feedback) records nothing and keeps its hash."""
        trained = options.get("feedback") in ("trainable", "linear") and bool(
            options.get("fb_iters") or options.get("pretrain_epochs"))
        return {"conv_fb_loss": CONV_FB_LOSS} if trained and has_conv_feedback(arch, depth) else {}

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

    def set_graph_safe(self, on: bool = True) -> None:
        """Put the feedback optimizer in graph-safe mode (``LayerwiseOptimizer.set_graph_safe``)."""
        if self.fb_opt is not None:
            self.fb_opt.set_graph_safe(on)

    # ------------------------------------------------------------------ checkpoints
    def state_dict(self) -> dict:
        """What a checkpoint needs to continue this rule exactly: the trainable feedback weights, their
        optimizer and the position of the noise streams (``{}``: nothing, for feedback that is not trained)."""
        if not self.trainable or self.fb is None:
            return {}
        return {"fb": [t.detach().cpu().clone() for t in self._fb_tensors()], "fb_opt": self.fb_opt.state_dict(),
                "noise_rng": self.noise_source, "noise_keys": self.noise_keys.cpu(),
                "noise_counter": self.noise_counter, "noise_gens": [g.get_state() for g in self.noise_gens]}

    def _fb_tensors(self) -> list[torch.Tensor]:
        return [t for l in sorted(self.fb) for t in (self.fb[l].weight, self.fb[l].bias)]

    def load_state_dict(self, state: dict, net: Net) -> None:
        """Restore :meth:`state_dict` (of a rule with the same feedback and noise_rng) for ``net``. With
        noise_rng="auto" the run goes on with the generator the checkpoint drew with (a GPU run resumed on a
        CPU keeps its counter stream)."""
        self.setup(net)
        if not state:
            if self.trainable:
                raise CheckpointError("the checkpoint has no feedback state, but this rule trains its feedback")
            return
        if not self.trainable:
            raise CheckpointError(f"the checkpoint has trained feedback, this rule's feedback is '{self.feedback}'")
        if self.noise_rng == "auto":
            self._source = state["noise_rng"]
        elif state["noise_rng"] != self.noise_rng:
            raise CheckpointError(f"the checkpoint drew its feedback noise with noise_rng='{state['noise_rng']}', "
                                  f"this rule with '{self.noise_rng}'")
        mine = self._fb_tensors()
        if [tuple(t.shape) for t in mine] != [tuple(t.shape) for t in state["fb"]]:
            raise CheckpointError("the checkpoint's feedback weights do not fit this net")
        for t, v in zip(mine, state["fb"]):
            t.copy_(v)
        self.fb_opt.load_state_dict(state["fb_opt"])
        self.noise_keys = state["noise_keys"].to(self.noise_keys.device)
        self.noise_counter = int(state["noise_counter"])
        for g, v in zip(self.noise_gens, state["noise_gens"]):
            g.set_state(v)

    # ------------------------------------------------------------------ feedback training
    def _fwd(self, net: Net, l: int, a: torch.Tensor) -> torch.Tensor:
        """The forward map h_{l-1} -> h_l between target spaces."""
        if net.residual_net:
            return net.predict(l, net.post(l - 1, a), a)
        u = net.layers[l - 1].forward(a)
        return u if l == net.depth else net.post(l, u)

    def train_feedback(self, net: Net, acts, f, stats: bool = True) -> dict:
        """One feedback-training pass (``fb_iters`` iterations per layer) on a batch's activities.

        Returns per layer l (K,) tensors on the net's device: ``rec_err_l``, the RMS of the residual the loss
        reconstructs (rec: g(f(h + xi)) - (h + xi); drl and ldrl: g(f(h + xi)) - g(f(h)) - xi), and
        ``fb_loss_l``, the batch-mean feedback loss (mean over positions for conv feedback; with ``stats=False``
        nothing: the training path's default, which computes no statistic)."""
        L = net.depth
        sig = self._sigmas(L)
        h = list(acts) + [f]
        want, stats = stats, {}
        for _ in range(self.fb_iters):
            grads = []
            for l in range(2, L + 1):
                xi = self._noise(h[l - 1], sig[l - 1])
                a_n = h[l - 1] + xi
                h_n = self._fwd(net, l, a_n)
                g_n, z_n = self._g(l, h_n, net)

                def fbg(r, z, a, g):
                    return self._fb_grads(l, net, r, z, a, g)
                if self.fb_loss == "rec":
                    r = g_n - a_n
                    value = 0.5 * r.pow(2) if want else None
                    gw, gb = fbg(r, z_n, h_n, g_n)
                else:
                    g_0, z_0 = self._g(l, h[l], net)
                    if self.fb_loss == "drl":
                        r = g_n - g_0 - xi
                        value = 0.5 * r.pow(2) if want else None
                        gw, gb = fbg(r, z_n, h_n, g_n)
                        gw0, gb0 = fbg(-r, z_0, h[l], g_0)
                    else:  # ldrl
                        eta = self._noise(h[l], sig[l - 1])
                        h_e = h[l] + eta
                        g_e, z_e = self._g(l, h_e, net)
                        s = g_e - g_0
                        r = (g_n - g_0 - xi) if want else None  # reported only
                        value = (0.5 * s.pow(2) - xi * (g_n - g_0)) if want else None
                        gw, gb = fbg(-xi, z_n, h_n, g_n)
                        gw0, gb0 = fbg(xi - s, z_0, h[l], g_0)
                        gwe, gbe = fbg(s, z_e, h_e, g_e)
                        gw0, gb0 = gw0 + gwe, gb0 + gbe
                    gw, gb = gw + gw0, gb + gb0
                grads += [gw, gb]
                if want:  # on the device: no host read-back
                    stats[f"rec_err_{l}"] = r.flatten(1).double().pow(2).mean(1).sqrt()
                    stats[f"fb_loss_{l}"] = value.flatten(2).sum(-1).mean(-1).double() / self._positions(l)
            self.fb_opt.step(grads)
        return stats

    def pretrain(self, net: Net, x: torch.Tensor) -> None:
        """Feedback training on a batch without touching the forward weights (pre-training)."""
        us, acts = net.forward(x)
        self.setup(net, acts)
        if self.trainable:
            self.train_feedback(net, self.space(net, us, acts), us[-1], stats=False)

    def prepare(self, net, us, acts, f) -> None:
        self.setup(net, acts)
        if self.trainable and self.fb_iters:
            self.fb_stats = self.train_feedback(net, self.space(net, us, acts), f, stats=self.record)

    # ------------------------------------------------------------------ targets
    def _linear_map(self, net: Net, l: int, acts, f):
        """For linear feedback kinds: r -> Q_l r (layer l -> l-1 space, shaped like acts[l-1]; ``acts`` are the
        target spaces h_0..h_{L-1}). A residual block's Q_l is the identity plus the map of its branch."""
        L = net.depth
        H = _flat(f if l == L else acts[l])
        Hp = _flat(acts[l - 1])
        tail = acts[l - 1].shape[2:]
        block = net.residual(l)
        if block and self.feedback == "ridge":
            Hp = Hp - H  # regress the branch h_{l-1} - h_l on h_l: the identity path is not shrunk

        def shape(r):
            return (*r.shape[:2], *tail)
        if self.feedback == "ridge":
            gram = torch.bmm(H, H.transpose(1, 2))
            gram.diagonal(dim1=1, dim2=2).add_(self.ridge * H.shape[-1])
            chol, info = torch.linalg.cholesky_ex(gram)
            # a replica whose activities stopped being finite: factor I, targets NaN (diverged); selected on the
            # device, without reading info back
            bad = (info != 0).view(-1, 1, 1)
            chol = torch.where(bad, torch.eye(gram.shape[-1], dtype=gram.dtype, device=gram.device), chol)
            Hp = torch.where(bad, torch.full((), float("nan"), dtype=Hp.dtype, device=Hp.device), Hp)
            # Q applied to rows r: r H^T (H H^T + mu I)^{-1} H_{l-1}

            def ridge(r):
                q = torch.bmm(torch.cholesky_solve(torch.bmm(H, _flat(r).transpose(1, 2)), chol).transpose(1, 2), Hp)
                return (_flat(r) + q if block else q).reshape(shape(r))
            return ridge
        if self.feedback == "inverse":
            layer = net.layers[l - 1]
            if not isinstance(layer, Dense):
                raise ConfigError("inverse feedback needs dense layers (an MLP or a residual MLP)")
            jac = layer.weight * layer.mult  # (K, out, in)
            if block:  # h_l = h_{l-1} + a (m W h_{l-1} + b): Jacobian I + a m W (a is in the branch's mult)
                jac = jac + torch.eye(jac.shape[-1], dtype=jac.dtype, device=jac.device)
            pinv = torch.linalg.pinv(jac)  # (K, in, out)
            return lambda r: torch.bmm(_flat(r), pinv.transpose(1, 2)).reshape(shape(r))
        fb = self.fb[l]  # trainable linear: g(a) = V a + c, so g(t) - g(h) = V (t - h)
        return lambda r: fb.forward(r, bias=False)

    def targets(self, net, us, acts, f, dldf):
        L = net.depth
        t = [None] * (L + 1)
        t[L] = f - self.beta * dldf
        h = self.space(net, us, acts) + [f]
        acts = h[:-1]
        for l in range(L, 1, -1):
            if self.feedback == "trainable" or (self.feedback == "linear" and net.residual_net):
                g_t = self._g(l, t[l], net)[0]
                if self.difference:
                    t[l - 1] = h[l - 1] + (g_t - self._g(l, h[l], net)[0])
                else:
                    t[l - 1] = g_t
            else:
                Q = self._linear_map(net, l, acts, f)
                if self.difference:
                    t[l - 1] = h[l - 1] + Q(t[l] - h[l])
                else:
                    t[l - 1] = Q(t[l])
                    if self.feedback == "linear":  # the bias is per channel for conv feedback
                        b = self.fb[l].bias
                        t[l - 1] = t[l - 1] + (b[:, None, :, None, None] if t[l - 1].dim() == 5 else b.unsqueeze(1))
        return t


class DTP(TP):
    """Difference target propagation: t_{l-1} = h_{l-1} + g_l(t_l) - g_l(h_l)."""

    name = "dtp"
    difference = True
