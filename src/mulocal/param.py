"""abc-parameterizations anchored at a base width.

A network has L weight layers with three *roles*: the input layer (fan-in fixed,
fan-out = width M), hidden layers (M -> M) and the output layer (M -> C fixed).
Each role r carries width exponents

* ``b[r]`` - init std of W ~ M^{-b}      (SP: b = (0, 1/2, 1/2))
* ``c[r]`` - learning rate eta * M^{-c}   (SP: c = (0, 0, 0))
* ``a[r]`` - forward multiplier M^{-a}    (SP: a = (0, 0, 0); abc-symmetry makes it optional)

Everything is anchored at a base width M_0 (as microsoft/mup does) with m = M / M_0:

    init std      sigma / sqrt(fan_in) * m^{-(b - b_SP)}
    multiplier    m^{-(a - a_SP)}
    learning rate eta * m^{-c}

so at M = M_0 every parameterization builds exactly the standard model with the same
learning rates. ``describe(width)`` prints the resolved numbers; the table below maps each
muP rule to the line that applies it:

=========================  ===========================================  ==========================
rule                       formula                                      where
=========================  ===========================================  ==========================
init std                   sigma * fan_in^-1/2 * m^-(b - b_SP)          ``Parameterization.rule``
forward multiplier         m^-(a - a_SP)                                ``Parameterization.rule``
per-layer learning rate    eta * m^-c                                   ``Parameterization.rule``
bias learning rate         eta * m^-c_bias                              ``Parameterization.rule``
PC output energy weight    gamma'_L * m^-gbar_L                         ``Parameterization.gamma_L``
residual branch mult.      d^-alpha, d = (H - 2) / (H_0 - 2)            ``Parameterization.rule``
residual branch LR (W, b)  (width LR) * d^-c_H                          ``Parameterization.rule``
PC hidden energy weight    d^depth_gamma (residual nets; else 1)        ``Parameterization.gamma_hidden``
Adam epsilon (W and b)     eps * m^-e            (default e = 0)        ``Parameterization.rule``
decoupled weight decay     wd * m^-w; default: lr_l * wd_l = eta * wd   ``Parameterization.rule``
=========================  ===========================================  ==========================

Depth (residual nets only, ``nets.ResMLP``). A residual MLP of depth H has H - 2 blocks
h_l = h_{l-1} + a_l (W_l phi(h_{l-1}) + b_l). With d = (H - 2) / (H_0 - 2), the number of blocks
relative to the base net's (H_0 = ``base_depth``; the same as H / H_0 for H >> 1, and exact at small
depth, where the input layer's own update would otherwise bias the sum over blocks below):

    branch multiplier   a_l = d^-alpha             (alpha = ``depth_alpha``; 1/2: Depth-muP / muPC,
                                                    1: CompleteP, 0: the depth-free control)
    branch LR (W, b)    eta_l = (width LR) * d^-c_H (c_H = ``depth_lr_exponent()``)

Derivation of c_H (d >> 1, the backward signal dl/dh_l is Theta(1) in depth when alpha >= 1/2).
An SGD step moves W_l by eta_l a_l (dl/dh_l) phi^T, so the block's contribution a_l Delta W_l phi to
the residual stream is ~ eta_l a_l^2; the H - 2 blocks add up to ~ d eta_l a_l^2, which is Theta(1)
iff eta_l ~ d^(2 alpha - 1): c_H = 1 - 2 alpha (Depth-muP, alpha = 1/2: c_H = 0, the branch LR is
depth-independent; CompleteP with SGD, alpha = 1: c_H = -1). Adam normalises the gradient, the
contribution is ~ eta_l a_l and c_H = 1 - alpha (alpha = 1/2: eta / sqrt(d), as in Depth-muP;
CompleteP: 0). ``depth_c`` overrides the derived value. Input and output layers carry no depth
factor. A plain (non-residual) net never reads these fields; at H = H_0 every factor is exactly 1,
so every preset equals its depth-free version there (tested: ``tests/test_depth.py``).

PC is stable for gbar_L >= -1 (the inference perturbation of v_{L-1} scales like M^{-1-gbar_L});
``preset(..., algo="pc")`` with gbar_L < -1 warns (``UnstableParameterizationWarning``, see
``stability.instability``) and still builds it.

Biases start at zero. A bias is a vector-like parameter (its fan-in is 1), so its
learning-rate exponent is set separately: ``c_bias = (hidden/input-layer biases, output bias)``.

Optimizer hyperparameters (read by ``optim.LayerwiseOptimizer`` from the resolved ``LayerRule``; the base
values eps and wd are the run's ``adam_eps`` and ``weight_decay``):

* Adam's epsilon, ``eps_exponents`` e = (e_in, e_hid, e_out): eps_l = eps * m^-e[role] for the layer's weight
  and bias (``LayerRule.eps_scale``, ``bias_eps_scale``), but the output layer's bias: its gradient dL/db_L = delta_L
  is Theta(1) under every parameterization, and mup's readout bias is not divided by m either, so its eps is eps. Default e = (0, 0, 0) (SP and custom parameterizations); the ``mup`` preset
  with Adam: e = (0, 0, -1), microsoft/mup's epsilon in this package's abc-form: MuAdam never rescales eps, but its
  readout (``MuReadout``) divides its input by m, so its gradient is 1/m of ours and its eps acts as eps * m on our
  readout (tested against mup: tests/test_adapter_mup.py). It is mup's choice, not the width-consistent one:
  Adam's update m / (sqrt(v) + eps) is invariant when the gradient and eps scale together, so the width-consistent
  choice is e = the width exponent of the layer's gradient entries; under this package's muP (a = 0, b = (0, 1/2,
  1)) dL/dW_l = (dL/dh_l) x_{l-1}^T has entries ~ m^-1 for the input and hidden layers (the backward signal
  dL/dh_l ~ 1/M below the output) and ~ 1 for the output layer: e = (1, 1, 0) (``--eps-exponents 1,1,0``). With
  e = 0 an eps that is negligible at the base width becomes comparable with those gradients at m ~ |g| / eps and
  Adam turns into SGD with LR eta / eps there; mup's e_out = -1 reaches that regime sooner on the readout.
* Decoupled weight decay (``weight_decay_mode = "decoupled"``: AdamW, or SGDW), ``wd_exponents`` w: the
  update is theta <- theta - lr_l (update + wd_l theta) (torch.optim.AdamW's convention: the LR multiplies
  the decay). Default None: *independent* weight decay, w = -c (w = -c_bias for biases; a residual block also
  undoes its depth LR factor): wd_l = wd / lr_scale_l, so the decay per step lr_l * wd_l = eta * wd is the
  same at every width (microsoft/mup's MuAdamW multiplies wd by the width multiplier it divides the LR by, for
  the same product). A tuple w: wd_l = wd * m^-w[role] for weight and bias; w = (0, 0, 0) is the decay
  coupled to the LR (wd_l = wd, the decay per step lr_l * wd shrinks with the layer's LR, torch.optim.AdamW
  used naively under muP). L2 weight decay (``weight_decay_mode = "l2"``, the default: wd * theta added to
  the gradient, torch's ``weight_decay`` of SGD / Adam) is not width-scaled, as before these fields existed.
"""
from __future__ import annotations

import math
from dataclasses import asdict, dataclass, replace

from .describe import resolved_table
from .errors import ConfigError, check_choice, choice_error, finite_number
from .stability import warn_if_unstable

OPTIMIZERS = ("sgd", "adam")
ROLES = ("input", "hidden", "output")
BASE_WIDTH = 64  # the default base width M_0: every preset equals SP at this width
BASE_DEPTH = 3  # the default base depth H_0 (the default run depth; one residual block): presets are depth-free there
DEPTH_ALPHA = 0.5  # the default residual branch exponent: Depth-muP / muPC
DEPTH_GAMMA = 1.0  # the default depth exponent of PC's hidden energy weights on residual nets (gamma_l = d^1)
B_SP = (0.0, 0.5, 0.5)
A_SP = (0.0, 0.0, 0.0)
ADAMW_HINT = "AdamW is Adam with decoupled weight decay: --optimizer adam --weight-decay-mode decoupled"
EPS_EXPONENTS = (0.0, 0.0, 0.0)  # Adam's eps is not width-scaled (a Parameterization's default; SP)
# muP with Adam: microsoft/mup's epsilon on the readout. MuAdam leaves eps alone, but mup's readout (MuReadout) computes
# (theta / m) x, so its gradient is 1/m of this package's W (W = theta / m, no multiplier); Adam's update of theta with
# eps is the update of W with eps * m: e_out = -1 (tests/test_adapter_mup.py: MuAdam's numbers exactly).
MUP_ADAM_EPS = (0.0, 0.0, -1.0)


@dataclass(frozen=True)
class LayerRule:
    """The resolved numbers of one layer at one width."""

    role: str
    init_std: float
    multiplier: float
    lr_scale: float
    bias_lr_scale: float
    branch: float = 1.0  # residual branch multiplier a_l (1 outside residual blocks)
    eps_scale: float = 1.0  # Adam's eps of the weight: eps * eps_scale (m^-e)
    bias_eps_scale: float = 1.0  # ... of the bias (the same, but 1 on the output layer: its gradient is width-free)
    wd_scale: float = 1.0  # decoupled weight decay of the weight: wd * wd_scale
    bias_wd_scale: float = 1.0  # ... of the bias


@dataclass(frozen=True)
class Parameterization:
    """Per-role width exponents (b, c, a), a base width and algorithm-specific exponents.

    ``gamma_bar_L`` / ``gamma_L_prime`` weight the output energy of predictive coding
    (gamma_L = gamma'_L m^{-gbar_L}); ``feedback_b`` / ``feedback_c`` are the init and
    learning-rate exponents of target propagation's feedback weights (roles as above, read
    in the feedback direction). ``sigma`` multiplies every init std. ``optimizer`` names the optimizer the
    learning-rate exponents are for (muP's c differ for SGD and Adam); training with another is an error.
    ``eps_exponents`` (Adam's eps_l = eps m^-e) and ``wd_exponents`` (decoupled weight decay wd_l = wd m^-w;
    None: independent, lr_l wd_l = eta wd) are explained in the module docstring.
    """

    name: str = "custom"
    b: tuple[float, float, float] = B_SP
    c: tuple[float, float, float] = (0.0, 0.0, 0.0)
    a: tuple[float, float, float] = A_SP
    c_bias: tuple[float, float] = (0.0, 0.0)
    base_width: int = BASE_WIDTH
    sigma: float = 1.0
    gamma_bar_L: float = 0.0
    gamma_L_prime: float = 1.0
    feedback_b: tuple[float, float, float] | None = None
    feedback_c: tuple[float, float, float] | None = None
    optimizer: str | None = None  # the optimizer these exponents are for (None: any); training checks it
    note: str = ""
    base_depth: int = BASE_DEPTH  # H_0: residual nets only
    depth_alpha: float = DEPTH_ALPHA  # branch multiplier a_l = d^-alpha, d = (H - 2) / (H_0 - 2)
    depth_c: float | None = None  # branch LR exponent in depth (None: derived, see depth_lr_exponent)
    depth_gamma: float = DEPTH_GAMMA  # PC on residual nets: hidden energy weights gamma_l = d^depth_gamma
    eps_exponents: tuple[float, float, float] = EPS_EXPONENTS  # Adam's eps_l = eps * m^-e[role]
    wd_exponents: tuple[float, float, float] | None = None  # decoupled wd_l = wd * m^-w[role]; None: independent

    def __post_init__(self) -> None:
        for key, n in (("b", 3), ("c", 3), ("a", 3), ("c_bias", 2)):
            value = getattr(self, key)
            try:
                value = tuple(float(v) for v in value)
            except (TypeError, ValueError):
                raise ConfigError(f"parameterization '{self.name}': {key} must be {n} numbers, got {value!r}") from None
            if len(value) != n or not all(math.isfinite(v) for v in value):
                raise ConfigError(f"parameterization '{self.name}': {key} must be {n} finite numbers, got {value!r}")
            object.__setattr__(self, key, value)
        for key in ("feedback_b", "feedback_c", "eps_exponents", "wd_exponents"):
            value = getattr(self, key)
            if value is not None:
                try:
                    value = tuple(float(v) for v in value)
                except (TypeError, ValueError):
                    raise ConfigError(f"parameterization '{self.name}': {key} must be 3 numbers, got {value!r}") \
                        from None
                if len(value) != 3 or not all(math.isfinite(v) for v in value):
                    raise ConfigError(f"parameterization '{self.name}': {key} must be 3 finite numbers")
                object.__setattr__(self, key, value)
        if self.eps_exponents is None:
            raise ConfigError(f"parameterization '{self.name}': eps_exponents must be 3 numbers (0, 0, 0: eps not "
                              "scaled), got None")
        if not isinstance(self.base_width, int) or isinstance(self.base_width, bool) or self.base_width <= 0:
            raise ConfigError(f"base width must be a positive integer, got {self.base_width!r}")
        for key in ("sigma", "gamma_bar_L", "gamma_L_prime"):
            if not math.isfinite(float(getattr(self, key))):
                raise ConfigError(f"parameterization '{self.name}': {key} must be finite")
        if not isinstance(self.base_depth, int) or isinstance(self.base_depth, bool) or self.base_depth < 3:
            raise ConfigError(f"base depth must be an integer >= 3 (at least one residual block), got "
                              f"{self.base_depth!r}")
        for key in ("depth_alpha", "depth_c", "depth_gamma"):
            value = getattr(self, key)
            if value is not None:
                object.__setattr__(self, key, finite_number(value, f"parameterization '{self.name}': {key}"))
        if self.optimizer is not None:
            check_choice("optimizer", self.optimizer, OPTIMIZERS, prefix=f"parameterization '{self.name}'")
        if self.sigma <= 0 or self.gamma_L_prime <= 0:
            raise ConfigError(f"parameterization '{self.name}': sigma and gamma_L_prime must be positive")

    # ------------------------------------------------------------------ resolution
    def width_mult(self, width: int) -> float:
        """m = M / M_0 (validates the width)."""
        return check_width(width) / self.base_width

    def depth_mult(self, depth: int) -> float:
        """d = (H - 2) / (H_0 - 2): the number of residual blocks relative to the base net's (validates H)."""
        if isinstance(depth, bool) or not isinstance(depth, int) or depth < 3:
            raise ConfigError(f"a residual net needs depth (number of weight layers) >= 3, got {depth!r}")
        return (depth - 2) / (self.base_depth - 2)

    def depth_lr_exponent(self) -> float:
        """c_H of the residual branch LR eta * d^-c_H: ``depth_c`` if set, else 1 - 2 alpha (SGD, or no
        optimizer named) or 1 - alpha (Adam); see the module docstring for the derivation."""
        if self.depth_c is not None:
            return self.depth_c
        return 1.0 - self.depth_alpha if self.optimizer == "adam" else 1.0 - 2.0 * self.depth_alpha

    def depth_free(self) -> "Parameterization":
        """The same parameterization without depth scaling (a_l = 1, depth-independent LRs)."""
        return self.with_(depth_alpha=0.0, depth_c=0.0, depth_gamma=0.0)

    def rule(self, role: str, fan_in: int, width: int, depth: int | None = None,
             residual: bool = False) -> LayerRule:
        """Init std, multiplier, learning-rate scales, Adam's eps scale and the decoupled weight decay's scales of
        a layer of ``role`` at ``width`` (the optimizer's rules: module docstring).

        ``residual=True`` (a residual block of a net with ``depth`` weight layers) adds the depth
        factors: the branch multiplier d^-alpha and the branch LR factor d^-c_H on weight and bias.
        """
        r = ROLES.index(check_choice("layer role", role, ROLES))
        m = self.width_mult(width)
        std = self.sigma / math.sqrt(fan_in) * m ** (-(self.b[r] - B_SP[r]))
        mult = m ** (-(self.a[r] - A_SP[r]))
        lr = m ** (-self.c[r])
        blr = m ** (-self.c_bias[1 if role == "output" else 0])
        branch = 1.0
        if residual:
            if role != "hidden":
                raise ConfigError(f"only hidden layers can be residual blocks, got role '{role}'")
            d = self.depth_mult(depth)
            depth_lr = d ** (-self.depth_lr_exponent())
            lr, blr, branch = lr * depth_lr, blr * depth_lr, d ** (-self.depth_alpha)
        eps = m ** (-self.eps_exponents[r])
        if self.wd_exponents is None:  # independent weight decay: lr_l * wd_l = eta * wd
            wd, bwd = 1.0 / lr, 1.0 / blr
        else:
            wd = bwd = m ** (-self.wd_exponents[r])
        beps = 1.0 if role == "output" else eps  # dL/db_L = delta_L: Theta(1) under every parameterization
        return LayerRule(role, std, mult, lr, blr, branch=branch, eps_scale=eps, bias_eps_scale=beps, wd_scale=wd,
                         bias_wd_scale=bwd)

    def feedback_rule(self, role: str, fan_in: int, width: int, depth: int | None = None,
                      residual: bool = False) -> LayerRule:
        """Like :meth:`rule` for feedback weights (defaults: the forward exponents); a residual block's feedback
        branch (``residual=True``) carries the block's depth factors (branch multiplier and LR)."""
        fb = replace(self, b=self.feedback_b or self.b, c=self.feedback_c or self.c)
        return fb.rule(role, fan_in, width, depth, residual)

    def gamma_L(self, width: int) -> float:
        """PC output energy weight gamma_L = gamma'_L * m^{-gbar_L}."""
        return self.gamma_L_prime * self.width_mult(width) ** (-self.gamma_bar_L)

    def gamma_hidden(self, depth: int) -> float:
        """PC's hidden energy weight on a residual net of ``depth`` weight layers: gamma_l = d^depth_gamma, d = (H -
        2) / (H_0 - 2). It keeps the inference's output preconditioner C = sum_l (gamma_L / gamma_l) J_l J_l^T
        (J_l = df/dv_l, Theorem 4.2's C) Theta(1) in depth: each of the ~d blocks adds a Theta(1) term to C, so with
        gamma_l = 1 PC's equilibrium update shrinks like (I + C)^-1 ~ 1/d and turns Gauss-Newton-like. The weight
        gradients gamma_l e_l ~ gamma_L delta_l^BP keep their size (docs/depth.md). 1 at H = H_0."""
        return self.depth_mult(depth) ** self.depth_gamma

    def with_(self, **changes) -> "Parameterization":
        """A copy with some fields changed (validated again)."""
        try:
            return replace(self, **changes)
        except TypeError as err:
            raise ConfigError(f"invalid parameterization field: {err}") from None

    def to_dict(self) -> dict:
        """The fields; the depth and optimizer (eps, weight decay) fields only where they differ from their
        defaults (so the records and hashes of cells written before they existed are unchanged)."""
        d = asdict(self)
        for key, default in (("base_depth", BASE_DEPTH), ("depth_alpha", DEPTH_ALPHA), ("depth_c", None),
                             ("depth_gamma", DEPTH_GAMMA), ("eps_exponents", EPS_EXPONENTS), ("wd_exponents", None)):
            if d[key] == default:
                del d[key]
        return d

    def describe(self, width: int, depth: int = 3, in_dim: int = 784, out_dim: int = 10, lr: float = 1.0) -> str:
        """A readable table of what this resolves to at ``width`` on an MLP (``describe.resolved_table``)."""
        return resolved_table(self, width, layer_shapes(depth, in_dim, width, out_dim), depth, lr)


def check_width(width) -> int:
    if isinstance(width, bool) or not isinstance(width, int):
        try:
            if float(width) != int(width):
                raise ValueError
            width = int(width)
        except (TypeError, ValueError):
            raise ConfigError(f"width must be a positive integer, got {width!r}") from None
    if width <= 0:
        raise ConfigError(f"width must be a positive integer, got {width}")
    return width


def layer_roles(depth: int) -> list[str]:
    if isinstance(depth, bool) or not isinstance(depth, int) or depth < 2:
        raise ConfigError(f"depth (number of weight layers) must be an integer >= 2, got {depth!r}")
    return ["input"] + ["hidden"] * (depth - 2) + ["output"]


def layer_shapes(depth: int, in_dim: int, width: int, out_dim: int) -> list[tuple[str, int, int]]:
    """(role, fan_in, fan_out) of each layer of an MLP."""
    roles = layer_roles(depth)
    dims = [in_dim] + [width] * (depth - 1) + [out_dim]
    return [(r, dims[i], dims[i + 1]) for i, r in enumerate(roles)]


# ---------------------------------------------------------------------- presets
TARGET_ALGOS = ("tp", "dtp", "gnt")


def _sp(optimizer: str, gamma_bar_L: float, algo: str) -> Parameterization:
    return Parameterization(name=f"sp-{optimizer}", gamma_bar_L=gamma_bar_L, note="standard parameterization")


def _mup(optimizer: str, gamma_bar_L: float, algo: str) -> Parameterization:
    """muP of the learning rule ``algo``.

    BP / PC: with SGD the output energy weight gamma_L ~ m^-gbar multiplies every PC update, so
    c = c_SGD - gbar compensates it; Adam normalises it away (c unchanged).
    TP / DTP / GNT: targets move every coordinate by Theta(1), so the update sizes look like Adam's
    for SGD too, c = (0, 1, 1); b_L = 1/2 because W_L and the target-driven Delta h_{L-1} are
    independent (alignment 1/2 instead of 1). Feedback weights: g_L reads the output (role
    "input": b = 0, c = 0), hidden g_l (b = 1/2, c = 1).
    """
    g = gamma_bar_L
    if algo in TARGET_ALGOS:
        return Parameterization(name=f"mup-{algo}-{optimizer}", b=(0, 0.5, 0.5), c=(0, 1, 1), c_bias=(0, 0),
                                feedback_b=(0, 0.5, 0.5), feedback_c=(0, 1, 1),
                                note=f"muP for {algo.upper()} (b_L = 1/2)")
    if optimizer == "sgd":
        note = "muP with SGD (Yang & Hu)" + (f", PC gbar_L = {g:g}: c = c_SGD - gbar_L" if g else "")
        return Parameterization(name="mup-sgd", b=(0, 0.5, 1), c=(-1 - g, 0.0 - g, 1 - g), c_bias=(-1 - g, 0.0 - g),
                                gamma_bar_L=g, note=note)
    return Parameterization(name="mup-adam", b=(0, 0.5, 1), c=(0, 1, 1), c_bias=(0, 0), gamma_bar_L=g,
                            eps_exponents=MUP_ADAM_EPS,
                            note="muP with Adam" + (f", PC gbar_L = {g:g}" if g else ""))


def _gnt(optimizer: str, gamma_bar_L: float, algo: str) -> Parameterization:
    """PC's Gauss-Newton-like muP: gbar_L = -1 (the maximal inference perturbation)."""
    return _mup(optimizer, -1.0, "pc").with_(name=f"gnt-{optimizer}")


def _mup_bL1(optimizer: str, gamma_bar_L: float, algo: str) -> Parameterization:
    """Control for target propagation: TP's muP but with BP's output init b_L = 1."""
    p = _mup(optimizer, gamma_bar_L, algo if algo in TARGET_ALGOS else "tp")
    return p.with_(name=f"mup-bL1-{optimizer}", b=(0, 0.5, 1), note="TP muP with b_L = 1 (control)")


PRESETS = {"sp": _sp, "mup": _mup, "gnt": _gnt, "mup-bl1": _mup_bL1}


def register_preset(name: str, factory) -> None:
    """Add a preset: ``factory(optimizer, gamma_bar_L, algo) -> Parameterization``."""
    PRESETS[name] = factory


def preset(name: str, optimizer: str = "sgd", gamma_bar_L: float = 0.0, algo: str = "bp",
           **overrides) -> Parameterization:
    """A named preset for an optimizer ("sgd" or "adam"), then field overrides.

    ``preset("mup", "sgd")`` is muP for SGD, ``preset("mup", "adam")`` for Adam, ``preset("sp")`` the
    standard parameterization, ``preset("gnt")`` PC's muP with gbar_L = -1, ``preset("mup-bL1",
    algo="dtp")`` TP's control with b_L = 1. ``algo`` picks the learning rule's muP ("tp", "dtp",
    "gnt" have b_L = 1/2, c = (0, 1, 1)). Names like ``mup-sgd`` pin the optimizer. ``gamma_bar_L`` is a preset argument: muP with SGD shifts its learning-rate
    exponents by it (c = c_SGD - gbar_L). Overrides are applied afterwards and never re-derive
    anything: ``preset("mup").with_(gamma_bar_L=-1)`` keeps SGD's c (the unstable control).
    With ``algo="pc"``, a gbar_L < -1 warns (``UnstableParameterizationWarning``, still built):
    PC's inference perturbation then grows with width (``stability.instability``).
    """
    if not isinstance(name, str):
        raise ConfigError(f"preset name must be a string, got {name!r}")
    key = name.lower()
    for opt in OPTIMIZERS:
        if key.endswith("-" + opt) and key[: -len(opt) - 1] in PRESETS:
            key, optimizer = key[: -len(opt) - 1], opt
    check_choice("optimizer", optimizer, OPTIMIZERS, hint=ADAMW_HINT if optimizer == "adamw" else "")
    if key not in PRESETS:  # the name as given, not its key (lower case, the optimizer taken off)
        raise choice_error("parameterization preset", name, sorted(PRESETS))
    g = finite_number(gamma_bar_L, "gamma_bar_L")
    base = PRESETS[key](optimizer, g, algo)
    base = base.with_(optimizer=optimizer) if base.optimizer is None else base
    out = base.with_(**overrides) if overrides else base
    warn_if_unstable(out, algo)
    return out
