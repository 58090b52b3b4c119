"""The torch implementations of the sparse-delta operations: what runs wherever no Triton kernel does.

On the CPU they are sparse: CSR products (``torch.sparse``) for ``x @ ΔWᵀ`` and ``grad @ ΔW``,
``torch.sparse.sampled_addmm`` for the values' gradient of an unstructured support, and one batched matmul
over the blocks of a block support; none forms a weight-sized tensor. On CUDA, cuBLAS on a dense ΔW or on
the dense weight gradient was faster than every sparse product measured at LLaMA sizes (cuSPARSE CSR and
BSR, and the Triton entry kernels; ``benchmarks/RESULTS.md``), so there they use one weight-sized transient.
"""

from __future__ import annotations

import functools
import warnings

import torch

from .layout import SparseLayout

#: Largest gathered activation tile of the block SDDMM (elements), so its memory stays bounded.
_BLOCK_GATHER_LIMIT = 1 << 22


def _csr(crow: torch.Tensor, col: torch.Tensor, values: torch.Tensor, shape) -> torch.Tensor:
    with warnings.catch_warnings():  # "Sparse CSR tensor support is in beta state": valid by construction
        warnings.simplefilter("ignore", UserWarning)
        return torch.sparse_csr_tensor(crow, col, values, size=tuple(shape))


def _outside_autocast(fn):
    """Run ``fn`` with autocast off: under ``torch.autocast("cpu", dtype=torch.bfloat16)`` (the Trainer's and TRL's
    ``bf16=True``) autocast would cast the CSR operands to bf16, which the CPU sparse kernels do not implement. The
    dtypes are chosen explicitly below instead (``_compute_dtype``)."""

    @functools.wraps(fn)
    def wrapper(first: torch.Tensor, *args, **kwargs):
        if not torch.is_autocast_enabled(first.device.type):
            return fn(first, *args, **kwargs)
        with torch.autocast(first.device.type, enabled=False):
            return fn(first, *args, **kwargs)

    return wrapper


def _compute_dtype(dtype: torch.dtype, device: torch.device) -> torch.dtype:
    """CPU sparse kernels have fp32/fp64 implementations only: half precision is computed in fp32."""
    if device.type == "cpu" and dtype not in (torch.float32, torch.float64):
        return torch.float32
    return dtype


def _dense(layout: SparseLayout, values: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    flat = torch.zeros(layout.shape[0] * layout.shape[1], dtype=dtype, device=values.device)
    return flat.index_add_(0, layout.indices, values.to(dtype)).view(layout.shape)


@_outside_autocast
def spmm(x: torch.Tensor, values: torch.Tensor, layout: SparseLayout) -> torch.Tensor:
    """``x @ ΔWᵀ`` for 2-D ``x`` ``(tokens, in)``; the result may be a transposed view."""
    if x.is_cuda:
        return x @ _dense(layout, values, x.dtype).T
    dtype = _compute_dtype(x.dtype, x.device)
    matrix = _csr(layout.crow, layout.col, values.to(dtype), layout.shape)
    return (matrix @ x.to(dtype).T.contiguous()).T


@_outside_autocast
def spmm_t(grad: torch.Tensor, values: torch.Tensor, layout: SparseLayout) -> torch.Tensor:
    """``grad @ ΔW`` for 2-D ``grad`` ``(tokens, out)``; the result may be a transposed view."""
    if grad.is_cuda:
        return grad @ _dense(layout, values, grad.dtype)
    dtype = _compute_dtype(grad.dtype, grad.device)
    transposed = _csr(layout.ccol, layout.csc_row, values[layout.csc_order].to(dtype), layout.shape[::-1])
    return (transposed @ grad.to(dtype).T.contiguous()).T


@_outside_autocast
def sddmm(grad_out: torch.Tensor, x: torch.Tensor, layout: SparseLayout) -> torch.Tensor:
    """fp32 ``(grad_outᵀ @ x)`` at the support, in the values' (row-major) order."""
    if layout.nnz == 0 or grad_out.shape[0] == 0:
        return torch.zeros(layout.nnz, dtype=torch.float32, device=x.device)
    if x.is_cuda:
        return (grad_out.T @ x).view(-1)[layout.indices].float()
    if layout.blocks is not None:
        return _sddmm_blocks(grad_out, x, layout)
    dtype = _compute_dtype(x.dtype, x.device)
    # Zeros, not torch.empty: sampled_addmm computes beta * values even for beta=0, and 0 * NaN-garbage = NaN.
    pattern = _csr(layout.crow, layout.col, torch.zeros(layout.nnz, dtype=dtype, device=x.device), layout.shape)
    return torch.sparse.sampled_addmm(pattern, grad_out.to(dtype).T, x.to(dtype), beta=0.0).values().float()


def _sddmm_blocks(grad_out: torch.Tensor, x: torch.Tensor, layout: SparseLayout) -> torch.Tensor:
    """Block supports: gather each block's rows of ``grad_out`` and columns of ``x``, one batched matmul."""
    pattern = layout.blocks
    b = pattern.block_size
    out_features, in_features = layout.shape
    tokens = grad_out.shape[0]
    dtype = _compute_dtype(x.dtype, x.device)
    offs = torch.arange(b, device=x.device)
    result = torch.empty(layout.nnz, dtype=torch.float32, device=x.device)
    count = pattern.rows.numel()
    chunk = max(1, _BLOCK_GATHER_LIMIT // (b * max(tokens, 1)))
    for start in range(0, count, chunk):
        block_rows = pattern.rows[start : start + chunk]
        block_cols = pattern.cols[start : start + chunk]
        rows = block_rows[:, None] * b + offs  # (n, B), past the edge for clipped blocks
        cols = block_cols[:, None] * b + offs
        g = grad_out.index_select(1, rows.clamp(max=out_features - 1).flatten()).to(dtype)
        xs = x.index_select(1, cols.clamp(max=in_features - 1).flatten()).to(dtype)
        n = rows.shape[0]
        tiles = torch.bmm(g.view(tokens, n, b).permute(1, 2, 0), xs.view(tokens, n, b).transpose(0, 1))
        # Row i of block k sits at crow[row] + (rank of k in its block row) * B in the row-major values.
        rank = torch.arange(start, start + n, device=x.device) - pattern.row_ptr[block_rows]
        starts = pattern.crow[rows.clamp(max=out_features - 1)] + (rank * b)[:, None]
        positions = starts[:, :, None] + offs
        inside = (rows < out_features)[:, :, None] & (cols < in_features)[:, None, :]
        result[positions[inside]] = tiles[inside].float()
    return result
