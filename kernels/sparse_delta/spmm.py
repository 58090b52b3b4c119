"""SpMM with a sparse increment: ``y = x @ ΔWᵀ`` (quantized bases' forward) and ``grad_x = grad_y @ ΔW``.

``ΔW`` is ``(out, in)`` with its values on a fixed support (row-major order). Two Triton kernels, each
serving both directions; outputs are in the activations' dtype, accumulated in fp32:

* ``spmm_csr`` / ``spmm_t_csr``: any support. A program takes one output feature (a row of ΔW for ``y``, a
  column for ``grad_x``: the layout's CSC arrays ``ccol`` / ``csc_row`` / ``csc_order``) and a tile of tokens, and
  sums the gathered input features times the values. Activations are read and written transposed
  (features × tokens), so each gathered feature is a contiguous run of tokens.
* ``spmm_bsr`` / ``spmm_t_bsr``: supports made of whole ``B × B`` blocks. A program takes one block row
  (``y``) or block column (``grad_x``) and a token tile, and accumulates ``tl.dot`` of the activation tile
  with each of its blocks, read straight from the row-major values (edge blocks are masked).

The torch references are ``reference.spmm_reference`` / ``spmm_t_reference`` (a dense ΔW, then a matmul).
"""

import torch

from ._triton import autotune, cdiv, dot_upcast, interpreting, jit, pow2_bucket, tl
from .layout import BlockPattern, SparseLayout, uses_block_kernels

# ------------------------------------------------------------------------------------- unstructured


@jit
def _spmm_csr_kernel(
    a_ptr, v_ptr, ptr_ptr, idx_ptr, out_ptr,
    T, stride_af, stride_at, stride_of, stride_ot,
    BLOCK_NZ: tl.constexpr, BLOCK_T: tl.constexpr,
):
    """``out[r, t] = Σ_{j in ptr[r]:ptr[r+1]} v[j] · a[idx[j], t]`` (a compressed-row product, transposed)."""
    r = tl.program_id(0).to(tl.int64)
    pid_t = tl.program_id(1)
    ts = (pid_t * BLOCK_T + tl.arange(0, BLOCK_T)).to(tl.int64)
    t_mask = ts < T
    start = tl.load(ptr_ptr + r)
    stop = tl.load(ptr_ptr + r + 1)
    acc = tl.zeros((BLOCK_NZ, BLOCK_T), dtype=tl.float32)
    for j in range(start, stop, BLOCK_NZ):
        js = j + tl.arange(0, BLOCK_NZ)
        j_mask = js < stop
        feature = tl.load(idx_ptr + js, mask=j_mask, other=0).to(tl.int64)
        v = tl.load(v_ptr + js, mask=j_mask, other=0.0).to(tl.float32)
        a = tl.load(a_ptr + feature[:, None] * stride_af + ts[None, :] * stride_at,
                    mask=j_mask[:, None] & t_mask[None, :], other=0.0).to(tl.float32)
        acc += a * v[:, None]
    y = tl.sum(acc, axis=0)
    tl.store(out_ptr + r * stride_of + ts * stride_ot, y.to(out_ptr.dtype.element_ty), mask=t_mask)


def _compressed_product(a, values, ptr, idx, n_out, block_nz=16, block_t=64):
    """``(tokens, n_out)``: for each output feature r, ``Σ values[j] · a[:, idx[j]]`` over ``ptr[r]:ptr[r+1]``."""
    tokens = a.shape[0]
    if tokens == 0 or n_out == 0 or values.numel() == 0:
        return a.new_zeros(tokens, n_out)
    at = a.t().contiguous()  # (features, tokens)
    out_t = torch.empty(n_out, tokens, dtype=a.dtype, device=a.device)
    _spmm_csr_kernel[(n_out, cdiv(tokens, block_t))](
        at, values, ptr, idx, out_t,
        tokens, at.stride(0), at.stride(1), out_t.stride(0), out_t.stride(1),
        BLOCK_NZ=block_nz, BLOCK_T=block_t, num_warps=4,
    )
    return out_t.t().contiguous()


def spmm_csr(x: torch.Tensor, values: torch.Tensor, layout: SparseLayout) -> torch.Tensor:
    """``x @ ΔWᵀ`` for ``x`` ``(tokens, in)``, in x's dtype."""
    return _compressed_product(x, values, layout.crow, layout.col, layout.shape[0])


def spmm_t_csr(grad: torch.Tensor, values: torch.Tensor, layout: SparseLayout) -> torch.Tensor:
    """``grad @ ΔW`` for ``grad`` ``(tokens, out)``, in grad's dtype."""
    return _compressed_product(grad, values[layout.csc_order], layout.ccol, layout.csc_row, layout.shape[1])


# ------------------------------------------------------------------------------------------- blocks


@jit
def _spmm_bsr_kernel(
    a_ptr, v_ptr, out_ptr, ptr_ptr, order_ptr, brow_ptr, bcol_ptr, row_ptr_ptr, crow_ptr,
    T, N_OUT, N_IN, T_KEY, stride_at, stride_af, stride_ot, stride_of,
    B: tl.constexpr, BLOCK_T: tl.constexpr, TRANS: tl.constexpr, UPCAST: tl.constexpr, IEEE: tl.constexpr,
):
    """``TRANS=False``: ``out[t, rows of block row p] = Σ_k a[t, cols of k] @ V_kᵀ`` (``y = x @ ΔWᵀ``);
    ``TRANS=True``: ``out[t, cols of block column p] = Σ_k a[t, rows of k] @ V_k`` (``grad_x = grad @ ΔW``)."""
    p = tl.program_id(0)
    pid_t = tl.program_id(1)
    offs = tl.arange(0, B)
    ts = (pid_t * BLOCK_T + tl.arange(0, BLOCK_T)).to(tl.int64)
    t_mask = ts < T
    start = tl.load(ptr_ptr + p)
    stop = tl.load(ptr_ptr + p + 1)
    acc = tl.zeros((BLOCK_T, B), dtype=tl.float32)
    for q in range(start, stop):
        if TRANS:
            blk = tl.load(order_ptr + q)
        else:
            blk = q
        br = tl.load(brow_ptr + blk)
        bc = tl.load(bcol_ptr + blk)
        rows = br * B + offs
        cols = bc * B + offs
        r_mask = rows < N_OUT
        c_mask = cols < N_IN
        # V_k[i, j] = values[crow[row i] + (rank of the block in its block row) * B + j]
        starts = tl.load(crow_ptr + rows, mask=r_mask, other=0) + (blk - tl.load(row_ptr_ptr + br)) * B
        if TRANS:
            a = tl.load(a_ptr + ts[:, None] * stride_at + rows[None, :] * stride_af,
                        mask=t_mask[:, None] & r_mask[None, :], other=0.0)  # (BLOCK_T, B: i)
            v = tl.load(v_ptr + starts[:, None] + offs[None, :],
                        mask=r_mask[:, None] & c_mask[None, :], other=0.0)  # (i, j)
        else:
            a = tl.load(a_ptr + ts[:, None] * stride_at + cols[None, :] * stride_af,
                        mask=t_mask[:, None] & c_mask[None, :], other=0.0)  # (BLOCK_T, B: j)
            v = tl.load(v_ptr + starts[None, :] + offs[:, None],
                        mask=c_mask[:, None] & r_mask[None, :], other=0.0)  # (j, i) = V_kᵀ
        if UPCAST:
            a = a.to(tl.float32)
            v = v.to(tl.float32)
        else:
            v = v.to(a.dtype)
        if IEEE:
            acc = tl.dot(a, v, acc, input_precision="ieee")
        else:
            acc = tl.dot(a, v, acc)
    features = p * B + offs
    if TRANS:
        f_mask = features < N_IN
    else:
        f_mask = features < N_OUT
    tl.store(out_ptr + ts[:, None] * stride_ot + features[None, :] * stride_of,
             acc.to(out_ptr.dtype.element_ty), mask=t_mask[:, None] & f_mask[None, :])


#: Autotuned on CUDA over the token tile and the warps (key: block size, bucketed tokens, direction, precision).
_SPMM_BSR_CONFIGS = [
    {"BLOCK_T": block_t, "num_warps": warps, "num_stages": 3} for block_t in (32, 64, 128) for warps in (4, 8)
]
_spmm_bsr_tuned = autotune(_spmm_bsr_kernel, _SPMM_BSR_CONFIGS, key=["B", "T_KEY", "TRANS", "IEEE"])


def _block_product(a, values, pattern: BlockPattern, shape, trans: bool, block_t=None):
    b = pattern.block_size
    tokens = a.shape[0]
    n_out = shape[1] if trans else shape[0]
    if tokens == 0 or values.numel() == 0:
        return a.new_zeros(tokens, n_out)
    out = torch.empty(tokens, n_out, dtype=a.dtype, device=a.device)
    # Block columns are visited through the column order; block rows are the blocks' own (row-major) order.
    ptr, order = (pattern.col_ptr, pattern.col_order) if trans else (pattern.row_ptr, None)
    args = (
        a, values, out, ptr, order, pattern.rows, pattern.cols, pattern.row_ptr, pattern.crow,
        tokens, shape[0], shape[1], pow2_bucket(tokens), a.stride(0), a.stride(1), out.stride(0), out.stride(1),
    )
    flags = dict(B=b, TRANS=trans, UPCAST=dot_upcast(a.dtype), IEEE=a.dtype == torch.float32)
    if block_t is None and _spmm_bsr_tuned is not None and not interpreting() and a.is_cuda:
        _spmm_bsr_tuned[lambda meta: (cdiv(n_out, b), cdiv(tokens, meta["BLOCK_T"]))](*args, **flags)
        return out
    block_t = block_t or (64 if b <= 64 else 32)
    _spmm_bsr_kernel[(cdiv(n_out, b), cdiv(tokens, block_t))](
        *args, **flags, BLOCK_T=block_t, num_warps=4 if b <= 32 else 8, num_stages=3,
    )
    return out


def spmm_bsr(x: torch.Tensor, values: torch.Tensor, pattern: BlockPattern, shape) -> torch.Tensor:
    """``x @ ΔWᵀ`` on a block support, in x's dtype."""
    return _block_product(x, values, pattern, shape, trans=False)


def spmm_t_bsr(grad: torch.Tensor, values: torch.Tensor, pattern: BlockPattern, shape) -> torch.Tensor:
    """``grad @ ΔW`` on a block support, in grad's dtype."""
    return _block_product(grad, values, pattern, shape, trans=True)


# ----------------------------------------------------------------------------------------- dispatch


def spmm(x: torch.Tensor, values: torch.Tensor, layout: SparseLayout) -> torch.Tensor:
    """``x @ ΔWᵀ`` on ``layout``'s support: the block kernel where the support allows."""
    if uses_block_kernels(layout):
        return spmm_bsr(x, values, layout.blocks, layout.shape)
    return spmm_csr(x, values, layout)


def spmm_t(grad: torch.Tensor, values: torch.Tensor, layout: SparseLayout) -> torch.Tensor:
    """``grad @ ΔW`` on ``layout``'s support."""
    if uses_block_kernels(layout):
        return spmm_t_bsr(grad, values, layout.blocks, layout.shape)
    return spmm_t_csr(grad, values, layout)
