"""SDDMM: the gradient of a sparse increment's values, ``(grad_outᵀ @ x)`` sampled at the support.

``grad_out`` is ``(tokens, out)`` and ``x`` is ``(tokens, in)``; the result has one fp32 entry per support
entry, in the support's (row-major) order. Two Triton kernels, neither forms the dense weight gradient:

* ``sddmm_csr``: any support. A program takes ``BLOCK_K`` support entries and walks the tokens in tiles of
  ``BLOCK_T``, multiplying the gathered ``grad_out[t, row]`` and ``x[t, col]`` (fp32 accumulation). The
  inputs are read transposed (features × tokens), so that each entry's token run is contiguous in memory.
* ``sddmm_bsr``: supports made of whole ``B × B`` blocks (B = 16, 32, 64, 128). A program takes one block
  and accumulates ``grad_out[:, rows]ᵀ @ x[:, cols]`` with ``tl.dot`` (tensor cores on GPU) over token
  tiles, then stores the tile straight into the row-major values (edge blocks are masked).

Both split the tokens over several programs (fp32 atomics) when there are too few entries or blocks to
fill the GPU (not under ``torch.use_deterministic_algorithms(True)``: atomics sum in no fixed order).
The torch reference is ``reference.sddmm_reference`` (a dense product and a gather).
"""

import torch

from ._triton import autotune, cdiv, dot_upcast, interpreting, jit, num_programs_target, pow2_bucket, tl
from .layout import BlockPattern, SparseLayout, uses_block_kernels

# ------------------------------------------------------------------------------------- unstructured


@jit
def _sddmm_csr_kernel(
    g_ptr, x_ptr, idx_ptr, out_ptr,
    K, T, N_IN, tokens_per_program,
    stride_gf, stride_gt, stride_xf, stride_xt,
    BLOCK_K: tl.constexpr, BLOCK_T: tl.constexpr, ATOMIC: tl.constexpr,
):
    pid_k = tl.program_id(0)
    pid_t = tl.program_id(1)
    ks = pid_k * BLOCK_K + tl.arange(0, BLOCK_K)
    k_mask = ks < K
    flat = tl.load(idx_ptr + ks, mask=k_mask, other=0).to(tl.int64)
    rows = flat // N_IN
    cols = flat - rows * N_IN
    g_rows = g_ptr + rows[:, None] * stride_gf
    x_rows = x_ptr + cols[:, None] * stride_xf
    t_start = pid_t * tokens_per_program
    t_stop = tl.minimum(t_start + tokens_per_program, T)
    acc = tl.zeros((BLOCK_K, BLOCK_T), dtype=tl.float32)
    for t in range(t_start, t_stop, BLOCK_T):
        ts = (t + tl.arange(0, BLOCK_T)).to(tl.int64)
        mask = k_mask[:, None] & (ts < t_stop)[None, :]
        g = tl.load(g_rows + ts[None, :] * stride_gt, mask=mask, other=0.0).to(tl.float32)
        xv = tl.load(x_rows + ts[None, :] * stride_xt, mask=mask, other=0.0).to(tl.float32)
        acc += g * xv
    result = tl.sum(acc, axis=1)
    if ATOMIC:
        tl.atomic_add(out_ptr + ks, result, mask=k_mask)
    else:
        tl.store(out_ptr + ks, result, mask=k_mask)


def _token_split(tokens: int, block_t: int, programs: int, device, split) -> tuple[int, int]:
    """``(splits, tokens_per_program)``: enough programs to fill the device, each a whole number of tiles."""
    tiles = cdiv(tokens, block_t)
    if split is None:  # atomics sum in no fixed order: none under torch.use_deterministic_algorithms(True)
        split = 1 if torch.are_deterministic_algorithms_enabled() else num_programs_target(device) // max(programs, 1)
    split = max(1, min(int(split), tiles))
    per_program = cdiv(tiles, split) * block_t
    return cdiv(tokens, per_program), per_program


def sddmm_csr(
    grad_out: torch.Tensor,
    x: torch.Tensor,
    indices: torch.Tensor,
    in_features: int,
    *,
    split=None,
    block_k: int = 64,
    block_t: int = 64,
) -> torch.Tensor:
    """fp32 ``(grad_outᵀ @ x)`` at the sorted flat ``indices`` of an ``(out, in_features)`` weight."""
    k, tokens = indices.numel(), grad_out.shape[0]
    if k == 0 or tokens == 0:
        return torch.zeros(k, dtype=torch.float32, device=grad_out.device)
    gt = grad_out.t().contiguous()  # (out, tokens): each support entry reads a contiguous run of tokens
    xt = x.t().contiguous()  # (in, tokens)
    programs = cdiv(k, block_k)
    splits, per_program = _token_split(tokens, block_t, programs, grad_out.device, split)
    atomic = splits > 1
    out = (torch.zeros if atomic else torch.empty)(k, dtype=torch.float32, device=grad_out.device)
    _sddmm_csr_kernel[(programs, splits)](
        gt, xt, indices, out,
        k, tokens, in_features, per_program,
        gt.stride(0), gt.stride(1), xt.stride(0), xt.stride(1),
        BLOCK_K=block_k, BLOCK_T=block_t, ATOMIC=atomic, num_warps=4,
    )
    return out


# ------------------------------------------------------------------------------------------- blocks


@jit
def _sddmm_bsr_kernel(
    g_ptr, x_ptr, out_ptr, brow_ptr, bcol_ptr, row_ptr_ptr, crow_ptr,
    T, N_OUT, N_IN, T_KEY, NB_KEY,
    stride_gt, stride_gf, stride_xt, stride_xf,
    B: tl.constexpr, BLOCK_T: tl.constexpr, SPLIT: tl.constexpr,
    UPCAST: tl.constexpr, IEEE: tl.constexpr,
):
    """One program: one block, and 1/SPLIT of the tokens (fp32 atomics into a zeroed output when SPLIT > 1).
    ``T_KEY`` and ``NB_KEY`` (token and block counts, bucketed) only key the autotuner."""
    blk = tl.program_id(0)
    pid_t = tl.program_id(1)
    br = tl.load(brow_ptr + blk)
    bc = tl.load(bcol_ptr + blk)
    offs = tl.arange(0, B)
    rows = br * B + offs
    cols = bc * B + offs
    r_mask = rows < N_OUT
    c_mask = cols < N_IN
    per_program = tl.cdiv(tl.cdiv(T, BLOCK_T), SPLIT) * BLOCK_T
    t_start = pid_t * per_program
    t_stop = tl.minimum(t_start + per_program, T)
    acc = tl.zeros((B, B), dtype=tl.float32)
    for t in range(t_start, t_stop, BLOCK_T):
        ts = (t + tl.arange(0, BLOCK_T)).to(tl.int64)
        t_mask = ts < t_stop
        g = tl.load(g_ptr + ts[:, None] * stride_gt + rows[None, :] * stride_gf,
                    mask=t_mask[:, None] & r_mask[None, :], other=0.0)  # (BLOCK_T, B)
        xv = tl.load(x_ptr + ts[:, None] * stride_xt + cols[None, :] * stride_xf,
                     mask=t_mask[:, None] & c_mask[None, :], other=0.0)  # (BLOCK_T, B)
        if UPCAST:
            g = g.to(tl.float32)
            xv = xv.to(tl.float32)
        if IEEE:
            acc = tl.dot(tl.trans(g), xv, acc, input_precision="ieee")
        else:
            acc = tl.dot(tl.trans(g), xv, acc)
    # The block's row i sits in the row-major values at crow[row] + (its rank in the block row) * B: every
    # block before it in that row is whole (only the last block column can be clipped).
    first = tl.load(row_ptr_ptr + br)
    starts = tl.load(crow_ptr + rows, mask=r_mask, other=0)
    positions = starts[:, None] + (blk - first) * B + offs[None, :]
    mask = r_mask[:, None] & c_mask[None, :]
    if SPLIT > 1:
        tl.atomic_add(out_ptr + positions, acc, mask=mask)
    else:
        tl.store(out_ptr + positions, acc, mask=mask)


#: Autotuned on CUDA over the token tile, the token split and the warps, keyed on the block size, the bucketed
#: token and block counts and the precision; the interpreter and fixed requests launch the plain kernel.
_SDDMM_BSR_CONFIGS = [
    {"BLOCK_T": block_t, "SPLIT": split, "num_warps": warps, "num_stages": 3}
    for block_t in (64, 128) for split in (1, 2, 4, 8) for warps in (4, 8)
] + [{"BLOCK_T": 256, "SPLIT": split, "num_warps": 8, "num_stages": 3} for split in (1, 2, 4, 8)]
_sddmm_bsr_tuned = autotune(_sddmm_bsr_kernel, _SDDMM_BSR_CONFIGS, key=["B", "T_KEY", "NB_KEY", "IEEE"],
                            reset_to_zero=["out_ptr"])


def sddmm_bsr(
    grad_out: torch.Tensor,
    x: torch.Tensor,
    pattern: BlockPattern,
    shape: tuple[int, int],
    *,
    nnz=None,
    split=None,
    block_t=None,
) -> torch.Tensor:
    """fp32 ``(grad_outᵀ @ x)`` on a block support (``pattern``), in row-major value order.

    ``nnz`` is the support's size (pass it: reading it from the device would stall the GPU on every call).
    ``split`` / ``block_t`` fix the token split and tile; by default they are autotuned on CUDA (one split
    under ``torch.use_deterministic_algorithms(True)``, whose runs must not depend on atomics' order).
    """
    b = pattern.block_size
    k = int(pattern.crow[-1]) if nnz is None else nnz
    blocks, tokens = pattern.rows.numel(), grad_out.shape[0]
    if k == 0 or tokens == 0:
        return torch.zeros(k, dtype=torch.float32, device=grad_out.device)
    out = torch.zeros(k, dtype=torch.float32, device=grad_out.device)
    args = (
        grad_out, x, out, pattern.rows, pattern.cols, pattern.row_ptr, pattern.crow,
        tokens, shape[0], shape[1], pow2_bucket(tokens), pow2_bucket(blocks),
        grad_out.stride(0), grad_out.stride(1), x.stride(0), x.stride(1),
    )
    flags = dict(B=b, UPCAST=dot_upcast(x.dtype), IEEE=x.dtype == torch.float32)
    tuned = _sddmm_bsr_tuned is not None and not interpreting() and x.is_cuda
    if split is None and block_t is None and tuned and not torch.are_deterministic_algorithms_enabled():
        _sddmm_bsr_tuned[lambda meta: (blocks, meta["SPLIT"])](*args, **flags)
        return out
    block_t = block_t or (64 if b <= 64 else 32)
    if split is None:
        split = 1 if torch.are_deterministic_algorithms_enabled() else num_programs_target(x.device) // blocks
    split = max(1, min(int(split), cdiv(tokens, block_t)))
    _sddmm_bsr_kernel[(blocks, split)](
        *args, **flags, BLOCK_T=block_t, SPLIT=split, num_warps=4 if b <= 32 else 8, num_stages=3,
    )
    return out


# ----------------------------------------------------------------------------------------- dispatch


def sddmm(grad_out: torch.Tensor, x: torch.Tensor, layout: SparseLayout) -> torch.Tensor:
    """fp32 values' gradient on ``layout``'s support: the block kernel where the support allows."""
    if uses_block_kernels(layout):
        return sddmm_bsr(grad_out, x, layout.blocks, layout.shape, nnz=layout.nnz)
    return sddmm_csr(grad_out, x, layout.indices, layout.shape[1])
