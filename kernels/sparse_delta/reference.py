"""The one dense reference of every sparse-delta operation: what tests and benchmarks compare against.

Each function forms ΔW (or the weight gradient) densely, in fp32 or in the inputs' dtype when that is wider
(pass float64 inputs for a float64 reference), and is written for clarity, not speed.
"""

from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F


def _wide(dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if dtype == torch.float64 else torch.float32


def dense_delta(indices: torch.Tensor, values: torch.Tensor, shape: tuple[int, int]) -> torch.Tensor:
    """ΔW as a dense ``(out, in)`` tensor (fp32, or fp64 for fp64 values)."""
    flat = torch.zeros(shape[0] * shape[1], dtype=_wide(values.dtype), device=values.device)
    return flat.index_add(0, indices, values.to(flat.dtype)).view(shape)


def sddmm_reference(grad_out: torch.Tensor, x: torch.Tensor, indices: torch.Tensor) -> torch.Tensor:
    """``(grad_outᵀ @ x).flatten()[indices]``: the dense weight gradient, then a gather."""
    dtype = _wide(x.dtype)
    return (grad_out.to(dtype).T @ x.to(dtype)).reshape(-1)[indices]


def spmm_reference(x: torch.Tensor, indices: torch.Tensor, values: torch.Tensor, shape) -> torch.Tensor:
    """``x @ ΔWᵀ`` through a dense ΔW."""
    delta = dense_delta(indices, values, shape)
    return x.to(delta.dtype) @ delta.T


def spmm_t_reference(grad: torch.Tensor, indices: torch.Tensor, values: torch.Tensor, shape) -> torch.Tensor:
    """``grad @ ΔW`` through a dense ΔW."""
    delta = dense_delta(indices, values, shape)
    return grad.to(delta.dtype) @ delta


def sparse_delta_linear_reference(
    x: torch.Tensor,
    indices: torch.Tensor,
    values: torch.Tensor,
    shape: tuple[int, int],
    weight: Optional[torch.Tensor] = None,
    bias: Optional[torch.Tensor] = None,
) -> torch.Tensor:
    """``F.linear(x, W + ΔW, b)`` (or ``x @ ΔWᵀ + b`` without ``W``) with a dense ΔW, differentiable."""
    delta = torch.zeros(shape[0] * shape[1], dtype=values.dtype, device=values.device)
    delta = delta.index_add(0, indices, values).view(shape)
    effective = delta if weight is None else weight.to(delta.dtype) + delta
    return F.linear(x.to(delta.dtype), effective, None if bias is None else bias.to(delta.dtype))
