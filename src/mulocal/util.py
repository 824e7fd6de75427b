"""Small shared helpers, and the constants that torch-free modules (the command line) share with torch ones."""
from __future__ import annotations

import math

DEFAULT_LR = {"sgd": 0.1, "adam": 1e-3}  # the base learning rate when none is given (optim.py)
COMPILE_MODES = ("off", "default", "reduce-overhead", "cuda-graph")  # TrainConfig.compile (train.py), --compile
EXPORT_FORMATS = ("state-dict", "program")  # mulocal export (export.py), --format


def json_safe(obj):
    """Make ``obj`` strict-JSON serialisable: nan -> null, +-inf -> "inf" / "-inf", keys -> str."""
    if isinstance(obj, float) and not math.isfinite(obj):
        return None if math.isnan(obj) else ("inf" if obj > 0 else "-inf")
    if isinstance(obj, dict):
        return {str(k): json_safe(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [json_safe(v) for v in obj]
    return obj


def rule_label(algo: str, param: str, options: dict | None = None) -> str:
    """'pc mup-sgd T=5 inference=parallel': a learning rule, its resolved preset's name and its options (sorted),
    the key a diagnostic or an experiment files one configuration's results under."""
    return " ".join([algo, param] + [f"{k}={v}" for k, v in sorted((options or {}).items())])
