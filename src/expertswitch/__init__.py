"""expertswitch: hold and serve many expert LLMs on one GPU.

Importing the package must stay cheap and must not initialise CUDA: heavy modules (transformers,
the calibration runner) are imported inside the functions that need them.
"""

from expertswitch.errors import (
    ArchiveError,
    CheckpointError,
    CompatibilityError,
    ConfigError,
    ExpertSwitchError,
)

__version__ = "0.1.0"

__all__ = [
    "ArchiveError",
    "CheckpointError",
    "CompatibilityError",
    "ConfigError",
    "ExpertSwitchError",
    "__version__",
]
