"""The torch implementations of the sparse-delta operations: what runs wherever no Triton kernel does.

On the CPU they are sparse: for a block support, batched matmuls over its blocks (the block's columns of ``x``
gathered, multiplied by the block, added into its rows), for ``x @ ΔWᵀ``, ``grad @ ΔW`` and the values' gradient;
for an unstructured support, CSR products (``torch.sparse``) and ``torch.sparse.sampled_addmm``. None forms a
weight-sized tensor. The products with ΔW serve quantized bases: on float bases ``W + ΔW`` for one matmul was
faster, on the CPU too (``function.py``). On CUDA, cuBLAS on a dense ΔW or on the dense weight gradient was faster
than every sparse product measured at LLaMA sizes (cuSPARSE CSR and BSR, and the Triton entry kernels;
``benchmarks/RESULTS.md``), so there they use one weight-sized transient.
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


def _block_product(a: torch.Tensor, values: torch.Tensor, layout: SparseLayout, transpose: bool) -> torch.Tensor:
    """``a @ ΔWᵀ`` (``a``: ``(tokens, in)``) or, with ``transpose``, ``a @ ΔW`` (``a``: ``(tokens, out)``) for a
    block support: per block, the block's columns (rows) of ``a`` times the block, added into its rows (columns)
    of the result. Blocks clipped at the weight's edge have zeros outside it, so their clamped indices add 0."""
    pattern = layout.blocks
    b = pattern.block_size
    out_features, in_features = layout.shape
    dtype = _compute_dtype(a.dtype, a.device)
    index = layout.block_value_index  # (blocks, B rows, B cols), built once per support
    gathered = values.to(dtype).index_select(0, index.clamp(min=0).flatten()).view(index.shape)
    tiles = torch.where(index >= 0, gathered, 0)
    offs = torch.arange(b, device=a.device)
    rows = (pattern.rows[:, None] * b + offs).clamp(max=out_features - 1)
    cols = (pattern.cols[:, None] * b + offs).clamp(max=in_features - 1)
    source, target, width = (rows, cols, in_features) if transpose else (cols, rows, out_features)
    tiles = tiles if transpose else tiles.transpose(1, 2)  # (blocks, source, target)
    tokens = a.shape[0]
    out = torch.zeros(tokens, width, dtype=dtype, device=a.device)
    chunk = max(1, _BLOCK_GATHER_LIMIT // (b * max(tokens, 1)))
    a = a.to(dtype)
    for start in range(0, source.shape[0], chunk):
        src, dst = source[start : start + chunk], target[start : start + chunk]
        n = src.shape[0]
        gathered = a.index_select(1, src.flatten()).view(tokens, n, b).transpose(0, 1)  # (n, tokens, B)
        partial = torch.bmm(gathered, tiles[start : start + chunk])  # (n, tokens, B)
        out.index_add_(1, dst.flatten(), partial.transpose(0, 1).reshape(tokens, n * b))
    return out


@_outside_autocast
def spmm(x: torch.Tensor, values: torch.Tensor, layout: SparseLayout) -> torch.Tensor:
    """``x @ ΔWᵀ`` for 2-D ``x`` ``(tokens, in)``; the result may be a transposed view."""
    if x.is_cuda:
        return x @ _dense(layout, values, x.dtype).T
    if layout.blocks is not None:
        return _block_product(x, values, layout, transpose=False)
    dtype = _compute_dtype(x.dtype, x.device)
    matrix = _csr(layout.crow, layout.col, values.to(dtype), layout.shape)
    return (matrix @ x.to(dtype).T.contiguous()).T


@_outside_autocast
def spmm_t(grad: torch.Tensor, values: torch.Tensor, layout: SparseLayout) -> torch.Tensor:
    """``grad @ ΔW`` for 2-D ``grad`` ``(tokens, out)``; the result may be a transposed view."""
    if grad.is_cuda:
        return grad @ _dense(layout, values, grad.dtype)
    if layout.blocks is not None:
        return _block_product(grad, values, layout, transpose=True)
    dtype = _compute_dtype(grad.dtype, grad.device)
    ordered = values.index_select(0, layout.csc_order).to(dtype)
    transposed = _csr(layout.ccol, layout.csc_row, ordered, layout.shape[::-1])
    return (transposed @ grad.to(dtype).T.contiguous()).T


@_outside_autocast
def sddmm(grad_out: torch.Tensor, x: torch.Tensor, layout: SparseLayout) -> torch.Tensor:
    """fp32 ``(grad_outᵀ @ x)`` at the support, in the values' (row-major) order."""
    if layout.nnz == 0 or grad_out.shape[0] == 0:
        return torch.zeros(layout.nnz, dtype=torch.float32, device=x.device)
    if x.is_cuda:
        return (grad_out.T @ x).view(-1).index_select(0, layout.indices).float()
    if layout.blocks is not None:
        return _sddmm_blocks(grad_out, x, layout)
    dtype = _compute_dtype(x.dtype, x.device)
    # Zeros, not torch.empty: sampled_addmm computes beta * values even for beta=0, and 0 * NaN-garbage = NaN.
    pattern = _csr(layout.crow, layout.col, torch.zeros(layout.nnz, dtype=dtype, device=x.device), layout.shape)
    return torch.sparse.sampled_addmm(pattern, grad_out.to(dtype).T, x.to(dtype), beta=0.0).values().float()


def _sddmm_blocks(grad_out: torch.Tensor, x: torch.Tensor, layout: SparseLayout) -> torch.Tensor:
    """Block supports: each block's columns of ``grad_out`` and ``x`` gathered as ``(tokens, B)`` tiles, one batched
    matmul, the tiles written to their row-major positions with one ``index_copy_``."""
    pattern = layout.blocks
    b = pattern.block_size
    out_features, in_features = layout.shape
    tokens = grad_out.shape[0]
    dtype = _compute_dtype(x.dtype, x.device)
    grad_out, x = grad_out.to(dtype), x.to(dtype)
    index = layout.block_value_index  # (blocks, B, B) positions in the values, -1 outside the weight
    result = torch.empty(layout.nnz, dtype=torch.float32, device=x.device)
    count = pattern.rows.numel()
    chunk = max(1, _BLOCK_GATHER_LIMIT // (b * max(tokens, 1)))
    offs = torch.arange(b, device=x.device)
    for start in range(0, count, chunk):
        rows, cols = pattern.rows[start : start + chunk], pattern.cols[start : start + chunk]
        n = rows.numel()
        g = _block_columns(grad_out, rows, b, offs, out_features)  # (n, tokens, B)
        xs = _block_columns(x, cols, b, offs, in_features)
        tiles = torch.bmm(g.transpose(1, 2), xs).float()  # (n, B rows, B cols)
        positions = index[start : start + n]
        inside = positions >= 0
        if bool(inside.all()):
            result.index_copy_(0, positions.flatten(), tiles.flatten())
        else:  # blocks clipped at the weight's edge
            result.index_copy_(0, positions[inside], tiles[inside])
    return result


def _block_columns(a: torch.Tensor, blocks: torch.Tensor, b: int, offs: torch.Tensor, width: int) -> torch.Tensor:
    """``(n, tokens, B)``: for each block index in ``blocks``, its ``B`` columns of ``a`` (``(tokens, width)``); whole
    column blocks are gathered from a blocked view, edge blocks (past ``width``) by their clamped columns."""
    tokens = a.shape[0]
    if width % b == 0:
        return a.view(tokens, width // b, b).transpose(0, 1).index_select(0, blocks)
    columns = (blocks[:, None] * b + offs).clamp(max=width - 1).flatten()
    return a.index_select(1, columns).view(tokens, blocks.numel(), b).transpose(0, 1)
