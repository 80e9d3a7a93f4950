"""When the library runs its Triton kernels instead of the torch references.

By default: on CUDA tensors, with Triton installed. Inside `force_kernels()` also on CPU
tensors — under TRITON_INTERPRET=1 the kernels then run in Triton's interpreter — so a test can
drive every GPU-only branch of a layer (gradients, dispatch, fallbacks) on a machine without a
GPU, and compare it with the reference path:

    with force_kernels():
        out = layer(x)          # the same code a GPU runs, interpreted

A kernel that cannot produce gradients is chosen only when none are needed (`needs_grad`).
"""

from __future__ import annotations

import contextlib
import contextvars
from collections.abc import Iterator

import torch

from expertswitch.utils.imports import is_triton_available

_FORCED: contextvars.ContextVar[bool] = contextvars.ContextVar("force_kernels", default=False)


def kernels_for(t: torch.Tensor) -> bool:
    """True when the Triton kernels should run on tensors like t."""
    return (t.is_cuda or _FORCED.get()) and is_triton_available()


def needs_grad(*tensors: torch.Tensor | None) -> bool:
    """True when autograd would record an operation on any of these tensors."""
    return torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in tensors)


@contextlib.contextmanager
def force_kernels() -> Iterator[None]:
    """Run the Triton kernels on any device inside this block (CPU: set TRITON_INTERPRET=1
    before Triton is imported)."""
    if not is_triton_available():
        raise ImportError("Triton is not installed: pip install 'expertswitch[gpu]'")
    token = _FORCED.set(True)
    try:
        yield
    finally:
        _FORCED.reset(token)
