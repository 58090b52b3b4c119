"""Triton kernels behind peft_sparse's sparse-delta primitive (installed as ``peft_sparse.kernels``).

This folder is mapped to ``peft_sparse.kernels`` in pyproject.toml and must never be importable as a
top-level ``kernels`` package: that name belongs to Hugging Face's ``kernels`` package, which
bitsandbytes imports.

Backends (``PEFT_SPARSE_BACKEND``): ``auto`` (the default) runs the Triton kernels on CUDA tensors when
triton is importable and the torch reference path otherwise; ``torch`` always runs the reference path;
``triton`` always runs the kernels, and is an error where they cannot run (triton missing, or CPU tensors
without ``TRITON_INTERPRET=1``, Triton's interpreter, which is how the tests run them on a CPU; it must be in
the environment before Python starts, because torch imports triton early).

Importing this package never imports triton: the kernel modules (``sddmm``, ``spmm``) are loaded on the
first Triton launch.
"""

from __future__ import annotations

import functools
import importlib.util
import os
from typing import Optional

import torch

BACKEND_ENV = "PEFT_SPARSE_BACKEND"
BACKENDS = ("auto", "torch", "triton")
KERNEL_DTYPES = (torch.float32, torch.bfloat16, torch.float16)


@functools.lru_cache(maxsize=None)
def is_triton_available() -> bool:
    """True when the ``triton`` package can be imported (it is an optional extra: ``peft_sparse[triton]``).

    Cached: ``backend_for`` asks on every forward and backward of every layer, and the answer cannot change
    within a process."""
    if importlib.util.find_spec("triton") is None:
        return False
    return _triton_import_error() is None


def _triton_import_error() -> Optional[BaseException]:
    from . import _triton

    return _triton.IMPORT_ERROR


def requested_backend() -> str:
    """The backend asked for in ``PEFT_SPARSE_BACKEND`` (``auto`` when unset)."""
    raw = os.environ.get(BACKEND_ENV, "")
    value = raw.strip().lower() or "auto"
    if value not in BACKENDS:
        raise ValueError(f"{BACKEND_ENV}={raw!r} is not one of {', '.join(BACKENDS)}")
    return value


def triton_unavailable_reason(tensor: torch.Tensor) -> Optional[str]:
    """Why the Triton kernels cannot run on ``tensor`` (None when they can)."""
    if importlib.util.find_spec("triton") is None:
        return "triton is not installed (pip install 'peft_sparse[triton]')"
    error = _triton_import_error()
    if error is not None:
        return f"triton failed to import ({error!r})"
    from ._triton import interpreting, language_mode_mismatch

    if tensor.device.type == "cpu" and not interpreting():
        return (
            "the tensors are on the CPU and TRITON_INTERPRET=1 is not set "
            "(Triton runs kernels on CPU tensors only in its interpreter)"
        )
    mismatch = language_mode_mismatch()
    if mismatch is not None:
        return mismatch
    if tensor.device.type not in ("cpu", "cuda"):
        return f"the tensors are on {tensor.device.type!r}; the kernels run on CUDA (or ROCm) devices"
    if tensor.dtype not in KERNEL_DTYPES:
        return f"the kernels take float32, bfloat16 or float16 tensors, not {tensor.dtype}"
    return None


def backend_for(tensor: torch.Tensor) -> str:
    """``"torch"`` or ``"triton"``: the backend that serves ``tensor`` under ``PEFT_SPARSE_BACKEND``.

    Raises ``RuntimeError`` when ``triton`` is forced where it cannot run, ``ValueError`` on an unknown value.
    """
    requested = requested_backend()
    if requested == "torch":
        return "torch"
    if requested == "auto":
        if tensor.is_cuda and tensor.dtype in KERNEL_DTYPES and is_triton_available():
            return "triton"
        return "torch"
    reason = triton_unavailable_reason(tensor)
    if reason is not None:
        raise RuntimeError(f"{BACKEND_ENV}=triton, but {reason}; set {BACKEND_ENV}=auto or torch")
    return "triton"


def describe_backend(tensor: torch.Tensor) -> str:
    """``requested->resolved`` for ``tensor`` (for reprs; never raises), e.g. ``auto->torch``."""
    try:
        requested = requested_backend()
    except ValueError:
        return f"{os.environ.get(BACKEND_ENV)!r}->invalid"
    try:
        return f"{requested}->{backend_for(tensor)}"
    except RuntimeError:
        return f"{requested}->unavailable"


# ------------------------------------------------------------------------------- the ops sparse.py calls


def triton_sddmm(grad_out: torch.Tensor, x: torch.Tensor, delta) -> torch.Tensor:
    """fp32 gradient of ``delta``'s values: ``(grad_outᵀ @ x)`` at its support (2-D ``grad_out`` and ``x``)."""
    from .sddmm import sddmm

    return sddmm(grad_out, x, delta)


def triton_spmm(x: torch.Tensor, values: torch.Tensor, delta) -> torch.Tensor:
    """``x @ ΔWᵀ`` (2-D ``x``), in x's dtype."""
    from .spmm import spmm

    return spmm(x, values, delta)


def triton_spmm_t(grad: torch.Tensor, values: torch.Tensor, delta) -> torch.Tensor:
    """``grad @ ΔW`` (2-D ``grad``), in grad's dtype."""
    from .spmm import spmm_t

    return spmm_t(grad, values, delta)


__all__ = [
    "BACKEND_ENV",
    "backend_for",
    "describe_backend",
    "is_triton_available",
    "requested_backend",
    "triton_sddmm",
    "triton_spmm",
    "triton_spmm_t",
    "triton_unavailable_reason",
]
