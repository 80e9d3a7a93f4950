"""Capability probes for optional and GPU-only dependencies (STYLE.md §10).

Nothing here initialises CUDA at import time; each probe runs only when called.
"""

from __future__ import annotations

import functools
import importlib.util


@functools.cache
def is_triton_available() -> bool:
    """True when Triton can be imported (it may still lack a GPU: see `has_cuda`)."""
    return importlib.util.find_spec("triton") is not None


def has_cuda() -> bool:
    """True when torch sees a CUDA device. Calling this initialises CUDA."""
    import torch

    return torch.cuda.is_available()


def resolve_device(device: str | None) -> str:
    """Map a user's `--device` to a torch device string, with a clear error when unavailable."""
    from expertswitch.errors import ConfigError

    if device in (None, "auto"):
        return "cuda" if has_cuda() else "cpu"
    if device.startswith("cuda") and not has_cuda():
        raise ConfigError(
            f"--device {device} was requested but torch sees no CUDA GPU; use --device cpu"
        )
    if not (device == "cpu" or device.startswith("cuda")):
        raise ConfigError(f"unknown device {device!r}: use cpu, cuda or cuda:N")
    return device


def require_serve() -> None:
    """The server's optional dependencies, or a ConfigError that says how to install them."""
    from expertswitch.errors import ConfigError

    missing = [m for m in ("fastapi", "uvicorn", "prometheus_client")
               if importlib.util.find_spec(m) is None]  # fmt: skip
    if missing:
        raise ConfigError(f"the server needs {', '.join(missing)}: pip install -e '.[serve]' "
                          "(or pip install 'expertswitch[serve]')")  # fmt: skip
