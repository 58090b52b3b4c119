"""The autograd Function of a linear layer with a sparse increment, and the dispatch between implementations.

``sparse_delta_linear(x, values, layout, weight, bias)`` computes ``F.linear(x, W + ΔW, b)``, ΔW non-zero only on
the support described by ``layout``. It saves ``x`` and the values, nothing weight-sized, and takes the values'
gradient at the support only (an SDDMM), so no dense weight gradient is kept. ``weight`` says where ``W`` comes
from:

* a float tensor (a full-precision base): ΔW is added **in place** for the product and the overwritten entries are
  put back exactly afterwards (saved support-sized before the add), in the forward and again in the backward. No
  weight-sized tensor is formed; the weight is bit-for-bit what it was after every call. Only where the product
  needs another dtype than the weight's (no autocast, bf16 activations on an fp32 weight) is ``W + ΔW`` a cast
  copy, which the cast needs anyway.
* a callable ``dtype -> tensor`` that returns a **fresh** dense weight each call (a quantized base's
  dequantization, ``peft_sparse.quantized``): ΔW is scattered into that buffer, which nobody else holds, and one
  matmul runs. One dequantization in the forward and one in the backward, as bitsandbytes' own 4-bit training
  matmul does; nothing weight-sized is kept between them.
* ``None``: ``x @ ΔWᵀ + b`` alone, through sparse products (an increment added beside a base layer that runs its
  own forward: hooked or 8-bit bases, a second active adapter, mixed-adapter batches).

The values' gradient (``sddmm``) is the Triton block kernel on CUDA block supports, the dense weight gradient plus a
gather elsewhere on CUDA, and on the CPU torch's sampled product or batched block products (``torch_ops``). A
backend forced to ``triton`` runs a Triton kernel wherever one exists (the interpreter, in the tests).
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from typing import Callable, Optional, Union

import torch
import torch.nn.functional as F

from . import backend_for, get_backend, torch_ops
from .layout import SparseLayout, uses_block_kernels

#: A fresh dense ``(out, in)`` weight in the requested dtype, made anew at each call (a dequantization).
FreshWeight = Callable[[torch.dtype], torch.Tensor]
WeightSource = Union[torch.Tensor, FreshWeight, None]


def _kernel_wanted(tensor: torch.Tensor, layout: SparseLayout) -> bool:
    """Triton for this product: on block supports where Triton serves, everywhere when forced."""
    if backend_for(tensor) != "triton":
        return False
    return get_backend() == "triton" or uses_block_kernels(layout)


def sddmm(grad_out: torch.Tensor, x: torch.Tensor, layout: SparseLayout) -> torch.Tensor:
    """fp32 values' gradient ``(grad_outᵀ @ x)`` at the support (2-D inputs)."""
    if grad_out.dtype != x.dtype:
        dtype = torch.promote_types(grad_out.dtype, x.dtype)
        grad_out, x = grad_out.to(dtype), x.to(dtype)
    if _kernel_wanted(x, layout):
        from . import sddmm as triton_sddmm

        return triton_sddmm.sddmm(grad_out, x, layout)
    return torch_ops.sddmm(grad_out, x, layout)


def spmm(x: torch.Tensor, values: torch.Tensor, layout: SparseLayout) -> torch.Tensor:
    """``x @ ΔWᵀ`` (2-D ``x``), in x's dtype (CPU half precision: fp32)."""
    if _kernel_wanted(x, layout):
        from . import spmm as triton_spmm

        return triton_spmm.spmm(x, values, layout)
    return torch_ops.spmm(x, values, layout)


def spmm_t(grad: torch.Tensor, values: torch.Tensor, layout: SparseLayout) -> torch.Tensor:
    """``grad @ ΔW`` (2-D ``grad``), in grad's dtype (CPU half precision: fp32)."""
    if _kernel_wanted(grad, layout):
        from . import spmm as triton_spmm

        return triton_spmm.spmm_t(grad, values, layout)
    return torch_ops.spmm_t(grad, values, layout)


def _storage_indices(weight: torch.Tensor, layout: SparseLayout) -> Optional[torch.Tensor]:
    """Flat positions of the support in ``weight``'s storage: the support itself for a contiguous ``(out, in)``
    weight, the transposed positions for a transposed view (GPT-2's ``Conv1D`` stores ``(in, out)``); None for any
    other layout."""
    if weight.is_contiguous():
        return layout.indices
    if weight.T.is_contiguous():
        out_features, in_features = layout.shape
        rows = torch.div(layout.indices, in_features, rounding_mode="floor")
        return (layout.indices - rows * in_features) * out_features + rows
    return None


@contextlib.contextmanager
def folded(weight: WeightSource, values: torch.Tensor, layout: SparseLayout, dtype: torch.dtype) -> Iterator[torch.Tensor]:
    """``W + ΔW`` in ``dtype`` for one product (see the module docstring): a fresh weight with ΔW scattered in, or a
    float weight with ΔW added in place and its entries put back exactly when the block ends."""
    if callable(weight):
        fresh = weight(dtype)
        fresh.view(-1).index_add_(0, layout.indices, values.to(dtype))
        yield fresh
        return
    storage = _storage_indices(weight, layout) if weight.dtype == dtype else None
    if storage is None:  # another dtype (or layout): the cast makes a copy anyway
        merged = weight.to(dtype=dtype, memory_format=torch.contiguous_format, copy=True)
        merged.view(-1).index_add_(0, layout.indices, values.to(dtype))
        yield merged
        return
    flat = (weight if weight.is_contiguous() else weight.T).view(-1)
    with torch.no_grad():
        saved = flat.index_select(0, storage)  # not flat[storage]: advanced indexing is a slow path on the CPU
        flat.index_add_(0, storage, values.to(dtype))
    try:
        yield weight
    finally:
        with torch.no_grad():
            flat.index_copy_(0, storage, saved)


class SparseDeltaLinear(torch.autograd.Function):
    """``y = x @ (W + ΔW)ᵀ + b``, or ``x @ ΔWᵀ + b`` with no ``W``; see the module docstring."""

    @staticmethod
    def forward(ctx, x, values, layout, weight, bias):
        shape = layout.shape
        x2d = x.reshape(-1, shape[1])
        ctx.layout = layout
        # The weight is held as a reference, not saved for backward: its in-place fold changes its version counter,
        # and its entries are back to what they were when the product ends.
        ctx.weight = weight
        ctx.save_for_backward(x, values)
        if weight is None:
            out = spmm(x2d, values, layout).to(x.dtype).contiguous()
            if bias is not None:
                out += bias.to(out.dtype)
        else:
            with folded(weight, values, layout, x.dtype) as merged:
                out = F.linear(x2d, merged, bias)
        return out.view(*x.shape[:-1], shape[0])

    @staticmethod
    def backward(ctx, grad_out):
        x, values = ctx.saved_tensors
        layout, weight = ctx.layout, ctx.weight
        shape = layout.shape
        grad_2d = grad_out.reshape(-1, shape[0])
        x2d = x.reshape(-1, shape[1])
        grad_x = grad_values = grad_weight = grad_bias = None
        if ctx.needs_input_grad[0]:
            if weight is None:
                grad_x = spmm_t(grad_2d, values, layout).to(grad_2d.dtype)
            else:
                with folded(weight, values, layout, grad_2d.dtype) as merged:
                    grad_x = grad_2d @ merged
            grad_x = grad_x.reshape(x.shape)
        if ctx.needs_input_grad[1]:
            grad_values = sddmm(grad_2d, x2d, layout).to(values.dtype)
        if ctx.needs_input_grad[3]:  # an unfrozen float base weight (not the usual case)
            grad_weight = (grad_2d.T @ x2d.to(grad_2d.dtype)).to(weight.dtype)
        if ctx.needs_input_grad[4]:
            grad_bias = grad_2d.sum(0)
        return grad_x, grad_values, None, grad_weight, grad_bias


def sparse_delta_linear(
    x: torch.Tensor,
    values: torch.Tensor,
    layout: SparseLayout,
    weight: WeightSource = None,
    bias: Optional[torch.Tensor] = None,
) -> torch.Tensor:
    """``F.linear(x, W + ΔW, bias)``, ``W`` from ``weight`` (a float tensor, or a callable returning a fresh
    dequantized one), or ``x @ ΔWᵀ + bias`` when ``weight`` is None.

    ``values`` are ΔW's entries on ``layout``'s support (row-major order); weight layout is ``(out, in)``.
    """
    return SparseDeltaLinear.apply(x, values, layout, weight, bias)
