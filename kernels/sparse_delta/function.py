"""The autograd Function of a linear layer with a sparse increment, and the dispatch between implementations.

``sparse_delta_linear(x, values, layout, weight, bias)`` computes ``F.linear(x, W + ΔW, b)`` (or
``x @ ΔWᵀ + b`` without ``W``: quantized bases, whose own forward runs beside it), ΔW non-zero only on the
support described by ``layout``. It saves ``x``, the values and the weight reference, nothing weight-sized,
and takes the values' gradient at the support only (an SDDMM), so no dense weight gradient is kept.

How each product runs is chosen per device, from measurements (``benchmarks/RESULTS.md``):

* CPU, float bases: ``W + ΔW`` formed for the matmul and freed at once (recomputed in the backward), as on
  CUDA. Measured faster than ``F.linear(x, W) + x @ ΔWᵀ`` with sparse products (CSR, or batched block products)
  at every shape and token count tried (SmolLM2 and MiniLM blocks, 512 and 2,048 tokens, 1 % and LoRA r=8's
  count, unstructured and 32 x 32 blocks; ``benchmarks/cpu_hot_path.py``): one weight-sized copy and scatter
  costs less than any sparse product adds. It lives only inside the layer's forward or backward.
* CPU, quantized bases (no float ``W``; dequantizing would cost more): the base layer's own forward plus sparse
  products (``torch_ops``: batched block products, or CSR); no weight-sized tensor.
* CUDA: the weight-sized ``W + ΔW`` is formed for the cuBLAS product and freed at once (recomputed in the
  backward): one scatter over the weight costs a few percent of the matmul, less than any sparse product
  adds. The values' gradient is the Triton block kernel on block supports, and the dense gradient plus a
  gather on unstructured ones (faster than the entry kernel at thousands of tokens).
* A backend forced to ``triton`` runs a Triton kernel wherever one exists (the interpreter, in the tests).
"""

from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F

from . import backend_for, get_backend, torch_ops
from .layout import SparseLayout, uses_block_kernels


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


def _merge_weight(weight: torch.Tensor, values: torch.Tensor, layout: SparseLayout, dtype) -> torch.Tensor:
    """``W + ΔW`` as a new dense tensor in ``dtype``."""
    merged = weight.to(dtype=dtype, memory_format=torch.contiguous_format, copy=True)  # GPT-2's Conv1D: Wᵀ views
    merged.view(-1).index_add_(0, layout.indices, values.to(dtype))
    return merged


def merges_weight(weight: Optional[torch.Tensor]) -> bool:
    """Whether the forward (and the backward) form ``W + ΔW`` rather than adding sparse products: on every float
    base, CPU and CUDA, unstructured and block supports (measured faster; see the module docstring)."""
    return weight is not None


class SparseDeltaLinear(torch.autograd.Function):
    """``y = x @ (W + ΔW)ᵀ + b``, or ``x @ ΔWᵀ + b`` with no ``W``; see the module docstring."""

    @staticmethod
    def forward(ctx, x, values, layout, weight, bias):
        shape = layout.shape
        x2d = x.reshape(-1, shape[1])
        ctx.layout = layout
        ctx.save_for_backward(x, values, weight)
        if merges_weight(weight):
            out = F.linear(x2d, _merge_weight(weight, values, layout, x.dtype), bias)
        else:
            update = spmm(x2d, values, layout)
            if weight is None:
                out = update.to(x.dtype).contiguous()
                if bias is not None:
                    out += bias.to(out.dtype)
            else:
                out = F.linear(x2d, weight, bias)
                out += update.to(out.dtype)
        return out.view(*x.shape[:-1], shape[0])

    @staticmethod
    def backward(ctx, grad_out):
        x, values, weight = ctx.saved_tensors
        layout = ctx.layout
        shape = layout.shape
        grad_2d = grad_out.reshape(-1, shape[0])
        x2d = x.reshape(-1, shape[1])
        grad_x = grad_values = grad_weight = grad_bias = None
        if ctx.needs_input_grad[0]:
            if merges_weight(weight):
                grad_x = grad_2d @ _merge_weight(weight, values, layout, grad_2d.dtype)
            else:
                grad_x = spmm_t(grad_2d, values, layout).to(grad_2d.dtype)
                if weight is not None:
                    grad_x = torch.addmm(grad_x, grad_2d, weight.to(grad_2d.dtype))
            grad_x = grad_x.reshape(x.shape)
        if ctx.needs_input_grad[1]:
            grad_values = sddmm(grad_2d, x2d, layout).to(values.dtype)
        if ctx.needs_input_grad[3]:  # an unfrozen base weight (not the usual case)
            grad_weight = (grad_2d.T @ x2d.to(grad_2d.dtype)).to(weight.dtype)
        if ctx.needs_input_grad[4]:
            grad_bias = grad_2d.sum(0)
        return grad_x, grad_values, None, grad_weight, grad_bias


def sparse_delta_linear(
    x: torch.Tensor,
    values: torch.Tensor,
    layout: SparseLayout,
    weight: Optional[torch.Tensor] = None,
    bias: Optional[torch.Tensor] = None,
) -> torch.Tensor:
    """``F.linear(x, weight + ΔW, bias)``, or ``x @ ΔWᵀ + bias`` when ``weight`` is None (quantized bases).

    ``values`` are ΔW's entries on ``layout``'s support (row-major order); weight layout is ``(out, in)``.
    """
    return SparseDeltaLinear.apply(x, values, layout, weight, bias)
