"""Error types. Every user-facing failure is one of these, with a one-line message."""


class MulocalError(ValueError):
    """Base class: the CLI prints ``str(err)`` on one line and exits non-zero."""


class ConfigError(MulocalError):
    """Invalid parameterization, width, preset, option or shape."""


class DataError(MulocalError):
    """A dataset is missing, truncated or corrupt (the message says how to get it)."""


class CheckpointError(MulocalError):
    """A checkpoint does not match the model it is loaded into."""
