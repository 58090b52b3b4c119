"""The sparse-delta operations behind peft_sparse (installed as ``peft_sparse.kernels``).

Liger-Kernel's layout: each operation has its Triton kernels (``sddmm.py``, ``spmm.py``), its torch
implementation (``torch_ops.py``, what runs on the CPU and wherever Triton is not used), **one** dense
reference that tests and benchmarks compare against (``reference.py``), and the autograd Function that
ties them together (``function.py``). Everything here takes tensors (flat indices, CSR/CSC arrays, block
patterns: ``layout.py``), never a PEFT or peft_sparse object.

This folder is mapped to ``peft_sparse.kernels`` in pyproject.toml and must never be importable as a
top-level ``kernels`` package: that name belongs to Hugging Face's ``kernels`` package, which bitsandbytes
imports.

Backends. ``auto`` (the default) picks, for each operation and device, the implementation measured fastest
(``benchmarks/RESULTS.md``): on CUDA the Triton block kernels and cuBLAS products, on the CPU torch's sparse
products. ``torch`` never launches a Triton kernel; ``triton`` launches one wherever a kernel exists, and is
an error where kernels cannot run (triton missing, or CPU tensors without ``TRITON_INTERPRET=1``, Triton's
interpreter, which is how the tests run the kernels on a CPU; it must be in the environment before Python
starts, because torch imports triton early).

The backend is read once from ``PEFT_SPARSE_BACKEND`` at import, and changed with ``set_backend(name)`` or,
for a block of code, ``with use_backend(name): ...``. Importing this package never imports triton.
"""

from __future__ import annotations

import contextlib
import functools
import importlib.util
import os
from collections.abc import Iterator
from typing import Optional

import torch

BACKEND_ENV = "PEFT_SPARSE_BACKEND"
BACKENDS = ("auto", "torch", "triton")
KERNEL_DTYPES = (torch.float32, torch.bfloat16, torch.float16)


def _parse_backend(raw: str, source: str) -> str:
    value = raw.strip().lower() or "auto"
    if value not in BACKENDS:
        raise ValueError(f"{source}={raw!r} is not one of {', '.join(BACKENDS)}")
    return value


_backend: str = _parse_backend(os.environ.get(BACKEND_ENV, ""), BACKEND_ENV)


def get_backend() -> str:
    """The backend in force: ``auto``, ``torch`` or ``triton``."""
    return _backend


def set_backend(name: str) -> None:
    """Choose the backend for the rest of the process (overrides ``PEFT_SPARSE_BACKEND``)."""
    global _backend
    _backend = _parse_backend(name, "backend")


@contextlib.contextmanager
def use_backend(name: str) -> Iterator[None]:
    """Run a block of code with another backend, e.g. ``with use_backend("torch"): loss.backward()``."""
    global _backend
    previous, _backend = _backend, _parse_backend(name, "backend")
    try:
        yield
    finally:
        _backend = previous


@functools.lru_cache(maxsize=None)
def is_triton_available() -> bool:
    """True when the ``triton`` package can be imported (an optional extra: ``pip install triton``, or the ``[triton]`` extra of an install from source); cached,
    since the answer cannot change within a process."""
    if importlib.util.find_spec("triton") is None:
        return False
    return _triton_import_error() is None


def _triton_import_error() -> Optional[BaseException]:
    from . import _triton

    return _triton.IMPORT_ERROR


def triton_unavailable_reason(tensor: torch.Tensor) -> Optional[str]:
    """Why the Triton kernels cannot run on ``tensor`` (None when they can)."""
    if importlib.util.find_spec("triton") is None:
        return "triton is not installed (pip install triton)"
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
    """``"torch"`` or ``"triton"``: whether Triton kernels serve ``tensor`` under the backend in force.

    ``auto`` gives Triton on CUDA tensors (where triton imports); a forced ``triton`` that cannot run raises
    ``RuntimeError`` naming the reason.
    """
    if _backend == "torch":
        return "torch"
    if _backend == "auto":
        if tensor.is_cuda and tensor.dtype in KERNEL_DTYPES and is_triton_available():
            return "triton"
        return "torch"
    reason = triton_unavailable_reason(tensor)
    if reason is not None:
        raise RuntimeError(
            f"the peft_sparse backend is 'triton' ({BACKEND_ENV} or set_backend), but {reason}; "
            "use 'auto' or 'torch'"
        )
    return "triton"


def describe_backend(tensor: torch.Tensor) -> str:
    """``requested->resolved`` for ``tensor``, e.g. ``auto->torch`` (for reprs; never raises)."""
    try:
        return f"{_backend}->{backend_for(tensor)}"
    except RuntimeError:
        return f"{_backend}->unavailable"


from .function import sparse_delta_linear  # noqa: E402
from .layout import BLOCK_KERNEL_SIZES, BlockPattern, SparseLayout, build_layout  # noqa: E402

__all__ = [
    "BACKENDS",
    "BACKEND_ENV",
    "BLOCK_KERNEL_SIZES",
    "BlockPattern",
    "SparseLayout",
    "backend_for",
    "build_layout",
    "describe_backend",
    "get_backend",
    "is_triton_available",
    "set_backend",
    "sparse_delta_linear",
    "triton_unavailable_reason",
    "use_backend",
]
