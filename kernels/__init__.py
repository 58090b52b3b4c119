"""Triton kernels behind peft_sparse's sparse-delta primitive (installed as ``peft_sparse.kernels``).

This folder is mapped to ``peft_sparse.kernels`` in pyproject.toml and must never be importable as a
top-level ``kernels`` package: that name belongs to Hugging Face's ``kernels`` package, which
bitsandbytes imports.
"""

from __future__ import annotations

import importlib.util


def is_triton_available() -> bool:
    """True when the ``triton`` package can be imported (it is an optional extra: ``peft_sparse[triton]``)."""
    return importlib.util.find_spec("triton") is not None


__all__ = ["is_triton_available"]
