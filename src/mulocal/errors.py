"""Error and warning types. Every user-facing failure is one of these, with a one-line message."""


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
