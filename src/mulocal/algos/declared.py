"""What every learning rule declares about its options, without torch: the ``Option`` tuples the rule classes
take as their ``OPTIONS`` (one source), the constants their choices use, and each rule's family.

The command line builds its flags from here (``cli/flags.py``), so that a mistyped flag of ``mulocal train``
answers without loading torch; ``algos/__init__.py`` loads a rule's class (and torch) only when it is used.
"""
from __future__ import annotations

from .options import Option

# ------------------------------------------------------------------------------------------ bp
BP_OPTIONS = (
    Option("readout_only", "bool", False, "train only the output layer on frozen random features (the "
           "feature-learning baseline)", implicit=True),
)

# ------------------------------------------------------------------------------------------ pc
INFERENCE = ("auto", "sequential", "parallel", "error", "mupc")
INITS = ("forward", "zero", "random")
ERROR_T = 3  # the error solver's default steps: relative residual ~1e-3 at width 256, depths 8-32 (docs/pc.md)
PARALLEL_STEPS = ("bound", "gamma")

PC_OPTIONS = (
    Option("T", "int", None, "inference steps (default: 1 for sequential and parallel, single-shot; "
           f"{ERROR_T} for error; the depth H for mupc)"),
    Option("inference", "str", "auto", "inference solver: sequential (top-down), parallel, error (ePC: the "
           "errors as free variables), mupc (muPC's recipe); auto: error on residual nets, else sequential",
           choices=INFERENCE),
    Option("init", "str", "forward", "value initialisation: forward, zero or random", choices=INITS),
    Option("fpa", "bool", False, "fixed prediction assumption"),
    Option("kappa", "floats", None, "inference step size, one or one per hidden layer (default: 1/gamma_l; "
                                    "parallel without FPA: see parallel_step)"),
    Option("parallel_step", "str", "bound", "step of parallel inference without FPA when kappa is not given: "
           "bound (1/(gamma_l + gamma_{l+1} c ||W_{l+1}||_2^2), stable) or gamma (1/gamma_l)",
           choices=PARALLEL_STEPS, implicit=True),
    Option("power_iters", "int", 1, "power iterations per step for ||W||_2 in the bound step (warm-started)",
           implicit=True),
    Option("guard", "bool", None, "energy-decrease guard: undo a replica's step if its energy rose and halve "
           "its step (default: on for the error solver, off otherwise)", implicit=True),
    Option("no_status", "bool", False, "skip the per-replica inference status (inference_status(): energy rose, "
           "residual), saving an energy evaluation per step and a gradient evaluation per inference",
           flag="no-inference-status", implicit=True),
    Option("momentum", "float", 0.0, "inference momentum", flag="inference-momentum"),
    Option("tol", "float", None, "stop inference when the energy changes less than this (relative)"),
    Option("incremental", "bool", False, "incremental PC: update weights at every inference step"),
    Option("gammas", "floats", None, "hidden-layer energy weights gamma_1..gamma_{L-1} (default 1; residual "
           "nets: d^depth_gamma, Parameterization.gamma_hidden)"),
    Option("activity_lr", "float", 0.5, "mupc only: jpc's activity learning rate beta (kappa = 2 beta / B: jpc "
           "differentiates the batch-mean energy sum ||e||^2 / B)", implicit=True),
)

# ------------------------------------------------------------------------------------------ tp, dtp, gnt
FEEDBACK = ("trainable", "linear", "ridge", "inverse")
FB_LOSSES = ("rec", "drl", "ldrl")
NOISE_RNGS = ("auto", "host", "counter")

TARGET_OPTIONS = (Option("beta", "float", 1.0, "output target step: t_L = f - beta dloss/df"),)
TP_OPTIONS = TARGET_OPTIONS + (
    Option("feedback", "str", "trainable", "trainable (phi(V a + c)), linear (V a + c), ridge (batch optimum) "
           "or inverse", choices=FEEDBACK),
    Option("fb_loss", "str", "rec", "feedback loss: rec, drl or ldrl", choices=FB_LOSSES),
    Option("sigma", "floats", 0.1, "feedback-training noise, one or one per hidden layer"),
    Option("noise_rng", "str", "auto", "feedback-noise generator: host (per-replica CPU generators), counter "
           "(all replicas at once on the net's device) or auto (counter on a GPU, host on a CPU)",
           choices=NOISE_RNGS, implicit=True),
    Option("fb_iters", "int", 1, "feedback iterations per batch"),
    Option("fb_lr", "float", 0.01, "feedback learning rate"),
    Option("fb_optimizer", "str", "sgd", "feedback optimizer: sgd or adam", choices=("sgd", "adam")),
    Option("ridge", "float", 1e-3, "ridge constant per unit of width (ridge feedback)"),
    Option("pretrain_epochs", "int", 0, "feedback-only epochs before training", flag="fb-pretrain-epochs"),
)
GNT_OPTIONS = TARGET_OPTIONS + (Option("damping", "float", 1e-4, "damping lambda of J J^T + lambda I"),)

# ------------------------------------------------------------------------------------------ every rule
# name -> (module of the algos package, class name, family, options), in the order the rules are listed
RULES = {
    "bp": ("bp", "BP", "backpropagation", BP_OPTIONS),
    "pc": ("pc", "PC", "predictive coding", PC_OPTIONS),
    "tp": ("tp", "TP", "target propagation", TP_OPTIONS),
    "dtp": ("tp", "DTP", "target propagation", TP_OPTIONS),
    "gnt": ("gnt", "GNT", "Gauss-Newton targets", GNT_OPTIONS),
}


def family(name: str) -> str:
    return RULES[name][2]


def declared(name: str) -> tuple:
    """The options rule ``name`` declares (its class's ``OPTIONS``)."""
    return RULES[name][3]


__all__ = ["BP_OPTIONS", "ERROR_T", "FB_LOSSES", "FEEDBACK", "GNT_OPTIONS", "INFERENCE", "INITS", "NOISE_RNGS",
           "PARALLEL_STEPS", "PC_OPTIONS", "RULES", "TARGET_OPTIONS", "TP_OPTIONS", "declared", "family"]
