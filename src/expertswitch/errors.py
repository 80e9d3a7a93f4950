"""Errors a user can act on. Each message names the problem and the fix."""


class ExpertSwitchError(Exception):
    """Base class: the CLI prints these as one line, without a traceback."""


class ConfigError(ExpertSwitchError, ValueError):
    """A configuration value is out of range or inconsistent."""


class CheckpointError(ExpertSwitchError):
    """A Hugging Face checkpoint directory is missing, incomplete or not safetensors."""


class CompatibilityError(ExpertSwitchError):
    """Base and expert (or base and delta) do not belong together."""


class ArchiveError(ExpertSwitchError):
    """An expert archive is missing, corrupt, truncated or of an unknown format."""


class ParallelError(ExpertSwitchError, RuntimeError):
    """A collective across ranks failed: a peer stopped, timed out or called another one."""
