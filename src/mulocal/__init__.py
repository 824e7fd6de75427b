"""mulocal: width-stable local learning (muP for predictive coding and target propagation)."""
from .errors import CheckpointError, ConfigError, DataError, MulocalError
from .param import Parameterization, preset

__version__ = "0.1.0"
__all__ = ["Parameterization", "preset", "MulocalError", "ConfigError", "DataError", "CheckpointError", "__version__"]
