"""``TP`` and ``DTP``: options, the feedback's set-up and checkpoints, and the targets (the package's docstring).

A rule is a ``TargetRule`` (``targets.py``) with trainable feedback (``FeedbackTraining``, ``feedback.py``) and its
noise (``FeedbackNoise``, ``noise.py``); ``targets`` propagates the output target down through g_l (TP) or its
difference (DTP), or through the linear map of ridge, inverse or linear feedback (``_linear_map``).
"""
from __future__ import annotations

import weakref
from typing import Sequence

import torch

from ...errors import CheckpointError, ConfigError, check_choice
from ...layers import Dense
from ...nets import Net
from ...optim import LayerwiseOptimizer
from ...streams import generator
from ..declared import FB_LOSSES, FEEDBACK, NOISE_RNGS, TP_OPTIONS
from .feedback import CONV_FB_LOSS, ConvFeedbackBranch, FeedbackTraining, UpConvFeedback, _flat, feedback_maps
from .feedback import has_conv_feedback
from .noise import FeedbackNoise
from .targets import TargetRule


class TP(FeedbackTraining, FeedbackNoise, TargetRule):
    """Target propagation; ``DTP`` is the difference variant."""

    name = "tp"
    difference = False
    OPTIONS = TP_OPTIONS

    def __init__(self, loss: str = "ce", beta: float = 1.0, feedback: str = "trainable", fb_loss: str = "rec",
                 sigma: float | Sequence[float] = 0.1, noise_rng: str = "auto", fb_iters: int = 1,
                 fb_lr: float = 0.01, fb_optimizer: str = "sgd", ridge: float = 1e-3, pretrain_epochs: int = 0,
                 record: bool = False):
        super().__init__(loss, beta, record)
        check_choice("feedback", feedback, FEEDBACK)
        check_choice("feedback loss", fb_loss, FB_LOSSES)
        check_choice("noise_rng", noise_rng, NOISE_RNGS)
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
        if net.residual_net:  # the stream's shape: acts[1] = phi(u_1) has it (only the last activity is pooled)
            self._stream = tuple(acts[1].shape[2:])
        self.fb = feedback_maps(net, self._shapes, self._stream if net.residual_net else None)
        for k, seed in enumerate(getattr(net, "seeds", range(net.K))):
            gen = generator("feedback_init", seed)
            for l in range(2, L + 1):
                w = torch.randn(self.fb[l].weight.shape[1:], generator=gen, dtype=torch.float64)
                self.fb[l].weight[k].copy_(w * self.fb[l].rule.init_std)
        self._start_noise(net)
        params, scales = [], []
        for l in range(2, L + 1):
            params += [self.fb[l].weight, self.fb[l].bias]
            scales += [self.fb[l].rule.lr_scale, self.fb[l].rule.bias_lr_scale]
        self.fb_opt = LayerwiseOptimizer(params, scales, self.fb_lr, self.fb_optimizer)

    def run_facts(self) -> dict:
        """The generator the feedback noise was drawn with, where there is noise ({"noise_rng": ...}), and where
        conv feedback is trained, its loss's position mean ({"conv_fb_loss": "position_mean"})."""
        facts = self._noise_facts()
        if facts and any(isinstance(fb, (UpConvFeedback, ConvFeedbackBranch)) for fb in (self.fb or {}).values()):
            facts["conv_fb_loss"] = CONV_FB_LOSS
        return facts

    @staticmethod
    def cell_facts(options: dict, arch: str, depth: int) -> dict:
        """What a cell records about this rule beyond its options (``config.resolved_algo``: part of its hash):
        trained conv feedback (``has_conv_feedback``) averages its loss over positions ({"conv_fb_loss":
        "position_mean"}); cells of it stored before summed over them and hold other numbers. Every other cell
        (MLPs, ridge / inverse feedback, untrained feedback) records nothing and keeps its hash."""
        trained = options.get("feedback") in ("trainable", "linear") and bool(
            options.get("fb_iters") or options.get("pretrain_epochs"))
        return {"conv_fb_loss": CONV_FB_LOSS} if trained and has_conv_feedback(arch, depth) else {}

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
