"""Error and warning types, and the checks every module shares (a choice, a finite number). Every user-facing failure
is one of these, with a one-line message."""
from __future__ import annotations

import math
from typing import Collection


class MulocalError(ValueError):
    """Base class: the CLI prints ``str(err)`` on one line and exits non-zero."""


class ConfigError(MulocalError):
    """Invalid parameterization, width, preset, option or shape."""


class DataError(MulocalError):
    """A dataset is missing, truncated or corrupt (the message says how to get it)."""


class CheckpointError(MulocalError):
    """A checkpoint does not match the model it is loaded into."""


class MulocalWarning(UserWarning):
    """Base class of the warnings: the CLI prints each once, on one line (``mulocal: warning: ...``)."""


class UnstableParameterizationWarning(MulocalWarning):
    """A parameterization outside the stable range of its learning rule. It still runs (the unstable
    regime can be studied on purpose); ``warnings.simplefilter("error", ...)`` makes it an error."""


def choice_error(what: str, value, choices: Collection[str], *, where: str = "", hint: str = "",
                 also: Collection[str] = (), prefix: str = "", as_repr: bool = False,
                 error: type[Exception] = ConfigError) -> Exception:
    """The error of a ``value`` that is none of ``choices``, for a caller that has checked already:

        [PREFIX: ]unknown WHAT 'VALUE'[ WHERE]; choose one of A, B, C[, or ALSO][ (HINT)]

    ``choices`` are listed in their order (pass ``sorted(...)`` for a registry); ``also`` are accepted too and
    named after them (``, or all``); ``as_repr`` shows the value as ``repr(value)``; ``error`` is the
    exception class (``argparse.ArgumentTypeError`` for an argument type)."""
    shown = repr(value) if as_repr else f"'{value}'"
    extra = "".join(f", or {a}" for a in also)
    return error(f"{prefix + ': ' if prefix else ''}unknown {what} {shown}{' ' + where if where else ''}; "
                 f"choose one of {', '.join(choices)}{extra}{f' ({hint})' if hint else ''}")


def check_choice(what: str, value, choices: Collection[str], *, where: str = "", hint: str = "",
                 also: Collection[str] = (), prefix: str = "", as_repr: bool = False,
                 error: type[Exception] = ConfigError):
    """``value`` if it is one of ``choices`` (or of ``also``), else :func:`choice_error`'s error.

    ``check_choice("loss", kind, LOSSES)`` -> ``unknown loss 'l1'; choose one of ce, mse``."""
    if value in choices or value in also:
        return value
    raise choice_error(what, value, choices, where=where, hint=hint, also=also, prefix=prefix, as_repr=as_repr,
                       error=error)


def finite_number(value, what: str) -> float:
    """``value`` as a finite float, else a ConfigError naming ``what``."""
    try:
        out = float(value)
    except (TypeError, ValueError):
        raise ConfigError(f"{what} must be a number, got {value!r}") from None
    if not math.isfinite(out):
        raise ConfigError(f"{what} must be finite, got {value!r}")
    return out
