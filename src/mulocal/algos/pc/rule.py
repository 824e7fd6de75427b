"""The PC learning rule: options, energy weights, which solver runs, status and checkpoints.

One energy (``energy.py``), several inference solvers that minimise it over the free variables, the weight
gradient at the solver's final state computed in one place (``energy.weight_grads``). Equations, the step
sizes' derivations and measurements: docs/pc.md; residual nets: docs/depth.md.

=============  ======================================================  =====================================
inference      free variables and move                                 module
=============  ======================================================  =====================================
sequential     values v_l, top-down gradient steps (SI; the paper's)    ``state.py``
parallel       values v_l, all layers from one snapshot                ``state.py`` (plain MLP: ``fused.py``)
error          errors e_l (ePC): backward recursion of the             ``error.py``
               stationarity conditions, then the forward map
mupc           muPC's recipe: parallel steps, T = H, kappa from        ``state.py``
               jpc's activity LR (``activity_lr``, batch-mean energy)
auto           error on residual nets, sequential otherwise            (resolved per net)
=============  ======================================================  =====================================
"""
from __future__ import annotations

from typing import Sequence

import torch

from ...errors import ConfigError, check_choice
from ...losses import check_loss
from ...nets import Net
from ...streams import generators
from ..declared import ERROR_T, INFERENCE, INITS, PARALLEL_STEPS, PC_OPTIONS, family
from .error import check as check_error_options
from .error import state_only
from .error import step as error_step
from .fused import applies as fused_applies
from .fused import step as fused_step
from .state import step as state_step
from .observers import Status
from .steps import PowerIteration, kappas

JPC_ENERGY_FACTOR = 2.0  # jpc's energy sum ||e||^2 / B has no 1/2: its activity gradient is 2/B times ours


def resolve_inference(inference: str, residual: bool, options: dict) -> str:
    """``auto`` -> ``error`` on a residual net (every block learns), ``sequential`` otherwise (the paper's) or
    where an option of state-based inference is given (``error.state_only``: FPA, a value init other than
    forward, momentum, tol, incremental)."""
    if inference == "auto":
        return "error" if residual and not state_only(options) else "sequential"
    return inference


def resolve_guard(guard: bool | None, inference: str) -> bool:
    """guard, or its default: on for the error solver (its full step overshoots where the output curvature C is
    large: relu nets at large learning rates, measured in docs/pc.md), off for the state solvers."""
    return inference == "error" if guard is None else bool(guard)


def resolve_T(T: int | None, inference: str, depth: int) -> int:
    """T, or the solver's default: 1 (single shot) for sequential and parallel, ``ERROR_T`` for error, H for
    mupc (muPC ties the number of steps to depth)."""
    if T is not None:
        return T
    return {"error": ERROR_T, "mupc": depth}.get(inference, 1)


class PC:
    """Predictive coding learning rule. ``step(net, x, y, opt=None) -> (grads, loss)``."""

    name = "pc"
    family = family("pc")
    OPTIONS = PC_OPTIONS

    @staticmethod
    def hash_defaults(options: dict) -> tuple[str, ...]:
        """Implicit options whose default still belongs in a cell's hash: the default step of parallel inference
        without FPA changed (1/gamma_l -> the stable bound), so those cells must not reuse older results."""
        parallel = options.get("inference", "sequential") == "parallel"
        keep = ("parallel_step", "power_iters") if parallel and not options.get("fpa") and options.get("kappa") is None \
            else ()
        return keep + (("activity_lr",) if options.get("inference") == "mupc" else ()) + \
            (("guard",) if options.get("inference") == "error" else ())

    @staticmethod
    def resolve_options(options: dict, residual: bool, depth: int, param) -> dict:
        """What a cell's options resolve to on its net (recorded in the cell, part of its hash): the solver and
        T ``auto`` picks, and on a residual net the hidden energy weights' rule. A plain net's cell records
        what it recorded before these existed."""
        out = dict(options)
        out["inference"] = resolve_inference(out.get("inference", "auto"), residual, out)
        out["T"] = resolve_T(out.get("T"), out["inference"], depth)
        out["guard"] = resolve_guard(out.get("guard"), out["inference"])
        if residual and out.get("gammas") is None and out["inference"] != "mupc":
            out["gammas"] = f"d^{param.depth_gamma:g}"
        return out

    def __init__(self, loss: str = "ce", T: int | None = None, inference: str = "auto", init: str = "forward",
                 fpa: bool = False, kappa: float | Sequence[float] | None = None, parallel_step: str = "bound",
                 power_iters: int = 1, guard: bool | None = None, no_status: bool = False, momentum: float = 0.0,
                 tol: float | None = None, incremental: bool = False, gammas: Sequence[float] | None = None,
                 activity_lr: float = 0.5, record: bool = False, seed: int = 0):
        self.loss = check_loss(loss)
        if T is not None and (isinstance(T, bool) or not isinstance(T, int) or T < 1):
            raise ConfigError(f"number of inference steps T must be a positive integer, got {T!r}")
        check_choice("inference", inference, INFERENCE)
        check_choice("value initialisation", init, INITS)
        check_choice("parallel_step", parallel_step, PARALLEL_STEPS)
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
        if not activity_lr > 0:
            raise ConfigError(f"activity_lr must be positive, got {activity_lr}")
        if inference == "error":
            check_error_options(dict(fpa=fpa, init=init, momentum=momentum, tol=tol, incremental=incremental))
        if inference == "mupc" and kappa is not None:
            raise ConfigError("mupc sets kappa from activity_lr (jpc's convention): give activity_lr, not kappa")
        self.T, self.inference, self.init, self.fpa = T, inference, init, bool(fpa)
        self.kappa, self.momentum, self.tol, self.incremental = kappa, momentum, tol, bool(incremental)
        self.parallel_step, self.guard_option = parallel_step, guard
        self.guard = bool(guard)  # resolved per net (``_resolve``)
        self.keep_status = not no_status
        self.gammas, self.record, self.activity_lr = gammas, record, float(activity_lr)
        self.seed = int(seed)
        self.power = PowerIteration(power_iters)  # the bound step's warm-started ||W||_2 estimates
        self.status = Status()  # device accumulators every solver reports to
        self.mode, self.steps = inference, T  # what runs on the current net (``_resolve``)
        self._gens: tuple | None = None  # per-replica generators for random value initialisation
        self.stats: dict = {}
        self._last = None

    # ------------------------------------------------------------------ set-up
    def energy_weights(self, net: Net) -> list[float]:
        """gamma_1..gamma_L (index l - 1): the hidden ones from ``gammas``, else 1 (residual nets:
        ``Parameterization.gamma_hidden``, but for muPC's recipe, whose energy has unit weights), gamma_L from the
        Parameterization."""
        L = net.depth
        if self.gammas is not None:
            hidden = [float(g) for g in self.gammas]
        else:  # muPC's recipe runs on its own energy: unit weights (jpc's)
            depth_rule = net.residual_net and self.inference != "mupc"
            hidden = [net.param.gamma_hidden(net.rule_depth) if depth_rule else 1.0] * (L - 1)
        if len(hidden) != L - 1 or any(g <= 0 for g in hidden):
            raise ConfigError(f"need {L - 1} positive hidden energy weights, got {self.gammas!r}")
        return hidden + [net.param.gamma_L(net.width)]

    def _resolve(self, net: Net, batch: int) -> None:
        """Set ``mode`` and ``steps`` (and mupc's kappa) for this net and batch size."""
        self.mode = resolve_inference(self.inference, net.residual_net, vars(self))
        self.steps = resolve_T(self.T, self.mode, net.depth)
        self.guard = resolve_guard(self.guard_option, self.mode)
        if self.mode == "mupc":  # jpc: z <- z - beta dF_jpc/dz, F_jpc = sum ||e||^2 / B = (2 / B) F_ours per sample
            self.kappa = JPC_ENERGY_FACTOR * self.activity_lr / batch

    @property
    def uses_bound(self) -> bool:
        """Whether the default step is the curvature bound (parallel, no FPA, kappa not given)."""
        return self.kappa is None and self.mode == "parallel" and not self.fpa and self.parallel_step == "bound"

    def compile_blocker(self, net: Net) -> str | None:
        """Why this rule's step cannot run as one compiled graph (``TrainConfig.compile``), or None."""
        if self.tol is not None:
            return "PC's tol stops inference on a host read of the energies"
        if self.init == "random":
            return "PC's init='random' draws the values on host generators"
        if self.record:
            return "record reads diagnostics back to the host at every step"
        return None

    def fused(self, net: Net) -> bool:
        """Whether ``step`` takes the fused parallel path (``fused.py``) on this net."""
        self._resolve(net, 1)
        return fused_applies(self, net)

    # ------------------------------------------------------------------ the step
    def step(self, net: Net, x: torch.Tensor, y: torch.Tensor, opt=None):
        """Inference with the configured solver, then the weight gradients at its final state: (grads aligned
        with ``net.params()``, feed-forward loss (K,))."""
        self._resolve(net, x.shape[-len(net.input_shape) - 1])  # the batch: x is (B, ...) or (K, B, ...)
        if self.mode == "error":
            return error_step(self, net, x, y)
        if fused_applies(self, net):
            return fused_step(self, net, x, y)
        return state_step(self, net, x, y, opt)

    def init_value(self, u: torch.Tensor, net: Net) -> torch.Tensor:
        """v_l at the start of inference: u_l (F-ini), 0, or a draw of the replica's own stream."""
        if self.init == "forward":
            return u
        if self.init == "zero":
            return torch.zeros_like(u)
        # one stream per replica, derived from the replica's seed: K replicas = K separate runs
        seeds = tuple(getattr(net, "seeds", range(net.K)))
        if self._gens is None or self._gens[0] != seeds:
            self._gens = (seeds, generators("pc_values", seeds, self.seed))
        return torch.stack([torch.randn(u.shape[1:], generator=g, dtype=u.dtype) for g in self._gens[1]]).to(u.device)

    def step_sizes(self, net: Net, acts=None) -> list:
        """kappa_l per hidden layer for ``net`` (``steps.kappas``)."""
        return kappas(self, self.energy_weights(net), net, acts)

    # ------------------------------------------------------------------ checkpoints and status
    def state_dict(self) -> dict:
        """What a checkpoint needs to continue exactly: the bound step's warm-started power-iteration vectors."""
        return self.power.state_dict()

    def load_state_dict(self, state: dict, net: Net) -> None:
        self.power.load_state_dict(state, net)

    def inference_status(self) -> dict:
        """Per replica, since the last call (then reset): ``energy_rose``, the fraction of training steps in which
        the energy rose at some inference step (nan under FPA, where the move is not a descent on F);
        ``residual``, the mean relative residual ||dF/dv|| at the end over ||dF/dv|| at the start;
        ``backtracks`` (guard on); ``steps``. Empty if no step ran. One host read."""
        return self.status.read(descent=not self.fpa, guard=self.guard)

    def perturbation(self) -> dict[str, torch.Tensor]:
        """RMS of v_l minus its feed-forward value after the last inference, per layer (K,)."""
        if self._last is None:
            return {}
        v, u_ff = self._last
        return {f"pert_{l}": (v[l] - u_ff[l]).flatten(1).double().pow(2).mean(1).sqrt().cpu()
                for l in range(1, len(v))}

    def coord_observables(self, net, x, y) -> dict[str, torch.Tensor]:
        return self.perturbation()
