"""Predictive coding as an explicit local computation (no autograd through the network).

Value nodes v_0 = x (clamped) and v_1..v_{L-1} (pre-activations, free). With predictions
mu_l = W_l post(v_{l-1}) and f = mu_L:

    e_l = v_l - mu_l                 (l < L)          e_L = -dloss/df
    F   = sum_{l<L} gamma_l / 2 ||e_l||^2 + gamma_L loss(f)
    dF/dv_l = gamma_l e_l - gamma_{l+1} J_l^T W_{l+1}^T e_{l+1},    J_l = d post(v_l) / d v_l
    v_l <- v_l - kappa_l dF/dv_l
    grad W_l = -gamma_l mean_batch(e_l post(v_{l-1})^T),   grad b_l = -gamma_l mean_batch(e_l)

Residual nets (``Net.residual(l)``, ``nets.ResMLP``; muPC's energy): a residual layer predicts
mu_l = v_{l-1} + a_l (W_l post(v_{l-1}) + b_l), so with B_l = a_l W_l (the layer's operator)

    E   = sum_{l<L} gamma_l / 2 ||v_l - v_{l-1} - a_l W_l phi(v_{l-1}) - a_l b_l||^2 + gamma_L loss(f)
    dE/dv_l = gamma_l e_l - gamma_{l+1} (e_{l+1} + J_l^T B_{l+1}^T e_{l+1})   (the e_{l+1} term iff l+1 is residual)
    grad W_l = -gamma_l a_l mean_batch(e_l post(v_{l-1})^T),   grad b_l = -gamma_l a_l mean_batch(e_l)

(``Net.predict`` for mu_l, ``_back`` for the bracket; the default parallel step uses
||I + B_{l+1} J_l||_2 <= 1 + s_{l+1} in place of s_{l+1} below a residual layer; the default sequential
step without FPA is kappa_l = 1/(gamma_l + gamma_{l+1}) below a residual layer, the exact step for the
diagonal gamma_l I + gamma_{l+1} I of the Hessian in v_l when a_l W_l -> 0: with 1/gamma_l the energy rose
at every step measured, width 64, H = 4 and 16, T = 1 and 5. Under FPA, 1/gamma_l is kept, so the
single-shot identity with BP below holds for residual nets too). gamma_L / gbar_L
are unchanged; the input and output layers are never residual.

gamma_l = 1 for hidden layers and gamma_L = gamma'_L m^{-gbar_L} from the Parameterization.
(W_l above includes the layer's forward multiplier: the operator the layer applies.)

Options: sequential inference (SI: top-down, each layer sees the freshest values above) or
parallel (all layers from one snapshot); T steps (T = 1 is single-shot); value initialisation
forward (F-ini: v_l = u_l, so every hidden error starts at 0), zero or random; the fixed
prediction assumption (FPA: mu_l, J_l and the presynaptic activities frozen at their
feed-forward values during inference and the update); inference momentum; early stop on the
relative energy change; incremental PC (weights updated after every inference step); an
energy-decrease guard.

Default inference step (``kappa=None``):

* sequential, and any mode under FPA: kappa_l = 1 / gamma_l.
* parallel without FPA (``parallel_step="bound"``):

      kappa_l = 1 / (gamma_l + gamma_{l+1} c_{l+1} s_{l+1}^2)

  with s_{l+1} = ||W_{l+1}||_2 (spectral norm of the operator layer l+1 applies, per replica),
  c_{l+1} = 1 for a hidden layer above and, for the output layer, the largest curvature of the
  loss in f: c_L = 1 (MSE), 1/2 (cross-entropy: diag(p) - p p^T <= 1/2 by Popoviciu).
  ``parallel_step="gamma"`` gives 1/gamma_l (what parallel used before; it diverges, below).

Why. Near F-ini the Hessian of F in v (per sample; Gauss-Newton part: the phi'' term is
proportional to the errors, which start at 0) is block-tridiagonal: with B_l = W_l J_{l-1},
diagonal blocks H_ll = gamma_l I + gamma_{l+1} B_{l+1}^T C_{l+1} B_{l+1} and couplings
H_{l+1,l} = -gamma_{l+1} B_{l+1} (C_{l+1} = I for hidden layers, the loss Hessian for l+1 = L).
A parallel step is preconditioned gradient descent v <- v - P grad F, P = diag(kappa_l): a
Jacobi-type iteration. It decreases the quadratic model iff lambda_max(P^1/2 H P^1/2) < 2. With
z = P^{-1/2} dv, z^T P^1/2 H P^1/2 z = sum_l gamma_l ||sqrt(kappa_l) z_l - B_l sqrt(kappa_{l-1}) z_{l-1}||^2
(the l = 1 term has no z_0: x is clamped; the l = L term is gamma_L ||C_L^1/2 B_L sqrt(kappa_{L-1}) z_{L-1}||^2),
and ||a - b||^2 <= 2 ||a||^2 + 2 ||b||^2 bounds it by 2 sum_l kappa_l (gamma_l + gamma_{l+1} c_{l+1}
||B_{l+1}||^2) ||z_l||^2 <= 2 ||z||^2 for the kappa above, since ||J|| <= 1 (tanh, relu, linear;
max and average pooling) so ||B_{l+1}|| <= s_{l+1}. Equality would need a = -b in every term, which
the clamped first layer forbids (by induction z = 0): lambda_max < 2 strictly, the model energy
decreases at every step. kappa_l = 1/gamma_l is exact for the diagonal e_l term alone (what
sequential inference, which sees the freshest values above, can afford); in parallel every v_l
corrects the same error e_{l+1} from both ends at once and the iteration matrix I - P H has
eigenvalues near 1 - (1 + s^2): under muP s^2 ~ 4 for a hidden layer, so errors grow ~4x per
step (measured: FashionMNIST, width 256, T = 5, hidden energy 0, 0.07, 0.04, 0.25, 0.82).
kappa_l stays Theta(1) in width under muP (s_hidden = Theta(1), gamma_L s_L^2 = O(1) for
gbar_L >= -1), so the width scaling of the inference perturbation is unchanged. Under FPA the
move of e_l depends on e_l and e_{l+1} only (a block-triangular iteration): 1/gamma_l makes it
nilpotent, exact in L - 1 steps, so FPA keeps 1/gamma_l.

s_l is estimated on the device by power iteration on W_l^T W_l (the layer's own ``forward`` and
``backward_input`` on one sample, so dense and conv layers alike), per replica, without host
synchronisation: ``COLD_ITERS`` = 100 iterations the first time a weight tensor is seen, then
``power_iters`` (default 1) per training step warm-started from the previous vector (the weights
move little per step). The estimate ||W^T W x|| approaches s^2 from below, within about 1/(2 e n)
relative after n iterations whatever the spectrum; measured over one epoch at widths 256 and 512,
kappa stays within 2e-3 (mostly 1e-4) of the one from an exact SVD. The strict margin above
absorbs that; the guard catches the rest. The vector is not checkpointed: a resumed run restarts it
cold.

Guard (``guard=True``, off by default): after each step (a sweep in sequential mode), a replica
whose energy F did not decrease is put back where it was (values, predictions, momentum) and its
step is halved for the rest of this inference (a per-replica factor and ``torch.where`` over K: no
Python loop over replicas, no host round trip). Off by default: with the default steps it never
acted in training, and the snapshot and energy per step cost 15-40% of a training step on top of
the status (T = 5-20, widths 256-1024, CPU).

Status (kept unless ``no_status``): per replica, whether F rose by more than 1000 ulp relative at
any inference step, and (T > 1) the relative residual ||dF/dv(v_T)|| / ||dF/dv(v_0)|| (all hidden
layers and the batch). Cost: ||e_l|| of every state (one reduction per layer and step; the errors
are shared with the next parallel step) and one gradient evaluation at the end (L - 1 W^T
products, the price of one parallel step; sequential inference with zero or random
initialisation: one more at the start). Measured per training step (1 CPU thread, widths
256-1024): +3-12% at T = 1, +10-18% at T = 5, +4-7% at T = 20. Accumulated on the device;
``inference_status()`` reads and resets it. Under FPA the move is not a descent on F (F rises by
construction from F-ini), so ``energy_rose`` is nan there.

Identity (tested): F-ini + FPA + SI + T = 1 + kappa_l = 1/gamma_l gives e_l = -(gamma_L/gamma_l)
delta_l^BP and an update equal to gamma_L times the BP gradient.

Cost: every prediction is recomputed once, only when its input changed; under FPA nothing is
recomputed. A sequential step costs one W^T product (and, without FPA, one W product) per
hidden layer.

Fused parallel step (``PC.fused``, ``_step_fused``): parallel inference without FPA, guard, record, tol,
momentum or incremental updates, on a plain MLP, runs in few in-place tensor operations: the one-hot target
built once per training step, the loss reduced only where it is used (the returned feed-forward loss; the
status, once at the end), v_l <- v_l - kappa gamma_l e_l + kappa gamma_{l+1} mult J_l (W^T e_{l+1}) as two
in-place updates (no gradient tensor unless the status' residual or a per-replica kappa needs it), predictions
and activities written into their buffers, and at F-ini the errors that are exactly 0 neither computed nor
propagated (a T = 5 step from F-ini skips one W product and one W^T product). Same moves, gradients, loss and
status up to float rounding (tests/test_pc_fused.py); measured in docs/PERFORMANCE.md.
"""
from __future__ import annotations

import math
from typing import Sequence

import torch

from ..errors import ConfigError
from ..losses import check_loss, labels, loss_and_grad
from ..losses import onehot as one_hot
from ..nets import MLP, Net
from ..streams import generators
from .options import Option

INFERENCE = ("sequential", "parallel")
INITS = ("forward", "zero", "random")
PARALLEL_STEPS = ("bound", "gamma")
LOSS_CURVATURE = {"mse": 1.0, "ce": 0.5}  # largest eigenvalue of d^2 loss / df^2 (per sample)
POWER_SEED = 0x5BEC  # the fixed start vector of the power iteration (no replica randomness: same for all)


RESIDUAL_WARN = 1.0  # a relative residual above 1: inference ended farther from equilibrium than it started


def status_warning(energy_rose=None, residual=None) -> str | None:
    """One line saying what went wrong in a replica's inference status, or None if nothing did.

    Warned: the energy F rose at some inference step in a fraction ``energy_rose`` > 0 of the training
    steps (a descent on F never raises it; nan, as under FPA, is not a warning), or the mean relative
    residual ||dF/dv(v_T)|| / ||dF/dv(v_0)|| exceeds ``RESIDUAL_WARN`` (inference moved away from its
    equilibrium). Arguments: the ``pc_energy_rose`` and ``pc_residual`` of an epoch row (None: not kept)."""
    parts = []
    if energy_rose is not None and energy_rose == energy_rose and energy_rose > 0:
        parts.append(f"energy rose during inference in {100 * energy_rose:.3g}% of steps")
    if residual is not None and residual == residual and residual > RESIDUAL_WARN:
        parts.append(f"final relative residual {residual:.3g} > {RESIDUAL_WARN:g}")
    if not parts:
        return None
    return "; ".join(parts) + " (unstable inference: a smaller --kappa, --guard, or sequential inference)"


def _back(net: Net, l: int, jac, e_above: torch.Tensor) -> torch.Tensor:
    """(d mu_{l+1} / d v_l)^T e_{l+1}: J_l^T W_{l+1}^T e_{l+1}, plus e_{l+1} when layer l+1 is residual."""
    g = jac(net.layers[l].backward_input(e_above))
    return g + e_above if net.residual(l + 1) else g


def _bcast(t: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """A per-replica (K,) tensor shaped to broadcast against ``like`` (K, ...)."""
    return t.view(-1, *([1] * (like.dim() - 1)))


class PC:
    """Predictive coding learning rule. ``step(net, x, y, opt=None) -> (grads, loss)``."""

    name = "pc"
    family = "predictive coding"
    COLD_ITERS = 100  # power iterations the first time a weight tensor is seen
    OPTIONS = (
        Option("T", "int", 1, "inference steps (1: single-shot)"),
        Option("inference", "str", "sequential", "sequential (top-down) or parallel", choices=INFERENCE),
        Option("init", "str", "forward", "value initialisation: forward, zero or random", choices=INITS),
        Option("fpa", "bool", False, "fixed prediction assumption"),
        Option("kappa", "floats", None, "inference step size, one or one per hidden layer (default: 1/gamma_l; "
                                        "parallel without FPA: see parallel_step)"),
        Option("parallel_step", "str", "bound", "step of parallel inference without FPA when kappa is not given: "
               "bound (1/(gamma_l + gamma_{l+1} c ||W_{l+1}||_2^2), stable) or gamma (1/gamma_l)",
               choices=PARALLEL_STEPS, implicit=True),
        Option("power_iters", "int", 1, "power iterations per step for ||W||_2 in the bound step (warm-started)",
               implicit=True),
        Option("guard", "bool", False, "energy-decrease guard: undo a replica's step if its energy rose and halve "
               "its step", implicit=True),
        Option("no_status", "bool", False, "skip the per-replica inference status (inference_status(): energy rose, "
               "residual), saving an energy evaluation per step and a gradient evaluation per inference",
               flag="no-inference-status", implicit=True),
        Option("momentum", "float", 0.0, "inference momentum", flag="inference-momentum"),
        Option("tol", "float", None, "stop inference when the energy changes less than this (relative)"),
        Option("incremental", "bool", False, "incremental PC: update weights at every inference step"),
        Option("gammas", "floats", None, "hidden-layer energy weights gamma_1..gamma_{L-1} (default 1)"),
    )

    @staticmethod
    def hash_defaults(options: dict) -> tuple[str, ...]:
        """Implicit options whose default still belongs in a cell's hash: the default step of parallel inference
        without FPA changed (1/gamma_l -> the stable bound), so those cells must not reuse older results."""
        parallel = options.get("inference", "sequential") == "parallel"
        if parallel and not options.get("fpa") and options.get("kappa") is None:
            return ("parallel_step", "power_iters")
        return ()

    def __init__(self, loss: str = "ce", T: int = 1, inference: str = "sequential", init: str = "forward",
                 fpa: bool = False, kappa: float | Sequence[float] | None = None, parallel_step: str = "bound",
                 power_iters: int = 1, guard: bool = False, no_status: bool = False, momentum: float = 0.0,
                 tol: float | None = None, incremental: bool = False, gammas: Sequence[float] | None = None,
                 record: bool = False, seed: int = 0):
        self.loss = check_loss(loss)
        if isinstance(T, bool) or not isinstance(T, int) or T < 1:
            raise ConfigError(f"number of inference steps T must be a positive integer, got {T!r}")
        if inference not in INFERENCE:
            raise ConfigError(f"unknown inference '{inference}'; choose one of {', '.join(INFERENCE)}")
        if init not in INITS:
            raise ConfigError(f"unknown value initialisation '{init}'; choose one of {', '.join(INITS)}")
        if parallel_step not in PARALLEL_STEPS:
            raise ConfigError(f"unknown parallel_step '{parallel_step}'; choose one of {', '.join(PARALLEL_STEPS)}")
        if isinstance(power_iters, bool) or not isinstance(power_iters, int) or power_iters < 1:
            raise ConfigError(f"power_iters must be a positive integer, got {power_iters!r}")
        if not 0 <= momentum < 1:
            raise ConfigError(f"inference momentum must be in [0, 1), got {momentum}")
        if incremental and fpa:
            raise ConfigError("incremental PC updates the weights during inference, which FPA freezes: pick one")
        if guard and fpa:
            raise ConfigError("the energy guard needs a move that descends the energy; under FPA it does not "
                              "(F rises by construction from F-ini): drop guard or fpa")
        if tol is not None and not tol > 0:
            raise ConfigError(f"tol must be positive, got {tol}")
        self.T, self.inference, self.init, self.fpa = T, inference, init, bool(fpa)
        self.kappa, self.momentum, self.tol, self.incremental = kappa, momentum, tol, bool(incremental)
        self.parallel_step, self.power_iters, self.guard = parallel_step, power_iters, bool(guard)
        self.status = not no_status
        self.gammas, self.record = gammas, record
        self.seed = int(seed)
        self._gens: tuple | None = None  # per-replica generators for random value initialisation
        self._power: dict = {}  # layer index -> (weight tensor, unit power-iteration vector (K, 1, ...))
        self._status: dict | None = None  # device accumulators of the inference status
        self.stats: dict = {}
        self._last = None

    # ------------------------------------------------------------------ set-up
    def energy_weights(self, net: Net) -> list[float]:
        """gamma_1..gamma_L (index l - 1)."""
        L = net.depth
        hidden = [1.0] * (L - 1) if self.gammas is None else [float(g) for g in self.gammas]
        if len(hidden) != L - 1 or any(g <= 0 for g in hidden):
            raise ConfigError(f"need {L - 1} positive hidden energy weights, got {self.gammas!r}")
        return hidden + [net.param.gamma_L(net.width)]

    @property
    def uses_bound(self) -> bool:
        """Whether the default step is the curvature bound (parallel, no FPA, kappa not given)."""
        return self.kappa is None and self.inference == "parallel" and not self.fpa and self.parallel_step == "bound"

    def _kappas(self, gam: list[float], net: Net | None = None, acts=None) -> list:
        """Per hidden layer: a float, or a (K,) tensor for the bound step (needs the net and the
        activities a_1..a_{L-1}, whose shapes are the spaces the layers above act on)."""
        n = len(gam) - 1
        if self.kappa is None:
            if not self.uses_bound:
                if net is None or self.fpa or self.inference != "sequential":
                    return [1.0 / g for g in gam[:-1]]
                # sequential below a residual layer: the identity path adds gamma_{l+1} to the curvature in v_l
                return [1.0 / (gam[l - 1] + gam[l]) if net.residual(l + 1) else 1.0 / gam[l - 1]
                        for l in range(1, n + 1)]
            out = []
            for l in range(1, n + 1):
                c = LOSS_CURVATURE[self.loss] if l + 1 == len(gam) else 1.0
                s2 = self._spectral_sq(net, l, acts[l].shape[2:])
                if net.residual(l + 1):  # ||I + W J|| <= 1 + ||W||_2
                    s2 = (1 + s2.sqrt()) ** 2
                out.append(1.0 / (gam[l - 1] + gam[l] * c * s2))
            return out
        if isinstance(self.kappa, (int, float)):
            return [float(self.kappa)] * n
        k = [float(v) for v in self.kappa]
        if len(k) != n:
            raise ConfigError(f"need {n} inference step sizes kappa, got {len(k)}")
        return k

    @torch.no_grad()
    def _spectral_sq(self, net: Net, l: int, shape) -> torch.Tensor:
        """Estimate of ||W_{l+1}||_2^2 per replica (K,): power iteration on W^T W with the layer's own maps,
        warm-started from the last call for the same weight tensor (cold: ``COLD_ITERS`` iterations)."""
        layer = net.layers[l]
        w = layer.weight
        K, shape = w.shape[0], tuple(shape)
        st = self._power.get(l)
        warm = st is not None and st[0] is w and tuple(st[1].shape) == (K, 1, *shape)
        if warm:
            x, iters = st[1], self.power_iters
        else:
            gen = torch.Generator().manual_seed(POWER_SEED)
            x0 = torch.randn((1, 1, *shape), generator=gen, dtype=torch.float64)
            x = (x0 / x0.norm()).to(device=w.device, dtype=w.dtype).expand(K, *x0.shape[1:]).contiguous()
            iters = self.COLD_ITERS
        lam = None
        for _ in range(iters):
            z = layer.backward_input(layer.forward(x, bias=False))
            lam = z.flatten(1).norm(dim=1)  # ||W^T W x|| <= ||W||^2 for unit x
            ok = torch.isfinite(lam) & (lam > 0)
            x = torch.where(_bcast(ok, z), z / _bcast(lam.clamp_min(1e-300 if w.dtype == torch.float64 else 1e-30), z),
                            x)
        if warm:  # in place: a compiled or captured step keeps its state in the same memory
            st[1].copy_(x)
        else:
            self._power[l] = (w, x)
        return torch.nan_to_num(lam, nan=0.0, posinf=0.0)

    def compile_blocker(self, net: Net) -> str | None:
        """Why this rule's step cannot run as one compiled graph (``TrainConfig.compile``), or None."""
        if self.tol is not None:
            return "PC's tol stops inference on a host read of the energies"
        if self.init == "random":
            return "PC's init='random' draws the values on host generators"
        if self.record:
            return "record reads diagnostics back to the host at every step"
        return None

    # ------------------------------------------------------------------ the fused parallel step
    def fused(self, net: Net) -> bool:
        """Whether ``step`` takes the fused path (``_step_fused``): parallel inference without FPA, guard, record,
        tol, momentum or incremental updates, on a plain MLP (``Dense`` layers, no residual layer). It computes
        the same moves, weight gradients, loss and inference status as the general path, up to float rounding
        (tested: tests/test_pc_fused.py); the general path, which the energy oracle checks, runs otherwise."""
        return (self.inference == "parallel" and not (self.fpa or self.guard or self.record or self.momentum
                                                      or self.incremental) and self.tol is None
                and type(net) is MLP)  # MLP builds Dense layers only (ResMLP, a subclass, is excluded)

    def _top(self, f: torch.Tensor, onehot: torch.Tensor, lab: torch.Tensor, need_loss: bool = True):
        """(per-sample loss terms (K, B) or None, e_L = -dloss/df) at the output f, with the one-hot target built
        once per training step (``losses.loss_and_grad`` builds it at every call). ``_loss_of`` turns the terms
        into the batch-mean loss per replica, bitwise that of ``loss_and_grad``: the cross-entropy sum over
        classes of logp * onehot is logp[y] exactly, and onehot - p = -(p - onehot) exactly."""
        if self.loss == "ce":
            logp = torch.log_softmax(f, -1)
            terms = logp.gather(-1, lab).squeeze(-1) if need_loss else None  # log p_y
            return terms, torch.sub(onehot, logp.exp_())
        e_top = torch.sub(onehot, f)
        return (e_top.square().sum(-1) if need_loss else None), e_top

    def _loss_of(self, terms: torch.Tensor) -> torch.Tensor:
        """The batch-mean loss from ``_top``'s terms (the batch is the last dimension; leading ones are kept)."""
        return terms.mean(-1).neg_() if self.loss == "ce" else 0.5 * terms.mean(-1)

    @torch.no_grad()
    def _step_fused(self, net: Net, x: torch.Tensor, y: torch.Tensor):
        """Parallel inference and the weight gradients in few, mostly in-place tensor operations: the one-hot
        target built once, the loss only where it is used (the returned feed-forward loss; the status, reduced
        once at the end), the step, gamma_{l+1} and the multiplier folded into one coefficient of an in-place
        move, predictions and activities written into their buffers, the errors that are exactly 0 at F-ini
        neither computed nor propagated, no host synchronisation. The moves are those of ``step`` (module
        docstring); only the rounding differs (tests/test_pc_fused.py)."""
        L, layers = net.depth, net.layers
        gam = self.energy_weights(net)
        u_ff, a_ff = net.forward(x)
        kap = self._kappas(gam, net, a_ff)
        f = u_ff[L]
        lab = labels(f, y)
        onehot = one_hot(lab, f.shape[-1], f.dtype)
        lab = lab.unsqueeze(-1)
        status = self.status
        residual = status and self.T > 1
        terms, e_top = self._top(f, onehot, lab)
        ff_loss = self._loss_of(terms)
        v = [a_ff[0]] + [self._init_value(u_ff[l], net) for l in range(1, L)]
        a, mu = list(a_ff), [None] + u_ff[1:]
        wt = [None] + [layers[l].weight.transpose(1, 2) for l in range(1, L)]  # W_{l+1}^T, for mu_{l+1}
        bias = [None] + [None if layers[l].bias is None else layers[l].bias.unsqueeze(1) for l in range(1, L)]
        dims = tuple(range(1, f.dim()))  # per replica: every dimension but K
        norms, losses = [], [terms]  # the status: ||e_l|| (l < L) and the loss terms of every state
        if self.init == "forward":  # F-ini: every hidden error is exactly 0 (None: not computed)
            errs = [None] * L + [e_top]
        else:
            for l in range(1, L):
                a[l] = net.post(l, v[l])
                mu[l + 1] = layers[l].forward(a[l])
            terms, e_top = self._top(mu[L], onehot, lab, status)
            errs = [None] + [v[l] - mu[l] for l in range(1, L)] + [e_top]
            losses = [terms]
        if status:
            norms.append([None if errs[l] is None else torch.linalg.vector_norm(errs[l], dim=dims)
                          for l in range(1, L)])
        tanh = net.activation == "tanh"
        one = torch.ones((), dtype=f.dtype, device=f.device) if tanh else None
        kb = [_bcast(k, v[1]) if isinstance(k, torch.Tensor) else None for k in kap]

        def back(l):  # (c, J_l^T W_{l+1}^T e_{l+1} / mult, J_l or None): the bracket of dF/dv_l, c = gamma_{l+1} mult
            bw = torch.bmm(errs[l + 1], layers[l].weight)  # the multiplier goes into c
            c = gam[l] * layers[l].mult
            if tanh:
                return c, bw, torch.addcmul(one, a[l], a[l], value=-1.0)  # J = 1 - a^2
            return c, net.linearize(l, v[l], a[l])(bw), None

        def add_sq(total, grad):  # total + ||grad||^2 per replica (None: nothing summed yet)
            sq = grad.square().sum(dims)
            return sq if total is None else total + sq

        def grad_v(l):  # dF/dv_l = gamma_l e_l - gamma_{l+1} J_l^T W_{l+1}^T e_{l+1} (a new tensor), None if 0
            e = errs[l]
            if errs[l + 1] is None:  # F-ini: e_{l+1} = 0 exactly
                return None if e is None else e.mul(gam[l - 1])
            c, jb, J = back(l)
            if J is not None:
                jb = J.mul_(jb)
            if e is None:
                return jb.mul_(-c)
            return torch.add(e, jb, alpha=-c) if gam[l - 1] == 1 else e.mul(gam[l - 1]).sub_(jb, alpha=c)

        g0 = None
        for t in range(self.T):
            moved = [False] * (L + 1)
            for l in range(1, L):
                fresh = v[l] is u_ff[l]  # still the feed-forward value (kept for perturbation()): move out of place
                if kb[l - 1] is None and not (residual and t == 0):
                    # v_l <- v_l - kappa gamma_l e_l + kappa c J (W^T e_{l+1}): in place, no gradient tensor
                    k = kap[l - 1]
                    above = back(l) if errs[l + 1] is not None else None  # J_l read at v_l before it moves
                    if errs[l] is not None:
                        v[l] = torch.add(v[l], errs[l], alpha=-k * gam[l - 1]) if fresh else \
                            v[l].add_(errs[l], alpha=-k * gam[l - 1])
                        fresh = False
                    if above is not None:
                        c, jb, J = above
                        if J is None:
                            v[l] = torch.add(v[l], jb, alpha=k * c) if fresh else v[l].add_(jb, alpha=k * c)
                        else:
                            v[l] = torch.addcmul(v[l], J, jb, value=k * c) if fresh else \
                                v[l].addcmul_(J, jb, value=k * c)
                    moved[l] = errs[l] is not None or errs[l + 1] is not None
                    continue
                grad = grad_v(l)
                if grad is None:  # dF/dv_l = 0 exactly (F-ini, below the top): v_l stays
                    continue
                if residual and t == 0:
                    g0 = add_sq(g0, grad)
                if kb[l - 1] is None:
                    v[l] = torch.add(v[l], grad, alpha=-kap[l - 1]) if fresh else v[l].add_(grad, alpha=-kap[l - 1])
                else:
                    v[l] = torch.addcmul(v[l], kb[l - 1], grad, value=-1.0) if fresh else \
                        v[l].addcmul_(kb[l - 1], grad, value=-1.0)
                moved[l] = True
            for l in range(1, L):
                if not moved[l]:  # a_l and mu_{l+1} unchanged
                    continue
                a[l] = torch.tanh(v[l], out=a[l]) if tanh else net.post(l, v[l])
                mult = layers[l].mult
                if mu[l + 1] is u_ff[l + 1]:  # the feed-forward value: a new tensor
                    mu[l + 1] = torch.baddbmm(bias[l], a[l], wt[l], alpha=mult) if bias[l] is not None else \
                        torch.bmm(a[l], wt[l])
                elif bias[l] is not None:
                    torch.baddbmm(bias[l], a[l], wt[l], alpha=mult, out=mu[l + 1])
                else:
                    torch.bmm(a[l], wt[l], out=mu[l + 1])
                if bias[l] is None and mult != 1:
                    mu[l + 1].mul_(mult)
            for l in range(1, L):
                if not (moved[l] or moved[l - 1]):  # v_l and mu_l unchanged: e_l too (0 at F-ini)
                    continue
                if errs[l] is None:
                    errs[l] = v[l] - mu[l]
                else:
                    torch.sub(v[l], mu[l], out=errs[l])
            terms, errs[L] = self._top(mu[L], onehot, lab, status)
            if status:
                norms.append([None if errs[l] is None else torch.linalg.vector_norm(errs[l], dim=dims)
                              for l in range(1, L)])
                losses.append(terms)
        grads: list = []
        for l in range(1, L + 1):
            layer = layers[l - 1]
            if errs[l] is None:  # e_l = 0 exactly (T = 1 from F-ini, below the top two layers): zero gradients
                gw, gb = torch.zeros_like(layer.weight), None if layer.bias is None else torch.zeros_like(layer.bias)
            else:
                gw, gb = layer.grads(errs[l].mul(-gam[l - 1]), a[l - 1])
            grads += [gw] if gb is None else [gw, gb]
        self._last = (v, u_ff)
        if status:
            g_end = None
            if residual:
                for l in range(1, L):
                    grad = grad_v(l)
                    if grad is not None:
                        g_end = add_sq(g_end, grad)
            # the per-state parts as _energy_parts lays them out: ||e_l|| (None: exactly 0), then the loss
            zero, rows = torch.zeros_like(losses[0][..., 0]), self._loss_of(torch.stack(losses))
            parts = [p for s, n in enumerate(norms) for p in [zero if c is None else c for c in n] + [rows[s]]]
            tr = self._energy_from_parts(parts, gam, L, f.shape[1])
            self._finish_status(tr[:-1], tr[1:], f.dtype, g0, g_end, None)  # g0: None unless residual
        return grads, ff_loss

    def _finish_status(self, prev, cur, dtype, g0, g_end, backtracks) -> None:
        """Add one training step to the inference status: whether the energy rose at any inference step (beyond
        float rounding of ``dtype``) and, with ``g0``, the relative residual sqrt(g_end / g0)."""
        rose = (~(cur <= prev + 1000 * torch.finfo(dtype).eps * prev.abs())).any(0)
        self._accumulate(rose, None if g0 is None else (g_end.double() / g0.double().clamp_min(1e-300)).sqrt(),
                         backtracks)

    # ------------------------------------------------------------------ the step
    @torch.no_grad()
    def step(self, net: Net, x: torch.Tensor, y: torch.Tensor, opt=None):
        if self.fused(net):
            return self._step_fused(net, x, y)
        L = net.depth
        gam = self.energy_weights(net)
        # feed-forward pass: a[l] activity, mu[l] prediction (mu[L] = f)
        u_ff, a_ff = net.forward(x)
        kap = self._kappas(gam, net, a_ff)
        mu = [None] + u_ff[1:]
        a = list(a_ff)
        ff_loss, dldf = loss_and_grad(mu[L], y, self.loss)
        e_top = -dldf  # e_L
        loss_now = ff_loss  # loss at the current f = mu[L]
        v = [a[0]] + [self._init_value(mu[l], net) for l in range(1, L)]
        if self.incremental and opt is None:
            raise ConfigError("incremental PC needs the optimizer: call step(net, x, y, opt=optimizer)")
        if self.init != "forward" and not self.fpa:  # under FPA predictions stay at their feed-forward values
            for l in range(1, L):
                a[l] = net.post(l, v[l])
                mu[l + 1] = net.predict(l + 1, a[l], v[l])
            loss_now, dldf = loss_and_grad(mu[L], y, self.loss)
            e_top = -dldf
        jac_ff = [None] + [net.linearize(l, u_ff[l], a_ff[l]) for l in range(1, L)] if self.fpa else None
        vel = [None] + [torch.zeros_like(v[l]) for l in range(1, L)] if self.momentum else None
        record = self.record or self.tol is not None
        track = record or self.status or self.guard  # the energy after every step, per replica, on the device
        residual = self.record or (self.status and self.T > 1)  # the status' residual: multi-step inference only
        K, dev = net.K, u_ff[1].device
        errs = None  # errors of the current state (parallel mode: computed once per state, shared)
        terms = None
        # the status alone only needs the energies after the loop: keep ||e_l|| and the loss of every state (L
        # small ops per step) and add them up once; the guard and record need each energy at once
        lazy = track and not (record or self.guard)
        if lazy:
            parts = self._energy_parts(v, mu, errs, loss_now, L, start=self.init == "forward")
        elif track:
            terms, energy = self._state_energy(v, mu, errs, loss_now, gam, L, record, start=self.init == "forward")
            trace = [energy]  # F after every accepted step
        energies = [terms.double().cpu()] if record else []
        scale = torch.ones(K, dtype=u_ff[1].dtype, device=dev) if self.guard else None
        backtracks = torch.zeros(K, dtype=torch.float64, device=dev) if self.guard else None
        g0 = None  # sum of squares of dF/dv at the start, per replica
        if residual and self.inference == "sequential" and self.init != "forward":
            g0 = self._grad_sq(net, v, mu, a, e_top, gam, jac_ff)
        steps = 0
        for t in range(self.T):
            if self.guard:
                saved = (list(v), list(a), list(mu), e_top, loss_now,
                         [None] + [q.clone() for q in vel[1:]] if vel is not None else None)
            k_eff = kap if scale is None else [scale * k for k in kap]
            if self.inference == "sequential":
                for l in range(L - 1, 0, -1):
                    e_above = e_top if l + 1 == L else v[l + 1] - mu[l + 1]
                    jac = jac_ff[l] if self.fpa else net.linearize(l, v[l], a[l])
                    grad = (v[l] - mu[l]).mul_(gam[l - 1]).sub_(_back(net, l, jac, e_above),
                                                                  alpha=gam[l])
                    if residual and t == 0 and l == L - 1 and g0 is None:  # F-ini: every other dF/dv_l is 0 here
                        g0 = grad.flatten(1).pow(2).sum(1)
                    v[l] = self._move(v[l], grad, k_eff[l - 1], vel, l)
                    if not self.fpa:
                        a[l] = net.post(l, v[l])
                        mu[l + 1] = net.predict(l + 1, a[l], v[l])
                        if l + 1 == L:
                            loss_now, dldf = loss_and_grad(mu[L], y, self.loss)
                            e_top = -dldf
            else:
                if errs is None:
                    errs = self._errors(v, mu, e_top, L)
                for l in range(1, L):
                    jac = jac_ff[l] if self.fpa else net.linearize(l, v[l], a[l])
                    grad = errs[l].mul(gam[l - 1]).sub_(_back(net, l, jac, errs[l + 1]), alpha=gam[l])
                    if residual and t == 0:
                        sq = grad.flatten(1).pow(2).sum(1)
                        g0 = sq if l == 1 else g0 + sq
                    v[l] = self._move(v[l], grad, k_eff[l - 1], vel, l)
                if not self.fpa:
                    for l in range(1, L):
                        a[l] = net.post(l, v[l])
                        mu[l + 1] = net.predict(l + 1, a[l], v[l])
                    loss_now, dldf = loss_and_grad(mu[L], y, self.loss)
                    e_top = -dldf
                errs = self._errors(v, mu, e_top, L) if track and not self.guard else None
            steps = t + 1
            if lazy:
                parts += self._energy_parts(v, mu, errs, loss_now, L)
            elif track:
                new_terms, new = self._state_energy(v, mu, errs, loss_now, gam, L, record)
                if self.guard:  # put back every replica whose energy did not decrease (nan included), halve its step
                    back = ~(new <= energy)
                    v, a, mu, e_top, loss_now, vel = self._restore(back, (v, a, mu, e_top, loss_now, vel), saved)
                    new = torch.where(back, energy, new)
                    if record:
                        new_terms = torch.where(back, terms, new_terms)
                    scale = torch.where(back, scale * 0.5, scale)
                    backtracks += back
                energy = new
                if record:
                    terms = new_terms
                trace.append(energy)
            if self.incremental and t < self.T - 1:
                opt.step(self._weight_grads(net, v, mu, a, e_top, gam))
                for l in range(1, L + 1):
                    mu[l] = net.predict(l, a[l - 1], v[l - 1])
                loss_now, dldf = loss_and_grad(mu[L], y, self.loss)
                e_top = -dldf
                errs = None
                if lazy:  # the next step is compared with the energy at the new weights
                    parts += self._energy_parts(v, mu, errs, loss_now, L)
                elif track:
                    terms, energy = self._state_energy(v, mu, errs, loss_now, gam, L, record)
                    trace.append(energy)
            if record:
                energies.append(terms.double().cpu())
                if self.tol is not None and len(energies) > 1:
                    prev, cur = energies[-2].sum(0), energies[-1].sum(0)
                    if bool(((prev - cur).abs() <= self.tol * prev.abs().clamp_min(1e-30)).all()):
                        break
        acts = a_ff if self.fpa else a
        grads = self._weight_grads(net, v, mu, acts, e_top, gam)
        self._last = (v, u_ff)
        g_end = self._grad_sq(net, v, mu, a, e_top, gam, jac_ff, errs) if residual else None
        if self.status:
            tr = self._energy_from_parts(parts, gam, L, v[1].shape[1]) if lazy else torch.stack(trace)
            prev, cur = tr[:-1], tr[1:]
            if self.incremental:  # compare each step with the energy at the weights it was made with
                prev, cur = tr[0:-1:2], tr[1::2]
            self._finish_status(prev, cur, u_ff[1].dtype, g0 if residual else None, g_end, backtracks)
        if self.record:
            n = sum(v[l][0].numel() for l in range(1, L))
            self.stats = {"energy": torch.stack(energies), "steps": steps,
                          "residual": (g_end / n).sqrt().double().cpu(),
                          "perturbation": self.perturbation()}
            if any(isinstance(k, torch.Tensor) for k in kap):
                self.stats["kappa"] = [k.double().cpu() if isinstance(k, torch.Tensor) else k for k in kap]
            if self.guard:
                self.stats["step_scale"] = scale.double().cpu()
        elif self.tol is not None:
            self.stats = {"steps": steps}
        return grads, ff_loss

    # ------------------------------------------------------------------ checkpoints
    def state_dict(self) -> dict:
        """What a checkpoint needs to continue exactly: the bound step's warm-started power-iteration vectors, by
        layer (``{}`` when the bound step has not run)."""
        return {"power": {l: x.detach().cpu().clone() for l, (w, x) in self._power.items()}} if self._power else {}

    def load_state_dict(self, state: dict, net: Net) -> None:
        """Restore :meth:`state_dict` for ``net`` (each vector warm-starts the power iteration of its layer)."""
        weights = {int(l): net.layers[int(l)].weight for l in (state or {}).get("power", {})}
        self._power = {int(l): (weights[int(l)], x.to(device=net.device, dtype=weights[int(l)].dtype))
                       for l, x in (state or {}).get("power", {}).items()}

    # ------------------------------------------------------------------ inference status
    def _accumulate(self, rose, rel_residual, backtracks) -> None:
        """Add one training step's status to the device accumulators (in place: the counts are device
        tensors too, so a compiled or captured step adds to the same memory at every replay)."""
        st = self._status
        if st is None or st["rose"].shape != rose.shape or st["rose"].device != rose.device:
            z = torch.zeros(rose.shape, dtype=torch.float64, device=rose.device)
            n = torch.zeros((), dtype=torch.int64, device=rose.device)
            st = self._status = {"rose": z, "residual": z.clone(), "backtracks": z.clone(), "n": n, "n_res": n.clone()}
        st["rose"] += rose
        if rel_residual is not None:
            st["residual"] += rel_residual
            st["n_res"] += 1
        if backtracks is not None:
            st["backtracks"] += backtracks
        st["n"] += 1

    def inference_status(self) -> dict:
        """Per replica, since the last call (then reset to zero in place): ``energy_rose``, the fraction of
        training steps in which the energy rose at some inference step (nan under FPA, where the move is not a
        descent on F); ``residual``, the mean relative residual ||dF/dv|| at the end over ||dF/dv|| at the
        start; ``backtracks`` (guard on), the mean number of undone steps per training step; ``steps``, the
        number of training steps counted. Empty if no step ran. Read back to the host once per call."""
        st = self._status
        if st is None:
            return {}
        host = {k: v.to("cpu", copy=True) for k, v in st.items()}  # a copy: on the CPU .cpu() would alias
        for v in st.values():
            v.zero_()
        n, n_res = int(host["n"]), int(host["n_res"])
        if not n:
            return {}
        out = {"energy_rose": [math.nan] * len(host["rose"]) if self.fpa else (host["rose"] / n).tolist()}
        if n_res:
            out["residual"] = (host["residual"] / n_res).tolist()
        if self.guard:
            out["backtracks"] = (host["backtracks"] / n).tolist()
        out["steps"] = n
        return out

    # ------------------------------------------------------------------ pieces
    def _init_value(self, u: torch.Tensor, net: Net) -> torch.Tensor:
        if self.init == "forward":
            return u
        if self.init == "zero":
            return torch.zeros_like(u)
        # one stream per replica, derived from the replica's seed: K replicas = K separate runs
        seeds = tuple(getattr(net, "seeds", range(net.K)))
        if self._gens is None or self._gens[0] != seeds:
            self._gens = (seeds, generators("pc_values", seeds, self.seed))
        return torch.stack([torch.randn(u.shape[1:], generator=g, dtype=u.dtype) for g in self._gens[1]]).to(u.device)

    def _move(self, v, grad, kappa, vel, l):
        if vel is not None:
            vel[l].mul_(self.momentum).add_(grad)
            grad = vel[l]
        if isinstance(kappa, torch.Tensor):
            return v - _bcast(kappa, v) * grad
        return v - kappa * grad

    @staticmethod
    def _restore(back: torch.Tensor, state, saved):
        """Where ``back`` (K,) is set, the saved state; elsewhere the new one (lists of tensors, tensors)."""
        def pick(new, old):
            if new is None or new is old:
                return new
            if isinstance(new, list):
                return [pick(n, o) for n, o in zip(new, old)]
            return torch.where(_bcast(back, new), old, new)
        return tuple(pick(n, o) for n, o in zip(state, saved))

    @staticmethod
    def _weight_grads(net, v, mu, acts, e_top, gam):
        L = net.depth
        grads: list = []
        for l in range(1, L + 1):
            err = e_top if l == L else v[l] - mu[l]
            gw, gb = net.layers[l - 1].grads(err.mul(-gam[l - 1]), acts[l - 1])
            grads += [gw] if gb is None else [gw, gb]
        return grads

    @staticmethod
    def _errors(v, mu, e_top, L) -> list:
        return [None] + [v[l] - mu[l] for l in range(1, L)] + [e_top]

    @staticmethod
    def _energy_parts(v, mu, errs, loss, L, start: bool = False) -> list:
        """[||e_1||, ..., ||e_{L-1}||, loss] per replica ((K,) each; norms over the batch and features)."""
        if start:  # F-ini: every hidden error is exactly 0
            return [torch.zeros_like(loss)] * (L - 1) + [loss]
        return [torch.linalg.vector_norm((errs[l] if errs is not None else v[l] - mu[l]).flatten(1), dim=1)
                for l in range(1, L)] + [loss]

    @staticmethod
    def _energy_from_parts(parts: list, gam, L, B) -> torch.Tensor:
        """The energies (n_states, K), float64, of the states whose ``_energy_parts`` were concatenated."""
        x = torch.stack(parts).double().view(-1, L, parts[0].shape[0])
        out = gam[-1] * x[:, -1]
        for l in range(1, L):  # Python-number coefficients: no host-to-device copy
            out = out + x[:, l - 1].square() * (0.5 * gam[l - 1] / B)
        return out

    @staticmethod
    def _energy(v, mu, errs, loss, gam, L, start: bool = False) -> torch.Tensor:
        """Total energy F per replica (K,), float64, on the device, in few operations (the guard's energy after
        each step; ``_energy_terms`` gives the per-layer terms that ``record`` keeps)."""
        out = loss.double() * gam[-1]
        if start:
            return out
        B = v[1].shape[1]
        for l in range(1, L):
            e = errs[l] if errs is not None else v[l] - mu[l]
            out = out + torch.linalg.vector_norm(e.flatten(1), dim=1).double().square() * (0.5 * gam[l - 1] / B)
        return out

    @classmethod
    def _state_energy(cls, v, mu, errs, loss, gam, L, record: bool, start: bool = False):
        """(per-layer terms (L, K) when recording, else None; the total F per replica (K,), float64)."""
        if record:
            terms = cls._energy_terms(v, mu, loss, gam, L, start=start)
            return terms, terms.double().sum(0)
        return None, cls._energy(v, mu, errs, loss, gam, L, start=start)

    @staticmethod
    def _energy_terms(v, mu, loss, gam, L, start: bool = False) -> torch.Tensor:
        """Per-layer energy terms (L, K) on the device: gamma_l/2 mean_batch ||e_l||^2 and gamma_L loss
        (``start``: at F-ini, where every hidden error is exactly 0)."""
        if start:
            return torch.stack([torch.zeros_like(loss)] * (L - 1) + [gam[-1] * loss])
        rows = [0.5 * gam[l - 1] * (v[l] - mu[l]).flatten(2).pow(2).sum(-1).mean(-1) for l in range(1, L)]
        rows.append(gam[-1] * loss)
        return torch.stack(rows)

    def _grad_sq(self, net, v, mu, a, e_top, gam, jac_ff, errs=None) -> torch.Tensor:
        """Sum of squares of dF/dv_l over hidden layers and the batch at the given state, per replica (K,)."""
        L = net.depth
        errs = errs or self._errors(v, mu, e_top, L)
        tot = 0
        for l in range(1, L):
            jac = jac_ff[l] if self.fpa else net.linearize(l, v[l], a[l])
            g = gam[l - 1] * errs[l] - gam[l] * _back(net, l, jac, errs[l + 1])
            tot = tot + g.flatten(1).pow(2).sum(1)
        return tot

    def perturbation(self) -> dict[str, torch.Tensor]:
        """RMS of v_l minus its feed-forward value after the last inference, per layer (K,)."""
        if self._last is None:
            return {}
        v, u_ff = self._last
        return {f"pert_{l}": (v[l] - u_ff[l]).flatten(1).double().pow(2).mean(1).sqrt().cpu()
                for l in range(1, len(v))}

    def coord_observables(self, net, x, y) -> dict[str, torch.Tensor]:
        return self.perturbation()
